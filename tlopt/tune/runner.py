"""One trial's training, no storage: suggest, build, fit. Tuning and export both run it.

The caller hands in what happens after each epoch (the objective reports to the pruner and
saves a checkpoint; export-best logs), so a trial replayed by ``export-best`` through
``optuna.trial.FixedTrial`` runs exactly the code its tuning ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import nn

from tlopt.models.backbones import classifier_name
from tlopt.models.split import SplitModel
from tlopt.models.stages import set_train_mode
from tlopt.train.heads import HeadTask, fit_heads
from tlopt.train.inputs import cached_prefix
from tlopt.train.ledger import EpochRecord, FitResult, TrainParams
from tlopt.train.trainer import fit
from tlopt.tune.context import StudyContext
from tlopt.tune.space import TrialSetup, suggest

log = logging.getLogger("tlopt.worker")

# After each epoch: the record and a function that returns a checkpoint (for resume).
OnEpoch = Callable[[EpochRecord, Callable[[], dict[str, Any]]], None]


@dataclass(frozen=True)
class TrialRun:
    """A trained trial: its parameters, its fit and its model (best epoch's weights)."""

    params: TrainParams
    dropout: float
    result: FitResult
    model: nn.Module
    retrained: bool = True  # False: export-best loaded the weights the trial kept


def run_trial(
    trial: optuna.trial.BaseTrial,
    ctx: StudyContext,
    on_epoch: OnEpoch | None = None,
    resume: dict[str, Any] | None = None,
) -> TrialRun:
    """Suggest the trial's setting, build its model and train it.

    A head trial whose head is a linear layer on cached pooled features trains through the
    batched head trainer as a batch of one: the same computation as among K others (a trial's
    random stream does not depend on its batch mates), so export-best retrains it to its tuned
    value, dropout included. Other trials run ``fit``; a fine-tuning stage records epoch 0,
    the head it starts from.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite.
        Whatever ``on_epoch`` raises (``optuna.TrialPruned``).
    """
    return train_setup(suggest(trial, ctx.space, ctx.stage.name), ctx, on_epoch, resume)


def train_setup(
    setup: TrialSetup,
    ctx: StudyContext,
    on_epoch: OnEpoch | None = None,
    resume: dict[str, Any] | None = None,
    start_state: dict[str, torch.Tensor] | None = None,
) -> TrialRun:
    """:func:`run_trial` for a setting already suggested; ``start_state``: weights to start
    from instead of the head (a continuation's, tlopt.tune.continuation)."""
    if can_batch_heads(ctx) and start_state is None:

        def head_epoch(_: int, record: EpochRecord) -> None:
            if on_epoch is not None:
                on_epoch(record, dict)  # a head trial has no checkpoint to give

        (result,) = fit_head_trials(ctx, [setup], head_epoch)
        if isinstance(result, BaseException):
            raise result
        model = ctx.build_model(setup.dropout, setup.cut)
        model.get_submodule(classifier_name(model)).load_state_dict(result.best_state)
        return TrialRun(setup.params, setup.dropout, result, model)
    model = ctx.build_model(setup.dropout, setup.cut)
    # Where a fine-tuning trial starts (the head, evaluated before any step) is the same for
    # every trial of the context at a cut: validated once, then recorded from memory.
    start: bool | tuple[float, float] = ctx.starts.get(setup.cut, ctx.stage.from_head)
    if start_state is not None:  # its own start: evaluated, and not the context's
        model.load_state_dict(start_state, strict=False)
        start = True

    def noted(record: EpochRecord, checkpoint: Callable[[], dict[str, Any]]) -> None:
        if record.epoch == 0 and start_state is None:
            ctx.starts[setup.cut] = (record.val_loss, record.val_accuracy)
        if on_epoch is not None:
            on_epoch(record, checkpoint)

    result = fit(
        model,
        ctx.split("train"),
        ctx.split("val"),
        setup.params,
        seed=ctx.config.seed,
        on_epoch=noted,
        cache=ctx.prefix_cache,
        resume=resume,
        should_stop=ctx.should_stop,
        compile=ctx.compile,
        record_start=start,
    )
    return TrialRun(setup.params, setup.dropout, result, model)


def log_epoch(trial: optuna.trial.BaseTrial, record: EpochRecord, epochs: int) -> None:
    """The epoch's log line, at DEBUG (``tlopt --verbose``)."""
    log.debug(
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


def fit_head_trials(
    ctx: StudyContext,
    setups: list[TrialSetup],
    on_epoch: Callable[[int, EpochRecord], None],
    on_done: Callable[[int, FitResult | BaseException], None] | None = None,
) -> list[FitResult | BaseException]:
    """``fit_heads`` over the study's cached pooled features."""
    ready = pooled_features(ctx, mirror=any(ctx.space.flip))
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
        on_done=on_done,
    )


def can_batch_heads(ctx: StudyContext) -> bool:
    """Whether this study's head trials can train together: a linear head on cached features.

    Computes the features (with mirror images, when flips are searched) into the study's
    prefix cache, as the first trial would.
    """
    if ctx.stage.name != "head" or ctx.space.cut or min(ctx.space.crop_scale) < 1:
        return False
    return pooled_features(ctx, mirror=any(ctx.space.flip)) is not None


Pooled = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def pooled_features(ctx: StudyContext, mirror: bool) -> Pooled | None:
    """(seeded initial head weight and bias, train features, val features) or None.

    Kept in the study's prefix cache: every batch of head trials starts from the same seeded
    head on the same features, so the model is built and run once per worker, not per batch.
    """
    if mirror not in ctx.pooled_heads:
        ctx.pooled_heads[mirror] = _compute_pooled_features(ctx, mirror)
    return ctx.pooled_heads[mirror]  # type: ignore[no-any-return]


def _compute_pooled_features(ctx: StudyContext, mirror: bool) -> Pooled | None:
    model = ctx.build_model(0.0)  # dropout is per trial, in fit_heads
    set_train_mode(model, False)  # the prefix runs as fit runs it: BatchNorm on running stats
    train, val = ctx.split("train"), ctx.split("val")
    split = SplitModel(model, int(train.images.shape[1]))
    head = split.classifier
    if split.mode != "pooled" or not isinstance(head, nn.Linear):
        return None
    features = cached_prefix(split, train, mirror, ctx.prefix_cache)
    val_features = cached_prefix(split, val, False, ctx.prefix_cache)
    if features is None or val_features is None:
        return None
    return head.weight.detach(), head.bias.detach(), features, val_features[0]
