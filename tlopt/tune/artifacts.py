"""Artifact stores: where trials keep their files (weights, curves), beside the storage.

A folder (beside a SQLite file, or ``storage.artifacts``) or ``s3://BUCKET/PREFIX`` for
workers on many machines; Optuna's stores, with failed writes as one-line StorageErrors.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from optuna.artifacts import FileSystemArtifactStore

from tlopt.errors import StorageError
from tlopt.tune.storage import sqlite_path

T = TypeVar("T")


def default_artifact_dir(url: str) -> Path:
    """Artifacts live beside a SQLite file; for a server, under ./studies/artifacts."""
    path = sqlite_path(url)
    return (path.parent if path else Path("studies")).resolve() / "artifacts"


class ArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store, with failed writes as one-line StorageErrors.

    A full disk or a folder turned read-only fails every trial the same way; as a
    :class:`StorageError` it stops the worker with one line (its trial is queued again),
    instead of failing trial after trial. A partly written file is removed.
    """

    def __init__(self, base_path: str) -> None:
        super().__init__(base_path)
        self.base_path = base_path

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        try:
            super().write(artifact_id, content_body)
        except OSError as exc:
            with contextlib.suppress(OSError):
                (Path(self.base_path) / artifact_id).unlink()
            raise StorageError(
                f"cannot write an artifact in '{self.base_path}': "
                f"{(exc.strerror or str(exc)).lower()}; free space there or set "
                "storage.artifacts to another folder, then run the worker again (the trial "
                "is queued again)"
            ) from None


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


class S3ArtifactStore:
    """Optuna's ``Boto3ArtifactStore`` under ``s3://BUCKET/PREFIX``, for workers on many machines.

    Any S3-compatible server works (AWS, MinIO, Ceph, ...): boto3 takes the endpoint and the
    credentials from its usual places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``),
    so no secret is stored in the study. Failures other than a missing artifact become one-line
    StorageErrors, as with a folder.
    """

    def __init__(self, location: str) -> None:
        try:
            import boto3
            from optuna.artifacts import Boto3ArtifactStore
        except ImportError:
            raise StorageError(
                f"artifact store {location} needs boto3: pip install 'tlopt[s3]'"
            ) from None
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"artifact store {location!r} names no bucket: use s3://BUCKET/PATH")
        self.location, self.prefix = location.rstrip("/"), prefix.strip("/")
        self.store = Boto3ArtifactStore(bucket, client=boto3.client("s3"))

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return fn()
        except ArtifactNotFound:
            raise
        except Exception as exc:  # botocore's ClientError, EndpointConnectionError, NoCredentials
            reason = (
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            )
            raise StorageError(
                f"cannot {what} in artifact store {self.location}: {reason}; check the bucket, "
                "AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID, ~/.aws)"
            ) from None

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._call("read", lambda: self.store.open_reader(self._key(artifact_id)))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._call("write", lambda: self.store.write(self._key(artifact_id), content_body))

    def remove(self, artifact_id: str) -> None:
        self._call("remove", lambda: self.store.remove(self._key(artifact_id)))


def artifact_store(path: str | Path) -> ArtifactStore | S3ArtifactStore:
    """The artifact location as an Optuna store: a folder, or ``s3://BUCKET/PREFIX``.

    Raises:
        StorageError: in one line, if the folder cannot be made or boto3 is missing.
    """
    if is_s3(path):
        return S3ArtifactStore(str(path))
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the artifact folder '{path}': {(exc.strerror or str(exc)).lower()}; "
            "set storage.artifacts in the study file to a writable folder"
        ) from None
    return ArtifactStore(str(path))


def check_artifact_dir(path: str | Path) -> None:
    """Create the artifact location and write (then remove) a probe in it, or raise StorageError.

    ``study create`` calls this before it creates anything, so that a study never exists whose
    trials could not save their weights.
    """
    store = artifact_store(path)
    if isinstance(store, S3ArtifactStore):
        probe_id = f".tlopt-probe-{os.getpid()}"
        store.write(probe_id, io.BytesIO(b"tlopt"))
        store.remove(probe_id)
        return
    probe = Path(path) / f".tlopt-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"tlopt")
    except OSError as exc:
        raise StorageError(
            f"cannot write in the artifact folder '{path}': "
            f"{(exc.strerror or str(exc)).lower()}; free space there or set storage.artifacts "
            "in the study file to a writable folder"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
