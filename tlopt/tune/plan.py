"""A plan before the cost: what each stage of a run costs here, measured before its first trial.

For each stage, a few real training steps through the same ``fit`` (or, for a head on cached
features, the same batched head trainer) the trials run, on this device and this data: at each
of the space's batch sizes, except that a fine-tuning stage on the CPU times the middle one and
scales it per image (:func:`timed_batch_sizes`). An epoch costs its steps plus one validation
pass; a stage costs its trials times the mean epoch choice times the mean epoch cost (pruning
can only shorten it), plus its one-off set-up (the frozen features a worker computes once). A
stage that already holds its finished trials costs nothing. Measured for one worker process.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import optuna
import torch

from tlopt.config import FloatRange, SearchSpace, StudyConfig
from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.data.source import Source
from tlopt.models.backbones import create_backbone, normalization
from tlopt.models.split import SplitModel
from tlopt.models.stages import parse_stage
from tlopt.train.data import ImageSet
from tlopt.train.inputs import Inputs
from tlopt.train.ledger import Interrupted
from tlopt.train.trainer import evaluate, fit
from tlopt.tune.context import StudyContext, cache_dir, shared_cache
from tlopt.tune.runner import can_batch_heads, fit_head_trials
from tlopt.tune.space import TrialSetup, suggest

WARN_HOURS = 3.0  # a run longer than this gets a one-line warning before it starts
TIMED_STEPS = 3  # steps timed per batch size after one warm-up step ...
STEP_BUDGET_S = 2.0  # ... or fewer, once this many seconds of them are timed
VAL_SAMPLE = 32  # validation images timed to cost a validation pass


@dataclass(frozen=True)
class StagePlan:
    """One stage's expected cost; ``epoch_seconds`` by batch size (empty: not measured)."""

    stage: str
    trials: int  # still to run: the budget less the finished trials
    epochs: tuple[int, ...]
    epoch_seconds: dict[int, float]
    setup_seconds: float  # once per stage: the frozen features a worker computes
    trial_seconds: float = 0.0  # once per trial: a fine-tuning trial evaluates its start

    @property
    def seconds(self) -> float:
        """trials x mean epochs x mean epoch cost (+ set-up); 0 for a stage with nothing to run."""
        if self.trials == 0:
            return 0.0
        per_epoch = float(np.mean(list(self.epoch_seconds.values())))
        per_trial = self.trial_seconds + float(np.mean(self.epochs)) * per_epoch
        return self.setup_seconds + self.trials * per_trial

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"expected_minutes": round(self.seconds / 60, 2)}


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    device: str

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "stages": [s.as_dict() for s in self.stages],
            "expected_minutes": round(self.seconds / 60, 2),
            "note": "measured for one worker process; pruning can only shorten it",
        }


def make_plan(
    config: StudyConfig,
    stages: list[str],
    remaining: Callable[[str], int],
    device: str | None = None,
    heads_at_once: int = 8,
) -> Plan:
    """Measure each stage that has trials to run (``remaining(stage)``) on ``device``."""
    from tlopt.tune.context import open_config_source

    source = open_config_source(config)
    pieces = Pieces(config, source, device)
    rows = []
    for name in stages:
        space, trials = config.space_for(name), remaining(name)
        cost: tuple[dict[int, float], float, float] = ({}, 0.0, 0.0)
        if trials > 0:
            cost = measure_stage(pieces.context(name), heads_at_once)
        rows.append(StagePlan(name, trials, tuple(space.epochs), *cost))
    return Plan(tuple(rows), str(pieces.device))


class Pieces:
    """The data on the device, decoded once, for the contexts of every stage."""

    def __init__(self, config: StudyConfig, source: Source, device: str | None):
        from tlopt.devices import pick_device

        self.config, self.source, self.device = config, source, pick_device(device)
        self.images = decode_source(source, config.data.image_size, cache_dir())
        self.labels, self.index = labels(source), split_indices(source)
        model = create_backbone(config.model.backbone, "none", len(source.classes))
        self.mean, self.std = normalization(model)
        self.sets: dict[str, ImageSet] = {}

    def context(self, stage: str) -> StudyContext:
        """A study context as a worker builds it, less the storage (the head: untrained)."""
        return StudyContext(
            study_name=f"{self.config.name}/{stage}",
            config=self.config,
            stage=parse_stage(stage),
            space=self.config.space_for(stage),
            classes=list(self.source.classes),
            device=self.device,
            artifacts=None,
            source=self.source,
            images=self.images,
            labels=self.labels,
            index=self.index,
            head=None,
            head_state=None,
            mean=self.mean,
            std=self.std,
            sets=self.sets,  # the splits on the device, shared by the stages' contexts
            prefix_cache=shared_cache(self.config),  # and the workers of this process
        )


def measure_stage(
    ctx: StudyContext, heads_at_once: int = 8
) -> tuple[dict[int, float], float, float]:
    """(seconds per epoch by batch size, set-up seconds once per stage, and once per trial)
    of the stage of ``ctx``."""
    began = time.perf_counter()
    if can_batch_heads(ctx):  # computes the pooled features, as a head worker's first trial
        setup = time.perf_counter() - began
        return _head_epochs(ctx, heads_at_once), setup, 0.0
    setup, step_at = 0.0, {}
    val = _validation_seconds(ctx)
    timed = timed_batch_sizes(ctx.space.batch_size, ctx.device)
    first_setup = _setup(ctx, timed[0])
    model = ctx.build_model(first_setup.dropout, first_setup.cut)  # one for every batch size
    for i, bs in enumerate(timed):
        # After the first batch size the model and the frozen features are warm: its first
        # step is timed too (a step of hymenoptera's freeze1 at 288 px and batch size 32 takes
        # 2-3 s on 2 cores, of a plan that took about a minute: issue 28.1).
        step, first = _step_seconds(ctx, _setup(ctx, bs), model, warm=i > 0)
        setup = first if i == 0 else setup  # the frozen features, computed once per stage
        step_at[bs] = step
    n, per_epoch = len(ctx.split("train")), {}
    for bs in ctx.space.batch_size:
        # Untimed batch sizes: the timed one's seconds per image.
        step = step_at.get(bs, step_at[timed[0]] * bs / timed[0])
        per_epoch[bs] = math.ceil(n / bs) * step + val
    return per_epoch, setup, val if ctx.stage.from_head else 0.0  # from_head: epoch 0


def timed_batch_sizes(sizes: tuple[int, ...], device: torch.device) -> list[int]:
    """The batch sizes a fine-tuning stage's plan times: each on a GPU (a small batch there is
    bound by the per-step overhead, not by its images); on the CPU only the middle one, the
    others scaled by their images. There a step costs about its images: hymenoptera's freeze1
    at 288 px planned 21.8, 27.7 and 29.5 s an epoch at 8, 16 and 32 (the same within the
    plan's noise: it overestimated the trials' epochs 1.4 to 2.6 times), and timing the two
    others cost 5-7 s of each fine-tuning stage's plan (issue 28.1)."""
    if device.type == "cuda" or len(sizes) < 2:
        return list(sizes)
    return [sorted(sizes)[len(sizes) // 2]]


def _setup(ctx: StudyContext, batch_size: int, epochs: int = 1) -> TrialSetup:
    """The space's first point at ``batch_size``: every choice fixed, so nothing is suggested."""
    space: SearchSpace = ctx.space
    fixed: dict[str, Any] = {}
    for f in fields(space):
        value = getattr(space, f.name)
        if isinstance(value, FloatRange):
            fixed[f.name] = (value.low,)
        elif isinstance(value, tuple) and len(value) > 1 and f.name != "cut":
            fixed[f.name] = value[:1]
    decay = (fixed.get("decay") or space.decay)[0]
    params = {p: c[:1] for p, c in space.decay_params.get(decay, {}).items()}
    fixed |= {"batch_size": (batch_size,), "epochs": (epochs,), "decay_params": {decay: params}}
    if space.cut:
        fixed["cut"] = space.cut[:1]
    return suggest(optuna.trial.FixedTrial({}), replace(space, **fixed), ctx.stage.name)


def _step_seconds(
    ctx: StudyContext, setup: TrialSetup, model: torch.nn.Module, warm: bool = False
) -> tuple[float, float]:
    """(seconds per training step, seconds before the first step) of ``fit`` at the setting;
    ``warm``: ``model`` has trained a step before, so its first step is timed too."""
    params = replace(setup.params, epochs=1)
    return _timed_steps(
        ctx.device,
        lambda probe: fit(
            model,
            ctx.split("train"),
            ctx.split("val"),
            params,
            should_stop=probe,
            cache=ctx.prefix_cache,
            seed=ctx.config.seed,
        ),
        warm,
    )


def _timed_steps(
    device: torch.device, train: Callable[[Callable[[], bool]], object], warm: bool = False
) -> tuple[float, float]:
    """(median seconds per step, seconds before the first) of ``train(should_stop)``.

    Both trainers ask ``should_stop`` before every step: the probe notes the time of each ask
    (once the device finished the step before) and stops after one warm-up step (none when
    ``warm``) and a few timed ones. A train split of fewer steps ends its epoch first, timed
    all the same.
    """
    asks: list[float] = []
    skip = 0 if warm else 1  # asks before the first timed step's start

    def probe() -> bool:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        asks.append(time.perf_counter())
        timed = asks[-1] - asks[skip] if len(asks) > skip else 0.0
        done = len(asks) > skip + 1
        return len(asks) > skip + 1 + TIMED_STEPS or (done and timed >= STEP_BUDGET_S)

    began = time.perf_counter()
    with contextlib.suppress(Interrupted):
        train(probe)
    first = asks[0] - began if asks else 0.0
    steps = np.diff(asks[skip:]) if len(asks) > skip + 1 else np.diff(asks)
    return (float(np.median(steps)) if len(steps) else first), first


def _validation_seconds(ctx: StudyContext) -> float:
    """One validation pass over the val split, timed on a sample of it (after a warm-up)."""
    val = ctx.split("val")
    n = min(len(val), VAL_SAMPLE)
    if n == 0:
        return 0.0
    sample = ImageSet(val.images[:n], val.labels[:n], val.mean, val.std)
    model = ctx.build_model(0.0)
    split = SplitModel(model.to(memory_format=torch.channels_last), int(val.images.shape[1]))
    inputs = Inputs(split, sample, False, ctx.prefix_cache)
    evaluate(split, inputs, sample.labels)  # warm-up
    began = time.perf_counter()
    evaluate(split, inputs, sample.labels)
    return (time.perf_counter() - began) * len(val) / n


def _head_epochs(ctx: StudyContext, heads_at_once: int) -> dict[int, float]:
    """Seconds per trial-epoch of head trials trained ``heads_at_once`` together, by batch size.

    The batched head trainer runs K heads in one step, so a trial's epoch costs a K-th of its
    steps (its validation, one product on cached features, is left out).
    """
    per_epoch, n = {}, len(ctx.split("train"))
    for bs in ctx.space.batch_size:
        setups = [_setup(ctx, bs)] * heads_at_once
        step, _ = _timed_steps(
            ctx.device,
            lambda probe, s=setups: fit_head_trials(  # type: ignore[misc]
                replace(ctx, should_stop=probe), s, lambda _i, _r: None
            ),
        )
        per_epoch[bs] = math.ceil(n / bs) * step / heads_at_once
    return per_epoch


def table(plan: Plan) -> list[str]:
    """The plan as lines: stage, trials, epochs, s/epoch, expected minutes; then the total."""
    lines = [f"plan (measured on {plan.device}, one worker; pruning can only shorten it):"]
    lines.append(f"  {'stage':<10}{'trials':>7}  {'epochs':<22}{'s/epoch':>16}{'exp. min':>10}")
    for s in plan.stages:
        epochs = ",".join(map(str, s.epochs))
        cost = "/".join(_short(v) for v in s.epoch_seconds.values()) or "-"
        lines.append(f"  {s.stage:<10}{s.trials:>7}  {epochs:<22}{cost:>16}{s.seconds / 60:>10.1f}")
    bs = "/".join(str(b) for b in _batch_sizes(plan))
    total = f"{plan.seconds / 60:.1f} min ({plan.seconds / 3600:.1f} h)"
    lines.append(f"  total {total}; s/epoch at batch size {bs}")
    return lines


def warning(plan: Plan) -> str | None:
    """One line when the plan exceeds :data:`WARN_HOURS`, naming what shortens it."""
    hours = plan.seconds / 3600
    if hours <= WARN_HOURS:
        return None
    return (
        f"warning: this run is expected to take {hours:.1f} h here (over {WARN_HOURS:g} h): "
        "shorten it with --trials (per stage), --epochs (e.g. 5,10) or --stages (e.g. head), "
        "or run it on a GPU (--device cuda)"
    )


def _short(seconds: float) -> str:
    return f"{seconds:.3g}"


def _batch_sizes(plan: Plan) -> list[int]:
    sizes: list[int] = []
    for s in plan.stages:
        sizes += [b for b in s.epoch_seconds if b not in sizes]
    return sizes
