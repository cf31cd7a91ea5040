"""``tlopt data check``: what a data source holds, and what is wrong with it, as a report."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlopt.data.source import SPLITS, DataWarning, open_source
from tlopt.errors import DataError


@dataclass(frozen=True)
class SizeStats:
    """Width and height of the readable images, in pixels (as decoded, EXIF applied)."""

    min_width: int
    median_width: float
    max_width: int
    min_height: int
    median_height: float
    max_height: int

    @classmethod
    def of(cls, sizes: Sequence[tuple[int, int]]) -> SizeStats | None:
        """Statistics of ``(width, height)`` pairs; ``None`` when there are none."""
        if not sizes:
            return None
        widths = [w for w, _ in sizes]
        heights = [h for _, h in sizes]
        return cls(
            min(widths),
            statistics.median(widths),
            max(widths),
            min(heights),
            statistics.median(heights),
            max(heights),
        )


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_source` found.

    Attributes:
        kind: the source kind.
        root: the folder read, or ``None`` for built-in sets.
        classes: class names, in label order.
        counts: images per split and class.
        sizes: image size statistics, ``None`` if no image is readable.
        skipped: ``(key, reason)`` for every unreadable image file.
        converted: ``(mode, count)`` for images stored in a mode other than RGB.
        duplicates: distinct pictures (same bytes) found in more than one split.
        ignored: non-image and hidden files left out.
        fingerprint: the source's content fingerprint.
        max_bad_fraction: the share of unreadable files that training accepts.
    """

    kind: str
    root: str | None
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    sizes: SizeStats | None
    skipped: tuple[tuple[str, str], ...]
    converted: tuple[tuple[str, int], ...]
    duplicates: int
    ignored: int
    fingerprint: str
    max_bad_fraction: float

    @property
    def bad_fraction(self) -> float:
        """The share of image files that are unreadable."""
        readable = sum(sum(by_class.values()) for by_class in self.counts.values())
        total = readable + len(self.skipped)
        return len(self.skipped) / total if total else 0.0

    @property
    def usable(self) -> bool:
        """Whether training would accept the source (unreadable share within the limit)."""
        return self.bad_fraction <= self.max_bad_fraction


def check_source(
    kind: str,
    path: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_bad_fraction: float = 0.1,
) -> CheckReport:
    """Open a source as training would, and report on it.

    Unlike :func:`~tlopt.data.source.open_source`, too many unreadable files do not raise: the
    point of a check is to list them, so the report says whether the limit is passed
    (:attr:`CheckReport.usable`). Other problems raise the same :class:`DataError`.

    Args:
        kind: ``"folder"``, ``"digits"`` or ``"cifar10"``.
        path: the folder (unused for ``"digits"``).
        val_fraction: as for ``open_source``.
        test_fraction: as for ``open_source``.
        seed: as for ``open_source``.
        max_bad_fraction: the limit the report compares the unreadable share with.

    Returns:
        The :class:`CheckReport`; print it with :func:`format_report`.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction must be in [0, 1] but got {max_bad_fraction}")
    with warnings.catch_warnings():
        # The report lists skipped files and duplicates itself; the warnings would repeat it.
        warnings.simplefilter("ignore", DataWarning)
        source = open_source(
            kind,
            path,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            max_bad_fraction=1.0,
        )
    return CheckReport(
        kind=source.kind,
        root=None if source.root is None else str(source.root),
        classes=source.classes,
        counts=source.counts(),
        sizes=SizeStats.of(source.sizes),
        skipped=source.skipped,
        converted=source.converted,
        duplicates=source.duplicates,
        ignored=source.ignored,
        fingerprint=source.fingerprint,
        max_bad_fraction=max_bad_fraction,
    )


def format_report(report: CheckReport) -> str:
    """The report as plain text: a class table, sizes, then notes and unreadable files.

    Example output::

        folder '/data/flowers': 2 classes, 120 images, fingerprint 3f9a0c1d2e4b5a6f
        class  train  val  test  total
        daisy     36   12    12     60
        rose      36   12    12     60
        total     72   24    24    120
        image size: width 320..500 (median 500), height 240..375 (median 375)
        1 unreadable file skipped:
          rose/0042.jpg: truncated image data
    """
    where = report.kind if report.root is None else f"{report.kind} '{report.root}'"
    total = sum(sum(by_class.values()) for by_class in report.counts.values())
    lines = [
        f"{where}: {len(report.classes)} classes, {total} images, "
        f"fingerprint {report.fingerprint[:16]}",
        *_class_table(report),
        _size_line(report),
        *_notes(report),
    ]
    if report.skipped:
        lines.append(f"{len(report.skipped)} unreadable files skipped:")
        lines += [f"  {key}: {reason}" for key, reason in report.skipped]
    return "\n".join(lines)


def _class_table(report: CheckReport) -> list[str]:
    """Rows of class, count per split present, total; right-aligned numbers."""
    splits = [split for split in SPLITS if split in report.counts]
    rows = [["class", *splits, "total"]]
    for name in report.classes:
        per_split = [report.counts[split][name] for split in splits]
        rows.append([name, *map(str, per_split), str(sum(per_split))])
    totals = [sum(report.counts[split].values()) for split in splits]
    rows.append(["total", *map(str, totals), str(sum(totals))])
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    # The class column is left-aligned; numbers are right-aligned under their split.
    return [
        "  ".join(
            cell.ljust(w) if col == 0 else cell.rjust(w)
            for col, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _size_line(report: CheckReport) -> str:
    s = report.sizes
    if s is None:
        return "image size: no readable image"
    return (
        f"image size: width {s.min_width}..{s.max_width} (median {s.median_width:g}), "
        f"height {s.min_height}..{s.max_height} (median {s.median_height:g})"
    )


def _notes(report: CheckReport) -> list[str]:
    notes = []
    if report.converted:
        modes = ", ".join(f"{mode} {count}" for mode, count in report.converted)
        notes.append(f"converted to RGB: {modes}")
    if report.ignored:
        notes.append(f"ignored (not images, or hidden): {report.ignored} files")
    if report.duplicates:
        notes.append(
            f"same picture in more than one split: {report.duplicates} (scores will be optimistic)"
        )
    if not report.usable:
        notes.append(
            f"too many unreadable files: {report.bad_fraction:.0%} is above max_bad_fraction "
            f"{report.max_bad_fraction:g}, so training refuses this source until they are fixed"
        )
    return notes
