"""The ``tlopt`` command: thin commands over the library.

Each command parses its options, calls one library function and prints. User errors
(``TloptError``) print one line per problem and exit with code 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exceptions  # typer vendors click

from tlopt.errors import TloptError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Hyperparameter optimisation for staged transfer learning on images.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect data sources.")
model_app = typer.Typer(no_args_is_help=True, help="Backbones and stages.")
study_app = typer.Typer(no_args_is_help=True, help="Create, list, show and delete studies.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
storage_app = typer.Typer(no_args_is_help=True, help="Serve the study storage to many workers.")
app.add_typer(study_app, name="study")
app.add_typer(storage_app, name="storage")

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Storage URL (sqlite:///FILE or postgresql://...); default: "
        "$TLOPT_STORAGE, else sqlite:///studies/tlopt.db.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, dict):
            return " ".join(f"{k}={fmt(x)}" for k, x in v.items())
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


@data_app.command("check")
def data_check(
    path: Annotated[
        str | None, typer.Argument(help="Image folder or CIFAR-10 batches folder.")
    ] = None,
    source: Annotated[str, typer.Option(help="folder, digits or cifar10.")] = "folder",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> None:
    """Classes, counts per split, image sizes, and every unreadable file with its reason."""
    from tlopt.data.check import check_source, format_report

    if source == "folder" and path is None:
        raise TloptError("tlopt data check needs a PATH (or --source digits)")
    report = check_source(
        source, path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    typer.echo(format_report(report))


@model_app.command("list")
def model_list(
    pattern: Annotated[str, typer.Argument(help="Wildcard, e.g. 'resnet*'.")] = "*",
    pretrained: Annotated[bool, typer.Option(help="Only models with pretrained weights.")] = False,
) -> None:
    """List timm backbones."""
    import timm

    for name in timm.list_models(pattern, pretrained=pretrained):
        typer.echo(name)


@model_app.command("summary")
def model_summary(
    name: str,
    weights: Annotated[str, typer.Option(help="none, pretrained, bundled or file:PATH.")] = "none",
    classes: Annotated[int, typer.Option(help="Outputs of the new head.")] = 2,
    image_size: int = 224,
) -> None:
    """The model with and without its head, and per stage the frozen groups and trainable count."""
    from tlopt.models.backbones import create_backbone
    from tlopt.models.summary import summary_text

    if classes < 2:
        raise TloptError(f"--classes {classes}: a classifier needs at least 2 classes")
    model = create_backbone(name, weights, num_classes=classes)
    typer.echo(summary_text(model, name, image_size))


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
        _print_json(plan.__dict__)
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
    if plan.created:
        typer.echo(f"next: tlopt worker --study {plan.name}")


@study_app.command("list")
def study_list(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """Every study in the storage with its trials by state and best value."""
    from tlopt.tune.study import list_studies

    rows = list_studies(storage)
    if as_json:
        _print_json(rows)
    elif not rows:
        typer.echo("no studies: create one with 'tlopt study create --config FILE --stage head'")
    else:
        typer.echo(
            _table(
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
        _print_json(info)
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
        _table(
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


@app.command("worker")
def worker(
    study: Annotated[str, typer.Option(help="Study name, e.g. demo/head.")],
    storage: StorageOpt = None,
    n_trials: Annotated[
        int | None,
        typer.Option(help="Finished trials the study should hold in all (shared by every worker)."),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPU ids ('0,1') or 'all': one process per GPU slot.")
    ] = None,
    per_gpu: Annotated[
        str, typer.Option(help="Trial processes per GPU, or 'auto' to fit them to its memory.")
    ] = "1",
    processes: Annotated[int, typer.Option(help="Worker processes on the CPU.")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads per worker process (default: $OMP_NUM_THREADS if set; else, with "
            "several processes, the cores divided among them; one process: all cores)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    heads_at_once: Annotated[
        int, typer.Option(help="Head studies: trials whose heads train together (1: one by one).")
    ] = 8,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the training step (CUDA graphs per batch size on a GPU).",
        ),
    ] = False,
) -> None:
    """Run trials until the study holds its budget of finished trials."""
    from tlopt.tune.worker import check_device, parse_gpus, supervise, work

    device = check_device(device)
    gpu_ids = parse_gpus(gpus)
    slots_per_gpu = 0 if per_gpu == "auto" else int(per_gpu) if per_gpu.isdigit() else -1
    if slots_per_gpu < 0 or (slots_per_gpu == 0 and per_gpu != "auto"):
        raise TloptError(f"--per-gpu {per_gpu}: give a number of processes (1, 2, ...) or 'auto'")
    if slots_per_gpu == 0 and not gpu_ids:
        raise TloptError("--per-gpu auto sizes GPU slots: pass --gpus too (e.g. --gpus all)")
    if processes < 1 or heads_at_once < 1 or (threads is not None and threads < 1):
        raise TloptError("--processes, --heads-at-once and --threads must be at least 1")
    if processes > 1 and not gpu_ids and device not in (None, "", "auto", "cpu"):
        raise TloptError(
            f"--processes runs CPU workers; for several on a GPU use --gpus 0 --per-gpu {processes}"
        )
    if gpu_ids or processes > 1:
        raise typer.Exit(
            supervise(
                study,
                storage,
                n_trials,
                timeout,
                gpu_ids,
                slots_per_gpu,
                processes,
                heads_at_once,
                compile,
                threads=threads,
            )
        )
    from tlopt.report.trial_artifacts import write_trial_artifacts

    summary = work(
        study,
        storage,
        n_trials,
        timeout,
        device,
        heads_at_once,
        compile,
        threads,
        on_trial_done=write_trial_artifacts,  # curves and a note per trial, for the dashboard
    )
    typer.echo(
        f"worker done: {summary.complete} complete, {summary.pruned} pruned, "
        f"{summary.failed} failed"
    )


@app.command("export-best")
def export_best(
    study: Annotated[str, typer.Option(help="Study name.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    storage: StorageOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    force: Annotated[
        bool, typer.Option(help="Replace tlopt's files in a non-empty --out.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retrain the best trial and export model, history, metrics, plots and descriptors."""
    from tlopt.export.bundle import export_best as run

    manifest = run(study, out, storage, device, force)
    if as_json:
        metrics = json.loads((out / "metrics.json").read_text())
        keep = ("study", "stage", "trial", "params", "tuned_value", "retrained_value")
        _print_json(
            {
                **{k: manifest[k] for k in keep},
                "out": str(out.resolve()),
                "files": {name: str((out / name).resolve()) for name in manifest["files"]},
                "metrics": metrics,
            }
        )
        return
    typer.echo(f"exported trial {manifest['trial']} of '{study}' to {out}")
    typer.echo(
        f"  tuned val_loss {manifest['tuned_value']:.4f}, retrained "
        f"{manifest['retrained_value']:.4f}; {manifest['evaluated_split']} accuracy "
        f"{manifest['accuracy']:.4f}"
    )


DeviceOpt = Annotated[
    str, typer.Option(help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]


@app.command("extract")
def extract(
    model: Annotated[Path, typer.Option(help="Folder written by export-best.")],
    images: Annotated[Path, typer.Option(help="Image file or folder (any layout, recursive).")],
    out: Annotated[Path, typer.Option(help="Output .npy; a .csv of paths goes beside it.")],
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 128,
) -> None:
    """Write descriptors (pooled vectors before the classifier) for every image in a folder."""
    from tlopt.export.extract import extract_folder

    count, skipped = extract_folder(model, images, out, device, batch_size)
    typer.echo(
        f"wrote {count} descriptors to {out}"
        + (f"; skipped {skipped} unreadable files" if skipped else "")
    )


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option(help="Folder written by export-best.")],
    images: Annotated[Path, typer.Option(help="Image file or folder (any layout, recursive).")],
    out: Annotated[Path, typer.Option(help="Output CSV: path, class, one probability per class.")],
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 128,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary (only that) on stdout.")
    ] = False,
) -> None:
    """Predict the class of every image, prepared as the model was trained."""
    from tlopt.export.predict import predict_images

    summary = predict_images(model, images, out, device, batch_size)
    if as_json:
        _print_json(summary)
        return
    typer.echo(f"wrote {summary['count']} predictions to {out} (on {summary['device']})")
    typer.echo("  " + ", ".join(f"{k}: {v}" for k, v in summary["class_counts"].items()))
    if summary["skipped"]:
        typer.echo(f"  skipped {summary['skipped']} unreadable files (warnings above)")


@app.command("dashboard")
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")
    ] = "127.0.0.1",
    port: int = 8080,
    artifacts: Annotated[str | None, typer.Option(help="Artifact folder.")] = None,
) -> None:
    """Serve optuna-dashboard over the study storage, with tlopt's artifacts."""
    from tlopt.tune.dashboard import serve

    serve(storage, host, port, artifacts)


@storage_app.command("proxy")
def storage_proxy(
    storage: StorageOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 for workers on other machines.")
    ] = "127.0.0.1",
    port: int = 13000,
    grace_period: Annotated[
        int, typer.Option(help="Seconds without a beat before a trial is failed and re-queued.")
    ] = 90,
    max_retry: Annotated[int, typer.Option(help="Re-runs of a trial whose worker died.")] = 3,
) -> None:
    """Run Optuna's gRPC storage proxy in front of the database; workers use grpc://HOST:PORT.

    The proxy also keeps the heartbeats of the workers behind it and re-queues the trials of
    dead workers (Optuna's proxy forwards neither).
    """
    from tlopt.tune.proxy import is_grpc, serve
    from tlopt.tune.storage import mask_url, open_storage, resolve_url

    url = resolve_url(storage)
    if is_grpc(url):
        raise TloptError("tlopt storage proxy --storage needs the database URL, not grpc://")
    if grace_period < 2:
        raise TloptError(f"--grace-period {grace_period}: use at least 2 seconds")
    every = max(1, grace_period // 3)
    db = open_storage(url, heartbeat_interval=every, grace_period=grace_period, max_retry=max_retry)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        serve(db, mask_url(url), host, port, every)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        typer.echo("storage proxy stopped")


@app.command("report")
def report(
    study: Annotated[
        list[str], typer.Option(help="Study name; repeat to compare stages (head, freeze1, ...).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder for report.html and its PNGs.")],
    storage: StorageOpt = None,
    export: Annotated[
        Path | None,
        typer.Option(help="Folder written by export-best: adds its confusion matrix and report."),
    ] = None,
) -> None:
    """Write one HTML report (with its PNGs) on the studies' trials, stages and export."""
    from tlopt.report import write_report

    page = write_report(study, out, storage, export)
    typer.echo(f"wrote {page}")


@app.command("tune")
def tune(
    out: Annotated[Path, typer.Option(help="Run folder: study.toml, export/, report/, ...")],
    data: Annotated[
        Path | None, typer.Argument(help="Image folder: one folder per class (or train/, val/).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Study file (TOML) instead of the defaults.")
    ] = None,
    stages: Annotated[str, typer.Option(help="Stages in order.")] = "head,freeze1,freeze2",
    trials: Annotated[
        int | None, typer.Option(help="Finished trials per stage (default 20).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="timm backbone (default tf_efficientnet_lite0).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="pretrained, bundled (default), none or file:PATH.")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Pixels (default 224).")] = None,
    epochs: Annotated[
        str | None, typer.Option(help="Epoch choices, e.g. 10,25 (default 10..150).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split and training.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Study name (default: the folder's name).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Storage URL; default: $TLOPT_STORAGE, else sqlite:///RUN/studies.db."),
    ] = None,
    gpus: Annotated[str | None, typer.Option(help="GPU ids ('0,1') or 'all' for workers.")] = None,
    per_gpu: Annotated[str, typer.Option(help="Worker processes per GPU, or 'auto'.")] = "1",
    processes: Annotated[int, typer.Option(help="Worker processes on the CPU.")] = 1,
    heads_at_once: Annotated[int, typer.Option(help="Head trials trained together.")] = 8,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary (only that) on stdout.")
    ] = False,
) -> None:
    """Run every stage's study, export the best stage and report them; run again to resume."""
    import contextlib

    from tlopt.pipeline import placement, stdout_to_stderr
    from tlopt.pipeline import tune as run

    epoch_list = None
    if epochs is not None:
        try:
            epoch_list = [int(e) for e in epochs.split(",")]
        except ValueError:
            raise TloptError(f"--epochs '{epochs}': give whole numbers, e.g. 10,25") from None
    place = placement(gpus, per_gpu, processes, heads_at_once, device)
    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        summary = run(
            out,
            data,
            config,
            stages,
            place,
            say=lambda line: typer.echo(line, err=as_json),
            name=name,
            seed=seed,
            trials=trials,
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            epochs=epoch_list,
            storage=storage,
        )
    if as_json:
        _print_json(summary)


def _warning_line(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    sys.stderr.write(f"warning: {message}\n")


def main() -> None:
    """Entry point: run the CLI, turning user errors into one-line messages and exit code 2."""
    debug = "--debug" in sys.argv
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tlopt prints its own progress
    for noisy in ("timm", "httpx", "urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.showwarning = _warning_line  # type: ignore[assignment]
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app(args=argv, prog_name="tlopt", standalone_mode=False)
    except TloptError as exc:
        if debug:
            raise
        for line in str(exc).splitlines():
            sys.stderr.write(f"error: {line}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    except click_exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except click_exceptions.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
