"""``tlopt dashboard``, ``tlopt storage proxy`` and ``tlopt report``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from tlopt.cli.apps import app, storage_app
from tlopt.cli.common import StorageOpt
from tlopt.errors import TloptError


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
    from tlopt.dashboard import serve

    serve(storage, host, port, artifacts)


@storage_app.command("proxy")
def storage_proxy(
    storage: StorageOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 for workers on other machines.")
    ] = "127.0.0.1",
    port: int = 13000,
    grace_period: Annotated[
        int | None,
        typer.Option(
            help="Seconds without a beat before a trial is failed and re-queued, for every "
            "study (default: each study's storage.grace_period)."
        ),
    ] = None,
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
    if grace_period is not None and grace_period < 2:
        raise TloptError(f"--grace-period {grace_period}: use at least 2 seconds")
    # The storage's own grace is replaced per study by the watcher (tune/proxy.py).
    db = open_storage(
        url, heartbeat_interval=1, grace_period=grace_period or 90, max_retry=max_retry
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        serve(db, mask_url(url), host, port, grace_period)  # type: ignore[arg-type]
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
