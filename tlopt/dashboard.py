"""``tlopt dashboard``: optuna-dashboard over the study storage, with tlopt's artifact store.

Each trial's page then shows the curves PNG the trial uploaded as an artifact and its note.
The server is optuna-dashboard's own WSGI app (``optuna_dashboard.wsgi``) on a threaded
wsgiref server, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound

from tlopt.errors import TloptError
from tlopt.names import ATTR
from tlopt.tune.artifacts import artifact_store, default_artifact_dir, is_s3
from tlopt.tune.storage import (
    mask_url,
    open_storage,
    resolve_url,
    sqlite_path,
)

log = logging.getLogger("tlopt.dashboard")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser holding a connection open must not block Ctrl-C


class _ThreadedServer6(_ThreadedServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (wsgiref's name)
        log.debug("%s " + format, self.address_string(), *args)


class StoreChain:
    """Artifacts from several stores (studies with their own ``[storage] artifacts``).

    Reads try each folder or bucket in turn; uploads from the dashboard go to the first one.
    """

    def __init__(self, locations: Sequence[str]) -> None:
        self.stores = [artifact_store(location) for location in locations]

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in none of the artifact folders")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        removed = 0
        for store in self.stores:
            try:
                store.remove(artifact_id)
                removed += 1
            except ArtifactNotFound:
                continue
        if not removed:
            raise ArtifactNotFound(f"artifact {artifact_id} is in none of the artifact folders")


def artifact_locations(storage: optuna.storages.BaseStorage, url: str) -> list[str]:
    """The artifact folders or buckets of every study in the storage, then the default folder."""
    locations: list[str] = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        where = summary.user_attrs.get(ATTR + "artifacts")
        if where:
            where = where if is_s3(where) else str(Path(where).resolve())
            if where not in locations:
                locations.append(where)
    default = str(default_artifact_dir(url))
    if default not in locations:
        locations.append(default)
    return locations


def _bind(host: str, port: int, app: Any) -> WSGIServer:
    try:
        server_class = _ThreadedServer6 if ":" in host else _ThreadedServer
        return make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TloptError(
                f"port {port} on {host} is busy (another dashboard?): pass --port with a free "
                f"one, e.g. 'tlopt dashboard --port {port + 1}'"
            ) from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise TloptError(
                f"cannot bind {host}:{port}: {exc.strerror}; pass --host with an address of "
                "this machine (127.0.0.1 keeps the dashboard local)"
            ) from None
        raise TloptError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def serve(storage_url: str | None, host: str, port: int, artifacts: str | None) -> None:
    """Serve until interrupted; a busy port or a missing SQLite file is a one-line error."""
    import optuna_dashboard

    url = resolve_url(storage_url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise TloptError(
            f"no study storage at {path}: pass --storage with the URL the workers use, or "
            "create a study first with 'tlopt study create --config FILE --stage head'"
        )
    storage = open_storage(url)
    if artifacts:
        store: Any = artifact_store(artifacts)
    else:
        locations = artifact_locations(storage, url)
        store = artifact_store(locations[0]) if len(locations) == 1 else StoreChain(locations)
    server = _bind(host, port, optuna_dashboard.wsgi(storage, artifact_store=store))
    if host not in LOCAL_HOSTS:
        log.warning(
            "dashboard bound to %s: anyone who can reach this address sees the studies", host
        )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "optuna-dashboard for %s on http://%s:%d/ (Ctrl-C stops it)", mask_url(url), shown, port
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
