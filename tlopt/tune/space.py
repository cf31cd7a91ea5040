"""The search space: the only module that calls ``trial.suggest_*``.

Lists of one element are fixed values: they are not suggested, so they do not clutter Optuna's
parameter plots, but they are recorded in the trial's ``params`` through the returned
:class:`TrainParams` (the trial attributes hold the full set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from tlopt.config import Choice, FloatRange, SearchSpace
from tlopt.schedules import DECAY_DEFAULTS
from tlopt.train.ledger import TrainParams


def _pick(trial: optuna.trial.BaseTrial, name: str, space: Choice | FloatRange) -> Any:
    if isinstance(space, FloatRange):
        return trial.suggest_float(name, space.low, space.high, log=space.log)
    if len(space) == 1:
        return space[0]
    return trial.suggest_categorical(name, list(space))


@dataclass(frozen=True)
class TrialSetup:
    """What one trial trains with: the trainer's parameters and the model's."""

    params: TrainParams
    dropout: float
    cut: int | None


def suggest(trial: optuna.trial.BaseTrial, space: SearchSpace, stage: str = "head") -> TrialSetup:
    """Sample training parameters and the head's dropout rate for one trial.

    Decay parameters are suggested under the decay's own name (``step.gamma``), so each decay
    type keeps its own parameters, as Optuna's conditional spaces expect.
    """
    decay = _pick(trial, "decay", space.decay)
    decay_params = dict(DECAY_DEFAULTS.get(decay, {}))
    for pname, choice in space.decay_params.get(decay, {}).items():
        decay_params[pname] = float(_pick(trial, f"{decay}.{pname}", choice))
    params = TrainParams(
        batch_size=int(_pick(trial, "batch_size", space.batch_size)),
        epochs=int(_pick(trial, "epochs", space.epochs)),
        lr=float(_pick(trial, "lr", space.lr)),
        decay=decay,
        decay_params=decay_params,
        optimizer=_pick(trial, "optimizer", space.optimizer),
        momentum=float(_pick(trial, "momentum", space.momentum)),
        weight_decay=float(_pick(trial, "weight_decay", space.weight_decay)),
        patience=space.patience,
        flip=bool(_pick(trial, "flip", space.flip)),
        bn_train=space.bn_train if space.bn_train is not None else stage == "scratch",
        warmup_epochs=float(_pick(trial, "warmup_epochs", space.warmup_epochs)),
        layer_decay=float(_pick(trial, "layer_decay", space.layer_decay)),
        lr_batch_size=space.lr_batch_size,
        label_smoothing=float(_pick(trial, "label_smoothing", space.label_smoothing)),
        crop_scale=float(_pick(trial, "crop_scale", space.crop_scale)),
    )
    dropout = float(_pick(trial, "dropout", space.dropout))
    cut = int(_pick(trial, "cut", space.cut)) if space.cut else None
    return TrialSetup(params, dropout, cut)


def space_size(space: SearchSpace) -> int | None:
    """Number of distinct points in the space (None when a range makes it continuous).

    Every field :func:`suggest` may draw counts, so that the size is the number of distinct
    trials the space holds (a study stops there: no point runs twice).
    """
    size = 1
    for choice in (
        space.flip,
        space.cut or (None,),  # empty: no cut, one point
        space.batch_size,
        space.epochs,
        space.lr,
        space.optimizer,
        space.dropout,
        space.weight_decay,
        space.momentum,
        space.warmup_epochs,
        space.layer_decay,
        space.label_smoothing,
        space.crop_scale,
    ):
        if isinstance(choice, FloatRange):
            return None
        size *= len(choice)
    per_decay = 0
    for decay in space.decay:
        n = 1
        for choice in space.decay_params.get(decay, {}).values():
            n *= len(choice)
        per_decay += n
    return size * per_decay
