"""How the study file's parser checks one value: the problems it collects, one line each.

:class:`Checks` holds the problems found so far and the checks of a key (a known key, a table,
a number in its range, a string among its choices, a list of values); the functions below
are the per-value rules a list is checked with. ``config_parser.py`` walks the file with them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

from tlopt.config import BATCH_SIZES, Check, FloatRange

Rule = Callable[[Any], str | None]  # a value's problem, or None


def _one_line(text: str) -> str:
    """``text`` with the characters that would break or hide a line escaped (one problem, one line).

    Keys and values come from the user's file: a key may hold a newline, a record separator
    (which ``str.splitlines`` also splits at) or a terminal escape.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Checks:
    """The problems found in one source (a file or a snapshot), and the checks of a key."""

    def __init__(self, source: str, check: Check | None = None) -> None:
        self.source = source
        self.check = check
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(_one_line(f"{self.source}: {key}: {message}"))

    def known(self, table: dict[str, Any], allowed: list[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (
                    f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
                )
                self.fail(f"{where}{key}", f"unknown key: {hint}")

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ([{key}]), got {value!r}")
            return {}
        return value

    def number(
        self,
        raw: dict[str, Any],
        key: str,
        default: Any,
        kind: type,
        low: float,
        high: float,
        where: str,
    ) -> Any:
        value = raw.get(key, default)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            what = "an integer" if kind is int else "a number"
            self.fail(f"{where}{key}", f"{value!r} is not {what} in [{low:g}, {high:g}]")
            return default
        return kind(value)

    def text(
        self,
        raw: dict[str, Any],
        key: str,
        default: str,
        where: str,
        choices: tuple[str, ...] | None = None,
    ) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str):
            self.fail(f"{where}{key}", f"{value!r} must be a string")
            return default
        if "\x00" in value:  # no path, URL or database text field may hold one
            self.fail(f"{where}{key}", f"{value!r} contains a NUL character (\\u0000)")
            return default
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(f"{where}{key}", f"'{value}' is not one of {', '.join(choices)}{hint}")
            return default
        return value

    def choices(
        self,
        raw: dict[str, Any],
        key: str,
        default: Any,
        where: str,
        check: Any,
        allow_range: bool = False,
    ) -> Any:
        if key not in raw:
            return default
        value = raw[key]
        if allow_range and isinstance(value, dict):
            self.known(value, ["low", "high", "log"], f"{where}{key}.")
            low, high, log = value.get("low"), value.get("high"), value.get("log", False)
            if not isinstance(log, bool):
                self.fail(f"{where}{key}.log", f"{log!r} must be true or false")
                return default
            for bound in (low, high):
                problem = check(bound)
                if problem:
                    self.fail(f"{where}{key}", problem)
                    return default
            if low is None or high is None or not low < high:
                self.fail(f"{where}{key}", f"low ({low}) must be below high ({high})")
                return default
            return FloatRange(float(low), float(high), log)
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(f"{where}{key}", "is empty: give at least one value")
            return default
        ok = True
        for v in values:
            problem = check(v)
            if problem:
                self.fail(f"{where}{key}", problem)
                ok = False
        return tuple(values) if ok else default


def positive_int(high: int, low: int = 1) -> Rule:
    """A whole number in [low, high] (not a bool)."""

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            return f"{v!r} is not a whole number between {low} and {high}"
        return None

    return check


def batch(v: Any) -> str | None:
    """One of the batch sizes (``BATCH_SIZES``)."""
    if v not in BATCH_SIZES or isinstance(v, bool):
        return f"{v!r} is not one of {', '.join(map(str, BATCH_SIZES))}"
    return None


def among(options: tuple[str, ...]) -> Rule:
    """One of ``options``; a near miss is named."""

    def check(v: Any) -> str | None:
        if v not in options:
            close = difflib.get_close_matches(str(v), options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{v!r} is not one of {', '.join(options)}{hint}"
        return None

    return check


def real(low: float, high: float, low_open: bool = False) -> Rule:
    """A number in [low, high], or (low, high] with ``low_open``; not NaN, not a bool."""

    def check(v: Any) -> str | None:
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or math.isnan(v)
            or not (low < v if low_open else low <= v)
            or not v <= high
        ):
            side = "(" if low_open else "["
            return f"{v!r} is not a number in {side}{low:g}, {high:g}]"
        return None

    return check


def boolean(v: Any) -> str | None:
    """true or false."""
    return None if isinstance(v, bool) else f"{v!r} must be true or false"
