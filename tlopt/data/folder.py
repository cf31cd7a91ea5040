"""Image folders: the class folders (and split folders) of a user's folder, scanned and read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlopt.data.images import bomb_guard, decode_rgb, is_image_file, read_bytes
from tlopt.data.records import Contents, Record
from tlopt.data.split import assign_splits
from tlopt.errors import BadImage, DataError
from tlopt.once import log_once

_VAL_DIR_NAMES = ("val", "valid", "validation")
log = logging.getLogger("tlopt.data")


@dataclass(frozen=True)
class _Found:
    """An image file found in a class folder, before it is read."""

    path: Path
    key: str
    class_name: str
    split: str | None  # None: tlopt assigns the split


@dataclass(frozen=True)
class _Read:
    """What reading a good file tells: its content hash, decoded size and stored mode."""

    digest: str
    size: tuple[int, int]
    mode: str


@dataclass
class _Layout:
    """The image files of a folder, the class folders of each split, and the files ignored."""

    found: list[_Found] = field(default_factory=list)
    classes: dict[str | None, list[str]] = field(default_factory=dict)
    ignored: int = 0


def read_folder(
    root: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_bad_fraction: float,
    held_out: Mapping[str, str] | None = None,
    verified: Path | None = None,
) -> Contents:
    """An image folder: ``root/<class>/...`` or ``root/train/<class>/...`` plus val (and test).

    Every image file is hashed and decoded once (that is how corrupt ones are found);
    unreadable files are skipped with a reason, unless they are more than ``max_bad_fraction``.
    With ``verified`` (a folder), the digests of the files decoded without error are kept there
    (:class:`VerifiedImages`), and a file whose bytes hash to a kept digest is not decoded
    again: a worker's check of the data costs a hash per file, not a decode.
    """
    if not root.exists():
        raise DataError(
            f"data folder '{root}' does not exist: check data.path in the study file or pass an "
            "existing folder"
        )
    if not root.is_dir():
        raise DataError(f"data path '{root}' is a file, not a folder: pass the folder of classes")
    layout = _find_images(root)
    reads = _read_all([f.path for f in layout.found], VerifiedImages(verified))
    good = [(f, r) for f, r in zip(layout.found, reads, strict=True) if isinstance(r, _Read)]
    bad = [(f, r) for f, r in zip(layout.found, reads, strict=True) if isinstance(r, BadImage)]
    classes = _check_classes(root, layout, good, bad)
    _check_bad_fraction(root, len(bad), len(layout.found), max_bad_fraction)
    records = _folder_records(good, classes, val_fraction, test_fraction, seed, held_out)
    _say_twins(root, records)
    skipped = [(f.key, r.reason) for f, r in bad]
    return Contents(root, classes, records, skipped=skipped, ignored=layout.ignored)


def _find_images(root: Path) -> _Layout:
    """Image files by class and split, read from the folder layout."""
    names = {p.name for p in _visible_dirs(root)}
    val_dirs = [name for name in _VAL_DIR_NAMES if name in names]
    if len(val_dirs) > 1:
        both = " and ".join(repr(v) for v in val_dirs)
        raise DataError(f"data folder '{root}' has both {both}: keep one validation folder")
    if "train" not in names and (val_dirs or "test" in names):
        present = val_dirs[0] if val_dirs else "test"
        raise DataError(
            f"data folder '{root}' has '{present}' but no 'train' folder: add "
            f"'{root / 'train'}/<class>/' or put the class folders directly in '{root}'"
        )
    if "train" not in names:
        layout = _Layout()
        _scan_split(layout, root, root, None)
        _require_two_classes(root, layout.classes[None])
        return layout
    plan = [("train", "train"), *((v, "val") for v in val_dirs)]
    plan += [("test", "test")] if "test" in names else []
    layout = _Layout(ignored=_count_loose_files(root))
    for folder, split in plan:
        _scan_split(layout, root, root / folder, split)
    _require_two_classes(root / "train", layout.classes["train"])
    return layout


def _scan_split(layout: _Layout, root: Path, folder: Path, split: str | None) -> None:
    """Add the image files under ``folder/<class>/`` (any depth) to ``layout``."""
    class_dirs = _visible_dirs(folder)
    layout.classes[split] = [p.name for p in class_dirs]
    layout.ignored += _count_loose_files(folder)
    for class_dir in class_dirs:
        for path in _walk_files(class_dir):
            if _is_hidden(path.name) or not is_image_file(path):
                layout.ignored += 1
                continue
            key = path.relative_to(root).as_posix()
            layout.found.append(_Found(path, key, class_dir.name, split))


def _require_two_classes(folder: Path, classes: Sequence[str]) -> None:
    if not classes:
        loose = sum(1 for p in folder.iterdir() if p.is_file() and is_image_file(p))
        hint = f" (found {loose} image file(s) directly in it)" if loose else ""
        raise DataError(
            f"no class folders in '{folder}'{hint}: put each class's images in its own "
            f"sub-folder, like '{folder / '<class>' / 'image.jpg'}'"
        )
    if len(classes) == 1:
        raise DataError(
            f"found only one class '{classes[0]}' in '{folder}': an image classifier needs at "
            "least two class folders"
        )


def _is_hidden(name: str) -> bool:
    """Hidden entries and macOS archive debris are never classes or images."""
    return name.startswith(".") or name == "__MACOSX"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _count_loose_files(folder: Path) -> int:
    """Files lying next to the class (or split) folders: in no class, so ignored."""
    return sum(1 for p in folder.iterdir() if not p.is_dir())


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, skipping hidden folders.

    Symlinked folders are not entered (``followlinks=False``), which rules out symlink loops;
    symlinked files are listed and followed when read.
    """
    files: list[Path] = []
    for current, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        files += (Path(current) / name for name in sorted(filenames))
    return files


class VerifiedImages:
    """The image contents this machine has decoded without error: digest -> (size, mode).

    One JSON file in ``folder`` (the decoded-image cache), shared by every worker and study
    here; keyed by the SHA-256 of the bytes, so a changed file is decoded again. Writers
    replace the file whole (``os.replace``): two that race lose entries, which only costs a
    decode later. ``folder=None`` keeps nothing.
    """

    NAME = "verified-images-v1.json"

    def __init__(self, folder: Path | None):
        self.path = Path(folder) / self.NAME if folder is not None else None
        self.known = self._load()
        self.added: dict[str, list[Any]] = {}

    def _load(self) -> dict[str, list[Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):  # unreadable or half-written: start again
            return {}
        return known if isinstance(known, dict) else {}

    def get(self, digest: str) -> _Read | None:
        entry = self.known.get(digest)
        if not (isinstance(entry, list) and len(entry) == 3):
            return None
        width, height, mode = entry
        return _Read(digest, (int(width), int(height)), str(mode))

    def add(self, read: _Read) -> None:
        self.added[read.digest] = [read.size[0], read.size[1], read.mode]

    def save(self) -> None:
        if self.path is None or not self.added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._load(), **self.added}
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, prefix=".verified-", delete=False
            ) as out:
                json.dump(merged, out, separators=(",", ":"))
            os.replace(out.name, self.path)
        except OSError as exc:  # a read-only cache costs decodes, not the run
            log.warning("could not keep the verified images in %s: %s", self.path, exc)


def _read_one(path: Path, verified: VerifiedImages) -> _Read | BadImage:
    """Read a file once: hash its bytes and decode those same bytes (unless verified)."""
    try:
        data = read_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        known = verified.get(digest)
        if known is not None:
            return known
        img, mode = decode_rgb(data, str(path))
    except BadImage as exc:
        return exc
    return _Read(digest, img.size, mode)


def _read_all(paths: Sequence[Path], verified: VerifiedImages) -> list[_Read | BadImage]:
    """Read and verify files on a thread pool (Pillow's decoders and hashlib release the GIL)."""
    with bomb_guard(), ThreadPoolExecutor() as pool:
        reads = list(pool.map(lambda p: _read_one(p, verified), paths))
    for read in reads:
        if isinstance(read, _Read):
            verified.add(read)
    verified.save()
    return reads


def _check_classes(
    root: Path,
    layout: _Layout,
    good: Sequence[tuple[_Found, _Read]],
    bad: Sequence[tuple[_Found, BadImage]],
) -> list[str]:
    """The sorted class list, after checking the splits agree and every class has an image."""
    reference = layout.classes["train"] if "train" in layout.classes else layout.classes[None]
    for other in ("val", "test"):
        if other in layout.classes and set(layout.classes[other]) != set(reference):
            raise DataError(_mismatch_message(root, other, reference, layout.classes[other]))
    readable = {(f.split, f.class_name) for f, _ in good}
    for split, names in layout.classes.items():
        for name in names:
            if (split, name) not in readable:
                raise DataError(_empty_class_message(root, split, name, bad))
    return sorted(reference)


def _mismatch_message(root: Path, split: str, train: Sequence[str], other: Sequence[str]) -> str:
    only_train = ", ".join(repr(c) for c in sorted(set(train) - set(other))) or "none"
    only_other = ", ".join(repr(c) for c in sorted(set(other) - set(train))) or "none"
    return (
        f"train and {split} folders in '{root}' have different classes (only in train: "
        f"{only_train}; only in {split}: {only_other}): give both the same class folders"
    )


def _empty_class_message(
    root: Path, split: str | None, name: str, bad: Sequence[tuple[_Found, BadImage]]
) -> str:
    unreadable = [
        f"{f.key}: {r.reason}" for f, r in bad if (f.split, f.class_name) == (split, name)
    ]
    why = f" ({len(unreadable)} unreadable, e.g. {unreadable[0]})" if unreadable else ""
    where = f"'{root}'" if split is None else f"the {split} split of '{root}'"
    return (
        f"class '{name}' in {where} has no readable image{why}: add images to it or remove "
        "the folder"
    )


def _check_bad_fraction(root: Path, n_bad: int, n_total: int, limit: float) -> None:
    if n_total and n_bad / n_total > limit:
        raise DataError(
            f"{n_bad} of {n_total} image files in '{root}' are unreadable "
            f"({n_bad / n_total:.0%}, above max_bad_fraction {limit:g}): run 'tlopt data check "
            f"{root}' to list them, then fix or remove them (or raise data.max_bad_fraction)"
        )


def _folder_records(
    good: Sequence[tuple[_Found, _Read]],
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    held_out: Mapping[str, str] | None,
) -> list[Record]:
    """Records with their final split: from the layout, or carved per class by tlopt.

    A folder of class folders is split into train, val and test. A ``train/`` folder without a
    validation folder only has val carved out of it; its own ``test/`` (if any) is the test.
    """
    label_of = {name: label for label, name in enumerate(classes)}
    pre_split = any(f.split is not None for f, _ in good)
    has_val = any(f.split == "val" for f, _ in good)
    carve: dict[str, list[str]] = defaultdict(list)
    for f, _ in good:
        if f.split is None or (f.split == "train" and not has_val):
            carve[f.class_name].append(f.key)
    test = 0.0 if pre_split else test_fraction
    content_of = {f.key: r.digest for f, r in good}
    split_of = assign_splits(carve, val_fraction, test, seed, held_out, content_of)
    return [
        Record(
            f.key,
            label_of[f.class_name],
            split_of.get(f.key, f.split or "train"),
            r.digest,
            r.size,
            r.mode,
        )
        for f, r in good
    ]


def _say_twins(root: Path, records: Sequence[Record]) -> None:
    """Say how many files are byte-identical copies and which split each picture went to.

    Real folders hold them (80 of 1,577 photos in one); tlopt's own split keeps each picture
    in one split (``assign_splits``), a folder's own train/val/test folders may not.
    """
    splits_of: dict[str, list[str]] = defaultdict(list)
    for record in records:
        splits_of[record.digest].append(record.split)
    twins = {d: splits for d, splits in splits_of.items() if len(splits) > 1}
    if not twins:
        return
    kept = Counter(splits[0] for splits in twins.values() if len(set(splits)) == 1)
    across = len(twins) - sum(kept.values())
    where = ", ".join(f"{split} {kept[split]}" for split in ("train", "val", "test") if kept[split])
    log_once(  # the run opens the folder several times (plan, checks, workers)
        log,
        logging.INFO,
        "%d files in '%s' are byte-identical copies of %d pictures: %d kept in one split (%s)%s",
        sum(len(s) for s in twins.values()),
        root,
        len(twins),
        sum(kept.values()),
        where or "none",
        f"; {across} in more than one (the folder's own split folders)" if across else "",
    )
