"""``tlopt study``: create, list, show and delete the stage studies."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from tlopt.cli.apps import study_app
from tlopt.cli.common import JsonOpt, StorageOpt, print_json, table
from tlopt.config import FloatRange, SearchSpace


@study_app.command("create")
def study_create(
    config: Annotated[Path, typer.Option("--config", help="Study file (TOML).")],
    stage: Annotated[str, typer.Option(help="head, freeze1, freeze2, freezeN, full, scratch.")],
    storage: StorageOpt = None,
    name: Annotated[str | None, typer.Option(help="Study name; default NAME/STAGE.")] = None,
    data: Annotated[str | None, typer.Option(help="Override data.path of the study file.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and show; create nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the Optuna study of one stage."""
    from tlopt.config import load_config
    from tlopt.tune.study import buildable_problems, create

    cfg = load_config(config, data_path=data, check=buildable_problems)
    plan = create(cfg, stage, storage, name, dry_run=dry_run)
    if as_json:
        print_json(plan.__dict__)
        return
    verb = "created" if plan.created else "would create"
    typer.echo(f"{verb} study '{plan.name}' in {plan.storage}")
    typer.echo(
        f"  stage {plan.stage}: {plan.trainable_params:,} of {plan.total_params:,} "
        f"parameters train" + (f", head from '{plan.head_from}'" if plan.head_from else "")
    )
    typer.echo(f"  {len(plan.classes)} classes; images per split: {plan.counts}")
    size = plan.space_size if plan.space_size is not None else "continuous"
    typer.echo(f"  search space: {size} points; budget {cfg.n_trials} trials")
    typer.echo(f"  stage {plan.stage} runs: {space_summary(cfg.space_for(plan.stage), plan.stage)}")
    if plan.created:
        typer.echo(f"next: tlopt worker --study {plan.name}")


def space_summary(space: SearchSpace, stage: str = "head") -> str:
    """What a stage's trials run: each field's values, ``a|b`` a choice, ``low..high`` a range.

    Example:
        >>> space_summary(SearchSpace())[:43]
        'batch_size 8|16|32, epochs 10|25|50|75|100|'
    """
    parts = []
    for name, value in ((f.name, getattr(space, f.name)) for f in fields(space)):
        if name == "decay_params":
            for decay, params in value.items():
                if decay in space.decay:
                    parts += [f"{decay}.{p} {_values(v)}" for p, v in params.items()]
        elif name == "cut" and not value:
            continue
        elif name == "bn_train" and value is None:  # the trainer's rule (space.suggest)
            parts.append(f"bn_train {str(stage == 'scratch').lower()}")
        else:
            parts.append(f"{name} {_values(value)}")
    return ", ".join(parts)


def _values(value: Any) -> str:
    if isinstance(value, FloatRange):
        return f"{value.low:g}..{value.high:g}" + (" (log)" if value.log else "")
    if isinstance(value, tuple):
        return "|".join(_values(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


@study_app.command("list")
def study_list(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """Every study in the storage with its trials by state and best value."""
    from tlopt.tune.study import list_studies

    rows = list_studies(storage)
    if as_json:
        print_json(rows)
    elif not rows:
        typer.echo("no studies: create one with 'tlopt study create --config FILE --stage head'")
    else:
        typer.echo(
            table(
                rows,
                [
                    "name",
                    "stage",
                    "complete",
                    "pruned",
                    "running",
                    "failed",
                    "best_value",
                    "best_accuracy",
                ],
            )
        )


@study_app.command("show")
def study_show(name: str, storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """The study's trials: state, params, value, accuracy, epochs run, time."""
    from tlopt.tune.study import show

    info = show(name, storage)
    if as_json:
        print_json(info)
        return
    attrs = info["attrs"]
    typer.echo(
        f"study {name}: stage {attrs.get('stage')}, {len(attrs.get('classes', []))} "
        f"classes, data {str(attrs.get('fingerprint'))[:12]}"
    )
    if attrs.get("skipped"):
        typer.echo(f"{attrs['skipped']} unreadable files skipped:")
        for key, reason in attrs.get("skipped_files", []):
            typer.echo(f"  {key}: {reason}")
        if attrs["skipped"] > len(attrs.get("skipped_files", [])):
            typer.echo("  ...")
    typer.echo(
        table(
            info["trials"],
            [
                "number",
                "state",
                "value",
                "val_accuracy",
                "head_lost",
                "epochs_run",
                "seconds",
                "params",
                "note",
            ],
        )
    )
    from tlopt.tune.study import HEAD_LOSS_POINTS

    wrecked = [
        t
        for t in info["trials"]
        if t["head_lost"] is not None and t["head_lost"] > HEAD_LOSS_POINTS
    ]
    for t in wrecked:
        typer.echo(
            f"warning: trial {t['number']} lost {t['head_lost']:.1f} points of the head's "
            f"validation accuracy in its first epoch: lower [stages.{attrs.get('stage')}] lr "
            "or raise warmup_epochs"
        )


@study_app.command("delete")
def study_delete(
    name: str,
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete a study and its trials (artifact files stay on disk)."""
    from tlopt.tune.study import delete

    if not yes and not typer.confirm(f"delete study '{name}' and all its trials?"):
        raise typer.Exit(1)
    delete(name, storage)
    typer.echo(f"deleted study '{name}'")
