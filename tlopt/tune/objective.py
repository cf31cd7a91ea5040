"""The objective: one trial is one run of the trainer, reported to the pruner every epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import download_artifact, upload_artifact
from safetensors.torch import save_file
from torch import nn

from tlopt.models.backbones import classifier_name
from tlopt.report.trial_artifacts import write_trial_artifacts
from tlopt.train.trainer import EpochRecord, FitResult, NonFiniteLoss, TrainParams, fit
from tlopt.tune.context import ATTR, StudyContext
from tlopt.tune.resilience import retrying
from tlopt.tune.space import suggest

log = logging.getLogger("tlopt.worker")


CHECKPOINT = ATTR + "checkpoint"


def train_trial(
    trial: optuna.trial.BaseTrial, ctx: StudyContext, report: bool = True
) -> tuple[TrainParams, float, FitResult, nn.Module]:
    """Suggest, build and train; the shared path of tuning and export. Returns the model too.

    Fine-tuning trials save a checkpoint artifact after every epoch; a trial re-queued after
    its worker died inherits the attribute and resumes from that epoch.
    """
    setup = suggest(trial, ctx.space, ctx.stage.name)
    params, dropout = setup.params, setup.dropout
    model = ctx.build_model(dropout, setup.cut)
    live = isinstance(trial, optuna.Trial)
    checkpoints = live and report and ctx.stage.name != "head" and ctx.config.storage.checkpoint
    resume = _load_checkpoint(trial, ctx) if checkpoints else None
    history: list[EpochRecord] = [EpochRecord(**r) for r in resume["history"]] if resume else []
    if resume:
        log.info("trial %s resumes after epoch %d", trial.number, len(history))  # type: ignore[attr-defined]

    def on_epoch(record: EpochRecord, checkpoint: Callable[[], dict[str, Any]]) -> None:
        history.append(record)
        log.info(
            "trial %s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  lr %.2e  %.1fs",
            getattr(trial, "number", "-"),
            record.epoch,
            params.epochs,
            record.train_loss,
            record.val_loss,
            record.val_accuracy,
            record.lr,
            record.seconds,
        )
        if not report:
            return
        retrying("reporting an epoch", lambda: trial.report(record.val_loss, record.epoch))
        if retrying("asking the pruner", trial.should_prune):
            _set_history(trial, history)
            reason = f"{ctx.config.pruner.type} pruner at epoch {record.epoch}"
            retrying(
                "recording a prune", lambda: trial.set_user_attr(ATTR + "prune_reason", reason)
            )
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")
        if checkpoints and record.epoch < params.epochs:
            assert isinstance(trial, optuna.Trial)
            state = checkpoint()
            retrying("saving a checkpoint", lambda: _save_checkpoint(trial, ctx, state))

    try:
        result = fit(
            model,
            ctx.split("train"),
            ctx.split("val"),
            params,
            seed=ctx.config.seed,
            on_epoch=on_epoch,
            cache=ctx.prefix_cache,
            resume=resume,
            should_stop=ctx.should_stop,
        )
    except NonFiniteLoss as exc:
        _set_history(trial, history)
        trial.set_user_attr(ATTR + "prune_reason", str(exc))
        _drop_checkpoint(trial, ctx)
        raise optuna.TrialPruned(str(exc)) from None
    except optuna.TrialPruned:
        _drop_checkpoint(trial, ctx)
        raise
    if checkpoints:
        _drop_checkpoint(trial, ctx)
    return params, dropout, result, model


def _save_checkpoint(trial: optuna.Trial, ctx: StudyContext, state: dict) -> None:
    old = trial.user_attrs.get(CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"checkpoint-trial{trial.number}.pt"  # type: ignore[attr-defined]
        torch.save(state, path)
        new = upload_artifact(
            artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
        )  # type: ignore[arg-type]
    trial.set_user_attr(CHECKPOINT, new)
    if old:
        _remove(ctx, old)


def _load_checkpoint(trial: optuna.trial.BaseTrial, ctx: StudyContext) -> dict[str, Any] | None:
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
                trial.number,
                type(exc).__name__,
            )  # type: ignore[attr-defined]
            return None
        # weights_only: a checkpoint is tensors and plain numbers, never arbitrary pickles.
        state: dict[str, Any] = torch.load(path, map_location=ctx.device, weights_only=True)
        return state


def _drop_checkpoint(trial: optuna.trial.BaseTrial, ctx: StudyContext) -> None:
    artifact = trial.user_attrs.get(CHECKPOINT) if isinstance(trial, optuna.Trial) else None
    if artifact:
        _remove(ctx, artifact)
        trial.set_user_attr(CHECKPOINT, None)


def _remove(ctx: StudyContext, artifact_id: str) -> None:
    # Already gone (another worker cleaned it up): nothing left to keep.
    with contextlib.suppress(Exception):
        ctx.artifacts.remove(artifact_id)


def objective(trial: optuna.Trial, ctx: StudyContext) -> float:
    """Train one trial and return its best validation loss."""
    began = time.perf_counter()
    params, dropout, result, model = train_trial(trial, ctx)
    _set_history(trial, list(result.history))
    attrs = {
        ATTR + "train_params": {**dataclasses.asdict(params), "dropout": dropout},
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds": round(time.perf_counter() - began, 3),
    }
    for key, value in attrs.items():
        retrying("saving the results", functools.partial(trial.set_user_attr, key, value))
    if ctx.stage.name == "head":
        # The fine-tuning stages start from the best head: keep every head's weights.
        head = model.get_submodule(classifier_name(model))
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"head-trial{trial.number}.safetensors"
            save_file(state, str(path))
            artifact_id = retrying(
                "saving the head",
                lambda: upload_artifact(
                    artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
                ),
            )
        retrying(
            "saving the head", lambda: trial.set_user_attr(ATTR + "head_artifact", artifact_id)
        )
    write_trial_artifacts(trial, ctx, result.history, params)
    return result.best_val_loss


def _set_history(trial: optuna.trial.BaseTrial, history: list[EpochRecord]) -> None:
    retrying(
        "saving the history",
        lambda: trial.set_user_attr(
            "history", [{k: round(v, 6) for k, v in r.as_dict().items()} for r in history]
        ),
    )
