"""The dashboard and the report in a real browser: headless Chromium (Debian's ``chromium``).

``scripts/test`` installs Chromium when it is missing. The dashboard is optuna-dashboard, a
JavaScript app: ``--dump-dom`` with a virtual time budget gives the page as rendered. The
screenshots go to ``$TLOPT_SCREENSHOTS`` (else the test's temporary folder) and their paths
are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.conftest import TINY_DATA_MODEL, shared_cache
from tlopt.config import load_config
from tlopt.report import write_report
from tlopt.report.trial_artifacts import write_trial_artifacts
from tlopt.tune import study as studies
from tlopt.tune.worker import work

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"  # never anything else
TINY = (
    """
name = "web"
seed = 3
n_trials = 3
"""
    + TINY_DATA_MODEL
    + """[search]
batch_size = [32, 64]
epochs = [2]
decay = ["constant", "exponential"]
lr = [3e-3]
optimizer = ["sgd"]
"""
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A small finished study (3 head trials) in a SQLite file; returns its URL and folder."""
    root = tmp_path_factory.mktemp("web")
    url = f"sqlite:///{root}/studies.db"
    (root / "web.toml").write_text(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLOPT_CACHE", str(shared_cache(tmp_path_factory)))
        studies.create(load_config(root / "web.toml"), "head", url)
        work("web/head", url, on_trial_done=write_trial_artifacts)
    return url, root


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TLOPT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: run scripts/test as root (it installs Debian's "
            "chromium) or 'sudo apt-get install chromium'"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start a server command on a port; stops every server it started after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(command: list[str], port: int) -> str:
        log = open(tmp_path / f"server-{port}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        base = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{command} exited: {(tmp_path / f'server-{port}.log').read_text()}")
            try:
                get_json(f"{base}/api/meta")
                return base
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"{command} did not answer on {base} within 90 s")

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def browse(chromium: str, url: str, tmp: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` once rendered; with ``screenshot``, a PNG of the page too."""
    base = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--virtual-time-budget=8000",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    if screenshot is not None:
        height = 2400 if "trials" in url else 900  # a trial's artifacts sit below its note
        subprocess.run(
            [*base, f"--window-size=1280,{height}", f"--screenshot={screenshot}", url],
            capture_output=True,
            timeout=120,
            check=True,
        )
        assert screenshot.stat().st_size > 10_000, f"{screenshot} is nearly empty"
        print(f"screenshot: {screenshot}")
    return dom


def test_dashboard_shows_the_study_and_a_trials_curves(
    finished: tuple[str, Path], serve: Any, chromium: str, screenshots: Path, tmp_path: Path
) -> None:
    url, _ = finished
    port = free_port()
    base = serve(
        [sys.executable, "-m", "tlopt", "dashboard", "--storage", url, "--port", str(port)], port
    )

    summaries = get_json(f"{base}/api/studies")["study_summaries"]
    study_id = next(s["study_id"] for s in summaries if s["study_name"] == "web/head")
    detail = get_json(f"{base}/api/studies/{study_id}")
    trial = next(t for t in detail["trials"] if t["state"] == "Complete")
    number = trial["number"]
    artifact = next(a for a in trial["artifacts"] if a["filename"] == f"curves-trial{number}.png")
    png = urllib.request.urlopen(
        f"{base}/artifacts/{study_id}/{trial['trial_id']}/{artifact['artifact_id']}", timeout=30
    ).read()
    assert png.startswith(b"\x89PNG")

    home = browse(chromium, f"{base}/dashboard", tmp_path, screenshots / "dashboard-studies.png")
    assert "web/head" in home
    page = f"{base}/dashboard/studies/{study_id}/trials?numbers={number}"
    dom = browse(chromium, page, tmp_path, screenshots / "dashboard-trial.png")
    assert f"curves-trial{number}.png" in dom and f"Trial {number}" in dom
    assert "Best validation loss" in dom  # the trial's note

    busy = subprocess.run(
        [sys.executable, "-m", "tlopt", "dashboard", "--storage", url, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1
    assert busy.stderr.startswith(f"error: port {port} on 127.0.0.1 is busy")
    assert f"--port {port + 1}" in busy.stderr


def test_optuna_dashboard_alone_reads_what_tlopt_wrote(
    finished: tuple[str, Path], serve: Any
) -> None:
    url, root = finished
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "optuna-dashboard"),
        url,
        "--host",
        HOST,
        "--port",
        str(port),
        "--artifact-dir",
        str(root / "artifacts"),
    ]
    base = serve(command, port)
    names = {s["study_name"] for s in get_json(f"{base}/api/studies")["study_summaries"]}
    assert names == set(optuna.get_all_study_names(url)) == {"web/head"}
    study_id = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
    detail = get_json(f"{base}/api/studies/{study_id}")
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert complete and all(
        any(a["filename"].startswith("curves-trial") for a in t["artifacts"]) for t in complete
    )
    assert all(t["note"]["body"].startswith(f"### Trial {t['number']}") for t in complete)


def test_report_opens_offline_in_the_browser(
    finished: tuple[str, Path], chromium: str, screenshots: Path, tmp_path: Path
) -> None:
    url, _ = finished
    page = write_report(["web/head"], tmp_path / "report", url)
    dom = browse(chromium, page.as_uri(), tmp_path, screenshots / "report.png")
    for title in (
        "Stages compared",
        "Study web/head",
        "Validation curves",
        "Wall time per setting",
    ):
        assert title in dom
    # 8 figures for the study and the stage chart: each drawn, or a sentence saying why not.
    assert dom.count("data:image/png;base64,") + dom.count('class="missing"') == 9
    assert dom.count("data:image/png;base64,") >= 6
