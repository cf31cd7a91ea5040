"""What a finished trial leaves for optuna-dashboard: its curves as an artifact and a note.

The trial page of optuna-dashboard then shows the loss, accuracy and learning-rate curves
(``curves-trialN.png``) and a short Markdown note of the parameters and the result. Both are
plain Optuna artifacts and optuna-dashboard notes, so the dashboard reads them unchanged.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import optuna
from optuna.artifacts import upload_artifact

from tlopt.plots import curves_figure
from tlopt.tune.resilience import retrying

if TYPE_CHECKING:
    from tlopt.train.trainer import EpochRecord, TrainParams
    from tlopt.tune.context import StudyContext

log = logging.getLogger("tlopt.worker")


def note_markdown(trial_number: int, params: TrainParams, history: Sequence[EpochRecord]) -> str:
    """A short Markdown note: the result, then the training parameters as a table."""
    best = min(history, key=lambda r: _finite(r.val_loss))
    seconds = sum(r.seconds for r in history)
    lines = [
        f"### Trial {trial_number}",
        "",
        f"Best validation loss **{best.val_loss:.4f}** at epoch {best.epoch} of "
        f"{len(history)}, validation accuracy **{100 * best.val_accuracy:.2f} %** "
        f"(train {100 * best.train_accuracy:.2f} %); {seconds:.1f} s of training.",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    for key, value in _params_rows(params):
        lines.append(f"| {key} | {value} |")
    lines += ["", f"Curves: artifact `curves-trial{trial_number}.png`."]
    return "\n".join(lines)


def write_trial_artifacts(
    trial: optuna.Trial,
    ctx: StudyContext,
    history: Sequence[EpochRecord],
    params: TrainParams,
) -> None:
    """Upload the trial's curves PNG and save its note; never fails the trial (logs instead)."""
    if not history:
        return
    try:
        rows = [r.as_dict() for r in history]
        fig = curves_figure(rows, f"{ctx.study_name}: trial {trial.number}")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"curves-trial{trial.number}.png"
            fig.savefig(path)
            plt.close(fig)
            retrying(
                "saving the curves",
                lambda: upload_artifact(
                    artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
                ),
            )
        from optuna_dashboard import save_note

        body = note_markdown(trial.number, params, history)
        retrying("saving the note", lambda: save_note(trial, body))
    except Exception as exc:  # the curves are a convenience: the trial's result stands
        plt.close("all")
        log.warning(
            "trial %d: curves or note not saved (%s: %s)", trial.number, type(exc).__name__, exc
        )


def _params_rows(params: TrainParams) -> list[tuple[str, str]]:
    rows = [
        ("batch size", str(params.batch_size)),
        ("epochs", str(params.epochs)),
        ("learning rate", f"{params.lr:g}"),
        ("decay", params.decay),
    ]
    rows += [(f"{params.decay}.{k}", f"{v:g}") for k, v in sorted(params.decay_params.items())]
    rows += [("optimizer", params.optimizer), ("weight decay", f"{params.weight_decay:g}")]
    if params.optimizer == "sgd":
        rows.append(("momentum", f"{params.momentum:g}"))
    return rows


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan
