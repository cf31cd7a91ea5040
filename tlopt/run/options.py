"""What a ``tlopt tune`` run searches: the study file (or a folder and the defaults), the flags
over it, and which stages' epoch choices the user set (a time budget keeps those, and fits the
others). What the user set is decided from the text they wrote, by presence, never by equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from tlopt.config import StudyConfig, fine_tunes_from_head, load_config
from tlopt.errors import ConfigError
from tlopt.names import parse_stage

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
# A folder run's median pruner judges each trial from its first epoch against the trials
# completed, from the second trial on: Optuna's default waits for 5 complete trials and 3
# epochs, and a budgeted fine-tuning stage on a CPU runs a few trials of 3-8 epochs, so nothing
# was ever pruned (issue 28.2). Each epoch is a rung: a trial whose best validation loss so far
# is above the median of the completed trials' at that epoch stops there, so a rate that undoes
# the head costs one epoch, and the time goes to more points.
FOLDER_PRUNER = {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1}
EVERY = "*"  # in RunConfig.fixed: [search] epochs were set, so every stage's are


@dataclass(frozen=True)
class RunConfig:
    """The run's study config, its storage URL, the stages whose epoch choices the user set
    (:data:`EVERY`: all of them), and whether the user set the trial budget (--trials, or a
    study file's n_trials): the time a run leaves then runs no new points past it."""

    config: StudyConfig
    url: str
    fixed: frozenset[str]
    trials_set: bool = False

    def epochs_set(self, stage: str) -> bool:
        return EVERY in self.fixed or stage in self.fixed


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


def build_config(out: Path, data: Path | None, config_file: Path | None, **flags: Any) -> RunConfig:
    """The study config of the run: the study file (or the folder and the defaults), then the
    flags that are set; storage: flag, $TLOPT_STORAGE, file, RUN/studies.db."""
    from tlopt.tune.storage import resolve_url
    from tlopt.tune.study import buildable_problems

    storage = flags.pop("storage", None)
    time_budget = flags.pop("time", None)
    trials = flags.get("trials")  # the user's, before a folder run's default
    if config_file is not None:
        raw = load_config(config_file, data_path=str(data) if data else None).to_dict()
        written = _written(config_file)  # what the file's text sets, not its defaults
    elif data is None:
        raise ConfigError("tlopt tune needs an image folder DATA or --config")
    else:
        folder = data.expanduser().resolve()
        raw = {"name": folder.name or "study", "data": {"source": "folder", "path": str(folder)}}
        raw["stages"] = {"head": dict(FOLDER_HEAD)}
        raw["pruner"] = dict(FOLDER_PRUNER)
        flags = {k: FOLDER_DEFAULTS.get(k) if v is None else v for k, v in flags.items()}
        written = {"stages": raw["stages"]}
    where = {"backbone": "model", "weights": "model", "image_size": "data", "epochs": "search"}
    for key, value in ((k, v) for k, v in flags.items() if v is not None):
        table = raw.setdefault(where[key], {}) if key in where else raw
        table["n_trials" if key == "trials" else key] = value
    if (
        time_budget is None
        and config_file is None
        and not (flags.get("trials") or flags.get("epochs"))
    ):
        time_budget = DEFAULT_TIME  # a folder at the defaults: a budget, not a fixed list
    if time_budget is not None:
        raw["budget"] = {"time": time_budget}
    every = flags.get("epochs") is not None or "epochs" in _table(written, "search")
    fixed = {st for st, t in _table(written, "stages").items() if "epochs" in _table(t)}
    default = f"sqlite:///{(out / 'studies.db').expanduser().resolve()}"
    url = resolve_url(storage, raw.get("storage", {}).get("url") or default)
    raw.setdefault("storage", {})["url"] = url
    config = StudyConfig.from_dict(raw, "tlopt tune")
    if problems := buildable_problems(config.model, config.pruner):  # an unknown backbone
        raise ConfigError("\n".join(f"{key}: {problem}" for key, problem in problems))
    trials_set = trials is not None or "n_trials" in written
    return RunConfig(config, url, frozenset({EVERY} if every else fixed), trials_set)


def _written(path: Path) -> dict[str, Any]:
    """The tables a study file writes (load_config has read and checked it already)."""
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _table(raw: Any, key: str | None = None) -> dict[str, Any]:
    value = raw.get(key) if key is not None and isinstance(raw, dict) else raw
    return value if isinstance(value, dict) else {}
