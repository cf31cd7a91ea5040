"""``tlopt tune``: the whole staged search in one command, resumable.

It writes ``RUN/study.toml`` and ``RUN/run.json`` and calls what ``study create``, ``worker``,
``export-best`` and ``report`` call: each stage's study in order, the best trial of the run
exported to ``RUN/export``, every stage reported in ``RUN/report``. Run again, it decides from
what the run folder and the studies hold: it reuses the studies of the same name and config,
runs no stage that holds its budget, spends only what is left of the same ``--time``, and never
replaces an export with a worse one. Ctrl-C or SIGTERM anywhere exports the best trial so far
and ends with exit 130.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlopt.config import AUTO_SIZE, StudyConfig
from tlopt.errors import ConfigError, Stopped, TloptError
from tlopt.run.finish import candidates, finish
from tlopt.run.held import Held, adopt_epochs, adopt_rules, check_order, check_studies
from tlopt.run.options import DEFAULT_STAGES, DEFAULT_TIME, EVERY, build_config, parse_stages
from tlopt.run.placement import Placement, threads_now
from tlopt.run.plan import allot_time, export_reserve, measured_plan
from tlopt.run.record import Clock, RunRecord, check_run_storage, run_storage
from tlopt.run.size import choose_size, recorded_size, with_size
from tlopt.run.stage import Box, Say, run_stage, sigterm_is_ctrl_c
from tlopt.run.study_file import write_study_file
from tlopt.tune.timebox import Allotment

if TYPE_CHECKING:
    from tlopt.tune.plan import Plan


def tune(
    out: Path,
    data: Path | None = None,
    config_file: Path | None = None,
    stages: str = DEFAULT_STAGES,
    place: Placement | None = None,
    say: Say = print,
    **flags: Any,
) -> dict[str, Any]:
    """Run or resume the stages into ``out``; returns the summary that ``--json`` prints.

    ``flags`` (None: the study file's or the default): name, seed, trials, backbone, weights,
    image_size (a number or "auto"), epochs, storage, time (e.g. "20m"), plan_only."""
    with sigterm_is_ctrl_c():
        run = _Run(out, data, config_file, stages, place or Placement(), say, flags)
        try:
            return run.go()
        except KeyboardInterrupt:
            raise run.stopped() from None


class _Run:
    """One invocation of ``tlopt tune``: what it has decided so far, for the stop to use."""

    def __init__(
        self,
        out: Path,
        data: Path | None,
        config_file: Path | None,
        stages: str,
        place: Placement,
        say: Say,
        flags: dict[str, Any],
    ) -> None:
        self.began = time.monotonic()
        self.plan_only = bool(flags.pop("plan_only", False))
        self.defaulted = config_file is None and not any(
            flags.get(k) for k in ("time", "trials", "epochs")
        )
        self.out, self.data, self.config_file, self.say = out.expanduser(), data, config_file, say
        self.names, self.place, self.flags = parse_stages(stages), place, flags
        self.held: Held | None = None
        self.clock: Clock | None = None
        self.config: StudyConfig | None = None
        self.plan: Plan | None = None
        self.probe: dict[str, Any] | None = None
        self.stages: list[str] = list(self.names)  # the run's: these and those it ran before
        self.ran: dict[str, int] = {}
        self.exporting = False
        self._measured: dict[str, Any] = {}
        self.paces: list[float] = []  # finished trials' seconds over the plan's (timebox.pace)
        self.trials_set = False  # --trials or the study file's n_trials: no points past it

    def go(self) -> dict[str, Any]:
        from tlopt.tune.context import open_config_source
        from tlopt.tune.timebox import PROBE_SHARE

        out, say, names = self.out, self.say, self.names
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out '{out}' is a file: pass a folder for the run")
        run = build_config(out, self.data, self.config_file, **self.flags)
        config, url = run.config, run.url
        record = RunRecord.read(out)
        check_run_storage(out, url, record)
        open_config_source(config)  # the data's one-line errors, before anything is written
        self.clock = clock = Clock(config.time_budget, record, self.began)
        if config.time_budget:
            clock.check()
        self.held = held = Held(config.name, url)
        was = record.get("stages")
        self.stages += [s for s in was if s not in names] if isinstance(was, list) else []
        check_order(config, names, held)  # before the probe spends anything
        if self.defaulted:
            say(
                f"no --time, --trials or --epochs: a budget of {DEFAULT_TIME} (--time sets another)"
            )
        if config.data.image_size == AUTO_SIZE:
            self.probe = recorded_size(config, record, say)
            if self.probe is None:
                self.place = threads_now(self.place)  # the probe's features serve the workers
                share = clock.left() * PROBE_SHARE if config.time_budget else None
                self.probe = choose_size(config, self.place, share, say)
                clock.saving = not self.plan_only  # the probe's time and choice are the run's
                clock.save(storage=run_storage(out, url), size_probe=self.probe)
            config = with_size(config, self.probe)
        config = adopt_rules(config, names, held)  # an older run resumes by its own rules
        written = config  # the study file: what the user set, at the chosen size
        keep = {st for st in names if run.epochs_set(st)}
        self.trials_set = run.trials_set
        config, taken = adopt_epochs(config, names, held, keep)
        check_studies(config, names, held)
        self.place = threads_now(self.place)  # after the checks, so that a refusal is its one line
        self.config = config
        self.plan, self._measured = measured_plan(config, names, held, self.place, record, say)
        shares: list[Allotment] = []
        if config.time_budget:
            reserve = self._export_reserve()
            config, shares, self.plan = allot_time(
                config, names, held, self.plan, clock.left(), taken, reserve
            )
            check_studies(config, names, held)
        self._say_plan(shares)
        if self.plan_only:
            result = {"name": config.name, "storage": _masked(url), "plan": self.plan.as_dict()}
            return result | ({"image_size": self.probe} if self.probe else {})
        clock.saving = True
        clock.save(
            storage=run_storage(out, url),
            stages=self.stages,
            measured_plan=self._measured,
            **({"size_probe": self.probe} if self.probe else {}),
        )
        notes = self.probe["table"] if self.probe else []
        write_study_file(written, out / "study.toml", notes, epochs_set=EVERY in run.fixed)
        say(f"study file {out / 'study.toml'}; studies in {_masked(url)}")
        self.config = config
        clock.fixed += clock.now()  # the probe, the plan, the checks: what trains no trial
        try:
            self._run_stages(config, shares)
            return self._finish()
        finally:
            self._closing_line()

    # --- the plan ------------------------------------------------------------------------

    def _export_reserve(self) -> float:
        """The export and report's seconds, as measured (or guessed) on the machine as the
        plan found it, times how much slower this run's trials ran than the plan said."""
        from tlopt.tune.timebox import slowdown

        assert self.clock is not None and self.plan is not None
        return export_reserve(self.clock.record, self.plan) * slowdown(self.paces)

    def _say_plan(self, shares: list[Allotment]) -> None:
        from tlopt.tune.plan import table, warning
        from tlopt.tune.timebox import rungs
        from tlopt.tune.timebox import table as time_table

        assert self.plan is not None and self.config is not None and self.clock is not None
        for line in table(self.plan):
            self.say(line)
        if (warn := warning(self.plan)) is not None:
            self.say(warn)
        if shares:
            budget, reserve = self.config.time_budget, self._export_reserve()
            p = self.config.pruner
            for line in time_table(shares, budget, self.clock.spent(), reserve) + rungs(
                shares, p.type, p.n_startup_trials, p.n_warmup_steps
            ):
                self.say(line)

    # --- the stages -----------------------------------------------------------------------

    def _run_stages(self, config: StudyConfig, shares: list[Allotment]) -> None:
        """Each stage in order; with a time budget each gets its share (what one leaves unspent
        goes to the next) and starts no trial whose longest epoch choice cannot end by then."""
        from tlopt.tune.timebox import BETTER, HOLDS, no_new_trial, trial_seconds, turns
        from tlopt.tune.worker import STOP

        assert self.held is not None and self.clock is not None and self.plan is not None
        held, clock, say = self.held, self.clock, self.say
        done = self._on_trial_done
        if not shares:
            for stage in self.names:
                before = held.finished(stage)
                try:
                    run_stage(config, stage, held, self.place, say, on_trial_done=done)
                finally:
                    self.ran[stage] = self.ran.get(stage, 0) + held.finished(stage) - before
                    clock.save()
                if STOP.is_set():  # Ctrl-C or SIGTERM in the worker: the run stops here
                    raise KeyboardInterrupt
            return
        by_stage = {a.stage: a for a in shares}
        runs = {s for s in self.names if by_stage[s].trials or by_stage[s].why == HOLDS}
        stages_began, planned = time.monotonic(), 0.0
        for turn, seconds in turns(shares):
            planned += seconds
            # The stages' end: the export's reserve, grown with the slowdown measured so far.
            stop = self._stop()
            better = self._better(shares, seconds) if turn == BETTER else turn
            if better is None:
                continue
            stage = better
            a, ours = by_stage[stage], self.plan.stages[self.names.index(stage)]
            if stage not in runs:
                say(f"stage {stage}: {a.why}")
                continue
            if turn == BETTER:  # the better stage's best point first gets more epochs
                self._continue(stage, min(stages_began + planned, stop))
            now = time.monotonic()
            # Each stage ends at its planned end, the last one too: run to the export's reserve,
            # the last stage of a 75 s budget went 28 s (37%) over on a machine at load 5, where
            # the export and report took twice their reserve.
            until = min(stages_began + planned, stop)
            longest = trial_seconds(ours, (max(a.epochs),))
            if a.trials and stop - now < longest:
                say(
                    f"stage {stage}: left out: {max(0.0, stop - now) / 60:.1f} min are left "
                    f"before the export and its longest trial costs {longest / 60:.1f} min here"
                )
                continue
            if why := no_new_trial(ours, a, held.best(stage) is not None, until - now):
                say(f"stage {stage}: {why}")
                continue
            # The stage runs trials (up to its trial budget) until its time is up: the share's
            # count is what the plan expects, and a stage whose trials run faster runs more.
            cap = max(a.trials, held.remaining(config, stage))
            before = held.finished(stage)
            staged = replace(config, n_trials=max(1, cap + before))
            expect = max(1, round(a.trials * seconds / a.seconds)) if a.seconds else a.trials
            box = Box(max(1.0, until - now - longest), time.time() + stop - now, expect)
            try:
                completed = run_stage(staged, stage, held, self.place, say, box, done)
            finally:
                self.ran[stage] = self.ran.get(stage, 0) + held.finished(stage) - before
                clock.save()
            if STOP.is_set():  # Ctrl-C or SIGTERM, not the deadline: the run stops here
                raise KeyboardInterrupt
            if not completed and stage == "head" and not held.best("head"):
                raise TloptError("no head trial completed in its time: give a longer --time")
        if not candidates(held, self.stages):
            raise TloptError("no stage completed a trial in its time: give a longer --time")
        # What the stages left before the export's reserve: continuations (a continuation that
        # beat its parent may continue), then new points of the better stage, continued too.
        from tlopt.run.grow import more_points

        tuning = [a.stage for a in shares if a.stage != "head" and a.stage in runs]
        self._continue_best(tuning)
        if self.trials_set or not (best := held.best_losses(tuning)):
            return
        st = min(best, key=best.__getitem__)
        ran = more_points(held, config, by_stage[st], self.plan.stages[self.names.index(st)],
                          self._stop(), self.place, say, done)  # fmt: skip
        self.ran[st] = self.ran.get(st, 0) + ran
        clock.save()
        self._continue_best(tuning)

    def _continue_best(self, tuning: list[str]) -> None:
        """Up to MAX_CONTINUATIONS rounds: each continues the best trial not continued yet of
        the first of ``tuning`` (lowest best loss first) that has one; none left: done."""
        from tlopt.run.grow import MAX_CONTINUATIONS

        assert self.held is not None
        for _ in range(MAX_CONTINUATIONS):
            best = self.held.best_losses(tuning)
            if not any(self._continue(st, self._stop()) is not None
                       for st in sorted(best, key=best.__getitem__)):  # fmt: skip
                return

    def _stop(self) -> float:
        """When the stages end: the budget's end less the export's reserve (monotonic)."""
        assert self.clock is not None
        return self.clock.end() - self._export_reserve()

    def _continue(self, stage: str, until: float) -> bool | None:
        """tlopt.run.grow.continue_best for one of this run's stages (None: another's)."""
        from tlopt.run.grow import continue_best
        from tlopt.tune.timebox import slowdown

        assert self.held is not None and self.plan is not None
        if stage not in self.names:
            return None
        ours = self.plan.stages[self.names.index(stage)]
        try:
            return continue_best(self.held, stage, ours, until, slowdown(self.paces),
                                 self.place, self.say, self._on_trial_done)  # fmt: skip
        finally:
            if self.clock is not None:
                self.clock.save()

    def _better(self, shares: list[Allotment], seconds: float) -> str | None:
        """The fine-tuning stage with the lower best validation loss after the first turns:
        the one that gets what they left (tlopt.tune.timebox.turns); None: none completed."""
        from tlopt.tune.timebox import competing

        assert self.held is not None
        best = self.held.best_losses([a.stage for a in competing(shares)])
        if not best:
            self.say("turns: no fine-tuning stage completed a trial in its first turn")
            return None
        stage = min(best, key=best.__getitem__)  # a tie: the earlier stage
        losses = ", ".join(f"{st} {v:.4f}" for st, v in best.items())
        self.say(
            f"turns: {stage} has the lowest validation loss ({losses}): the remaining "
            f"{seconds / 60:.1f} min of fine-tuning go to it"
        )
        return stage

    def _on_trial_done(self, *args: Any) -> None:
        """Each finished trial: its curves and note (for the dashboard), the time in run.json."""
        from tlopt.report.trial_artifacts import write_trial_artifacts

        write_trial_artifacts(*args)
        self._note_pace(*args)
        if self.clock is not None:
            self.clock.save()

    def _note_pace(self, trial: Any, ctx: Any, history: Any, params: Any) -> None:
        """The trial's training seconds against the plan's (timebox.pace), for the reserve. Not
        a head trial's: heads trained together share their batch's seconds evenly, and a tiny
        head's few milliseconds an epoch are less than its records cost (a pace of 8 on the
        tests' network, which put the reserve at four times the export's)."""
        from tlopt.tune.replay import SAME_AS
        from tlopt.tune.timebox import pace

        if ctx.stage.name == "head" or SAME_AS in trial.user_attrs:  # a repeat trains nothing
            return
        stage = next((s for s in (self.plan.stages if self.plan else ()) if
                      s.stage == ctx.stage.name), None)  # fmt: skip
        seconds = trial.user_attrs.get("seconds")
        if stage is not None and isinstance(seconds, (int, float)):
            epochs = sum(r.epoch > 0 for r in history)
            if (p := pace(stage, float(seconds), epochs, params.batch_size)) is not None:
                self.paces.append(p)

    # --- the end --------------------------------------------------------------------------

    def _closing_line(self) -> None:
        """The time spent of the budget, and the share of it that trained no trial."""
        clock, config = self.clock, self.config
        if clock is not None and config is not None and config.time_budget:
            clock.save()
            self.say(clock.closing_line())

    def _finish(self) -> dict[str, Any]:
        """The export and the report (tlopt.run.finish); a stop from here keeps the old export."""
        assert self.config is not None and self.held is not None and self.clock is not None
        self.exporting = True
        return finish(self.config, self.held, self.out, self.place, self.stages, self.ran,
                      self.plan, self.probe, self.clock, self.say)  # fmt: skip

    def stopped(self) -> Stopped:
        """Ctrl-C or SIGTERM: the best trial so far exported (from its kept weights: seconds;
        Ctrl-C again skips it), then the one line that ends the run (exit 130)."""
        keep = "every finished trial is kept; run again to resume"
        held, config, clock = self.held, self.config, self.clock
        if self.exporting:
            return Stopped(
                f"stopped during the export: {self.out / 'export'} holds the export "
                f"before it, whole; {keep}"
            )
        if held is None or config is None or clock is None:
            return Stopped(f"stopped before anything was written: {keep}")
        if not candidates(held, self.stages):
            return Stopped(f"stopped before a trial completed: {keep}")
        self.say("stopped: exporting the best trial so far (Ctrl-C again skips it)")
        try:
            self._finish()
        except KeyboardInterrupt:
            return Stopped(
                f"stopped again: the export was skipped ({self.out / 'export'} holds "
                f"the one before, whole); {keep}"
            )
        finally:
            self._closing_line()
        return Stopped(
            f"stopped: the best trial so far is exported to {self.out / 'export'}; {keep}"
        )


def _masked(url: str) -> str:
    from tlopt.tune.storage import mask_url

    return mask_url(url)
