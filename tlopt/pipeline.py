"""``tlopt tune``: the whole staged search in one command, resumable.

It writes ``RUN/study.toml`` and ``RUN/run.json`` (where the studies are) and calls what
``study create``, ``worker``, ``export-best`` and ``report`` call: each stage's study in order,
the best stage exported to ``RUN/export``, every stage reported in ``RUN/report``. Run again,
it reuses the studies of the same name and config, runs no stage that holds its budget of
finished trials and keeps an export of the same trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlopt.config import AUTO_SIZE, StudyConfig, fine_tunes_from_head, load_config
from tlopt.errors import ConfigError, Stopped, TloptError
from tlopt.names import ATTR, FIRST_HEAD, HEAD, parse_stage
from tlopt.report.trial_artifacts import write_trial_artifacts
from tlopt.tune.storage import (
    has_secret,
    mask_url,
    open_storage,
    resolve_url,
    sqlite_path,
    study_names,
)
from tlopt.tune.study import (
    FINISHED,
    best_head,
    best_trial,
    buildable_problems,
    create,
    load,
    snapshot,
)
from tlopt.tune.timebox import Allotment, format_duration

if TYPE_CHECKING:
    import optuna

    from tlopt.tune.plan import Plan

MIN_TIME_S = 60.0  # a time budget with less than this left runs nothing
# A folder run without --time, --trials or --epochs: what a user waits for on one GPU; the
# plan shows what it buys (on a 2-core CPU a few short trials per stage).
DEFAULT_TIME = "1h"
DEFAULT_STAGES = "head,freeze1,freeze2"  # the reference projects' stages
FOLDER_DEFAULTS = {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "image_size": "auto"}
# A folder run's head stage trains heads on cached features, seconds a trial, so it searches the
# rate and the dropout too ([stages.head]; the fine-tuning stages keep [search]'s). On
# hymenoptera at 288 px, 20 head trials reached val loss 0.0918 (147/153) at [search]'s lr 1e-3
# and dropout 0.2, and 0.0851 (148/153) with these (lr 3e-3, dropout 0.5); on 1,200 Fashion-MNIST
# photos at 224 px 0.3077 against 0.3086 (README, Accuracy).
FOLDER_HEAD = {"lr": [3e-4, 1e-3, 3e-3], "dropout": [0.2, 0.5]}
SUMMARY = "summary.json"
# Where the run's studies are (their storage URL, masked), written before any stage runs: the
# way back to them when the study file cannot say (its URL is blanked when it holds a secret).
RUN_RECORD = "run.json"
OWN_SQLITE = "RUN/studies.db"  # the record's name for the run's own SQLite file (it may move)
HEADER = """\
# The study file of a 'tlopt tune' run, written by it. Edit it, then resume or extend the run:
#   tlopt tune --config {out}/study.toml --out {out}
# create one stage's study by hand:  tlopt study create --config {out}/study.toml --stage head
# join a running stage with more workers (here or on other machines):
#   tlopt worker --study {name}/STAGE --storage URL
# Every stage is the Optuna study {name}/STAGE in [storage] url. Fine-tuning stages start from
# the best head and, unless a [stages.STAGE] table says otherwise, search 0.01, 0.03 and 0.1
# of the [search] lr with one warm-up epoch and a rate scaled by 0.7 per block group.
# [stages.STAGE] sets a stage's own values over [search] (a folder run's head, seconds a trial
# on cached features, searches its rate and dropout there).{where}
"""
COMMENTS = {  # one per top-level key or table
    "seed": "seeds the split and training: every stage has the same validation split",
    "n_trials": "finished (complete + pruned) trials per stage, shared by every worker",
    "data": "one folder per class, or train/ and val/ (and test/) of class folders",
    "model": "any timm backbone; weights: pretrained, bundled, none or file:PATH",
    "search": "a list is a choice; one element fixes the value",
}


@dataclass
class Placement:  # the worker's placement flags, checked as 'tlopt worker' checks them
    gpus: list[str] = field(default_factory=list)
    per_gpu: int = 1  # 0: fit the slots to each GPU's memory
    processes: int = 1
    heads_at_once: int = 8
    device: str | None = None
    threads: int | None = None  # torch's CPU threads here: the plan's and the workers' (tune)


def placement(
    gpus: str | None, per_gpu: str, processes: int, heads_at_once: int, device: str | None
) -> Placement:
    from tlopt.devices import check_device
    from tlopt.tune.supervisor import parse_gpus

    device, ids = check_device(device), parse_gpus(gpus)
    slots = 0 if per_gpu == "auto" else int(per_gpu) if per_gpu.isdigit() else -1
    if slots < 0 or (slots == 0 and per_gpu != "auto"):
        raise ConfigError(f"--per-gpu {per_gpu}: give a number of processes (1, 2, ...) or 'auto'")
    if slots == 0 and not ids:
        raise ConfigError("--per-gpu auto sizes GPU slots: pass --gpus too (e.g. --gpus all)")
    if processes < 1 or heads_at_once < 1:
        raise ConfigError("--processes and --heads-at-once must be at least 1")
    if processes > 1 and not ids and device not in (None, "", "auto", "cpu"):
        raise ConfigError(f"--processes runs CPU workers; on a GPU: --gpus 0 --per-gpu {processes}")
    return Placement(ids, slots, processes, heads_at_once, device)


def parse_stages(text: str) -> list[str]:
    """``"head,freeze1"`` -> the stage names, checked; a fine-tuning stage needs head first."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise ConfigError(f"--stages '{text}': give stages, e.g. --stages {DEFAULT_STAGES}")
    for i, stage in enumerate(stages):
        parse_stage(stage)  # ConfigError naming the valid forms
        if stage in stages[:i]:
            raise ConfigError(f"--stages {text}: stage '{stage}' is listed twice")
        if fine_tunes_from_head(stage) and "head" in stages[i:]:
            raise ConfigError(f"--stages {text}: '{stage}' starts from the best head: put it first")
    return stages


def build_config(
    out: Path, data: Path | None, config_file: Path | None, **flags: Any
) -> tuple[StudyConfig, str, set[str]]:
    """The study config of the run, its storage URL and the stages whose epoch choices the user
    set (a time budget keeps them): the study file (or the folder and the defaults), then the
    flags that are set; storage: flag, $TLOPT_STORAGE, file, RUN/studies.db."""
    storage = flags.pop("storage", None)
    time_budget = flags.pop("time", None)
    if config_file is not None:
        raw = load_config(config_file, data_path=str(data) if data else None).to_dict()
    elif data is None:
        raise ConfigError("tlopt tune needs an image folder DATA or --config")
    else:
        folder = data.expanduser().resolve()
        raw = {"name": folder.name or "study", "data": {"source": "folder", "path": str(folder)}}
        raw["stages"] = {"head": dict(FOLDER_HEAD)}
        flags = {k: FOLDER_DEFAULTS.get(k) if v is None else v for k, v in flags.items()}
    where = {"backbone": "model", "weights": "model", "image_size": "data", "epochs": "search"}
    for key, value in ((k, v) for k, v in flags.items() if v is not None):
        table = raw.setdefault(where[key], {}) if key in where else raw
        table["n_trials" if key == "trials" else key] = value
    if time_budget is None and config_file is None and not (flags.get("trials") or
                                                            flags.get("epochs")):  # fmt: skip
        time_budget = DEFAULT_TIME  # a folder at the defaults: a budget, not a fixed list
    if time_budget is not None:
        raw["budget"] = {"time": time_budget}
    every = "epochs" in raw.get("search", {})  # --epochs or the file's [search]: every stage
    stage_tables = raw.get("stages", {})
    fixed = {st for st, t in stage_tables.items() if isinstance(t, dict) and "epochs" in t}
    default = f"sqlite:///{(out / 'studies.db').expanduser().resolve()}"
    url = resolve_url(storage, raw.get("storage", {}).get("url") or default)
    raw.setdefault("storage", {})["url"] = url
    config = StudyConfig.from_dict(raw, "tlopt tune")
    if problems := buildable_problems(config.model, config.pruner):  # an unknown backbone
        raise ConfigError("\n".join(f"{key}: {problem}" for key, problem in problems))
    return config, url, {"*"} if every else fixed


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _value(v: Any) -> str:
    if isinstance(v, (bool, int, float)):
        return str(v).lower() if isinstance(v, bool) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"


def _emit(path: list[str], table: dict[str, Any], lines: list[str]) -> None:
    body, subs = [], []
    for k, v in table.items():
        if v is None or (v == {} and k in ("stages", "options", "decay_params")):
            continue
        if isinstance(v, dict) and set(v) != {"low", "high", "log"}:  # a range stays inline
            subs.append((k, v))
            continue
        note = COMMENTS.get(k) if not path else None
        body.append(f"{_key(k)} = {_value(v)}" + (f"  # {note}" if note else ""))
    if path and (body or not subs):
        note = f"  # {COMMENTS[path[0]]}" if len(path) == 1 and path[0] in COMMENTS else ""
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]{note}"]
    lines += body
    for k, v in subs:
        _emit([*path, k], v, lines)


def write_study_file(config: StudyConfig, path: Path, notes: list[str] | None = None) -> None:
    """``path``: a commented study file that loads back to ``config`` (a password: url = "");
    ``notes``: comment lines after the header (the size probe's table)."""
    raw = config.to_dict()
    url = raw["storage"]["url"]
    where = ""
    if has_secret(url):  # no secret in a file: the user sets TLOPT_STORAGE to resume
        raw["storage"]["url"] = ""
        where = (
            f"\n# The studies are in {mask_url(url)} (url is blank below: it holds a password).\n"
            "# Set TLOPT_STORAGE to that URL, with its password, before you resume or join the run."
        )
    lines = [HEADER.format(out=path.parent, name=config.name, where=where).rstrip("\n")]
    lines += [f"# {line}" for line in notes or []]
    _emit([], raw, lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    back = load_config(path).to_dict()
    back["storage"]["url"] = url
    if back != config.to_dict():  # a bug here, not the user's: never leave a file that lies
        raise RuntimeError(f"{path} does not load back to the config it was written from")


@contextlib.contextmanager
def _environ(key: str, value: str | None) -> Iterator[None]:
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
def stdout_to_stderr() -> Iterator[None]:
    """Send what this process and its workers write to descriptor 1 to stderr (for --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _finished(name: str, url: str) -> int:
    return len(load(name, url).get_trials(deepcopy=False, states=FINISHED))


def _stage(
    config: StudyConfig,
    stage: str,
    url: str,
    p: Placement,
    say: Any,
    box: tuple[float, float] | None = None,
    expect: int | None = None,
) -> dict[str, Any] | None:
    """Create (or reuse) the stage's study and run workers until it holds its budget.

    ``box``: a time budget's (seconds for this stage, deadline as a ``time.time()``): no trial
    starts after the seconds, the running one stops at the deadline, and a stage that ran out
    of time ends with what it finished (None: not one complete trial). ``expect``: the new
    trials its time is expected to allow (the progress bar's total, so that its ETA holds).
    """
    from tlopt.tune.sampling import stage_budget
    from tlopt.tune.supervisor import supervise
    from tlopt.tune.worker import DEADLINE_ENV, STOP, work

    name, budget = f"{config.name}/{stage}", config.n_trials
    if name not in study_names(open_storage(url)):
        create(config, stage, url)
    study = load(name, url)
    stored = study.user_attrs.get(ATTR + "config", {})
    if stored.get("n_trials") != budget:  # a rerun with another --trials: the study takes it
        study.set_user_attr(ATTR + "config", snapshot(config))
        say(f"stage {stage}: budget {stored.get('n_trials')} -> {budget} finished trials")
    budget = stage_budget(budget, config.space_for(stage))  # a used-up space stops the stage
    before = len(study.get_trials(deepcopy=False, states=FINISHED))
    if fine_tunes_from_head(stage):
        _follow_best_head(study, f"{config.name}/head", url, before < budget, say)
    if before >= budget:
        say(f"stage {stage}: '{name}' holds {before} of {budget} finished trials: nothing to run")
    else:
        join = f"tlopt worker --study {name} --storage {mask_url(url)}"
        what = f"{budget - before} of {budget} trials"
        if box is not None:
            what = f"trials for {max(0.0, box[0]) / 60:.1f} min (up to {budget - before})"
        say(f"stage {stage}: running {what} (more workers: {join})")
        seconds = None if box is None else max(1.0, box[0])
        with _environ(DEADLINE_ENV, None if box is None else repr(box[1])):
            if not (p.gpus or p.processes > 1):
                work(
                    name,
                    url,
                    None,
                    seconds,
                    p.device,
                    p.heads_at_once,
                    threads=p.threads,
                    on_trial_done=write_trial_artifacts,
                    expect=None if expect is None else min(budget, before + expect),
                )
            elif (
                supervise(name, url, None, seconds, p.gpus, p.per_gpu, p.processes, p.heads_at_once)
                and not STOP.is_set()  # Ctrl-C: the workers stopped as asked
            ):
                raise TloptError(f"the workers of '{name}' failed (see above): run again to resume")
    after = _finished(name, url)
    if after < budget and box is None and not STOP.is_set():  # Ctrl-C: the caller says so
        raise TloptError(
            f"stage {stage} stopped at {after} of {budget} trials: run again to resume"
        )
    if after < budget and not STOP.is_set():
        say(f"stage {stage}: its time is up after {after - before} trials ({after} finished)")
    if not any(t.state.name == "COMPLETE" for t in load(name, url).get_trials(deepcopy=False)):
        if not STOP.is_set():
            say(f"stage {stage}: no trial completed in its time: a longer --time runs it")
        return None
    best = best_trial(load(name, url))
    accuracy = best.user_attrs.get("val_accuracy")
    acc = "-" if accuracy is None else f"{accuracy:.4f}"
    say(f"stage {stage}: best val_loss {best.value:.4f}, val accuracy {acc} (trial {best.number})")
    attrs = study.user_attrs  # a trial that recorded no head: the study's first
    head = (best.user_attrs.get(HEAD) or attrs.get(FIRST_HEAD) or attrs.get(HEAD) or {}).get(
        "trial"
    )
    keys = ("stage", "study", "finished", "ran", "best_trial", "best_value", "best_accuracy")
    values = (stage, name, after, after - before, best.number, best.value, accuracy)
    row = dict(zip(keys, values, strict=True))
    if fine_tunes_from_head(stage):  # the head trial its best trial started from
        row["head_trial"] = head
    return row


def _follow_best_head(
    study: optuna.Study, head_name: str, url: str, will_run: bool, say: Callable[[str], Any]
) -> None:
    """A fine-tuning stage's new trials start from the best head, also when a rerun with more
    head trials found a better one than the stage started from.

    Each trial records the head it started from (its ``tlopt.head``; export-best replays it
    from that one), so a stage may hold trials of two heads, each compared as what it is.
    A head trained at another cut cannot follow (the study's trials search one cut): refused.
    """
    old = study.user_attrs.get(HEAD) or {}
    new = best_head(load(head_name, url))
    if (old.get("trial"), old.get("artifact_id")) == (new["trial"], new["artifact_id"]):
        return
    was = f"head trial {old.get('trial')} (val_loss {old.get('value', float('nan')):.4f})"
    now = f"trial {new['trial']} (val_loss {new['value']:.4f})"
    stage = study.user_attrs.get(ATTR + "stage")
    if not will_run:
        say(f"stage {stage}: fine-tuned {was}; the best head is now {now}: raise --trials to "
            "fine-tune it")  # fmt: skip
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


def _export_is(folder: Path, study: str, trial: int) -> bool:  # a complete export of the trial?
    from tlopt.export.bundle import FILES

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    same = manifest.get("study") == study and manifest.get("trial") == trial
    return same and all((folder / f).is_file() for f in FILES)


def _but_budget(config: Any, stage: str) -> Any:
    """A stored config as it decides the study of ``stage``: less its trial and time budgets
    (a rerun may change --trials and --time) and the other stages' tables."""
    if not isinstance(config, dict):
        return config
    rest = {k: v for k, v in config.items() if k not in ("n_trials", "budget")}
    if isinstance(rest.get("storage"), dict):  # older studies stored the URL, masked
        rest["storage"] = {**rest["storage"], "url": ""}
    if isinstance(rest.get("stages"), dict):
        rest["stages"] = {k: v for k, v in rest["stages"].items() if k == stage}
    return rest


def _check_order(config: StudyConfig, names: list[str], url: str) -> None:
    """A fine-tuning stage needs the head stage first (in --stages, or its study exists)."""
    existing = _existing(url)
    if "head" in names or f"{config.name}/head" in existing:
        return
    for stage in names:
        if fine_tunes_from_head(stage):
            raise ConfigError(f"stage '{stage}' starts from the best head: --stages head,{stage}")


def _check_studies(config: StudyConfig, names: list[str], url: str) -> None:
    """Before anything runs: a study of this name holds this config, and head comes first."""
    existing = _existing(url)
    head = "head" in names or f"{config.name}/head" in existing
    for stage in names:
        name = f"{config.name}/{stage}"
        if name in existing:  # the same name with the same config is this run: resume it
            stored = load(name, url).user_attrs.get(ATTR + "config")
            if _but_budget(stored, stage) != _but_budget(snapshot(config), stage):
                create(config, stage, url, dry_run=True)  # its error shows the difference
        elif fine_tunes_from_head(stage) and not head:
            raise ConfigError(f"stage '{stage}' starts from the best head: --stages head,{stage}")


def check_run_storage(out: Path, url: str) -> None:
    """Refuse to resume the run in ``out`` anywhere but in the storage its studies are in.

    A study file whose URL held a secret is written with it blanked; resumed without
    ``TLOPT_STORAGE`` or ``--storage``, it would fall back to ``RUN/studies.db`` and run every
    stage again there (and overwrite the export). The run record says where they are.
    """
    try:
        recorded = json.loads((out / RUN_RECORD).read_text())["storage"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new run (or one from before the record): nothing to compare with
    if recorded == _run_storage(out, url):
        return
    if recorded == OWN_SQLITE:
        raise ConfigError(
            f"{out}'s studies are in {out / 'studies.db'}, not {mask_url(url)}: unset "
            "TLOPT_STORAGE and drop --storage to resume it, or pass another --out for a new run"
        )
    raise ConfigError(
        f"{out}'s studies are in {recorded}, not {mask_url(url)}: set TLOPT_STORAGE to that URL "
        "(with its password) and rerun, or pass another --out for a new run"
    )


def _run_storage(out: Path, url: str) -> str:
    """The storage as the run record keeps it: masked; the run's own SQLite file by name."""
    inside = sqlite_path(url) == (out / "studies.db").expanduser().resolve()
    return OWN_SQLITE if inside else mask_url(url)


def _threads_now(p: Placement) -> Placement:
    """Decide the CPU threads once, before the plan's work loads the machine: the plan
    measures at the count the workers of this process then run at. Once decided, the count
    stands (a second call returns it)."""
    import torch

    from tlopt.devices import pick_device
    from tlopt.tune.supervisor import worker_threads

    if p.gpus or p.processes > 1:  # each worker process decides its own
        return p
    threads = worker_threads(p.threads, os.environ, pick_device(p.device).type)
    if threads:
        torch.set_num_threads(threads)
    return replace(p, threads=threads)


def _remaining(config: StudyConfig, url: str) -> Callable[[str], int]:
    """Each stage's trials still to run: its budget less its finished trials."""
    from tlopt.tune.sampling import stage_budget

    existing = _existing(url)

    def remaining(stage: str) -> int:  # a resumed stage's finished trials cost nothing
        name = f"{config.name}/{stage}"
        budget = stage_budget(config.n_trials, config.space_for(stage))
        return max(0, budget - (_finished(name, url) if name in existing else 0))

    return remaining


def _plan(config: StudyConfig, names: list[str], url: str, p: Placement) -> Plan:
    """Measure what each stage will cost here (tlopt.tune.plan)."""
    from tlopt.tune.plan import make_plan

    device = f"cuda:{p.gpus[0]}" if p.gpus else p.device
    return make_plan(config, names, _remaining(config, url), device, p.heads_at_once)


def _say_plan(plan: Plan, say: Any) -> None:
    from tlopt.tune.plan import table, warning

    for line in table(plan):
        say(line)
    if (warn := warning(plan)) is not None:
        say(warn)


def _read_record(out: Path) -> dict[str, Any]:
    try:
        record = json.loads((out / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _time_left(config: StudyConfig, record: dict[str, Any]) -> tuple[float, float]:
    """(seconds this run may spend, seconds the run folder spent before on the same budget).

    A rerun with the same budget spends what is left of it; another budget starts afresh.
    """
    budget = config.time_budget
    was: dict[str, Any] = record["time"] if isinstance(record.get("time"), dict) else {}
    spent = float(was.get("spent", 0.0)) if was.get("budget") == budget else 0.0
    left = budget - spent
    if budget < MIN_TIME_S:
        raise ConfigError(f"--time {format_duration(budget)}: give at least 1m (the plan alone "
                          "measures for seconds)")  # fmt: skip
    if left < MIN_TIME_S:
        raise ConfigError(
            f"--time {format_duration(budget)}: this run folder spent {spent / 60:.1f} min of "
            "it already: give a larger --time to go on"
        )
    return left, spent


def _choose_size(
    config: StudyConfig, record: dict[str, Any], p: Placement, seconds: float | None, say: Any
) -> tuple[StudyConfig, dict[str, Any]]:
    """Resolve ``image_size = "auto"``: the size probe's choice (a rerun reuses the first's)."""
    from tlopt.models.backbones import create_backbone
    from tlopt.tune.context import cache_dir, open_config_source
    from tlopt.tune.size_probe import (
        candidate_sizes,
        choose,
        median_side,
        native_size,
        probe_sizes,
        probe_table,
    )

    key = {"backbone": config.model.backbone, "weights": config.model.weights,
           "data": config.data.path or config.data.source}  # fmt: skip
    was = record.get("size_probe")
    if isinstance(was, dict) and {k: was.get(k) for k in key} == key and was.get("chosen"):
        say(f"image size {was['chosen']} px: chosen by this run's size probe before")
        return replace(config, data=replace(config.data, image_size=int(was["chosen"]))), was
    source = open_config_source(config)
    native = native_size(create_backbone(config.model.backbone, "none", len(source.classes)))
    sizes = candidate_sizes(native, median_side(source))
    say(f"size probe: {', '.join(map(str, sizes))} px (the backbone's own is {native})")
    device = f"cuda:{p.gpus[0]}" if p.gpus else p.device
    from tlopt.devices import pick_device

    rows = probe_sizes(config, source, sizes, cache_dir(), pick_device(device), seconds, say)
    chosen = choose(rows)
    for line in probe_table(rows, chosen):
        say(line)
    probe = key | {"chosen": chosen, "rows": [r.as_dict() for r in rows],
                   "table": probe_table(rows, chosen)}  # fmt: skip
    return replace(config, data=replace(config.data, image_size=chosen)), probe


def _stored_epochs(config: StudyConfig, names: list[str], url: str) -> dict[str, tuple[int, ...]]:
    """The epoch choices of the stages whose studies exist (a rerun cannot change them)."""
    existing = _existing(url)
    out = {}
    for stage in names:
        if f"{config.name}/{stage}" in existing:
            stored = load(f"{config.name}/{stage}", url).user_attrs.get(ATTR + "config")
            if isinstance(stored, dict):
                out[stage] = StudyConfig.from_dict(stored).space_for(stage).epochs
    return out


def _adopt_epochs(config: StudyConfig, names: list[str], url: str, fixed: set[str]) -> StudyConfig:
    """A stage whose study exists keeps the epoch choices it was made with, unless the user
    gives others (a time budget chose them: a rerun with another --time or --trials resumes)."""
    stored = _stored_epochs(config, names, url)
    stages = {**config.stages}
    for st, epochs in stored.items():
        if "*" not in fixed and st not in fixed:
            stages[st] = {**stages.get(st, {}), "epochs": epochs}
    return replace(config, stages=stages)


def _allot(
    config: StudyConfig,
    names: list[str],
    url: str,
    plan: Plan,
    seconds: float,
    fixed: set[str],
) -> tuple[StudyConfig, list[Allotment], Plan]:
    """The time budget's share per stage; the config with the chosen epochs; the plan of it."""
    from tlopt.tune.timebox import allot

    # A stage whose study exists has the epochs it was made with (_adopt_epochs put them in
    # the config the plan was measured on): kept, as the user's are.
    existing = _existing(url)
    made = {st for st in names if f"{config.name}/{st}" in existing}
    keep = {st for st in names if "*" in fixed or st in fixed or st in made}
    stages = {**config.stages}
    left = _remaining(config, url)
    caps = {st: left(st) for st in names}
    shares = allot(plan, seconds, keep, caps)
    for a in shares:
        if a.stage not in keep and a.trials:
            stages[a.stage] = {**stages.get(a.stage, {}), "epochs": a.epochs}
    config = replace(config, stages=stages)
    shown = replace(plan, stages=tuple(
        replace(s, trials=a.trials, epochs=a.epochs)
        for s, a in zip(plan.stages, shares, strict=True)))  # fmt: skip
    return config, shares, shown


def tune(
    out: Path,
    data: Path | None = None,
    config_file: Path | None = None,
    stages: str = DEFAULT_STAGES,
    place: Placement | None = None,
    say: Callable[[str], Any] = print,
    **flags: Any,
) -> dict[str, Any]:
    """Run or resume the stages into ``out``; returns the summary that ``--json`` prints.

    ``flags`` (None: the study file's or the default): name, seed, trials, backbone, weights,
    image_size (a number or "auto"), epochs, storage, time (e.g. "20m"), plan_only."""
    from tlopt.tune.context import open_config_source
    from tlopt.tune.timebox import HOLDS, PROBE_SHARE, export_seconds
    from tlopt.tune.timebox import table as time_table

    began = time.monotonic()
    plan_only = bool(flags.pop("plan_only", False))
    defaulted = config_file is None and not any(flags.get(k) for k in ("time", "trials", "epochs"))
    place, names, out = place or Placement(), parse_stages(stages), out.expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: pass a folder for the run")
    config, url, fixed = build_config(out, data, config_file, **flags)
    check_run_storage(out, url)
    open_config_source(config)  # the data's one-line errors, before anything is written
    record = _read_record(out)
    left, spent_before = _time_left(config, record) if config.time_budget else (0.0, 0.0)
    _check_order(config, names, url)  # before the probe spends anything
    if defaulted:
        say(f"no --time, --trials or --epochs: a budget of {DEFAULT_TIME} (--time sets another)")
    probe: dict[str, Any] | None = None
    if config.data.image_size == AUTO_SIZE:
        share = left * PROBE_SHARE if config.time_budget else None
        place = _threads_now(place)  # the probe's features serve the workers: their threads
        config, probe = _choose_size(config, record, place, share, say)
    config = _adopt_epochs(config, names, url, fixed)
    _check_studies(config, names, url)
    place = _threads_now(place)  # after the checks, so that a refusal is its one line
    plan = _plan(config, names, url, place)
    shares: list[Allotment] = []
    if config.time_budget:
        seconds = left - (time.monotonic() - began)
        config, shares, plan = _allot(config, names, url, plan, seconds, fixed)
        _check_studies(config, names, url)
        head = next((a for a in shares if a.stage == "head"), None)
        if head is not None and head.trials == 0 and head.why != HOLDS:  # the others need it
            raise ConfigError(
                f"--time {format_duration(config.time_budget)} is too short for the head stage "
                f"({head.why}): give a longer --time"
            )
    _say_plan(plan, say)
    if shares:
        reserve = export_seconds(plan)
        for line in time_table(shares, config.time_budget, time.monotonic() - began, reserve):
            say(line)
    if plan_only:
        result = {"name": config.name, "storage": mask_url(url), "plan": plan.as_dict()}
        return result | ({"image_size": probe} if probe else {})
    out.mkdir(parents=True, exist_ok=True)
    record = {"storage": _run_storage(out, url)} | ({"size_probe": probe} if probe else {})
    if config.time_budget:
        record["time"] = {"budget": config.time_budget, "spent": spent_before}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_study_file(config, out / "study.toml", probe["table"] if probe else [])
    say(f"study file {out / 'study.toml'}; studies in {mask_url(url)}")
    try:
        try:
            rows = _run_stages(config, names, url, place, say, shares, plan, left, began)
        except _Stopped as stopped:  # export the best so far: its kept weights, seconds
            if stopped.rows:
                say("stopped: exporting the best trial so far (Ctrl-C again skips it)")
                _finish(config, url, out, place, stopped.rows, plan, probe, say)
            raise _stopped(out, bool(stopped.rows)) from None
        return _finish(config, url, out, place, rows, plan, probe, say)
    finally:
        if config.time_budget:
            spent = spent_before + time.monotonic() - began
            record["time"] = {"budget": config.time_budget, "spent": round(spent, 1)}
            (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            over = spent - config.time_budget
            note = f", {over:.0f} s ({over / config.time_budget:.1%}) over" if over > 0 else ""
            say(f"time: {spent / 60:.1f} min of {format_duration(config.time_budget)} spent{note}")


def _run_stages(
    config: StudyConfig,
    names: list[str],
    url: str,
    place: Placement,
    say: Any,
    shares: list[Allotment],
    plan: Plan,
    left: float,
    began: float,
) -> list[dict[str, Any]]:
    """Each stage in order; with a time budget each gets its share (what one leaves unspent
    goes to the next) and the running trial stops where the export's reserve begins."""
    from tlopt.tune.timebox import HOLDS, export_seconds, trial_seconds
    from tlopt.tune.worker import STOP

    if not shares:
        rows = []
        for stage in names:
            row = _stage(config, stage, url, place, say)
            rows += [row] if row is not None else []
            if STOP.is_set():  # Ctrl-C or SIGTERM: the run stops here
                raise _Stopped(rows)
        return rows
    by_stage, end = {a.stage: a for a in shares}, began + left  # monotonic: the run's end
    stages_began, planned, rows = time.monotonic(), 0.0, []
    stop = end - export_seconds(plan)  # the running trial stops here, for the export
    for stage in names:
        a, ours = by_stage[stage], plan.stages[[s.stage for s in plan.stages].index(stage)]
        planned += a.seconds
        if a.trials == 0 and a.why != HOLDS:
            say(f"stage {stage}: {a.why}")
            continue
        per, now = trial_seconds(ours, a.epochs), time.monotonic()
        seconds = min(stages_began + planned, stop) - now - per / 2  # the last ends about on time
        if a.trials and (stop - now < per or seconds <= 0):
            say(f"stage {stage}: left out: {max(0.0, stop - now) / 60:.1f} min are left before "
                f"the export and a trial costs {per / 60:.1f} min here")  # fmt: skip
            continue
        # The stage runs trials (up to its trial budget) until its time is up: the share's
        # count is what the plan expects, and a stage whose trials run faster runs more.
        cap = max(a.trials, _remaining(config, url)(stage))
        staged = replace(config, n_trials=max(1, cap + _finished_if_any(config, stage, url)))
        deadline = time.time() + stop - time.monotonic()
        row = _stage(staged, stage, url, place, say, (seconds, deadline), a.trials)
        rows += [row] if row is not None else []
        if STOP.is_set():  # Ctrl-C or SIGTERM, not the deadline: the run stops here
            raise _Stopped(rows)
        if row is None and stage == "head":
            raise TloptError("no head trial completed in its time: give a longer --time")
    if not rows:
        raise TloptError("no stage completed a trial in its time: give a longer --time")
    return rows


class _Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the stages; ``rows``: the stages that completed a trial."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("stopped")
        self.rows = rows


def _stopped(out: Path, exported: bool) -> Stopped:
    """The one line that ends a run stopped by Ctrl-C or SIGTERM."""
    keep = "every finished trial is kept; run again to resume"
    if not exported:
        return Stopped(f"stopped before a trial completed: {keep}")
    return Stopped(f"stopped: the best trial so far is exported to {out / 'export'}; {keep}")


def _existing(url: str) -> list[str]:
    """The studies in the storage (a run's SQLite file that does not exist yet holds none)."""
    db = sqlite_path(url)
    return [] if db is not None and not db.exists() else study_names(open_storage(url))


def _finished_if_any(config: StudyConfig, stage: str, url: str) -> int:
    name = f"{config.name}/{stage}"
    return _finished(name, url) if name in _existing(url) else 0


def _finish(
    config: StudyConfig,
    url: str,
    out: Path,
    place: Placement,
    rows: list[dict[str, Any]],
    plan: Plan,
    probe: dict[str, Any] | None,
    say: Any,
) -> dict[str, Any]:
    """Export the best stage and report every stage; the summary."""
    from tlopt.export.bundle import export_best
    from tlopt.report import write_report

    # Every stage minimises the same objective, its best validation loss, on the same
    # validation split (one data config, one seed), so the stages' best values compare.
    best = min(rows, key=lambda r: r["best_value"])
    say(
        "best stage by validation loss (every stage minimises it on the same validation split): "
        f"{best['stage']} (trial {best['best_trial']}, val_loss {best['best_value']:.4f})"
    )
    export, page = out / "export", out / "report" / "report.html"
    kept = _export_is(export, best["study"], best["best_trial"])
    if kept:
        say(f"export {export} holds trial {best['best_trial']} of '{best['study']}': kept")
    else:
        made = export_best(best["study"], export, url, place.device, force=True)
        how = "retrained" if made["weights_from"] == "retrained" else "its own weights"
        say(f"exported trial {best['best_trial']} of '{best['study']}' ({how}) to {export}")
    manifest = json.loads((export / "manifest.json").read_text())
    studies, ran = [r["study"] for r in rows], sum(r["ran"] for r in rows)
    try:  # the report shows the stages of the last run: the same ones?
        same = [r["study"] for r in json.loads((out / SUMMARY).read_text())["stages"]] == studies
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    done = not ran and kept and same and page.is_file()
    if done:
        say("nothing to do: every stage holds its finished trials; export and report are current")
    else:
        write_report(studies, page.parent, url, export, probe)
        say(f"wrote {page}")
    keys = ("study", "stage", "trial", "evaluated_split", "accuracy")
    exported = {k: manifest.get(k) for k in keys} | {"value": best["best_value"], "kept": kept}
    exported |= {"val_accuracy": best["best_accuracy"], "selected_by": "lowest validation loss"}
    paths = {"study_file": out / "study.toml", "export": export, "report": page}
    summary: dict[str, Any] = {"name": config.name, "storage": mask_url(url), "stages": rows}
    summary |= {k: str(p.resolve()) for k, p in paths.items()}
    summary |= {"exported": exported, "ran": ran, "nothing_to_do": done, "plan": plan.as_dict()}
    if probe:
        summary["image_size"] = probe
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
