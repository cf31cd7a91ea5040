"""``tlopt dashboard``: optuna-dashboard over the study storage, with tlopt's artifact store."""

from __future__ import annotations

import errno
import logging
import socket

from tlopt.errors import TloptError
from tlopt.tune.storage import (
    artifact_store,
    default_artifact_dir,
    mask_url,
    open_storage,
    resolve_url,
)

log = logging.getLogger("tlopt.dashboard")


def serve(storage_url: str | None, host: str, port: int, artifacts: str | None) -> None:
    """Serve until interrupted; refuses a busy port with a one-line fix."""
    from optuna_dashboard import run_server

    url = resolve_url(storage_url)
    storage = open_storage(url)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TloptError(
                    f"port {port} on {host} is busy: pass --port with a free one "
                    f"(e.g. --port {port + 1})"
                ) from None
            raise TloptError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "dashboard bound to %s: anyone who can reach this address sees the studies", host
        )
    store = artifact_store(artifacts or default_artifact_dir(url))
    log.info("optuna-dashboard for %s on http://%s:%d/", mask_url(url), host, port)
    run_server(storage, host=host, port=port, artifact_store=store)
