"""``tlopt worker`` and ``tlopt tune``: run the trials of a study, or the whole staged search."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from tlopt.cli.apps import app
from tlopt.cli.common import JsonOpt, StorageOpt, print_json
from tlopt.durations import parse_duration
from tlopt.errors import TloptError


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
    image_size: Annotated[
        str | None,
        typer.Option(help="Pixels, or 'auto' (the default for a folder: a probe chooses it)."),
    ] = None,
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
    plan_only: Annotated[
        bool, typer.Option("--plan-only", help="Measure and print the plan; run no trial.")
    ] = False,
    time: Annotated[
        str | None,
        typer.Option(
            "--time", help="Wall time for the whole run, e.g. 30m or 2h: trials and epochs fit it."
        ),
    ] = None,
) -> None:
    """Run every stage's study, export the best stage and report them; run again to resume."""
    import contextlib

    from tlopt.cli.common import stdout_to_stderr
    from tlopt.run import placement
    from tlopt.run import tune as run

    epoch_list = None
    if epochs is not None:
        try:
            epoch_list = [int(e) for e in epochs.split(",")]
        except ValueError:
            raise TloptError(f"--epochs '{epochs}': give whole numbers, e.g. 10,25") from None
    size: int | str | None = image_size
    if image_size is not None and image_size != "auto":
        if not image_size.isdigit() or not 8 <= int(image_size) <= 2048:
            raise TloptError(f"--image-size {image_size}: give pixels (8..2048) or 'auto'")
        size = int(image_size)
    if time is not None:
        parse_duration(time)  # its one-line error before anything is read
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
            image_size=size,
            epochs=epoch_list,
            storage=storage,
            plan_only=plan_only,
            time=time,
        )
    if as_json:
        print_json(summary)


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
            "several processes, the cores divided among them; one process: 1 on the CPU)."
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
    as_json: JsonOpt = False,
) -> None:
    """Run trials until the study holds its budget of finished trials."""
    from tlopt.cli.common import stdout_to_stderr

    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        code, summary = _run_workers(
            study, storage, n_trials, timeout, gpus, per_gpu, processes, threads, device,
            heads_at_once, compile,
        )  # fmt: skip
    if as_json:
        print_json(_study_summary(study, storage, summary))
    elif summary is not None:
        typer.echo(
            f"worker done: {summary.complete} complete, {summary.pruned} pruned, "
            f"{summary.failed} failed"
            + (f", {summary.taken} ended elsewhere" if summary.taken else "")
        )
    if code:
        raise typer.Exit(code)


def _study_summary(study: str, storage: str | None, summary: Any) -> dict[str, Any]:
    """What the study holds after the run, and what this process ran (None: its workers)."""
    from optuna.trial import TrialState

    from tlopt.tune.study import load

    trials = load(study, storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type, return-value]
    return {
        "study": study,
        "states": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
        "best": None
        if best is None
        else {
            "trial": best.number,
            "value": best.value,
            "val_accuracy": best.user_attrs.get("val_accuracy"),
            "params": best.params,
        },
        "this_process": None if summary is None else dataclasses.asdict(summary),
    }


def _run_workers(
    study: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    gpus: str | None,
    per_gpu: str,
    processes: int,
    threads: int | None,
    device: str | None,
    heads_at_once: int,
    compile: bool,
) -> tuple[int, Any]:
    """(exit code, this process's WorkerSummary or None when worker processes ran)."""
    from tlopt.devices import check_device
    from tlopt.tune.supervisor import parse_gpus, supervise
    from tlopt.tune.worker import work

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
        code = supervise(
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
        return code, None
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
    return 0, summary
