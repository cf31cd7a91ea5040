"""Per-epoch checkpoints of fine-tuning trials, as Optuna artifacts named in a trial attribute.

A trial re-queued after its worker died inherits the attribute (Optuna's
``RetryHeartbeatStaleTrialCallback`` copies user attributes) and resumes from that epoch.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import download_artifact, upload_artifact

from tlopt.names import ATTR
from tlopt.tune.context import StudyContext

log = logging.getLogger("tlopt.worker")
CHECKPOINT = ATTR + "checkpoint"


def save_checkpoint(trial: optuna.Trial, ctx: StudyContext, state: dict[str, Any]) -> None:
    """Upload ``state`` as the trial's checkpoint and remove the one it replaces."""
    old = trial.user_attrs.get(CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"checkpoint-trial{trial.number}.pt"
        torch.save(state, path)
        new = upload_artifact(
            artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
        )
    trial.set_user_attr(CHECKPOINT, new)
    if old:
        _remove(ctx, old)


def load_checkpoint(trial: optuna.trial.BaseTrial, ctx: StudyContext) -> dict[str, Any] | None:
    """The trial's checkpoint, its tensors on the CPU; None if it has none or it is lost."""
    artifact = trial.user_attrs.get(CHECKPOINT)
    if not artifact:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        try:
            download_artifact(
                artifact_store=ctx.artifacts, file_path=str(path), artifact_id=artifact
            )
        except Exception as exc:  # a lost checkpoint costs the epochs, not the trial
            log.warning(
                "checkpoint %s of trial %s is unreadable (%s): starting at epoch 1",
                artifact,
                getattr(trial, "number", "-"),
                type(exc).__name__,
            )
            return None
        # weights_only: a checkpoint is tensors and plain numbers, never arbitrary pickles.
        # Onto the CPU: the RNG states must stay CPU byte tensors, and fit places the rest.
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state


def drop_checkpoint(trial: optuna.trial.BaseTrial, ctx: StudyContext) -> None:
    """Remove the trial's checkpoint (it finished, or was pruned)."""
    artifact = trial.user_attrs.get(CHECKPOINT) if isinstance(trial, optuna.Trial) else None
    if artifact:
        _remove(ctx, artifact)
        trial.set_user_attr(CHECKPOINT, None)


def _remove(ctx: StudyContext, artifact_id: str) -> None:
    # Already gone (another worker cleaned it up): nothing left to keep.
    with contextlib.suppress(Exception):
        ctx.artifacts.remove(artifact_id)
