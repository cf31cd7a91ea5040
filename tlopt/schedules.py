"""Learning-rate schedules as pure functions of the epoch.

A schedule gives the factor that multiplies the base learning rate at a 0-based epoch: the
learning rate of epoch ``e`` is ``base_lr * lr_factor(decay, e, total_epochs, **params)``.
Every schedule gives 1.0 at epoch 0. The decays are the ones the reference projects compare
(seed 000 step 9c: "standard", step-by-step and polynomial degradation) plus exponential and
cosine.

Example:
    >>> lr_factor("step", 25, 50, step_size=10, gamma=0.5)
    0.25
    >>> lr_factor("polynomial", 0, 50)
    1.0

The functions named after each decay do the arithmetic only; :func:`lr_factor` validates the
decay name and its parameters first (:func:`validate_decay_params`) and raises
:class:`~tlopt.errors.ConfigError` with the rule and the value it got.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from tlopt.errors import ConfigError

__all__ = [
    "DECAY_DEFAULTS",
    "DECAY_PARAMS",
    "DECAY_TYPES",
    "batch_scale",
    "constant",
    "cosine",
    "exponential",
    "inverse_time",
    "layer_scales",
    "lr_factor",
    "polynomial",
    "step",
    "validate_decay_params",
    "warmup_factor",
]


def constant(epoch: int, total_epochs: int) -> float:
    """No decay: the factor is 1 at every epoch."""
    return 1.0


def step(epoch: int, total_epochs: int, step_size: float = 10, gamma: float = 0.5) -> float:
    """Step decay: multiply by ``gamma`` once every ``step_size`` epochs.

    Epochs ``0 .. step_size - 1`` have factor 1, the next ``step_size`` epochs ``gamma``, then
    ``gamma**2`` and so on (Keras' classic "drop by half every 10 epochs" by default).
    """
    return float(gamma ** math.floor(epoch / step_size))


def polynomial(
    epoch: int, total_epochs: int, power: float = 1.0, end_factor: float = 0.01
) -> float:
    """Polynomial decay from 1 to ``end_factor`` over ``total_epochs`` (Keras PolynomialDecay).

    ``factor = (1 - end_factor) * (1 - e / total) ** power + end_factor``, with ``e`` clamped to
    ``total``: ``power=1`` is a straight line. As in Keras with ``decay_steps=total_epochs``,
    ``end_factor`` is reached at epoch ``total_epochs``, one past the last trained epoch.
    """
    progress = min(epoch, total_epochs) / total_epochs
    return float((1.0 - end_factor) * (1.0 - progress) ** power + end_factor)


def exponential(epoch: int, total_epochs: int, gamma: float = 0.95) -> float:
    """Exponential decay: multiply by ``gamma`` every epoch (``gamma ** epoch``)."""
    return float(gamma**epoch)


def inverse_time(epoch: int, total_epochs: int, decay: float = 0.01) -> float:
    """Time-based decay, Keras' classic ``decay`` argument: ``1 / (1 + decay * epoch)``.

    This is the "standard degradation of the learning rate" of seed 000 step 9c.
    """
    return 1.0 / (1.0 + decay * epoch)


def cosine(epoch: int, total_epochs: int, end_factor: float = 0.0) -> float:
    """Cosine annealing from 1 to ``end_factor`` over ``total_epochs`` (epoch clamped).

    Like :func:`polynomial`, ``end_factor`` is reached at epoch ``total_epochs``, so the last
    trained epoch still has a small positive factor even when ``end_factor`` is 0.
    """
    progress = min(epoch, total_epochs) / total_epochs
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "step": step,
    "polynomial": polynomial,
    "exponential": exponential,
    "inverse_time": inverse_time,
    "cosine": cosine,
}

DECAY_TYPES: tuple[str, ...] = tuple(_SCHEDULES)
"""The decay names :func:`lr_factor` accepts."""

# Valid ranges, both ends included. They bound what makes sense, not what a study searches:
# a gamma of 1 (or a decay of 0) is a constant schedule; a factor that can reach 0 before the
# last epoch (gamma 0) trains nothing, so multiplicative factors start at 0.01.
DECAY_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "constant": {},
    "step": {"step_size": (1.0, 1000.0), "gamma": (0.01, 1.0)},
    "polynomial": {"power": (0.1, 10.0), "end_factor": (0.0, 1.0)},
    "exponential": {"gamma": (0.01, 1.0)},
    "inverse_time": {"decay": (0.0, 10.0)},
    "cosine": {"end_factor": (0.0, 1.0)},
}
"""For each decay, its parameter names and their valid ``(low, high)`` ranges, inclusive."""

DECAY_DEFAULTS: dict[str, dict[str, float]] = {
    "constant": {},
    "step": {"step_size": 10.0, "gamma": 0.5},
    "polynomial": {"power": 1.0, "end_factor": 0.01},
    "exponential": {"gamma": 0.95},
    "inverse_time": {"decay": 0.01},
    "cosine": {"end_factor": 0.0},
}
"""For each decay, the value each parameter takes when none is given."""


def _format_number(value: float) -> str:
    return f"{value:g}"


def _unknown_name(kind: str, name: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{kind} '{name}' is unknown{hint}: choose one of {', '.join(valid)}"


def validate_decay_params(decay: str, params: Mapping[str, Any]) -> dict[str, float]:
    """Check a decay name and its parameters; return all parameters, defaults filled in.

    Args:
        decay: one of :data:`DECAY_TYPES`.
        params: parameter values by name; any left out take :data:`DECAY_DEFAULTS`.

    Returns:
        Every parameter of ``decay`` as a float.

    Raises:
        ConfigError: the decay is unknown, a parameter does not belong to it, or a value is
            not a number inside its range in :data:`DECAY_PARAMS`.

    Example:
        >>> validate_decay_params("step", {"gamma": 0.1})
        {'step_size': 10.0, 'gamma': 0.1}
    """
    if decay not in _SCHEDULES:
        raise ConfigError(_unknown_name("learning-rate decay", decay, DECAY_TYPES))
    ranges = DECAY_PARAMS[decay]
    resolved = dict(DECAY_DEFAULTS[decay])
    for name, value in params.items():
        if name not in ranges:
            valid = ", ".join(ranges) if ranges else "none"
            close = difflib.get_close_matches(name, list(ranges), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"learning-rate decay '{decay}' has no parameter '{name}'{hint}: "
                f"its parameters are {valid}"
            )
        low, high = ranges[name]
        valid_range = f"[{_format_number(low)}, {_format_number(high)}]"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"learning-rate decay '{decay}': {name} = {value!r} is not a number; "
                f"use a number in {valid_range}"
            )
        number = float(value)  # numpy scalars too
        if not low <= number <= high:  # also rejects NaN
            raise ConfigError(
                f"learning-rate decay '{decay}': {name} = {value!r} is outside the valid "
                f"range {valid_range}"
            )
        resolved[name] = number
    return resolved


def lr_factor(decay: str, epoch: int, total_epochs: int, /, **params: Any) -> float:
    """The learning-rate factor of a 0-based ``epoch`` in a run of ``total_epochs``.

    Args:
        decay: one of :data:`DECAY_TYPES`.
        epoch: the epoch, counted from 0; epoch 0 has factor 1 for every decay.
        total_epochs: how many epochs the run trains (at least 1).
        **params: the decay's parameters (:data:`DECAY_PARAMS`); missing ones take
            :data:`DECAY_DEFAULTS`.

    Returns:
        The factor that multiplies the base learning rate, in ``(0, 1]`` for valid parameters
        (``polynomial`` and ``cosine`` with ``end_factor=0`` reach 0 only at ``total_epochs``).

    Raises:
        ConfigError: unknown decay, unknown parameter or out-of-range value.
        ValueError: a negative epoch or a ``total_epochs`` below 1 (a caller's bug).

    Example:
        >>> lr_factor("exponential", 2, 10, gamma=0.5)
        0.25
    """
    resolved = validate_decay_params(decay, params)
    if epoch < 0:
        raise ValueError(f"epoch counts from 0 but got {epoch}")
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be at least 1 but got {total_epochs}")
    return _SCHEDULES[decay](epoch, total_epochs, **resolved)


def warmup_factor(progress: float, warmup_epochs: float) -> float:
    """Linear warm-up: the factor at ``progress`` epochs into training (fractions allowed).

    ``progress`` counts the steps already taken, this one included, in epochs: the first of
    100 steps an epoch is at 0.01. The factor climbs linearly to 1 at ``warmup_epochs`` and
    stays there; ``warmup_epochs = 0`` is no warm-up. A fine-tuning stage starts from a trained
    head: the first full-rate steps on a backbone whose Adam moments are still empty are the
    ones that wreck it (issue 12: freeze2 fell from 83% to 47% in its first epoch).

    Example:
        >>> warmup_factor(0.5, 2.0)
        0.25
        >>> warmup_factor(3.0, 2.0)
        1.0
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs cannot be negative but got {warmup_epochs}")
    if progress < 0:
        raise ValueError(f"progress counts from 0 but got {progress}")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, progress / warmup_epochs)


def batch_scale(batch_size: int, lr_batch_size: int) -> float:
    """The factor of a rate written for ``lr_batch_size`` at ``batch_size``; 0: as written.

    Linear, as Goyal et al. (2017) scale SGD's rate with the batch: Adam moves each weight by
    about the rate per step whatever the batch, so an epoch at a quarter of the batch, four
    times the steps, moves the weights four times as far at the same rate. Scaled by
    ``batch_size / lr_batch_size``, every batch size moves them as far per epoch (issue 21.6:
    a fine-tuning epoch at batch size 8 lost 3.3 points of the digits head, one at 32 lost 0.8).

    Example:
        >>> batch_scale(8, 32)
        0.25
        >>> batch_scale(8, 0)
        1.0
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 but got {batch_size}")
    if lr_batch_size < 0:
        raise ValueError(f"lr_batch_size cannot be negative but got {lr_batch_size}")
    return 1.0 if lr_batch_size == 0 else batch_size / lr_batch_size


def layer_scales(num_layers: int, layer_decay: float) -> list[float]:
    """Learning-rate scale of each of ``num_layers`` layer groups, the head last.

    The head (the last group) trains at the full rate, and each group below it at
    ``layer_decay`` times the rate of the one above: ``layer_decay ** (num_layers - 1 - i)``,
    as timm's ``param_groups_layer_decay`` (BEiT) scales them. ``layer_decay = 1`` is off;
    fastai's ``fine_tune`` spreads 100x from the first group to the head, which is 0.46 over
    seven groups.

    Example:
        >>> layer_scales(3, 0.5)
        [0.25, 0.5, 1.0]
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1 but got {num_layers}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] but got {layer_decay}")
    return [float(layer_decay ** (num_layers - 1 - i)) for i in range(num_layers)]
