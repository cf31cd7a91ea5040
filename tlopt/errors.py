"""User-facing errors.

Every error a user can cause is a :class:`TloptError`: its message is one line that says what
is wrong and what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class TloptError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = 2


class Stopped(TloptError):
    """Ctrl-C or SIGTERM ended the run; what it finished is kept (exit code 130, as for SIGINT)."""

    exit_code = 130


class ConfigError(TloptError):
    """A study configuration or a command-line value is invalid."""


class DataError(TloptError):
    """A data source is missing, empty or unusable."""


class BadImage(DataError):
    """One image cannot be used; ``reason`` says why (it is skipped and counted)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(TloptError):
    """A backbone or its weights cannot be created or loaded."""


class StorageError(TloptError):
    """The study storage cannot be reached or used."""


class StudyError(TloptError):
    """A study is missing, or not in the state a command needs."""
