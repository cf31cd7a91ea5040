"""The command line as a user runs it: output, exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.test_data import messy_folder, save


def assert_one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], done.stderr


def test_data_check_lists_unreadable_files_and_converts_odd_modes(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "pets")
    done = cli("data", "check", str(root))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "cats" in out and "dögs and wölves" in out and "ipynb" not in out.split("unreadable")[0]
    for line in (
        "cats/empty.jpg: empty file",
        "cats/text.JPG: not an image",
        "half.jpg: truncated image data",
    ):
        assert line in out, out
    for mode in ("CMYK", "RGBA", "I;16", "P", "L"):
        assert mode in out


def test_data_check_folder_errors(tmp_path: Path) -> None:
    assert_one_line_error(cli("data", "check", str(tmp_path / "missing")), "does not exist")
    save(tmp_path / "one" / "a" / "0.png")
    assert_one_line_error(cli("data", "check", str(tmp_path / "one")), "only one class")
    save(tmp_path / "two" / "a" / "0.png")
    (tmp_path / "two" / "b").mkdir(parents=True)
    (tmp_path / "two" / "b" / "0.jpg").write_bytes(b"")
    assert_one_line_error(cli("data", "check", str(tmp_path / "two")), "'b'")


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_model_summary_and_list() -> None:
    done = cli(
        "model", "summary", "tf_efficientnet_lite0", "--weights", "bundled", "--classes", "10"
    )
    assert done.returncode == 0, done.stderr
    for word in ("with head", "without head", "conv_stem", "freeze1", "freeze2", "12,810"):
        assert word in done.stdout, word
    assert "resnet34" in cli("model", "list", "resnet3*").stdout
    assert_one_line_error(cli("model", "summary", "resnet33"), "did you mean")


def test_invalid_study_file_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[data]\nsource = "digits"\n[model]\nbackbone = "resnet33"\n'
        '[search]\nbatch_size = [12]\ndecay = ["linear"]\nepochs = [-1]\n'
    )
    done = cli("study", "create", "--config", str(bad), "--stage", "head", "--dry-run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and all(str(bad) in e for e in errors), done.stderr
