"""``scripts/size_probe.py``: a linear probe per image size, on a tiny net over the digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA_MODEL, run_in_group

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "size_probe.py"


def probe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_in_group([sys.executable, str(SCRIPT), *args], timeout, "size_probe")


@pytest.mark.slow  # a subprocess that imports torch: the full tier
def test_size_probe_scores_each_size_on_the_validation_split(tmp_path: Path) -> None:
    study = tmp_path / "probe.toml"
    study.write_text('name = "probe"\nseed = 0\n' + TINY_DATA_MODEL)
    done = probe("--config", str(study), "--sizes", "16,24")
    assert done.returncode == 0, done.stderr[-3000:]
    header, *rows = done.stdout.strip().splitlines()
    assert "test_efficientnet (none)" in header and "359 val images" in header
    assert [row.split()[0] for row in rows] == ["16", "24"]
    for row in rows:  # size, "px", seconds, "s", then "loss / correct" per C
        cells = row.split()[4:]
        assert len(cells) == 6 and cells[1::3] == ["/", "/"]
        for loss, correct in zip(cells[0::3], cells[2::3], strict=True):
            assert 0 < float(loss) < 10 and 0 <= int(correct) <= 359


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sizes", "3"], "--sizes 3: give sides of 8 px or more"),
        (["--sizes", "big"], "--sizes big"),
        (["--config", "missing.toml"], "does not exist"),
    ],
)
def test_size_probe_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    study = tmp_path / "probe.toml"
    study.write_text('name = "probe"\nseed = 0\n' + TINY_DATA_MODEL)
    done = probe("--config", str(study), *args, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0]
