"""The objective: one trial is one run of the trainer, reported to the pruner every epoch."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import optuna
from optuna.artifacts import upload_artifact
from safetensors.torch import save_file
from torch import nn

from tlopt.models.backbones import classifier_name
from tlopt.train.trainer import EpochRecord, FitResult, NonFiniteLoss, TrainParams, fit
from tlopt.tune.context import ATTR, StudyContext
from tlopt.tune.space import suggest

log = logging.getLogger("tlopt.worker")


def train_trial(
    trial: optuna.trial.BaseTrial, ctx: StudyContext, report: bool = True
) -> tuple[TrainParams, float, FitResult, nn.Module]:
    """Suggest, build and train; the shared path of tuning and export. Returns the model too."""
    params, dropout = suggest(trial, ctx.space, ctx.stage.name)
    model = ctx.build_model(dropout)
    history: list[EpochRecord] = []

    def on_epoch(record: EpochRecord, _checkpoint: object) -> None:
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
        trial.report(record.val_loss, record.epoch)
        if trial.should_prune():
            _set_history(trial, history)
            trial.set_user_attr(ATTR + "prune_reason", f"median pruner at epoch {record.epoch}")
            raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")

    try:
        result = fit(
            model,
            ctx.split("train"),
            ctx.split("val"),
            params,
            seed=ctx.config.seed,
            on_epoch=on_epoch,
            cache=ctx.prefix_cache,
        )
    except NonFiniteLoss as exc:
        _set_history(trial, history)
        trial.set_user_attr(ATTR + "prune_reason", str(exc))
        raise optuna.TrialPruned(str(exc)) from None
    return params, dropout, result, model


def objective(trial: optuna.Trial, ctx: StudyContext) -> float:
    """Train one trial and return its best validation loss."""
    began = time.perf_counter()
    params, dropout, result, model = train_trial(trial, ctx)
    _set_history(trial, [r for r in result.history])
    trial.set_user_attr(ATTR + "train_params", {**dataclasses.asdict(params), "dropout": dropout})
    trial.set_user_attr("val_accuracy", result.best_val_accuracy)
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr("epochs_run", len(result.history))
    trial.set_user_attr("seconds", round(time.perf_counter() - began, 3))
    if ctx.stage.name == "head":
        # The fine-tuning stages start from the best head: keep every head's weights.
        head = model.get_submodule(classifier_name(model))
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"head-trial{trial.number}.safetensors"
            save_file(state, str(path))
            artifact_id = upload_artifact(
                artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
            )
        trial.set_user_attr(ATTR + "head_artifact", artifact_id)
    return result.best_val_loss


def _set_history(trial: optuna.trial.BaseTrial, history: list[EpochRecord]) -> None:
    trial.set_user_attr(
        "history", [{k: round(v, 6) for k, v in r.as_dict().items()} for r in history]
    )
