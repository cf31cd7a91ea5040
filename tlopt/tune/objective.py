"""The objective: one trial is one run of the trainer, reported to the pruner every epoch."""

from __future__ import annotations

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
from optuna.artifacts import upload_artifact
from safetensors.torch import save_file

from tlopt.models.backbones import classifier_name
from tlopt.names import ATTR, HEAD
from tlopt.train.ledger import EpochRecord, FitResult, NonFiniteLoss, TrainParams
from tlopt.tune import continuation, replay
from tlopt.tune.checkpoints import drop_checkpoint, load_checkpoint, save_checkpoint
from tlopt.tune.context import StudyContext
from tlopt.tune.continuation import WEIGHTS
from tlopt.tune.resilience import retrying
from tlopt.tune.runner import can_batch_heads, fit_head_trials, log_epoch, train_setup
from tlopt.tune.space import suggest

log = logging.getLogger("tlopt.worker")


def objective(trial: optuna.Trial, ctx: StudyContext) -> float:
    """Train one trial and return its best validation loss.

    Fine-tuning trials save a checkpoint artifact after every epoch; a trial re-queued after
    its worker died inherits the attribute and resumes from that epoch. A continuation
    (tlopt.tune.continuation) starts from the weights its parent kept.
    """
    began = time.perf_counter()
    checkpoints = ctx.stage.name != "head" and ctx.config.storage.checkpoint
    resume = load_checkpoint(trial, ctx) if checkpoints else None
    history = [EpochRecord(**r) for r in resume["history"]] if resume else []
    grows = continuation.of(trial)
    if history:
        log.info("trial %d resumes after epoch %d", trial.number, history[-1].epoch)
    elif ctx.head is not None and grows is None:  # a resumed trial keeps its checkpoint's head
        retrying("recording the head", lambda: trial.set_user_attr(HEAD, ctx.head))
    setup = suggest(trial, ctx.space, ctx.stage.name)
    start = None
    if grows is not None:
        setup, start = continuation.start(grows, ctx, setup)
        log.info("trial %d continues trial %d for %d epochs", trial.number, grows.trial,
                 grows.epochs)  # fmt: skip
    epochs, after = setup.params.epochs, grows.after if grows else 0

    def on_epoch(record: EpochRecord, checkpoint: Callable[[], dict[str, Any]]) -> None:
        history.append(record)
        report(trial, ctx.config.pruner.type, record, epochs, history, after)
        if checkpoints and 0 < record.epoch < epochs:
            state = checkpoint()
            retrying("saving a checkpoint", lambda: save_checkpoint(trial, ctx, state))

    same = replay.measured_before(trial, ctx, setup) if grows is None and not history else None
    if same is not None:  # its epochs were trained before: their figures, no training

        def told(record: EpochRecord, so_far: list[EpochRecord]) -> None:
            report(trial, ctx.config.pruner.type, record, epochs, so_far)

        done = replay.replay(trial, same, setup, told)
        seconds = time.perf_counter() - began
        return _finish(trial, ctx, setup.params, setup.dropout, done, None, seconds)
    try:
        run = train_setup(setup, ctx, on_epoch, resume, start)
    except NonFiniteLoss as exc:
        drop_checkpoint(trial, ctx)
        raise _pruned_by(trial, history, exc) from None
    except optuna.TrialPruned:
        drop_checkpoint(trial, ctx)
        raise
    if checkpoints:
        drop_checkpoint(trial, ctx)
    head = run.model.get_submodule(classifier_name(run.model)) if ctx.stage.name == "head" else None
    state = head.state_dict() if head is not None else None
    seconds = time.perf_counter() - began
    if head is None:  # the trained weights of a new best: export-best takes them, no retrain
        _keep_if_best(trial, ctx, run.result)
    return _finish(trial, ctx, run.params, run.dropout, run.result, state, seconds)


def _keep_if_best(trial: optuna.Trial, ctx: StudyContext, result: FitResult) -> None:
    """Upload the trial's trained weights (its best epoch's) when it beats every complete
    trial of its study so far; ``tlopt.weights`` names them (export-best loads them)."""
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values = [t.value for t in done if t.value is not None]
    if values and result.best_val_loss >= min(values):
        return
    artifact_id = _upload(trial, ctx, result.best_state, "weights")
    retrying("saving the weights", lambda: trial.set_user_attr(WEIGHTS, artifact_id))


def _upload(
    trial: optuna.Trial, ctx: StudyContext, state: dict[str, torch.Tensor], what: str
) -> str:
    """``state`` as a safetensors artifact of the trial (``what``-trialN); its id."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{what}-trial{trial.number}.safetensors"
        save_file(tensors, str(path))
        return retrying(
            f"saving the {what}",
            lambda: upload_artifact(
                artifact_store=ctx.artifacts, file_path=str(path), study_or_trial=trial
            ),
        )


def head_objectives(
    trials: list[optuna.Trial],
    ctx: StudyContext,
    on_outcome: Callable[[int, float | BaseException], None] | None = None,
) -> list[float | BaseException] | None:
    """Train the heads of several head-stage trials at once (see tlopt.train.heads).

    Returns, per trial, its best validation loss or the exception that ended it (a prune);
    None when the model's head is not a plain linear layer on cached pooled features, for
    the caller to run the trials one at a time. ``on_outcome`` hears of each trial as soon as
    it ends (for the worker to tell the study), not when the batch's longest one ends.
    """
    began = time.perf_counter()
    if not can_batch_heads(ctx):
        return None
    setups = [suggest(t, ctx.space, "head") for t in trials]
    histories: list[list[EpochRecord]] = [[] for _ in trials]
    outcomes: list[float | BaseException] = [0.0] * len(trials)

    def on_epoch(i: int, record: EpochRecord) -> None:
        histories[i].append(record)
        report(trials[i], ctx.config.pruner.type, record, setups[i].params.epochs, histories[i])

    def on_done(i: int, result: FitResult | BaseException) -> None:
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
        if on_outcome is not None:
            on_outcome(i, outcomes[i])

    fit_head_trials(ctx, setups, on_epoch, on_done)
    return outcomes


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
        artifact_id = _upload(trial, ctx, head_state, "head")
        retrying(
            "saving the head", lambda: trial.set_user_attr(ATTR + "head_artifact", artifact_id)
        )
    if ctx.on_trial_done is not None:  # the curves and note the interface hands in
        ctx.on_trial_done(trial, ctx, result.history, params)
    return result.best_val_loss


def report(
    trial: optuna.Trial,
    pruner: str,
    record: EpochRecord,
    epochs: int,
    history: list[EpochRecord],
    after: int = 0,
) -> None:
    """Log the epoch, report it to the pruner; raise TrialPruned (history saved) if pruned.
    ``after``: the epochs a continuation's start had trained (its epoch k is step after + k).

    Epoch 0 (a fine-tuning trial's inherited head, evaluated before any step) stays in the
    history but is not reported: it is the same value for every trial, and the median pruner
    judges a trial by its best reported value, so the head's loss would shield every trial
    whose loss rose above it (issue 21).
    """
    log_epoch(trial, record, epochs)
    if record.epoch == 0:
        return
    step = after + record.epoch
    retrying("reporting an epoch", lambda: trial.report(record.val_loss, step))
    if retrying("asking the pruner", trial.should_prune):
        _set_history(trial, history)
        reason = f"{pruner} pruner at epoch {record.epoch}"
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
