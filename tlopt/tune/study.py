"""Stage studies: create (with the stage chain), list, show, delete.

A study is a plain Optuna study; tlopt's facts about it live in its user attributes under
``tlopt.`` so that ``optuna`` and ``optuna-dashboard`` read it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

import tlopt
from tlopt.config import StudyConfig
from tlopt.errors import StudyError
from tlopt.models.backbones import create_backbone
from tlopt.models.stages import StagePlan, apply_stage, parse_stage
from tlopt.tune.context import ATTR, open_config_source
from tlopt.tune.pruners import make_pruner
from tlopt.tune.space import space_size
from tlopt.tune.storage import (
    default_artifact_dir,
    mask_url,
    open_storage,
    resolve_url,
    study_names,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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


def load(name: str, storage_url: str | None = None) -> optuna.Study:
    """Load a tlopt study by name; StudyError lists the existing ones when it is missing."""
    url = resolve_url(storage_url)
    storage = open_storage(url)
    names = study_names(storage)
    if name not in names:
        listing = ", ".join(names[:10]) if names else "none"
        raise StudyError(
            f"no study '{name}' in {mask_url(url)} (studies there: {listing}): create it with "
            f"'tlopt study create --config studies/FILE.toml --stage STAGE'"
        )
    return optuna.load_study(study_name=name, storage=storage)


def create(
    config: StudyConfig,
    stage_name: str,
    storage_url: str | None = None,
    name: str | None = None,
    dry_run: bool = False,
) -> CreatePlan:
    """Create the study of ``stage_name`` for ``config``; fine-tuning stages chain to ``head``."""
    stage = parse_stage(stage_name)
    url = resolve_url(storage_url, config.storage.url)
    name = name or f"{config.name}/{stage.name}"
    source = open_config_source(config)
    classes = list(source.classes)
    counts = {split: sum(c.values()) for split, c in source.counts().items()}
    model = create_backbone(config.model.backbone, "none", len(classes))
    freeze = config.model.freeze_modules if stage.name != "head" else None
    plan: StagePlan = apply_stage(model, stage, freeze_modules=freeze)
    storage = open_storage(
        url,
        config.storage.heartbeat_interval,
        config.storage.grace_period,
        config.storage.max_retry,
    )
    existing = study_names(storage)
    head: dict[str, Any] | None = None
    if stage.from_head:
        head_name = f"{_prefix(name)}/head"
        if head_name not in existing:
            raise StudyError(
                f"stage '{stage.name}' starts from the best 'head' trial, but there is no study "
                f"'{head_name}': run 'tlopt study create --config FILE --stage head' and "
                f"'tlopt worker --study {head_name}' first"
            )
        head_study = optuna.load_study(study_name=head_name, storage=storage)
        best = best_trial(head_study)
        if ATTR + "head_artifact" not in best.user_attrs:
            raise StudyError(f"the best trial of '{head_name}' has no saved head weights")
        head = {
            "study": head_name,
            "trial": best.number,
            "value": best.value,
            "val_accuracy": best.user_attrs.get("val_accuracy"),
            "artifact_id": best.user_attrs[ATTR + "head_artifact"],
            "params": best.params,
        }
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
        if old is not None and old != config.to_dict():
            diff = _diff(old, config.to_dict())
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
    pruner = config.pruner
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=make_pruner(
            pruner.type, pruner.n_startup_trials, pruner.n_warmup_steps, pruner.options
        ),
    )
    try:
        attrs = {
            "config": config.to_dict(),
            "stage": stage.name,
            "classes": classes,
            "counts": counts,
            "fingerprint": source.fingerprint,
            "skipped": len(source.skipped),
            "artifacts": artifacts,
            "head": head,
            "version": tlopt.__version__,
        }
        for key, value in attrs.items():
            study.set_user_attr(ATTR + key, value)
    except Exception:
        optuna.delete_study(study_name=name, storage=storage)  # never leave half a study
        raise
    result.created = True
    return result


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
    storage = open_storage(resolve_url(storage_url))
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
                "epochs_run": len(t.user_attrs.get("history", [])),
                "seconds": seconds,
                "note": t.user_attrs.get(ATTR + "prune_reason") or t.user_attrs.get(ATTR + "error"),
            }
        )
    attrs = {k[len(ATTR) :]: v for k, v in study.user_attrs.items() if k.startswith(ATTR)}
    attrs.pop("config", None)
    return {"name": name, "attrs": attrs, "trials": trials}


def delete(name: str, storage_url: str | None = None) -> None:
    study = load(name, storage_url)
    optuna.delete_study(study_name=name, storage=study._storage)
