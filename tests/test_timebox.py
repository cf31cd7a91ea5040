"""``tlopt tune --time``: the budget shared by the probe, the plan, the stages and the export;
``--image-size auto``; the export of the weights a trial kept."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_DATA_MODEL, run_in_group
from tests.test_tune_command import shapes_folder, tune_in_process, tune_subprocess
from tlopt.config import StudyConfig, load_config
from tlopt.durations import format_duration, parse_duration
from tlopt.errors import ConfigError
from tlopt.tune.plan import Plan, StagePlan
from tlopt.tune.size_probe import ProbeRow, candidate_sizes, choose, probe_table
from tlopt.tune.timebox import BETTER, Allotment, allot, export_seconds, rungs, turns

TINY = ["--backbone", "test_efficientnet", "--weights", "none"]


def test_durations_read_units_and_refuse_bare_numbers() -> None:
    assert parse_duration("20m") == 1200 and parse_duration("1.5h") == 5400
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    for bad in ("20", "", "m", "-5m", "20 minutes", "0s"):
        with pytest.raises(ConfigError, match="--time"):
            parse_duration(bad)
    assert [format_duration(s) for s in (1200, 5400, 90, 3600)] == ["20m", "90m", "90s", "1h"]


def test_a_budget_under_a_minute_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlopt.tune import supervisor

    # On a busy machine the worker's thread count is said too: never before a refusal.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set for the suite's xdist workers
    monkeypatch.setattr(supervisor, "busy_cores", lambda: float(supervisor.available_cores()))
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    code, out, err = tune_in_process([str(data), "--out", str(run), *TINY, "--time", "30s"],
                                     capsys, monkeypatch)  # fmt: skip
    assert code == 2 and out == "" and "Traceback" not in err
    assert (
        err.strip() == "error: --time 30s: give at least 1m (the plan alone measures for seconds)"
    )
    assert not run.exists()


def _plan(head_setup: float = 60.0) -> Plan:
    """Hymenoptera's measured costs at 320 px on a 2-core CPU (README, the plan)."""
    epochs = (10, 25, 50, 75, 100, 150)
    return Plan(
        (
            StagePlan("head", 20, epochs, {8: 0.017, 16: 0.011, 32: 0.007}, head_setup),
            StagePlan("freeze1", 20, epochs, {8: 48.0, 16: 49.5, 32: 74.0}, 30.0, 5.0),
            StagePlan("freeze2", 20, epochs, {8: 16.6, 16: 17.1, 32: 20.0}, 20.0, 5.0),
        ),
        "cpu",
    )


@pytest.mark.parametrize("seconds", [300, 600, 960, 3600, 36000])
def test_the_shares_and_the_export_fit_in_the_budget(seconds: float) -> None:
    plan = _plan()
    shares = allot(plan, seconds, set(), {"head": 20, "freeze1": 20, "freeze2": 20})
    assert [a.stage for a in shares] == ["head", "freeze1", "freeze2"]
    assert sum(a.seconds for a in shares) + export_seconds(plan) <= seconds + 1e-6
    for a in shares:
        assert (a.trials == 0) == (a.seconds == 0) and a.trials <= 20
        if a.stage != "head" and a.trials:
            assert min(a.epochs) >= 3 and max(a.epochs) <= 50  # no trial of warm-up only
    if seconds >= 3600:  # an hour runs every stage, with a few trials each
        assert all(a.trials >= 4 for a in shares)


def test_a_stage_the_budget_cannot_hold_is_left_out_and_the_cheaper_one_runs() -> None:
    caps = {"head": 20, "freeze1": 20, "freeze2": 20}
    shares = {a.stage: a for a in allot(_plan(), 600, set(), caps)}
    assert shares["freeze1"].trials == 0 and "left out" in shares["freeze1"].why
    assert shares["freeze2"].trials >= 2  # a freeze2 epoch costs a third of freeze1's here


def test_epoch_choices_given_by_the_user_are_kept() -> None:
    plan = _plan()
    caps = {"head": 20, "freeze1": 20, "freeze2": 20}
    shares = allot(plan, 36000, {"head", "freeze1", "freeze2"}, caps)
    assert all(a.epochs == (10, 25, 50, 75, 100, 150) for a in shares)
    chosen = {a.stage: a.epochs for a in allot(plan, 3600, set(), caps)}
    assert chosen["freeze1"] != plan.stages[1].epochs  # from the budget, not the fixed list


def test_a_stage_that_holds_its_trials_costs_nothing() -> None:
    shares = allot(_plan(), 3600, set(), {"head": 0, "freeze1": 20, "freeze2": 20})
    assert (shares[0].trials, shares[0].seconds) == (0, 0.0)


def test_the_probe_chooses_a_larger_size_when_it_is_lower_beyond_noise() -> None:
    """Sizes are compared image by image (a paired bootstrap), not by a fixed share of the
    mean: a size 1% lower on every image wins, one more than 2% lower on average but by two
    images of 153, higher on the others, does not; the table says in how many resamples the
    chosen won."""
    base = np.random.default_rng(1).uniform(0.01, 0.6, 153)
    base[:2] = 2.0  # two hard images

    def row(size: int, losses: np.ndarray) -> ProbeRow:
        return ProbeRow(size, 1.0, float(losses.mean()), 140, 153, 1.0, tuple(losses))

    small, steady = row(224, base), row(256, base * 0.99)
    assert choose([small, steady]) == 256  # 1% lower everywhere: beyond noise
    noisy = base + 0.01  # higher on 151 images, much lower on the two hard ones
    noisy[:2] = 0.5
    lucky = row(288, noisy)
    assert lucky.loss < small.loss * 0.98 and choose([small, lucky]) == 224
    table = "\n".join(probe_table([small, lucky], 224))
    assert "288 px" in table and "of resamples" in table


def test_the_probe_chooses_a_larger_size_only_when_it_is_clearly_better() -> None:
    def row(size: int, loss: float) -> ProbeRow:
        return ProbeRow(size, 1.0, loss, 0, 10, 1.0)

    # hymenoptera's probe (scripts/size_probe.py, README): 288 px
    assert choose([row(224, 0.148), row(256, 0.141), row(288, 0.094), row(320, 0.095)]) == 288
    assert choose([row(224, 0.100), row(256, 0.099)]) == 224  # 1% lower is not worth 1.3x
    assert candidate_sizes(224, 375) == [224, 256, 288, 320]
    assert choose([row(256, 0.099), row(224, 0.100)]) == 224  # the order probed does not matter
    assert candidate_sizes(224, 250) == [224]  # photos no larger than 250 px: no upscaling
    assert max(candidate_sizes(224, 8)) <= 224 and min(candidate_sizes(224, 8)) >= 32


def test_a_study_file_reads_budget_time_and_auto_size(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[data]\nsource = "digits"\nimage_size = "auto"\n'
                    '[budget]\ntime = "1h30m"\n')  # fmt: skip
    config = load_config(path)
    assert config.time_budget == 5400 and config.data.image_size == 0
    raw = config.to_dict()
    assert raw["budget"] == {"time": "90m"} and raw["data"]["image_size"] == "auto"
    assert StudyConfig.from_dict(raw) == config
    path.write_text('name = "s"\n[data]\nsource = "digits"\n[budget]\ntime = 20\n')
    with pytest.raises(ConfigError, match="budget.time"):
        load_config(path)


# Over 60 s by design: the budget it checks is 75 s of wall time, then a rerun refused and one
# of 1m; the only test that tune keeps --time end to end and a rerun spends what is left.
@pytest.mark.slow  # tlopt tune on a folder, twice: the full tier
def test_tune_keeps_its_time_budget_and_a_rerun_spends_only_what_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    budget = 75.0
    began = time.monotonic()
    code, out, err = tune_in_process(
        [str(data), "--out", str(run), *TINY, "--time", "75s", "--stages", "head,freeze2"],
        capsys,
        monkeypatch,
    )
    wall = time.monotonic() - began
    assert code == 0, err
    assert wall <= budget * 1.1, f"{wall:.1f} s for a budget of {budget} s\n{out}"
    assert "time budget 75s" in out and "export + report" in out
    record = json.loads((run / "run.json").read_text())
    assert record["time"]["budget"] == budget and 0 < record["time"]["spent"] <= budget * 1.1
    assert "image size chosen by a linear probe" in out  # a folder: --image-size auto
    study_file = (run / "study.toml").read_text()
    assert "# image size chosen by a linear probe" in study_file and "<- chosen" in study_file
    assert "Image size" in (run / "report" / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["image_size"]["chosen"] == load_config(run / "study.toml").data.image_size
    # Again with the same budget: what is left is too little to run anything: one line, 2.
    done = tune_subprocess([str(data), "--out", str(run), *TINY, "--time", "75s",
                            "--stages", "head,freeze2"], timeout=120)  # fmt: skip
    if record["time"]["spent"] > budget - 60:
        assert done.returncode == 2, done.stderr[-2000:]
        assert "spent" in done.stderr and "larger --time" in done.stderr
        assert "Traceback" not in done.stderr
    # A new budget (the least, 1m) runs: the probe's size is reused, the stages' studies resumed.
    done = tune_subprocess([str(data), "--out", str(run), *TINY, "--time", "1m",
                            "--stages", "head,freeze2", "--json"], timeout=200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chosen by this run's size probe before" in done.stderr
    assert json.loads((run / "run.json").read_text())["time"]["budget"] == 60


@pytest.mark.slow
def test_a_size_given_by_the_user_is_kept_and_study_create_refuses_auto(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    code, out, err = tune_in_process(
        [str(data), "--out", str(run), *TINY, "--image-size", "24", "--stages", "head",
         "--trials", "2", "--epochs", "2", "--plan-only"], capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    assert "size probe" not in out and "plan (measured on" in out
    path = tmp_path / "auto.toml"
    path.write_text(f'name = "a"\n[data]\npath = "{data}"\nimage_size = "auto"\n'
                    '[model]\nbackbone = "test_efficientnet"\nweights = "none"\n')  # fmt: skip
    done = run_in_group(
        [sys.executable, "-m", "tlopt", "study", "create", "--config",
         str(path), "--stage", "head", "--storage", f"sqlite:///{tmp_path / 'a.db'}"],
        120, "study create")  # fmt: skip
    assert done.returncode == 2 and "only tlopt tune chooses the size" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_export_is_the_model_the_best_trial_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tuning trial that beats its study keeps its weights; the export loads them (no
    retrain) and gives the validation loss the trial reported; --retrain trains again."""
    from tlopt import load_model
    from tlopt.export.bundle import export_best

    data, run = shapes_folder(tmp_path / "shapes"), tmp_path / "run"
    flags = [*TINY, "--image-size", "32", "--trials", "3", "--epochs", "2"]
    code, out, err = tune_in_process(
        [str(data), "--out", str(run), *flags, "--stages", "head,freeze2"], capsys, monkeypatch
    )
    assert code == 0, err
    url = f"sqlite:///{run / 'studies.db'}"
    study = optuna.load_study(study_name="shapes/freeze2", storage=url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    kept = [t for t in complete if t.user_attrs.get("tlopt.weights")]
    assert study.best_trial in kept  # the best so far when it finished: kept
    out_dir = tmp_path / "export"
    manifest = export_best("shapes/freeze2", out_dir, url, "cpu")
    assert manifest["weights_from"] == "the trial" and manifest["trial"] == study.best_trial.number
    # The exported model's loss on the validation split is the trial's value.
    model = load_model(out_dir / "model")
    from tlopt.tune.context import StudyContext

    ctx = StudyContext.open(study, "cpu")
    val = ctx.split("val")
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(val.batch(torch.arange(i, min(i + 16, len(val)))))
                            for i in range(0, len(val), 16)])  # fmt: skip
    loss = float(F.cross_entropy(logits.float(), val.labels))
    assert np.isclose(loss, study.best_value, rtol=1e-3, atol=1e-4), (loss, study.best_value)
    again = export_best("shapes/freeze2", tmp_path / "again", url, "cpu", retrain=True)
    assert again["weights_from"] == "retrained"


def test_the_head_gets_at_least_one_trial_before_a_fine_tuning_stage() -> None:
    """A slow feature pass (30% of the budget would not hold it) still gets its head trial."""
    shares = allot(_plan(head_setup=200.0), 600, set(), {"head": 20, "freeze1": 20,
                                                          "freeze2": 20})  # fmt: skip
    assert shares[0].trials >= 1
    tiny = allot(_plan(head_setup=2000.0), 600, set(), {"head": 20, "freeze1": 0, "freeze2": 0})
    assert tiny[0].trials == 0 and "left out" in tiny[0].why  # tune refuses it in one line


def test_competing_fine_tuning_stages_take_half_their_share_then_the_rest_goes_to_one() -> None:
    shares = [
        Allotment("head", 9, (10,), 60.0),
        Allotment("freeze1", 3, (3, 6), 100.0),
        Allotment("freeze2", 0, (3,), 0.0, "left out"),
        Allotment("freeze3", 2, (3,), 80.0),
    ]
    got = turns(shares)
    assert got == [("head", 60.0), ("freeze1", 50.0), ("freeze2", 0.0), ("freeze3", 40.0),
                   (BETTER, 90.0)]  # fmt: skip
    assert sum(s for _, s in got) == sum(a.seconds for a in shares)  # nothing lost, nothing made
    one = [Allotment("head", 9, (10,), 60.0), Allotment("freeze1", 3, (3,), 100.0)]
    assert turns(one) == [("head", 60.0), ("freeze1", 100.0)]  # nothing to compete with
    lines = rungs(shares, "median", 1, 1)
    assert "every epoch from epoch 1" in lines[0] and "freeze1, freeze3 first run 50%" in lines[1]
    assert "whose best trial first continues" in lines[1] and "continuations" in lines[2]
    assert rungs(one, "hyperband", 5, 3)[0] == "  rungs: as the hyperband pruner sets them"
    # A stage of one trial (the demo's one-point stages) runs it whole: half would not fit it.
    single = [Allotment("freeze1", 1, (20,), 120.0), Allotment("freeze2", 3, (3,), 110.0)]
    assert turns(single) == [("freeze1", 120.0), ("freeze2", 110.0)]
    assert not any("turns" in line for line in rungs(single, "median", 1, 1))


def test_a_continuation_takes_the_epochs_that_fit_at_its_batch_size() -> None:
    from tlopt.tune.plan import StagePlan
    from tlopt.tune.timebox import TRIAL_OVERHEAD_S, epochs_that_fit

    s = StagePlan("freeze1", 3, (3, 6), {8: 10.0, 16: 20.0}, 5.0, trial_seconds=4.0)
    room = TRIAL_OVERHEAD_S + 4.0
    assert epochs_that_fit(s, 16, 6, room + 45.0) == 2  # 20 s an epoch at 16
    assert epochs_that_fit(s, 8, 6, room + 45.0) == 4
    assert epochs_that_fit(s, 8, 3, room + 45.0) == 3  # never more than its parent's
    assert epochs_that_fit(s, 32, 6, room + 45.0) == 3  # unmeasured: the mean, 15 s
    assert epochs_that_fit(s, 8, 6, room + 45.0, slower=2.0) == 2  # 8 s to start, 20 s an epoch
    assert epochs_that_fit(s, 16, 6, room + 5.0) == 0


def test_a_stage_holding_a_trial_starts_no_new_one_its_turn_cannot_end() -> None:
    from tlopt.tune.timebox import TRIAL_OVERHEAD_S, no_new_trial

    # elpv's freeze1: 72 s an epoch, 3-epoch trials; its turn had 0.0 min left after the
    # continuation, and it started a trial all the same (2.5 min to be pruned).
    s = StagePlan("freeze1", 2, (3, 6), {8: 72.0, 16: 72.0, 32: 72.0}, 30.0, trial_seconds=8.0)
    a = Allotment("freeze1", 2, (6, 3), 500.0)  # the shorter choice counts, in any order
    one = TRIAL_OVERHEAD_S + 8.0 + 3 * 72.0  # 3.8 min
    why = no_new_trial(s, a, holds=True, left=one - 1.0)
    assert why == "no new trial fits in the 3.8 min left of its turn (one costs 3.8 min here)"
    assert no_new_trial(s, a, holds=True, left=-5.0) is not None  # the turn overran: 0.0 min
    assert no_new_trial(s, a, holds=True, left=one) is None
    # A stage with no complete trial yet starts one (its first turn, or a first that failed).
    assert no_new_trial(s, a, holds=False, left=1.0) is None


def test_the_second_turn_goes_to_the_stage_with_the_lower_validation_loss(tmp_path: Path) -> None:
    from optuna.trial import create_trial

    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.run.tune import _Run

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    for stage, values in (("head", [0.3]), ("freeze1", [0.25, 0.21]), ("freeze2", [0.2, 0.4])):
        study = optuna.create_study(study_name=f"r/{stage}", storage=url)
        for v in values:
            study.add_trial(create_trial(value=v))
    said: list[str] = []
    run = _Run(tmp_path / "run", None, None, "head,freeze1,freeze2", Placement(), said.append, {})
    run.held = Held("r", url)
    shares = [Allotment(s, 2, (3,), 60.0) for s in ("head", "freeze1", "freeze2")]
    assert run._better(shares, 90.0) == "freeze2"
    assert said == ["turns: freeze2 has the lowest validation loss (freeze1 0.2100, freeze2 "
                    "0.2000): the remaining 1.5 min of fine-tuning go to it"]  # fmt: skip
    optuna.create_study(study_name="r/freeze3", storage=url)  # no complete trial: not a choice
    three = [*shares, Allotment("freeze3", 2, (3,), 60.0)]
    assert run._better(three, 90.0) == "freeze2"
    empty = Held("none", url)
    run.held = empty
    assert run._better(shares, 90.0) is None and "no fine-tuning stage" in said[-1]


def test_a_folder_runs_median_pruner_stops_a_worse_trial_at_its_first_epoch(
    tmp_path: Path,
) -> None:
    from tlopt.run.options import build_config
    from tlopt.tune.pruners import make_pruner

    data = tmp_path / "photos"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
    run = build_config(tmp_path / "run", data, None, **dict.fromkeys(
        ("name", "seed", "trials", "backbone", "weights", "image_size", "epochs")))  # fmt: skip
    p = run.config.pruner
    pruner = make_pruner(p.type, p.n_startup_trials, p.n_warmup_steps, p.options)
    study = optuna.create_study(pruner=pruner)
    first = study.ask()
    for epoch, loss in enumerate((0.5, 0.4, 0.35), start=1):
        first.report(loss, epoch)
        assert not first.should_prune()  # nothing completed to judge it by
    study.tell(first, 0.35)
    better, worse = study.ask(), study.ask()
    better.report(0.45, 1)
    worse.report(0.9, 1)  # a rate that undid the head: judged at its first epoch
    assert not better.should_prune() and worse.should_prune()


def test_the_export_reserve_grows_with_the_slowdown_the_trials_measured() -> None:
    from tlopt.tune.timebox import MAX_SLOWDOWN, pace, slowdown

    s = StagePlan("freeze1", 4, (3, 6), {16: 10.0, 32: 8.0}, 5.0, trial_seconds=2.0)
    assert pace(s, 28.0, 3, 32) == pytest.approx(1.0)  # 2 + 2 + 3 x 8: as planned
    assert pace(s, 68.0, 3, 16) == pytest.approx(2.0)  # 2 + 2 + 3 x 10, twice as long
    tiny = StagePlan("freeze1", 1, (2,), {32: 0.2}, 0.1, trial_seconds=0.05)
    assert pace(tiny, 3.0, 2, 32) < 1.5  # a tiny trial's records are planned: not a slowdown
    assert pace(s, 10.0, 3, 8) is None and pace(s, 10.0, 0, 16) is None  # nothing to compare
    assert slowdown([]) == 1.0 and slowdown([0.6, 0.9]) == 1.0  # a faster machine keeps it
    assert slowdown([1.0, 2.0, 3.0]) == 2.0 and slowdown([9.0]) == MAX_SLOWDOWN
    assert slowdown([5.0] * 8 + [1.0] * 8) == 1.0  # the recent trials: the load went away


def test_a_trial_budget_the_user_wrote_holds_against_the_time_left(tmp_path: Path) -> None:
    """The time a run leaves goes to new points past the trial budget only when the user did
    not set it (--trials, or n_trials in the study file): the default's 20 is not a choice."""
    from tlopt.run.options import build_config

    data = tmp_path / "photos"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
    keys = ("name", "seed", "trials", "backbone", "weights", "image_size", "epochs")

    def trials_set(config_file: Path | None = None, **flags: object) -> bool:
        given = dict.fromkeys(keys) | flags
        return build_config(tmp_path / "run", data, config_file, **given).trials_set

    assert not trials_set(time="20m")
    assert trials_set(time="20m", trials=5)
    study = tmp_path / "s.toml"
    study.write_text('name = "s"\n' + TINY_DATA_MODEL)
    assert not trials_set(study, time="5m")
    study.write_text('name = "s"\nn_trials = 3\n' + TINY_DATA_MODEL)
    assert trials_set(study, time="5m")
