"""The size probe (``tlopt/tune/size_probe.py``, ``scripts/size_probe.py``): a linear probe per
image size, on a tiny net over the digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_DATA_MODEL, run_in_group
from tlopt.config import load_config
from tlopt.tune.context import open_config_source
from tlopt.tune.size_probe import ProbeRow, probe_table

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


def _probe_at_16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: int) -> ProbeRow:
    """The digits probed at 16 px on a sample of 120 per split; 16 px the backbone's own size
    (every image computed, the head's cache) or not (the sample decoded alone)."""
    import tlopt.tune.size_probe as size_probe

    study = tmp_path / "probe.toml"
    study.write_text('name = "probe"\nseed = 0\n' + TINY_DATA_MODEL)
    config = load_config(study)
    monkeypatch.setattr(size_probe, "SAMPLE", 120)
    monkeypatch.setattr(size_probe, "native_size", lambda _model: native)
    source = open_config_source(config)
    (row,) = size_probe.probe_sizes(config, source, [16], tmp_path / "cache", say=lambda _: None)
    return row


def test_a_large_split_is_probed_on_the_same_sample_whichever_way_its_features_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the backbone's own size every image is computed and the sample picked from them; at
    another size only the sample is decoded and computed: the same images, the same fit."""
    whole = _probe_at_16(tmp_path, monkeypatch, native=16)
    alone = _probe_at_16(tmp_path, monkeypatch, native=224)
    assert (whole.train, whole.val) == (alone.train, alone.val) == (120, 120)
    assert 0 <= whole.correct <= 120 and abs(whole.correct - alone.correct) <= 1
    assert whole.loss == pytest.approx(alone.loss, rel=1e-3)
    table = probe_table([whole], 16)
    assert "fitted on 120 training images, scored on 120 val" in table[0]
