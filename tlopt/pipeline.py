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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig, fine_tunes_from_head, load_config
from tlopt.errors import ConfigError, TloptError
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

if TYPE_CHECKING:
    import optuna

DEFAULT_STAGES = "head,freeze1,freeze2"  # the reference projects' stages
FOLDER_DEFAULTS = {"backbone": "tf_efficientnet_lite0", "weights": "bundled", "image_size": 224}
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
# the best head and, unless a [stages.STAGE] table says otherwise, train at a tenth of the
# [search] lr with one warm-up epoch and a rate scaled by 0.7 per block group.{where}
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
) -> tuple[StudyConfig, str]:
    """The study config of the run and its storage URL: the study file (or the folder and the
    defaults), then the flags that are set; storage: flag, $TLOPT_STORAGE, file, RUN/studies.db."""
    storage = flags.pop("storage", None)
    if config_file is not None:
        raw = load_config(config_file, data_path=str(data) if data else None).to_dict()
    elif data is None:
        raise ConfigError("tlopt tune needs an image folder DATA or --config")
    else:
        folder = data.expanduser().resolve()
        raw = {"name": folder.name or "study", "data": {"source": "folder", "path": str(folder)}}
        flags = {k: FOLDER_DEFAULTS.get(k) if v is None else v for k, v in flags.items()}
    where = {"backbone": "model", "weights": "model", "image_size": "data", "epochs": "search"}
    for key, value in ((k, v) for k, v in flags.items() if v is not None):
        table = raw.setdefault(where[key], {}) if key in where else raw
        table["n_trials" if key == "trials" else key] = value
    default = f"sqlite:///{(out / 'studies.db').expanduser().resolve()}"
    url = resolve_url(storage, raw.get("storage", {}).get("url") or default)
    raw.setdefault("storage", {})["url"] = url
    config = StudyConfig.from_dict(raw, "tlopt tune")
    if problems := buildable_problems(config.model, config.pruner):  # an unknown backbone
        raise ConfigError("\n".join(f"{key}: {problem}" for key, problem in problems))
    return config, url


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


def write_study_file(config: StudyConfig, path: Path) -> None:
    """``path``: a commented study file that loads back to ``config`` (a password: url = "")."""
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
    _emit([], raw, lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    back = load_config(path).to_dict()
    back["storage"]["url"] = url
    if back != config.to_dict():  # a bug here, not the user's: never leave a file that lies
        raise RuntimeError(f"{path} does not load back to the config it was written from")


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


def _stage(config: StudyConfig, stage: str, url: str, p: Placement, say: Any) -> dict[str, Any]:
    """Create (or reuse) the stage's study and run workers until it holds its budget."""
    from tlopt.tune.sampling import stage_budget
    from tlopt.tune.supervisor import supervise
    from tlopt.tune.worker import work

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
        say(f"stage {stage}: running {budget - before} of {budget} trials (more workers: {join})")
        if not (p.gpus or p.processes > 1):
            work(
                name,
                url,
                None,
                None,
                p.device,
                p.heads_at_once,
                on_trial_done=write_trial_artifacts,
            )
        elif supervise(name, url, None, None, p.gpus, p.per_gpu, p.processes, p.heads_at_once):
            raise TloptError(f"the workers of '{name}' failed (see above): run again to resume")
    after = _finished(name, url)
    if after < budget:
        raise TloptError(
            f"stage {stage} stopped at {after} of {budget} trials: run again to resume"
        )
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


def _but_budget(config: Any) -> Any:
    """A stored config less its trial budget: a rerun may raise or lower --trials."""
    if not isinstance(config, dict):
        return config
    rest = {k: v for k, v in config.items() if k != "n_trials"}
    if isinstance(rest.get("storage"), dict):  # older studies stored the URL, masked
        rest["storage"] = {**rest["storage"], "url": ""}
    return rest


def _check_studies(config: StudyConfig, names: list[str], url: str) -> None:
    """Before anything runs: a study of this name holds this config, and head comes first."""
    db = sqlite_path(url)  # a new run's SQLite file does not exist yet: no studies in it
    existing = [] if db is not None and not db.exists() else study_names(open_storage(url))
    head = "head" in names or f"{config.name}/head" in existing
    for stage in names:
        name = f"{config.name}/{stage}"
        if name in existing:  # the same name with the same config is this run: resume it
            stored = load(name, url).user_attrs.get(ATTR + "config")
            if _but_budget(stored) != _but_budget(snapshot(config)):
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


def _plan(
    config: StudyConfig, names: list[str], url: str, p: Placement, say: Any
) -> dict[str, Any]:
    """Measure and print what each stage will cost here (tlopt.tune.plan); its summary."""
    from tlopt.tune.plan import make_plan, table, warning
    from tlopt.tune.sampling import stage_budget

    db = sqlite_path(url)
    existing = [] if db is not None and not db.exists() else study_names(open_storage(url))

    def remaining(stage: str) -> int:  # a resumed stage's finished trials cost nothing
        name = f"{config.name}/{stage}"
        budget = stage_budget(config.n_trials, config.space_for(stage))
        return max(0, budget - (_finished(name, url) if name in existing else 0))

    device = f"cuda:{p.gpus[0]}" if p.gpus else p.device
    plan = make_plan(config, names, remaining, device, p.heads_at_once)
    for line in table(plan):
        say(line)
    if (warn := warning(plan)) is not None:
        say(warn)
    return plan.as_dict()


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
    image_size, epochs, storage."""
    from tlopt.export.bundle import export_best
    from tlopt.report import write_report
    from tlopt.tune.context import open_config_source

    plan_only = bool(flags.pop("plan_only", False))
    place, names, out = place or Placement(), parse_stages(stages), out.expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file: pass a folder for the run")
    config, url = build_config(out, data, config_file, **flags)
    check_run_storage(out, url)
    open_config_source(config)  # the data's one-line errors, before anything is written
    _check_studies(config, names, url)
    plan = _plan(config, names, url, place, say)
    if plan_only:
        return {"name": config.name, "storage": mask_url(url), "plan": plan}
    out.mkdir(parents=True, exist_ok=True)
    record = {"storage": _run_storage(out, url)}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_study_file(config, out / "study.toml")
    say(f"study file {out / 'study.toml'}; studies in {mask_url(url)}")
    rows = [_stage(config, stage, url, place, say) for stage in names]
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
        export_best(best["study"], export, url, place.device, force=True)
        say(f"exported trial {best['best_trial']} of '{best['study']}' to {export}")
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
        write_report(studies, page.parent, url, export)
        say(f"wrote {page}")
    keys = ("study", "stage", "trial", "evaluated_split", "accuracy")
    exported = {k: manifest.get(k) for k in keys} | {"value": best["best_value"], "kept": kept}
    exported |= {"val_accuracy": best["best_accuracy"], "selected_by": "lowest validation loss"}
    paths = {"study_file": out / "study.toml", "export": export, "report": page}
    summary: dict[str, Any] = {"name": config.name, "storage": mask_url(url), "stages": rows}
    summary |= {k: str(p.resolve()) for k, p in paths.items()}
    summary |= {"exported": exported, "ran": ran, "nothing_to_do": done, "plan": plan}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
