"""Stage studies: create (with the stage chain), list, show, delete.

A study is a plain Optuna study; tlopt's facts about it live in its user attributes under
``tlopt.`` so that ``optuna`` and ``optuna-dashboard`` read it unchanged.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

import tlopt
from tlopt.config import AUTO_SIZE, ModelConfig, PrunerConfig, StudyConfig
from tlopt.errors import ConfigError, StorageError, StudyError, TloptError
from tlopt.names import ATTR, Stage, parse_stage
from tlopt.tune.artifacts import check_artifact_dir, default_artifact_dir
from tlopt.tune.pruners import make_pruner
from tlopt.tune.storage import (
    mask_url,
    open_storage,
    resolve_url,
    study_names,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The study keeps the list of unreadable files for its data report; a folder with more than
# this many keeps the first ones and the count (the list is one JSON attribute in the database).
MAX_SKIPPED_LISTED = 1000


@dataclass
class CreatePlan:
    """What ``study create`` made (or would make, with ``--dry-run``)."""

    name: str
    storage: str
    stage: str
    classes: list[str]
    counts: dict[str, int]
    space_size: int | None
    trainable_params: int
    total_params: int
    head_from: str | None
    created: bool


def _prefix(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else name


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The completed trial with the lowest validation loss, or a StudyError saying what to run."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise StudyError(
            f"no completed trial in study '{study.study_name}': run "
            f"'tlopt worker --study {study.study_name}' first"
        )
    return min(done, key=lambda t: t.value if t.value is not None else float("inf"))


def best_head(head_study: optuna.Study) -> dict[str, Any]:
    """The best head of a head study, as a fine-tuning study (and each of its trials) records
    the head it starts from: study, trial, value, accuracy, weights (artifact), params."""
    best = best_trial(head_study)
    if ATTR + "head_artifact" not in best.user_attrs:
        raise StudyError(f"the best trial of '{head_study.study_name}' has no saved head weights")
    return {
        "study": head_study.study_name,
        "trial": best.number,
        "value": best.value,
        "val_accuracy": best.user_attrs.get("val_accuracy"),
        "artifact_id": best.user_attrs[ATTR + "head_artifact"],
        "params": best.params,
    }


def load(name: str, storage_url: str | None = None) -> optuna.Study:
    """Load a tlopt study by name; StudyError lists the existing ones when it is missing."""
    url = resolve_url(storage_url)
    storage = open_storage(url, writable=False)
    names = study_names(storage)
    if name not in names:
        listing = ", ".join(names[:10]) if names else "none"
        raise StudyError(
            f"no study '{name}' in {mask_url(url)} (studies there: {listing}): create it with "
            f"'tlopt study create --config studies/FILE.toml --stage STAGE'"
        )
    return optuna.load_study(study_name=name, storage=storage)


def buildable_problems(model: ModelConfig, pruner: PrunerConfig) -> list[tuple[str, str]]:
    """What the torch-free parser cannot judge: the backbone's name, the pruner's options.

    Hand it to ``load_config(check=...)`` to hear of these with the file's other problems.
    """
    from tlopt.models.backbones import check_model_name

    problems: list[tuple[str, str]] = []
    try:
        check_model_name(model.backbone)
    except TloptError as exc:
        problems.append(("model.backbone", str(exc)))
    try:
        make_pruner(pruner.type, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.options)
    except (TypeError, ValueError) as exc:
        keys = ", ".join(pruner.options) or "type"
        problems.append((f"pruner.{keys}", f"pruner '{pruner.type}' rejects it: {exc}"))
    return problems


def check_searched_cuts(config: StudyConfig, stage: str) -> None:
    """Every ``cut`` the stage searches is a feature stage of the backbone, or a ConfigError.

    Checked when the study is created: a value the model cannot take would otherwise fail
    its trials one after another on every worker.
    """
    from tlopt.models.backbones import create_backbone
    from tlopt.models.cut import CutModel

    cuts = config.space_for(stage).cut
    if not cuts:
        return
    base = create_backbone(config.model.backbone, "none", 2)
    problems = []
    for cut in cuts:
        try:
            CutModel(base, cut, 2)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        key = f"stages.{stage}.cut" if "cut" in config.stages.get(stage, {}) else "search.cut"
        raise ConfigError(f"{key}: {'; '.join(problems)}")


def create(
    config: StudyConfig,
    stage_name: str,
    storage_url: str | None = None,
    name: str | None = None,
    dry_run: bool = False,
) -> CreatePlan:
    """Create the study of ``stage_name`` for ``config``; fine-tuning stages chain to ``head``."""
    from tlopt.data.source import held_out_keys
    from tlopt.models.backbones import create_backbone
    from tlopt.models.stages import apply_stage
    from tlopt.tune.context import open_config_source
    from tlopt.tune.space import space_size

    problems = buildable_problems(config.model, config.pruner)
    if problems:
        raise ConfigError("\n".join(f"{key}: {problem}" for key, problem in problems))
    if config.data.image_size == AUTO_SIZE:
        raise ConfigError(
            'data.image_size = "auto": only tlopt tune chooses the size (its size probe); '
            "give a size in pixels for study create, e.g. image_size = 224"
        )
    stage = parse_stage(stage_name)
    url = resolve_url(storage_url, config.storage.url)
    name = name or f"{config.name}/{stage.name}"
    storage = open_storage(
        url,
        config.storage.heartbeat_interval,
        config.storage.grace_period,
        config.storage.max_retry,
    )
    existing = study_names(storage)
    head_study = _head_study(storage, existing, stage, name)
    check_searched_cuts(config, stage.name)  # before the data is read: a second, not minutes
    # A fine-tuning stage validates on its head study's split: the one that study stored.
    held_out = head_study.user_attrs.get(ATTR + "held_out") if head_study else None
    source = open_config_source(config, held_out)
    classes = list(source.classes)
    counts = {split: sum(c.values()) for split, c in source.counts().items()}
    model = create_backbone(config.model.backbone, "none", len(classes))
    freeze = config.model.freeze_modules if stage.name != "head" else None
    plan = apply_stage(model, stage, freeze_modules=freeze)
    head = best_head(head_study) if head_study is not None else None
    result = CreatePlan(
        name,
        mask_url(url),
        stage.name,
        classes,
        counts,
        space_size(config.space_for(stage.name)),
        plan.trainable_params,
        plan.total_params,
        head["study"] if head else None,
        False,
    )
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage)
        old = study.user_attrs.get(ATTR + "config")
        if old is not None and read_now(old) != snapshot(config):
            diff = _diff(read_now(old), snapshot(config))
            raise StudyError(
                f"study '{name}' exists with another config ({diff}): pass --name NEW to create "
                f"a new study, or 'tlopt study delete {name}' first"
            )
        raise StudyError(
            f"study '{name}' already exists: run 'tlopt worker --study {name}' to add trials, "
            "or pass --name NEW"
        )
    if dry_run:
        return result
    artifacts = config.storage.artifacts or str(default_artifact_dir(url))
    # Before anything is created: a study whose trials cannot save their weights is no use.
    check_artifact_dir(artifacts)
    attrs = {
        "config": snapshot(config),
        "stage": stage.name,
        "classes": classes,
        "counts": counts,
        "fingerprint": source.fingerprint,
        # The split itself, not only its seed: workers on another NumPy must agree with it.
        "held_out": held_out_keys(source),
        "skipped": len(source.skipped),
        "skipped_files": [list(row) for row in source.skipped[:MAX_SKIPPED_LISTED]],
        "artifacts": artifacts,
        "head": head,
        "version": tlopt.__version__,
    }
    _create_whole(storage, name, attrs, mask_url(url))
    result.created = True
    return result


def _head_study(
    storage: optuna.storages.BaseStorage, existing: list[str], stage: Stage, name: str
) -> optuna.Study | None:
    """The head study a fine-tuning stage starts from (None for head and scratch)."""
    if not stage.from_head:
        return None
    head_name = f"{_prefix(name)}/head"
    if head_name not in existing:
        raise StudyError(
            f"stage '{stage.name}' starts from the best 'head' trial, but there is no study "
            f"'{head_name}': run 'tlopt study create --config FILE --stage head' and "
            f"'tlopt worker --study {head_name}' first"
        )
    return optuna.load_study(study_name=head_name, storage=storage)


def snapshot(config: StudyConfig) -> dict[str, Any]:
    """The config as the study stores it: JSON, without the storage URL.

    Workers get the storage URL from their own command line or environment, never from the
    snapshot, and study attributes are shown by ``optuna-dashboard`` to anyone who opens it:
    a URL there could hold a secret that no masking rule knows of.
    """
    return _stored(config.to_dict())


def _stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as studies store it (studies made before stored a masked URL: the same)."""
    storage = raw.get("storage")
    if isinstance(storage, dict) and "url" in storage:
        return {**raw, "storage": {**storage, "url": ""}}
    return raw


def read_now(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored snapshot read by the rules it was written under and written as this version
    writes them (config.RULES), to compare with a config of now; unreadable now: as it is."""
    with contextlib.suppress(ConfigError):
        return snapshot(StudyConfig.from_dict(_stored(raw)))
    return _stored(raw)


def _create_whole(
    storage: optuna.storages.BaseStorage,
    name: str,
    attrs: dict[str, Any],
    where: str,
) -> None:
    """Create the study with all its attributes, or leave nothing behind and say why."""
    created = False
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="minimize",  # Optuna stores neither sampler nor pruner: workers build them
        )
        created = True
        for key, value in attrs.items():
            study.set_user_attr(ATTR + key, value)
    except optuna.exceptions.DuplicatedStudyError:
        # Another 'study create' won the race between our check and the insert: it is theirs.
        raise StudyError(
            f"study '{name}' was created by another process just now: run "
            f"'tlopt worker --study {name}', or pass --name NEW"
        ) from None
    except TloptError:
        raise
    except Exception as exc:
        if created:  # never leave half a study
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=name, storage=storage)
        cause = exc.__cause__ or exc
        reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()
        first = mask_url(reason[0] if reason else type(cause).__name__)[:200]
        raise StorageError(
            f"cannot create study '{name}' in {where}: {first}; check that the storage is "
            "writable and has free space"
        ) from None


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return "; ".join(changes[:5])


def list_studies(storage_url: str | None = None) -> list[dict[str, Any]]:
    """One row per study: name, stage, trials by state, best value."""
    storage = open_storage(resolve_url(storage_url), writable=False)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        best = summary.best_trial
        rows.append(
            {
                "name": summary.study_name,
                "stage": summary.user_attrs.get(ATTR + "stage", "-"),
                "complete": states.count(TrialState.COMPLETE),
                "pruned": states.count(TrialState.PRUNED),
                "running": states.count(TrialState.RUNNING),
                "failed": states.count(TrialState.FAIL),
                "best_value": best.value if best else None,
                "best_accuracy": best.user_attrs.get("val_accuracy") if best else None,
            }
        )
    return rows


# A fine-tuning trial whose first epoch falls this far below the head it started from
# (accuracy, points) has wrecked that head: its rate or warm-up is wrong for fine-tuning.
HEAD_LOSS_POINTS = 2.0


def head_lost(history: list[dict[str, float]]) -> float | None:
    """Accuracy points a fine-tuning trial's first epoch lost against its epoch 0 (the head).

    None when the history has no epoch 0 (a head trial) or no epoch 1 yet.
    """
    if len(history) < 2 or history[0].get("epoch") != 0:
        return None
    return round(100 * (history[0]["val_accuracy"] - history[1]["val_accuracy"]), 2)


def show(name: str, storage_url: str | None = None) -> dict[str, Any]:
    """The study's attributes and its trials (state, params, value, accuracy, epochs, time)."""
    study = load(name, storage_url)
    trials = []
    for t in study.get_trials(deepcopy=False):
        seconds = None
        if t.datetime_complete and t.datetime_start:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": t.params,
                "value": t.value,
                "val_accuracy": t.user_attrs.get("val_accuracy"),
                "epochs_run": sum(h.get("epoch", 1) > 0 for h in t.user_attrs.get("history", [])),
                "seconds": seconds,
                "note": t.user_attrs.get(ATTR + "prune_reason") or t.user_attrs.get(ATTR + "error"),
                "head_lost": head_lost(t.user_attrs.get("history", [])),
            }
        )
    attrs = {k[len(ATTR) :]: v for k, v in study.user_attrs.items() if k.startswith(ATTR)}
    attrs.pop("config", None)
    return {"name": name, "attrs": attrs, "trials": trials}


def delete(name: str, storage_url: str | None = None) -> None:
    """Delete a study and its trials; its artifact files stay on disk."""
    load(name, storage_url)  # a missing study: the error lists the existing ones
    optuna.delete_study(study_name=name, storage=open_storage(resolve_url(storage_url)))
