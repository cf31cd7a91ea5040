"""Lines said once per process: several steps of one run ask the same question (the plan, the
time allotment, the checks and the worker each read the search space's size, and each opens
the image folder), and the answer is news only the first time.
"""

from __future__ import annotations

import logging
import threading

_said: set[tuple[str, int, str]] = set()
_lock = threading.Lock()


def log_once(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)``, unless this process said the same line already.

    A line is the same when its logger, level and text (``msg % args``) are; one that the
    logger's level drops is not counted as said.
    """
    if not logger.isEnabledFor(level):
        return
    key = (logger.name, level, msg % args if args else msg)
    with _lock:
        if key in _said:
            return
        _said.add(key)
    logger.log(level, msg, *args, stacklevel=2)


def forget() -> None:
    """Say every line again (a test that expects a line another test said first)."""
    with _lock:
        _said.clear()
