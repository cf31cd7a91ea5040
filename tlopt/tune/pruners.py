"""Optuna pruners by name: ``median`` (the default, on validation loss per epoch) and others."""

from __future__ import annotations

from typing import Any

import optuna

from tlopt import names

PRUNERS: dict[str, Any] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "patient": optuna.pruners.PatientPruner,
    "nop": optuna.pruners.NopPruner,
}
assert tuple(PRUNERS) == names.PRUNERS, "tlopt.names.PRUNERS lists the pruners a file may name"


def make_pruner(
    kind: str, n_startup_trials: int, n_warmup_steps: int, options: dict[str, Any]
) -> optuna.pruners.BasePruner:
    """Build the pruner ``kind``; startup/warm-up apply to the pruners that take them."""
    cls = PRUNERS[kind]
    if kind in ("median", "percentile"):
        return cls(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps, **options)
    if kind == "patient":
        inner = optuna.pruners.MedianPruner(n_startup_trials, n_warmup_steps)
        return cls(inner, **options)
    return cls(**options)
