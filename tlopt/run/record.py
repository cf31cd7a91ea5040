"""``RUN/run.json``: what a run folder holds besides its studies, so that a rerun decides from
the record and not from what one invocation saw: where the studies are, the size the probe
chose, the stages, the measured plan, the time budget and what of it was spent (saved at each
stage boundary and after each finished trial, so a killed run loses at most one trial's time),
and the export's measured cost.

Every write is atomic (a temporary file, then ``os.replace``): a kill never leaves half a
record.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tlopt.durations import format_duration
from tlopt.errors import ConfigError

RECORD = "run.json"
VERSION = 2  # 1: before the record kept the plan, the stages and the time after each trial
OWN_SQLITE = "RUN/studies.db"  # the record's name for the run's own SQLite file (it may move)
MIN_TIME_S = 60.0  # a time budget with less than this left runs nothing


class RunRecord:
    """``RUN/run.json`` as a dict that saves itself whole."""

    def __init__(self, out: Path, data: dict[str, Any] | None = None) -> None:
        self.out, self.data = out, data if data is not None else {}

    @classmethod
    def read(cls, out: Path) -> RunRecord:
        try:
            data = json.loads((out / RECORD).read_text())
        except (OSError, ValueError):
            data = {}
        return cls(out, data if isinstance(data, dict) else {})

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def save(self, **fields: Any) -> None:
        """Set ``fields`` and write the record atomically (the folder is made if need be)."""
        self.data.update(fields)
        self.data["version"] = VERSION
        self.out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{RECORD}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.data, indent=2, default=str) + "\n")
            os.replace(tmp, self.out / RECORD)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def run_storage(out: Path, url: str) -> str:
    """The storage as the record keeps it: masked; the run's own SQLite file by name."""
    from tlopt.tune.storage import mask_url, sqlite_path

    inside = sqlite_path(url) == (out / "studies.db").expanduser().resolve()
    return OWN_SQLITE if inside else mask_url(url)


def check_run_storage(out: Path, url: str, record: RunRecord) -> None:
    """Refuse to resume the run in ``out`` anywhere but in the storage its studies are in.

    A study file whose URL held a secret is written with it blanked; resumed without
    ``TLOPT_STORAGE`` or ``--storage``, it would fall back to ``RUN/studies.db`` and run every
    stage again there (and overwrite the export). The run record says where they are.
    """
    from tlopt.tune.storage import mask_url

    recorded = record.get("storage")
    if not isinstance(recorded, str) or recorded == run_storage(out, url):
        return  # a new run (or one from before the record), or the same storage
    if recorded == OWN_SQLITE:
        raise ConfigError(
            f"{out}'s studies are in {out / 'studies.db'}, not {mask_url(url)}: unset "
            "TLOPT_STORAGE and drop --storage to resume it, or pass another --out for a new run"
        )
    raise ConfigError(
        f"{out}'s studies are in {recorded}, not {mask_url(url)}: set TLOPT_STORAGE to that URL "
        "(with its password) and rerun, or pass another --out for a new run"
    )


class Clock:
    """A time budget kept as a record: what earlier invocations of the run spent on the same
    budget plus this one's, saved to ``run.json`` on :meth:`save`.

    A rerun with the same budget spends what is left of it; another budget starts afresh.
    """

    def __init__(self, budget: float, record: RunRecord, began: float | None = None) -> None:
        was = record.get("time") if isinstance(record.get("time"), dict) else {}
        self.budget, self.record = budget, record
        self.before = float(was.get("spent", 0.0)) if budget and was.get("budget") == budget else 0
        self.began = time.monotonic() if began is None else began
        self.saving = False  # set once the run may write its folder
        self.fixed = 0.0  # seconds of this invocation that trained no trial (the closing line)

    def check(self) -> None:
        """The one-line refusal of a budget too short to run anything."""
        if self.budget < MIN_TIME_S:
            raise ConfigError(
                f"--time {format_duration(self.budget)}: give at least 1m (the "
                "plan alone measures for seconds)"
            )
        if self.budget - self.before < MIN_TIME_S:  # what earlier runs of the folder left
            raise ConfigError(
                f"--time {format_duration(self.budget)}: this run folder spent "
                f"{self.before / 60:.1f} min of it already: give a larger --time to go on"
            )

    def now(self) -> float:
        """Seconds this invocation has run."""
        return time.monotonic() - self.began

    def closing_line(self) -> str:
        """The time spent of the budget, and the share of this invocation's that trained no
        trial (the probe, the plan, the export, the report)."""
        spent, budget = self.spent(), self.budget
        over = spent - budget
        note = f", {over:.0f} s ({over / budget:.1%}) over" if over > 0 else ""
        line = f"time: {spent / 60:.1f} min of {format_duration(budget)} spent{note}"
        if self.fixed:
            line += f"; fixed costs (probe, plan, export, report) {self.fixed / 60:.1f} min, "
            line += f"{self.fixed / max(self.now(), 1e-9):.0%} of this run's"
        return line

    def spent(self) -> float:
        return self.before + self.now()

    def left(self) -> float:
        return self.budget - self.spent()

    def end(self) -> float:
        """The run's end as a ``time.monotonic()``."""
        return self.began + self.budget - self.before

    def save(self, **fields: Any) -> None:
        """Record the time spent (and ``fields``) in ``run.json``, once the run may write."""
        if not self.saving:
            return
        if self.budget:
            fields["time"] = {"budget": self.budget, "spent": round(self.spent(), 1)}
        self.record.save(**fields)
