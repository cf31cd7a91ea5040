"""One stage of a run: its study created (or reused) and its workers run until it holds its
budget or its time is up; a fine-tuning stage follows the best head."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig, fine_tunes_from_head
from tlopt.errors import ConfigError, TloptError
from tlopt.names import ATTR, FIRST_HEAD, HEAD

if TYPE_CHECKING:
    import optuna

    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.tune.context import TrialDone

Say = Callable[[str], Any]


@dataclass(frozen=True)
class Box:
    """A time budget's hold on a stage: no trial starts after ``seconds`` (a trial whose longest
    epoch choice cannot end by ``deadline``, a ``time.time()``, is not started: the worker's
    ``timeout`` is set so), the running one stops at ``deadline``; ``expect``: the trials its
    time is expected to allow (the progress bar's total, so that its ETA holds)."""

    seconds: float
    deadline: float
    expect: int


@contextlib.contextmanager
def environ(key: str, value: str | None) -> Iterator[None]:
    """``$key`` set to ``value`` (None: left as it is) for this process and its workers."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None and old is None:
            os.environ.pop(key, None)
        elif value is not None and old is not None:
            os.environ[key] = old


@contextlib.contextmanager
def sigterm_is_ctrl_c() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt as Ctrl-C does, wherever the run is (the worker loop
    takes both signals over while it runs, and gives them back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(
    config: StudyConfig,
    stage: str,
    held: Held,
    p: Placement,
    say: Say,
    box: Box | None = None,
    on_trial_done: TrialDone | None = None,
) -> bool:
    """Create (or reuse) the stage's study and run workers until it holds its budget (or, with
    ``box``, until its time is up). True when the stage holds a complete trial."""
    from tlopt.tune.sampling import stage_budget
    from tlopt.tune.storage import mask_url
    from tlopt.tune.study import create, snapshot
    from tlopt.tune.supervisor import supervise
    from tlopt.tune.worker import DEADLINE_ENV, STOP, work

    name, budget, url = held.study_name(stage), config.n_trials, held.url
    if not held.has(stage):
        create(config, stage, url)
    study = held.study(stage)
    stored = study.user_attrs.get(ATTR + "config", {})
    if stored.get("n_trials") != budget:  # a rerun with another --trials: the study takes it
        study.set_user_attr(ATTR + "config", snapshot(config))
        say(f"stage {stage}: budget {stored.get('n_trials')} -> {budget} finished trials")
    budget = stage_budget(budget, config.space_for(stage))  # a used-up space stops the stage
    before = held.finished(stage)
    if fine_tunes_from_head(stage):
        follow_best_head(study, held, before < budget, say)
    if before >= budget:
        say(f"stage {stage}: '{name}' holds {before} of {budget} finished trials: nothing to run")
    else:
        join = f"tlopt worker --study {name} --storage {mask_url(url)}"
        what = f"{budget - before} of {budget} trials"
        if box is not None:
            what = f"trials for {max(0.0, box.seconds) / 60:.1f} min (up to {budget - before})"
        say(f"stage {stage}: running {what} (more workers: {join})")
        seconds = None if box is None else max(1.0, box.seconds)
        expect = None if box is None else min(budget, before + box.expect)
        with environ(DEADLINE_ENV, None if box is None else repr(box.deadline)):
            if not (p.gpus or p.processes > 1):
                work(
                    name,
                    url,
                    None,
                    seconds,
                    p.device,
                    p.heads_at_once,
                    threads=p.threads,
                    on_trial_done=on_trial_done,
                    expect=expect,
                )
            elif (
                supervise(
                    name,
                    url,
                    None,
                    seconds,
                    p.gpus,
                    p.per_gpu,
                    p.processes,
                    p.heads_at_once,
                    threads=p.threads,
                )
                and not STOP.is_set()  # Ctrl-C: the workers stopped as asked
            ):
                raise TloptError(f"the workers of '{name}' failed (see above): run again to resume")
    after = held.finished(stage)
    if after < budget and box is None and not STOP.is_set():  # Ctrl-C: the caller says so
        raise TloptError(
            f"stage {stage} stopped at {after} of {budget} trials: run again to resume"
        )
    if after < budget and not STOP.is_set():
        say(f"stage {stage}: its time is up after {after - before} trials ({after} finished)")
    best = held.best(stage)
    if best is None:
        if not STOP.is_set():
            say(f"stage {stage}: no trial completed in its time: a longer --time runs it")
        return False
    accuracy = best.user_attrs.get("val_accuracy")
    acc = "-" if accuracy is None else f"{accuracy:.4f}"
    say(f"stage {stage}: best val_loss {best.value:.4f}, val accuracy {acc} (trial {best.number})")
    return True


def follow_best_head(study: optuna.Study, held: Held, will_run: bool, say: Say) -> None:
    """A fine-tuning stage's new trials start from the best head, also when a rerun with more
    head trials found a better one than the stage started from.

    Each trial records the head it started from (its ``tlopt.head``; export-best replays it
    from that one), so a stage may hold trials of two heads, each compared as what it is.
    A head trained at another cut cannot follow (the study's trials search one cut): refused.
    """
    from tlopt.tune.study import best_head

    old = study.user_attrs.get(HEAD) or {}
    new = best_head(held.study("head"))
    if (old.get("trial"), old.get("artifact_id")) == (new["trial"], new["artifact_id"]):
        return
    was = f"head trial {old.get('trial')} (val_loss {old.get('value', float('nan')):.4f})"
    now = f"trial {new['trial']} (val_loss {new['value']:.4f})"
    stage = study.user_attrs.get(ATTR + "stage")
    if not will_run:
        say(
            f"stage {stage}: fine-tuned {was}; the best head is now {now}: raise --trials to "
            "fine-tune it"
        )
        return
    cut = (old.get("params", {}).get("cut"), new["params"].get("cut"))
    if cut[0] != cut[1]:
        raise ConfigError(
            f"stage {stage}: the best head is now {now} at cut {cut[1]}, but "
            f"'{study.study_name}' fine-tunes heads at cut {cut[0]}: delete it ('tlopt study "
            f"delete {study.study_name}') and rerun to fine-tune the new head"
        )
    if FIRST_HEAD not in study.user_attrs:
        study.set_user_attr(FIRST_HEAD, old)
    study.set_user_attr(HEAD, new)
    say(f"stage {stage}: the best head is now {now}, not {was}: new trials start from it")
