"""``tlopt report``: one HTML page (and its PNGs) over one or more stage studies.

The page covers, per study: validation curves grouped by batch size, epochs and decay type;
Optuna's parameter importances and slice plot; the optimization history with pruned trials
marked; the train/validation gap of the best trials; wall time per setting. Over several
studies it compares the stages' best accuracy and cost, and with an ``export-best`` folder it
adds the confusion matrix and the per-class report.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure

from tlopt.errors import TloptError
from tlopt.report import figures
from tlopt.report import html as h
from tlopt.report.collect import SETTINGS, StudyView, collect
from tlopt.tune.study import load

log = logging.getLogger("tlopt.report")
PAGE = "report.html"


class _Figures:
    """Draws figures into ``out`` as PNGs and returns their markup (or why they are missing)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: list[Path] = []

    def __call__(self, name: str, draw: Callable[[], Figure], caption: str) -> str:
        with figures.style(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fig = draw()
            except figures.Unavailable as exc:
                return h.missing(str(exc))
            except Exception as exc:  # one broken figure must not cost the whole report
                log.warning("figure %s failed: %s: %s", name, type(exc).__name__, exc)
                plt.close("all")
                return h.missing(f"This figure could not be drawn ({type(exc).__name__}: {exc}).")
            buffer = BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
            plt.close(fig)
        png = buffer.getvalue()
        path = self.out / f"{name}.png"
        path.write_bytes(png)
        self.written.append(path)
        return h.image(name, png, " ".join([caption, *_caveats(caught)]))


def _caveats(caught: list[warnings.WarningMessage]) -> list[str]:
    """What the drawing warned about, for the caption rather than the terminal.

    Dropped: Optuna's notes that a plotting function is experimental, and matplotlib widening
    the axis of a parameter that took one value (the slice plot of a fixed setting).
    """
    notes = []
    for w in caught:
        text = str(w.message).strip()
        experimental = issubclass(w.category, optuna.exceptions.ExperimentalWarning)
        if experimental or text.startswith("Attempting to set identical") or text in notes:
            continue
        notes.append(text)
    return [f"Note: {text}" for text in notes]


def write_report(
    study_names: Sequence[str],
    out: Path,
    storage_url: str | None = None,
    export: Path | None = None,
    size_probe: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/report.html`` and its PNGs for ``study_names``; returns the page's path.

    ``size_probe``: ``tlopt tune``'s image size probe, ``{"chosen": px, "rows": [...]}``.

    Example:
        >>> write_report(["flowers/head", "flowers/freeze1"], Path("runs/report"))  # doctest: +SKIP
    """
    if not study_names:
        raise TloptError("tlopt report needs at least one --study NAME")
    views = [collect(load(name, storage_url)) for name in study_names]
    exported = _read_export(export) if export else None
    out.mkdir(parents=True, exist_ok=True)
    draw = _Figures(out)
    slugs = _slugs([v.name for v in views])
    contents = [("stages", "Stages compared")]
    parts = [_stages_section(views, draw, out)]
    for view, slug in zip(views, slugs, strict=True):
        contents.append((slug, f"Study {view.name}"))
        parts.append(_study_section(view, slug, draw))
    if size_probe:
        contents.append(("size-probe", "Image size"))
        parts.append(_probe_section(size_probe["rows"], size_probe["chosen"]))
    if exported is not None:
        contents.append(("export", "Exported model"))
        parts.append(_export_section(exported, out))
    names = ", ".join(v.name for v in views)
    intro = (
        f"Studies {h.esc(names)}. Every figure is also a PNG beside this page. Losses are "
        "cross-entropy in nats (lower is better); the objective of a trial is its best "
        "validation loss over its epochs. Dashed lines and crosses are pruned trials."
    )
    page = out / PAGE
    page.write_text(h.page("tlopt report", intro, contents, "".join(parts)), encoding="utf-8")
    return page


def _probe_section(rows: list[dict[str, Any]], chosen: int) -> str:
    """The size probe's table: a linear probe on the frozen features at each size."""
    text = (
        "tlopt tune chose the image size with a linear probe (logistic regression) on the "
        "frozen backbone's pooled features at each size, scored on the validation split: "
        f"the lowest validation log loss, a larger size only when 2% lower. Chosen: {chosen} px."
    )
    cells = [
        (f"{r['size']} px", round(r["loss"], 4), f"{r['correct']}/{r['val']}", r["c"],
         round(r["seconds"], 1), "chosen" if r["size"] == chosen else "")
        for r in rows
    ]  # fmt: skip
    columns = ["size", "val log loss", "correct", "C", "seconds", ""]
    return h.section("size-probe", "Image size", f"<p>{h.esc(text)}</p>" + h.table(columns, cells))


def stage_rows(views: Sequence[StudyView]) -> list[dict[str, Any]]:
    """One row per study: trials by state, the best trial's loss, accuracy and setting, cost."""
    rows = []
    for v in views:
        best = v.best
        finished = len(v.trials)
        rows.append(
            {
                "study": v.name,
                "stage": v.stage,
                "complete": len(v.complete),
                "pruned": len(v.pruned),
                "failed": v.failed,
                "best_trial": best.number if best else None,
                "best_val_loss": best.value if best else None,
                "best_val_accuracy": best.val_accuracy if best else None,
                "best_setting": _setting_text(best.setting) if best else "",
                "wall_seconds": round(v.wall_seconds, 3),
                "seconds_per_trial": round(v.wall_seconds / finished, 3) if finished else None,
            }
        )
    return rows


def _stages_section(views: Sequence[StudyView], draw: _Figures, out: Path) -> str:
    rows = stage_rows(views)
    with open(out / "stages.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = [
        "study",
        "stage",
        "complete",
        "pruned",
        "failed",
        "best trial",
        "best val loss",
        "best val accuracy",
        "best setting",
        "wall time",
        "per finished trial",
    ]
    cells = [
        [
            r["study"],
            r["stage"],
            r["complete"],
            r["pruned"],
            r["failed"],
            _fmt(r["best_trial"], "{}"),
            _fmt(r["best_val_loss"], "{:.4f}"),
            _fmt(r["best_val_accuracy"], "{:.2%}"),
            r["best_setting"] or "-",
            _duration(r["wall_seconds"]),
            _fmt(r["seconds_per_trial"], "{:.1f} s"),
        ]
        for r in rows
    ]
    body = (
        "<p>The best trial of a study is its complete trial with the lowest validation loss "
        "(Optuna's best trial); its accuracy is the validation accuracy at that epoch. Wall "
        "time adds up every finished trial, so it is the compute the study cost. Also in "
        "<code>stages.csv</code>.</p>"
        + h.table(columns, cells, [r["study"] for r in rows])
        + draw(
            "stages",
            lambda: figures.stage_comparison(views),
            "Best validation accuracy and wall time per stage",
        )
    )
    return h.section("stages", "Stages compared", body)


def _study_section(view: StudyView, slug: str, draw: _Figures) -> str:
    best = view.best
    summary = (
        f"Stage <b>{h.esc(view.stage)}</b>: {len(view.complete)} complete, "
        f"{len(view.pruned)} pruned, {view.failed} failed trials, "
        f"{_duration(view.wall_seconds)} of wall time."
    )
    if best is not None:
        summary += (
            f" Best: trial {best.number} ({h.esc(_setting_text(best.setting))}), validation "
            f"loss {best.value:.4f}, accuracy {_fmt(best.val_accuracy, '{:.2%}')}."
        )
    if view.fixed:
        summary += f" Fixed by the study: {h.esc(_setting_text(view.fixed))}."
    curves = "".join(
        draw(
            f"{slug}-curves-{key}",
            lambda key=key: figures.curves_by(view, key),  # type: ignore[misc]
            f"{view.name}: validation loss and accuracy per epoch, by {label}",
        )
        for key, label in SETTINGS.items()
    )
    parts = [
        (
            "curves",
            "Validation curves by batch size, epochs and decay type",
            "<p>Each line is one trial; a decay type has the same colour in every figure.</p>"
            + curves,
        ),
        (
            "params",
            "Effect of each parameter",
            draw(
                f"{slug}-importance",
                lambda: figures.importances(view),
                f"{view.name}: Optuna's parameter importances",
            )
            + draw(
                f"{slug}-slice",
                lambda: figures.slices(view),
                f"{view.name}: Optuna's slice plot",
            ),
        ),
        (
            "history",
            "Optimization history",
            draw(
                f"{slug}-history",
                lambda: figures.history(view),
                f"{view.name}: objective per trial, best so far, pruned trials marked",
            ),
        ),
        (
            "overfitting",
            "Overfitting: train/validation gap of the best trials",
            draw(
                f"{slug}-overfitting",
                lambda: figures.overfitting(view),
                f"{view.name}: train/validation gap of the best trials",
            ),
        ),
        (
            "walltime",
            "Wall time per setting",
            draw(
                f"{slug}-walltime",
                lambda: figures.wall_time(view),
                f"{view.name}: wall time per trial by setting",
            ),
        ),
    ]
    body = f"<p>{summary}</p>" + "".join(
        h.section(f"{slug}-{sid}", title, inner, level=3) for sid, title, inner in parts
    )
    return h.section(slug, f"Study {view.name}", body)


def _read_export(folder: Path) -> dict[str, Any]:
    metrics_path = folder / "metrics.json"
    confusion = folder / "confusion_matrix.png"
    if not metrics_path.is_file() or not confusion.is_file():
        raise TloptError(
            f"'{folder}' is not a folder written by 'tlopt export-best' (it needs metrics.json "
            "and confusion_matrix.png): pass the --out folder of 'tlopt export-best'"
        )
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {
        "metrics": json.loads(metrics_path.read_text()),
        "manifest": manifest,
        "confusion": confusion.read_bytes(),
        "folder": folder,
    }


def _export_section(exported: dict[str, Any], out: Path) -> str:
    metrics, manifest = exported["metrics"], exported["manifest"]
    (out / "export-confusion_matrix.png").write_bytes(exported["confusion"])
    origin = (
        f"trial {manifest['trial']} of {manifest['study']}, retrained"
        if manifest.get("study")
        else str(exported["folder"])
    )
    split = metrics.get("split", "evaluation")
    summary = (
        f"<p>The model exported from {h.esc(origin)} (folder <code>"
        f"{h.esc(exported['folder'])}</code>): accuracy <b>{metrics['accuracy']:.2%}</b> on "
        f"{metrics['count']} images of the {h.esc(split)} split; macro F1 "
        f"{metrics['f1_macro']:.4f}, weighted F1 {metrics['f1_weighted']:.4f}.</p>"
    )
    per_class = [
        [name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
        for name, r in metrics["per_class"].items()
    ]
    body = (
        summary
        + h.image(
            "export-confusion_matrix",
            exported["confusion"],
            f"Confusion matrix on the {split} split (rows: true class, columns: predicted)",
        )
        + "<h3>Per-class report</h3>"
        + h.table(["class", "precision", "recall", "F1", "support"], per_class)
    )
    return h.section("export", "Exported model", body)


def _setting_text(setting: dict[str, Any]) -> str:
    return ", ".join(f"{SETTINGS.get(k, k)} {v}" for k, v in setting.items() if v is not None)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _slugs(names: Sequence[str]) -> list[str]:
    """Anchors and file-name prefixes: 'flowers/head' -> 'flowers-head', unique."""
    slugs: list[str] = []
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "study"
        while slug in slugs or slug in ("stages", "export"):
            slug += "-2"
        slugs.append(slug)
    return slugs
