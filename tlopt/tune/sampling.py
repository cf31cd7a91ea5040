"""How a worker draws its trials: one seed, one study; no point runs twice.

A worker's sampler is seeded from the study's seed, its slot and how often the supervisor
restarted that slot, so a single-worker study proposes the same trials every time it runs.
Each trial's parameters are drawn as soon as it is asked for, and a point that a running or
finished trial already holds is drawn again, so trials that run together (parallel workers,
heads trained at once) differ and no finished point is trained again. A study stops when its
space is used up (:func:`stage_budget`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from tlopt.config import SearchSpace
from tlopt.errors import TloptError
from tlopt.once import log_once
from tlopt.tune.space import space_size, suggest

log = logging.getLogger("tlopt.worker")
# The supervisor numbers its worker processes: slot i gets TLOPT_WORKER_SLOT = first + i (first:
# its own TLOPT_WORKER_SLOT, 0 unless set; workers on several machines may set it apart) and
# TLOPT_WORKER_RESTARTS = how often that slot was restarted. A plain worker is slot 0.
SLOT_ENV = "TLOPT_WORKER_SLOT"
RESTARTS_ENV = "TLOPT_WORKER_RESTARTS"
# How often the sampler draws a trial's point again while another trial holds it; then the
# first free point in the space's order is taken.
DRAWS = 20
# Trials whose points a new trial must not repeat: those running and those finished.
TAKEN_STATES = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


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


def sampler_seed(seed: int, slot: int = 0, restarts: int = 0, study: str = "") -> int:
    """The sampler seed of a worker: one per study seed, study, slot and restart of that slot.

    Not the process id: containers give every worker the same one, and a study run by one
    worker would propose other trials each time. A restarted slot does not replay the trials
    its first process proposed. The study's name: freeze1 and freeze2 of one run, one seed,
    proposed the same points in the same order (a hymenoptera run's trials 0-3 of both).

    Example:
        >>> sampler_seed(0) == sampler_seed(0) != sampler_seed(0, slot=1) != sampler_seed(0, 0, 1)
        True
        >>> sampler_seed(0, study="a/freeze1") != sampler_seed(0, study="a/freeze2")
        True
    """
    digest = hashlib.sha256(f"tlopt-sampler:{seed}:{slot}:{restarts}:{study}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(
    seed: int, slot: int = 0, restarts: int = 0, study: str = ""
) -> optuna.samplers.TPESampler:
    """The TPE sampler of a worker, its options set rather than left to Optuna's defaults.

    Optuna 5.0 turned both on by default (4.x: both off), and the defaults may move again:
    - ``constant_liar``: the running trials count as bad ones, so parallel workers and heads
      trained together are not proposed the points the others are running;
    - ``multivariate`` with ``group``: batch size, epochs and learning rate act together, so
      they are modelled jointly; ``group`` keeps the decay's own parameters (present only
      for their decay) in the joint model instead of sampling them independently.
    """
    return optuna.samplers.TPESampler(
        seed=sampler_seed(seed, slot, restarts, study),
        constant_liar=True,
        multivariate=True,
        group=True,
    )


def point(params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(params.items()))


def stage_budget(n_trials: int, space: SearchSpace) -> int:
    """The trials a study runs: ``n_trials``, or the size of a smaller space (said once a process).

    No point runs twice, so a space of 12 points is used up after 12 finished trials.
    """
    size = space_size(space)
    if size is None or size >= n_trials:
        return n_trials
    log_once(  # the plan, the time allotment, the checks and the worker each ask
        log,
        logging.INFO,
        "the search space holds %d points: the study stops after %d finished trials, not %d "
        "(no point runs twice)",
        size,
        size,
        n_trials,
    )
    return size


class _Walk:
    """Stands in for a trial to list the points of a discrete space, in order (depth first).

    Each choice not yet decided on this walk takes its first value and leaves the others for
    later walks, so conditional parameters (a decay's own) are listed under their decay only.
    """

    def __init__(self, decided: dict[str, Any], later: list[dict[str, Any]]):
        self.decided, self.later = decided, later
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        raise TypeError("a continuous space has no list of points")

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        if name in self.decided:
            value = self.decided[name]
        else:
            value = choices[0]
            self.later += [{**self.params, name: other} for other in reversed(choices[1:])]
        self.params[name], self.distributions[name] = value, CategoricalDistribution(choices)
        return value


def _points(space: SearchSpace, stage: str) -> Iterator[_Walk]:
    """Every point of a discrete space, as :func:`suggest` draws them."""
    later: list[dict[str, Any]] = [{}]
    while later:
        walk = _Walk(later.pop(), later)
        suggest(cast(optuna.Trial, walk), space, stage)
        yield walk


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
    """Draw and store the parameters of a new trial: a point no running or finished trial holds.

    ``taken`` holds the points of the trials in ``TAKEN_STATES`` (the caller's, under the
    budget lock); this adds each point it hands out. A trial that was queued (a retry, an
    enqueued point) keeps its own. TPE proposes points that finished trials hold (its
    random start-up trials in a small space, and once it models the study, the best point
    again), and parallel workers and heads trained together would run the same point at
    once. After ``DRAWS`` draws the first free point of a discrete space is taken; only in a
    space that trials use up (the worker's budget stops before: :func:`stage_budget`), or a
    continuous one after ``DRAWS`` draws, is the point drawn last kept.
    """
    frozen = trial.storage.get_trial(trial._trial_id)
    if frozen.params or "fixed_params" in frozen.system_attrs:
        taken.add(point(frozen.params or frozen.system_attrs["fixed_params"]))
        return trial
    size = space_size(space)
    draws = 1 if size is not None and len(taken) >= size else DRAWS
    draft: _Draft | _Walk
    for draw in range(draws):
        draft = _Draft(trial, frozen, relative=draw == 0)
        suggest(cast(optuna.Trial, draft), space, stage)
        if point(draft.params) not in taken:
            break
    else:
        walks = _points(space, stage) if size is not None else iter(())
        free = next((w for w in walks if point(w.params) not in taken), None)
        if free is not None:
            draft = free
        else:
            log.warning("trial %d repeats the point of another trial: none is free", trial.number)
    taken.add(point(draft.params))
    for name, value in draft.params.items():
        distribution = draft.distributions[name]
        trial.storage.set_trial_param(
            trial._trial_id, name, distribution.to_internal_repr(value), distribution
        )
    # A fresh view of the trial, which sees the parameters just stored.
    return optuna.Trial(study=trial.study, trial_id=trial._trial_id)
