"""How a worker draws its trials: one seed, one study; trials that run together differ.

A worker's sampler is seeded from the study's seed, its slot and how often the supervisor
restarted that slot, so a single-worker study proposes the same trials every time it runs.
Each trial's parameters are drawn as soon as it is asked for, and a point that a running trial
already holds is drawn again, so trials that run together (parallel workers, heads trained at
once) differ.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from tlopt.config import SearchSpace
from tlopt.errors import TloptError
from tlopt.tune.space import space_size, suggest

log = logging.getLogger("tlopt.worker")
# The supervisor numbers its worker processes: slot i gets TLOPT_WORKER_SLOT = first + i (first:
# its own TLOPT_WORKER_SLOT, 0 unless set; workers on several machines may set it apart) and
# TLOPT_WORKER_RESTARTS = how often that slot was restarted. A plain worker is slot 0.
SLOT_ENV = "TLOPT_WORKER_SLOT"
RESTARTS_ENV = "TLOPT_WORKER_RESTARTS"
# How often a trial's point is drawn again while a running trial holds the same point.
DRAWS = 20


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise TloptError(f"{name}={value!r} is not a whole number >= 0: unset it or fix it")
    return int(value)


def worker_slot() -> int:
    """This worker's slot (``$TLOPT_WORKER_SLOT``, set by the supervisor; 0 by default)."""
    return env_int(SLOT_ENV, 0)


def sampler_seed(seed: int, slot: int = 0, restarts: int = 0) -> int:
    """The sampler seed of a worker: one per study seed, slot and restart of that slot.

    Not the process id: containers give every worker the same one, and a study run by one
    worker would propose other trials each time. A restarted slot does not replay the trials
    its first process proposed.

    Example:
        >>> sampler_seed(0) == sampler_seed(0) != sampler_seed(0, slot=1) != sampler_seed(0, 0, 1)
        True
    """
    digest = hashlib.sha256(f"tlopt-sampler:{seed}:{slot}:{restarts}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(seed: int, slot: int = 0, restarts: int = 0) -> optuna.samplers.TPESampler:
    """The TPE sampler of a worker, its options set rather than left to Optuna's defaults.

    Optuna 5.0 turned both on by default (4.x: both off), and the defaults may move again:
    - ``constant_liar``: the running trials count as bad ones, so parallel workers and heads
      trained together are not proposed the points the others are running;
    - ``multivariate`` with ``group``: batch size, epochs and learning rate act together, so
      they are modelled jointly; ``group`` keeps the decay's own parameters (present only
      for their decay) in the joint model instead of sampling them independently.
    """
    return optuna.samplers.TPESampler(
        seed=sampler_seed(seed, slot, restarts),
        constant_liar=True,
        multivariate=True,
        group=True,
    )


def point(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(params.items()))


class _Draft:
    """Stands in for a trial while ``space.suggest`` draws its point, storing nothing.

    Each value comes from the study's sampler as ``Trial._suggest`` would take it (the
    relative, multivariate proposal on the first draw), so a point can be drawn again before
    it is written when a running trial already holds it.
    """

    def __init__(self, trial: optuna.Trial, frozen: optuna.trial.FrozenTrial, relative: bool):
        self.trial, self.frozen, self.relative = trial, frozen, relative
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return float(self._draw(name, FloatDistribution(low, high, step=step, log=log)))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._draw(name, CategoricalDistribution(choices))

    def _draw(self, name: str, distribution: BaseDistribution) -> Any:
        trial, study = self.trial, self.trial.study
        if isinstance(distribution, CategoricalDistribution) and len(distribution.choices) == 1:
            value = distribution.choices[0]
        elif isinstance(distribution, FloatDistribution) and distribution.single():
            value = distribution.low
        elif (
            self.relative
            and name in trial.relative_params
            and (trial.relative_search_space or {}).get(name) == distribution
        ):
            value = trial.relative_params[name]
        else:
            value = study.sampler.sample_independent(study, self.frozen, name, distribution)
        self.params[name], self.distributions[name] = value, distribution
        return value


def propose(
    space: SearchSpace, stage: str, trial: optuna.Trial, taken: set[tuple[Any, ...]]
) -> optuna.Trial:
    """Draw and store the parameters of a new trial: a point no running trial holds.

    A trial that was queued (a retry, an enqueued point) keeps its own. Parallel workers and
    heads trained together would otherwise run the same point at the same time: TPE's
    constant liar makes that unlikely once it models the study, but its random start-up
    trials in a small space repeat often. In a space that running trials use up, or after
    ``DRAWS`` draws, the point drawn last is kept.
    """
    frozen = trial.storage.get_trial(trial._trial_id)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        taken.add(point(frozen.params or frozen.system_attrs["fixed_params"]))
        return trial
    size = space_size(space)
    draws = 1 if size is not None and len(taken) >= size else DRAWS
    for draw in range(draws):
        draft = _Draft(trial, frozen, relative=draw == 0)
        suggest(cast(optuna.Trial, draft), space, stage)
        if point(draft.params) not in taken:
            break
    else:
        log.debug("trial %d repeats the point of a running trial", trial.number)
    taken.add(point(draft.params))
    for name, value in draft.params.items():
        distribution = draft.distributions[name]
        trial.storage.set_trial_param(
            trial._trial_id, name, distribution.to_internal_repr(value), distribution
        )
    # A fresh view of the trial, which sees the parameters just stored.
    return optuna.Trial(study=trial.study, trial_id=trial._trial_id)
