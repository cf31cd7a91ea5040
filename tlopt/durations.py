"""Durations as a person writes them (``20m``, ``90s``, ``1.5h``, ``1h30m``) and back.

Pure (no torch, no Optuna): the study file's parser and the CLI read ``--time`` and
``[budget] time`` here before anything heavy is imported.
"""

from __future__ import annotations

import re

from tlopt.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, what: str = "--time") -> float:
    """``"20m"``, ``"90s"``, ``"1.5h"``, ``"1h30m"`` -> seconds; a one-line error otherwise.

    Example:
        >>> parse_duration("1h30m")
        5400.0
    """
    parts = re.fullmatch(r"\s*((\d+(\.\d+)?)\s*[hms]\s*)+", text.lower() if text else "")
    if parts is None:
        raise ConfigError(f"{what} '{text}': give a time with a unit, e.g. 20m, 90s, 1.5h or 1h30m")
    seconds = sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text))
    if seconds < 1:
        raise ConfigError(f"{what} '{text}': give at least one second")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as :func:`parse_duration` reads them: ``1200`` -> ``"20m"``."""
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
