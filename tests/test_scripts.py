"""Every script under ``scripts/`` runs, on a tiny configuration, as a user runs it.

``scripts/size_probe.py`` has its own tests (``tests/test_size_probe.py``); ``scripts/setup``
and ``scripts/test`` run in every CI job. The rest run here on a small folder of scikit-learn's
real digits (3 classes, 16 px) and timm's ``test_efficientnet`` without weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.conftest import run_in_group

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY_MODEL = """[model]
backbone = "test_efficientnet"
weights = "none"
"""


def digits_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/SPLIT/CLASS/*.png``: the first digits 0, 1 and 2, as PNG files a user would have."""
    digits = load_digits()
    taken = 0
    for split, count in per_class.items():
        for label in range(3):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            rows = np.flatnonzero(digits.target == label)[taken : taken + count]
            for i in rows:
                pixels = (digits.images[i] * 15).astype(np.uint8)  # 0..16 -> 0..240
                Image.fromarray(pixels).convert("RGB").save(folder / f"{i:04d}.png")
        taken += count
    return root


def tiny_study(tmp_path: Path, name: str, extra: str = "") -> Path:
    data = digits_folder(tmp_path / "data", {"train": 16, "val": 6})
    study = tmp_path / f"{name}.toml"
    study.write_text(
        f'name = "{name}"\nseed = 0\nn_trials = 2\n[data]\nsource = "folder"\n'
        f'path = "{data}"\nimage_size = 16\n{TINY_MODEL}[search]\nbatch_size = [8]\n'
        f"epochs = [1]\n{extra}"
    )
    return study


def one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if "error" in line]
    assert "Traceback" not in done.stderr and len(lines) == 1 and needle in lines[0], done.stderr


@pytest.mark.slow  # subprocesses that import torch and train: the full tier
def test_bench_times_both_pipelines_and_a_study_per_stage(tmp_path: Path) -> None:
    data = digits_folder(tmp_path / "data", {"train": 16, "val": 6})
    figures = tmp_path / "bench.json"
    done = run_in_group(
        [
            sys.executable, str(SCRIPTS / "bench.py"), "--device", "cpu", "--data", str(data),
            "--model", "test_efficientnet", "--weights", "none", "--image-size", "16",
            "--batch-size", "8", "--epochs", "1", "--trials", "2", "--workers", "0",
            "--head-trials", "3", "--head-epochs", "2", "--stages", "head,freeze1",
            "--json", str(figures),
        ],
        240,
        "scripts/bench.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert list(report["stages"]) == ["head", "freeze1"] and report["threads"] >= 1
    for row in report["stages"].values():
        assert row["baseline_img_s"] > 0 and row["tlopt_img_s"] > 0 and row["study_s"] > 0
    # The usual pipeline is timed on the same trials: each at its batch size's measured rate.
    assert len(report["stages"]["head"]["trials"]) == 3
    assert len(report["stages"]["freeze1"]["trials"]) == 2
    for row in report["stages"].values():
        rates = {int(bs): r for bs, r in row["baseline_img_s_by_batch_size"].items()}
        n = report["train_images"]
        expected = sum(t["epochs"] * n / rates[t["batch_size"]] for t in row["trials"])
        assert row["baseline_study_s"] == pytest.approx(expected, rel=0.02, abs=0.2)
    printed = [line.split()[0] for line in done.stdout.splitlines()]
    assert "head" in printed and "freeze1" in printed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--stages", "head,freeze"], "freeze"),
        (["--epochs", "0"], "--epochs 0: give a number of 1 or more"),
        (["--data", "."], "needs a folder with train/ and val/"),
        (["--device", "tpu"], "--device tpu: unknown device"),
        (["--threads", "0"], "--threads 0: give a number of 1 or more"),
    ],
)
def test_bench_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    done = run_in_group([sys.executable, str(SCRIPTS / "bench.py"), *args], 120, "bench.py")
    one_line_error(done, needle)


GPU_CHECK_ROWS = [
    "bench: usual pipeline img/s",
    "bench: freeze1 bs-8 trial img/s, eager",
    "bench: freeze1 bs-8 trial img/s, --compile",
    "bench: best trial / usual pipeline",
    "resume cpu -> cpu: history",
    "resume cpu -> cpu -> cpu: history",
    "bf16 against fp32: val loss",
    "two trials in one process",
    "--per-gpu auto slots",
    "all checks, wall time",
]


@pytest.mark.slow  # the GPU claims' checks, CPU-sized: known to work when a GPU is lent
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path: Path) -> None:
    data = digits_folder(tmp_path / "data", {"train": 16, "val": 6})
    figures = tmp_path / "gpu-check.json"
    done = run_in_group(
        [
            sys.executable, str(SCRIPTS / "gpu_check.py"), "--device", "cpu", "--small",
            "--data", str(data), "--json", str(figures),
        ],
        240,
        "scripts/gpu_check.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(figures.read_text())
    assert [r["check"] for r in rows] == GPU_CHECK_ROWS
    status = {r["check"]: r["status"] for r in rows}
    assert all(s in ("PASS", "SKIP", "INFO") for s in status.values()), rows
    judged = ("resume cpu -> cpu: history", "resume cpu -> cpu -> cpu: history")
    assert all(status[c] == "PASS" for c in (*judged, "two trials in one process")), rows
    assert status["--per-gpu auto slots"] == "SKIP"  # no CUDA device: said, not hidden
    lines = done.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("check ")) :]
    assert len(table) == 1 + len(GPU_CHECK_ROWS), done.stdout
    for row, line in zip(rows, table[1:], strict=True):
        assert line.startswith(row["check"]) and line.rstrip().endswith(row["status"]), line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
        (["--device", "cpu", "--epochs", "2"], "--epochs 2: give 3 or more"),
        (["--device", "cpu", "--data", "."], "give a folder with train/ and val/"),
    ],
)
def test_gpu_check_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # "no GPU" also where the suite has one
    done = run_in_group([sys.executable, str(SCRIPTS / "gpu_check.py"), *args], 120, "gpu_check")
    one_line_error(done, needle)


@pytest.mark.slow
def test_finetune_ablation_builds_every_variant_on_the_study_space(tmp_path: Path) -> None:
    from tlopt.config import load_config
    from tlopt.tune import study as studies
    from tlopt.tune.worker import work

    url = f"sqlite:///{tmp_path}/studies.db"
    config = load_config(tiny_study(tmp_path, "abl"))
    studies.create(config, "head", url)
    work("abl/head", url, n_trials=1, device="cpu")
    studies.create(config, "freeze1", url)
    # The same variant before and after one that sets label smoothing: the second run must
    # not inherit it (each variant starts from the study's space, not the previous variant's).
    done = run_in_group(
        [
            sys.executable, str(SCRIPTS / "finetune_ablation.py"), "--study", "abl/freeze1",
            "--storage", url, "--epochs", "1", "--batch-size", "8", "--json",
            "--variant", "warmup_epochs=1", "--variant", "label_smoothing=0.3",
            "--variant", "warmup_epochs=1",
        ],
        180,
        "finetune_ablation.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, smoothed, again = json.loads(done.stdout)
    assert smoothed["params"]["label_smoothing"] == 0.3
    assert smoothed["params"]["warmup_epochs"] == 0.0
    assert again["params"] == first["params"]
    assert again["params"]["label_smoothing"] == 0.0 and again["params"]["warmup_epochs"] == 1.0
    # One process, one thread count: the replay gives the first run's loss.
    assert again["best_val_loss"] == pytest.approx(first["best_val_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--variant", "warmup=1"], "'warmup=1' is not FIELD=VALUE"),
        (["--variant", "optimizer=adamm"], "optimizer: 'adamm' is not one of"),
        (["--lr", "0"], "lr: 0.0 is not a number in (0, 10]"),
        (["--study", "nothing/freeze1"], "no study 'nothing/freeze1'"),
    ],
)
def test_finetune_ablation_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    url = f"sqlite:///{tmp_path}/studies.db"
    command = [sys.executable, str(SCRIPTS / "finetune_ablation.py"), "--storage", url]
    if "--study" not in args:
        from tlopt.config import load_config
        from tlopt.tune import study as studies

        studies.create(load_config(tiny_study(tmp_path, "abl")), "head", url)
        command += ["--study", "abl/head"]
    one_line_error(run_in_group([*command, *args], 120, "finetune_ablation.py"), needle)


# About a minute on 2 cores: scripts/demo runs a dozen tlopt commands, each a process that
# starts torch; the only test of the demo script end to end.
@pytest.mark.slow
def test_demo_runs_its_stages_and_exports_on_a_tiny_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEMO_CONFIG", str(tiny_study(tmp_path, "tinydemo")))
    monkeypatch.setenv("DEMO_RUN", str(tmp_path / "run"))
    done = run_in_group([str(SCRIPTS / "demo")], 300, "scripts/demo")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo: val accuracy" in done.stdout or "demo: test accuracy" in done.stdout
    listed = {row["name"] for row in _study_list(tmp_path / "run" / "studies.db")}
    assert listed == {"tinydemo/head", "tinydemo/freeze1", "tinydemo/freeze2"}
    assert (tmp_path / "run" / "export" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DEMO_FREEZE_TRIALS": "two"}, "DEMO_FREEZE_TRIALS=two"),
        ({"DEMO_CONFIG": "missing.toml"}, "DEMO_CONFIG=missing.toml: no such study file"),
    ],
)
def test_demo_bad_settings_are_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    monkeypatch.setenv("DEMO_RUN", str(tmp_path / "run"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    done = run_in_group([str(SCRIPTS / "demo")], 60, "scripts/demo")
    one_line_error(done, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_slurm_workers_script_parses_and_starts_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(SCRIPTS / "slurm-workers.sh")
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    monkeypatch.delenv("TLOPT_STORAGE", raising=False)
    one_line_error(run_in_group(["bash", path], 30, "slurm-workers.sh"), "usage: sbatch")
    one_line_error(run_in_group(["bash", path, "s/head"], 30, "slurm-workers.sh"), "TLOPT_STORAGE")
    # Without Slurm and without a GPU the script gets as far as tlopt's worker, which refuses
    # --gpus all: the set-up, the working directory and the command line all worked.
    monkeypatch.setenv("TLOPT_STORAGE", f"sqlite:///{tmp_path}/studies.db")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    done = run_in_group(["bash", path, "s/head"], 120, "slurm-workers.sh")
    one_line_error(done, "--gpus all: no CUDA device is visible")


def _study_list(db: Path) -> list[dict[str, object]]:
    from tlopt.tune import study as studies

    return studies.list_studies(f"sqlite:///{db}")


def test_bench_fold_times_both_ways_and_the_features_agree() -> None:
    done = run_in_group(
        [
            sys.executable, str(SCRIPTS / "bench_fold.py"), "--backbone", "test_efficientnet",
            "--weights", "none", "--image-size", "32", "--batch", "4", "--repeats", "1",
            "--device", "cpu", "--json",
        ],
        300,
        "bench_fold.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["batchnorms_folded"] > 0 and result["agrees"] is True
    assert result["timm_s"] > 0 and result["folded_s"] > 0


def test_bench_fold_bad_input_is_one_line_and_exit_2() -> None:
    done = run_in_group([sys.executable, str(SCRIPTS / "bench_fold.py"), "--batch", "0"], 120, "f")
    one_line_error(done, "--batch must be at least 1")
