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
from tlopt.models.split import SplitModel
from tlopt.models.stages import set_train_mode
from tlopt.report.trial_artifacts import write_trial_artifacts
from tlopt.train.heads import HeadTask, fit_heads
from tlopt.train.trainer import (
    EpochRecord,
    FitResult,
    NonFiniteLoss,
    TrainParams,
    _Inputs,
    fit,
)
from tlopt.names import ATTR
from tlopt.tune.context import StudyContext
from tlopt.tune.resilience import retrying
from tlopt.tune.space import TrialSetup, suggest

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
    if can_batch_heads(ctx):
        return _train_head(trial, ctx, setup, report)
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
        if report:
            _report(trial, ctx, record, params.epochs, history)  # type: ignore[arg-type]
        else:
            _log_epoch(trial, record, params.epochs)
        if checkpoints and 0 < record.epoch < params.epochs:
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
            compile=ctx.compile,
            # Fine-tuning starts from the best head: epoch 0 records where it starts.
            record_start=ctx.stage.from_head,
        )
    except NonFiniteLoss as exc:
        _drop_checkpoint(trial, ctx)
        raise _pruned_by(trial, history, exc) from None
    except optuna.TrialPruned:
        _drop_checkpoint(trial, ctx)
        raise
    if checkpoints:
        _drop_checkpoint(trial, ctx)
    return params, dropout, result, model


def _train_head(
    trial: optuna.trial.BaseTrial, ctx: StudyContext, setup: TrialSetup, report: bool
) -> tuple[TrainParams, float, FitResult, nn.Module]:
    """A head trial alone, through the batched head trainer as a batch of one.

    The same computation as a trial trained among others (``head_objectives``): a trial's
    stream does not depend on its batch mates, so export-best retrains a head trial to the
    value it was tuned to, dropout included.
    """
    history: list[EpochRecord] = []

    def on_epoch(_: int, record: EpochRecord) -> None:
        history.append(record)
        if report:
            _report(trial, ctx, record, setup.params.epochs, history)  # type: ignore[arg-type]
        else:
            _log_epoch(trial, record, setup.params.epochs)

    (result,) = _fit_heads(ctx, [setup], on_epoch)
    if isinstance(result, NonFiniteLoss):
        raise _pruned_by(trial, history, result)
    if isinstance(result, BaseException):
        raise result
    model = ctx.build_model(setup.dropout, setup.cut)
    model.get_submodule(classifier_name(model)).load_state_dict(result.best_state)
    return setup.params, setup.dropout, result, model


def _fit_heads(
    ctx: StudyContext,
    setups: list[TrialSetup],
    on_epoch: Callable[[int, EpochRecord], None],
) -> list[FitResult | BaseException]:
    """``fit_heads`` over the study's cached pooled features (one optimizer kind)."""
    ready = _pooled_features(ctx, mirror=any(ctx.space.flip))
    assert ready is not None, "can_batch_heads said yes"
    weight, bias, features, val_features = ready
    return fit_heads(
        [HeadTask(s.params, s.dropout) for s in setups],
        weight,
        bias,
        features,
        ctx.split("train").labels,
        val_features,
        ctx.split("val").labels,
        seed=ctx.config.seed,
        on_epoch=on_epoch,
        should_stop=ctx.should_stop,
    )


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
        # Onto the CPU: the RNG states must stay CPU byte tensors, and fit places the rest.
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
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
    head = model.get_submodule(classifier_name(model)) if ctx.stage.name == "head" else None
    state = head.state_dict() if head is not None else None
    return _finish(trial, ctx, params, dropout, result, state, time.perf_counter() - began)


def head_objectives(
    trials: list[optuna.Trial], ctx: StudyContext
) -> list[float | BaseException] | None:
    """Train the heads of several head-stage trials at once (see tlopt.train.heads).

    Returns, per trial, its best validation loss or the exception that ended it (a prune);
    None when the model's head is not a plain linear layer on cached pooled features, for
    the caller to run the trials one at a time.
    """
    began = time.perf_counter()
    if not can_batch_heads(ctx):
        return None
    setups = [suggest(t, ctx.space, "head") for t in trials]
    histories: list[list[EpochRecord]] = [[] for _ in trials]
    outcomes: list[float | BaseException] = [0.0] * len(trials)
    for kind in sorted({s.params.optimizer for s in setups}):
        group = [i for i, s in enumerate(setups) if s.params.optimizer == kind]

        def on_epoch(j: int, record: EpochRecord, group: list[int] = group) -> None:
            i = group[j]
            histories[i].append(record)
            _report(trials[i], ctx, record, setups[i].params.epochs, histories[i])

        results = _fit_heads(ctx, [setups[i] for i in group], on_epoch)
        for i, result in zip(group, results, strict=True):
            if isinstance(result, NonFiniteLoss):
                outcomes[i] = _pruned_by(trials[i], histories[i], result)
            elif isinstance(result, BaseException):
                outcomes[i] = result
            else:
                seconds = (time.perf_counter() - began) / len(trials)
                outcomes[i] = _finish(
                    trials[i],
                    ctx,
                    setups[i].params,
                    setups[i].dropout,
                    result,
                    result.best_state,
                    seconds,
                )
    return outcomes


def can_batch_heads(ctx: StudyContext) -> bool:
    """Whether this study's head trials can train together: a linear head on cached features.

    Computes the features (with mirror images, when flips are searched) into the study's
    prefix cache, as the first trial would.
    """
    if ctx.stage.name != "head" or ctx.space.cut:
        return False
    return _pooled_features(ctx, mirror=any(ctx.space.flip)) is not None


def _pooled_features(
    ctx: StudyContext, mirror: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(seeded initial head weight and bias, train features, val features) or None.

    Kept in the study's prefix cache: every batch of head trials starts from the same seeded
    head on the same features, so the model is built and run once per worker, not per batch.
    """
    key = f"pooled-heads|mirror={mirror}"
    if key not in ctx.prefix_cache:
        ctx.prefix_cache[key] = _compute_pooled_features(ctx, mirror)
    return ctx.prefix_cache[key]  # type: ignore[no-any-return]


def _compute_pooled_features(
    ctx: StudyContext, mirror: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    model = ctx.build_model(0.0)  # dropout is per trial, in fit_heads
    set_train_mode(model, False)  # the prefix runs as fit runs it: BatchNorm on running stats
    train, val = ctx.split("train"), ctx.split("val")
    split = SplitModel(model, int(train.images.shape[1]))
    head = split.classifier
    if split.mode != "pooled" or not isinstance(head, nn.Linear):
        return None
    features = _Inputs(split, train, mirror, ctx.prefix_cache).cached
    val_features = _Inputs(split, val, False, ctx.prefix_cache).cached
    if features is None or val_features is None:
        return None
    return head.weight.detach(), head.bias.detach(), features, val_features[0]


def _finish(
    trial: optuna.Trial,
    ctx: StudyContext,
    params: TrainParams,
    dropout: float,
    result: FitResult,
    head_state: dict[str, torch.Tensor] | None,
    seconds: float,
) -> float:
    """Record a finished trial: history, results, the head's weights, curves; its value."""
    _set_history(trial, list(result.history))
    attrs = {
        ATTR + "train_params": {**dataclasses.asdict(params), "dropout": dropout},
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": sum(r.epoch > 0 for r in result.history),
        "seconds": round(seconds, 3),
    }
    for key, value in attrs.items():
        retrying("saving the results", functools.partial(trial.set_user_attr, key, value))
    if head_state is not None:
        # The fine-tuning stages start from the best head: keep every head's weights.
        state = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
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


def _log_epoch(trial: optuna.trial.BaseTrial, record: EpochRecord, epochs: int) -> None:
    log.info(
        "trial %s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  lr %.2e  %.1fs",
        getattr(trial, "number", "-"),
        record.epoch,
        epochs,
        record.train_loss,
        record.val_loss,
        record.val_accuracy,
        record.lr,
        record.seconds,
    )


def _report(
    trial: optuna.Trial,
    ctx: StudyContext,
    record: EpochRecord,
    epochs: int,
    history: list[EpochRecord],
) -> None:
    """Log the epoch, report it to the pruner; raise TrialPruned (history saved) if pruned."""
    _log_epoch(trial, record, epochs)
    retrying("reporting an epoch", lambda: trial.report(record.val_loss, record.epoch))
    if retrying("asking the pruner", trial.should_prune):
        _set_history(trial, history)
        reason = f"{ctx.config.pruner.type} pruner at epoch {record.epoch}"
        retrying("recording a prune", lambda: trial.set_user_attr(ATTR + "prune_reason", reason))
        raise optuna.TrialPruned(f"pruned at epoch {record.epoch}")


def _pruned_by(
    trial: optuna.trial.BaseTrial, history: list[EpochRecord], exc: NonFiniteLoss
) -> optuna.TrialPruned:
    """Record a non-finite loss as the trial's prune reason, with its history so far."""
    _set_history(trial, history)
    trial.set_user_attr(ATTR + "prune_reason", str(exc))
    return optuna.TrialPruned(str(exc))


def _set_history(trial: optuna.trial.BaseTrial, history: list[EpochRecord]) -> None:
    retrying(
        "saving the history",
        lambda: trial.set_user_attr(
            "history", [{k: round(v, 6) for k, v in r.as_dict().items()} for r in history]
        ),
    )
