"""What a person sees while a worker runs (a progress bar on a terminal, nothing in a log),
and the JSON a script reads from worker and data check."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.conftest import kill_group
from tests.test_tuning import TINY, cli
from tlopt.config import load_config
from tlopt.tune import study as studies


def _on_a_terminal(args: list[str], timeout: float = 600) -> str:
    """Run tlopt with stderr on a pseudo-terminal, as a person at a shell sees it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 x 24
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlopt", *args],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                raise TimeoutError(seen.decode(errors="replace")[-2000:])
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")[-2000:]
    finally:
        kill_group(proc)  # a worker it started, too
        os.close(leader)
    return seen.decode(errors="replace")


@pytest.mark.slow  # CLI subprocesses (a worker, or one per bad input): the full tier
def test_worker_shows_a_bar_on_a_terminal_and_json_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    url = f"sqlite:///{tmp_path}/s.db"
    studies.create(load_config(path), "head", url)
    shown = _on_a_terminal(["worker", "--study", "tiny/head", "--storage", url, "--n-trials", "3"])
    assert "tiny/head" in shown and "3/3" in shown and "best val" in shown, shown[-2000:]

    done = cli("worker", "--study", "tiny/head", "--storage", url, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert summary["states"]["complete"] + summary["states"]["pruned"] == 6
    assert summary["this_process"]["trials"] and summary["best"]["value"] > 0
    assert "best val" not in done.stderr  # not a terminal: no bar in the log


def test_data_check_json(tmp_path: Path) -> None:
    done = cli("data", "check", "--source", "digits", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["classes"]) == 10
    assert sum(sum(c.values()) for c in report["counts"].values()) == 1797


def test_quiet_silences_every_bar_whatever_its_caller_asked(monkeypatch) -> None:
    """--quiet (TLOPT_QUIET=1) wins over a caller's disable=None; callers may pass disable."""
    from tlopt.progress import QUIET_ENV, bar

    monkeypatch.setenv(QUIET_ENV, "1")
    for disable in (None, False, True):
        with bar(total=3, desc="decoding images", disable=disable) as shown:
            assert shown.disable
    monkeypatch.delenv(QUIET_ENV)
    with bar(total=3, disable=True) as shown:
        assert shown.disable
