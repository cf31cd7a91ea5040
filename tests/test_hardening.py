"""Messy folders, wrong flags, half-configured databases, full disks: one line and a safe state.

Every test here runs tlopt as a user does (``python -m tlopt ...``) or at the library boundary
the CLI calls, and checks the contract of issue #7: a user error prints exactly one
``error: ...`` line per problem, no traceback, exit code 2, never a password; nothing is left
half-created. Image and folder cases at the library level live in ``test_data.py``; these are
the CLI and storage ends of them.

Read-only files and full disks are simulated with small tmpfs mounts (``mount -t tmpfs``) and
``chattr +i``, because the tests run as root and root ignores file permissions; where the
machine does not allow them, the test is skipped and says why.
"""

from __future__ import annotations

import ast
import contextlib
import json
import pickle
import secrets
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState
from PIL import Image
from sqlalchemy.engine import make_url

from tests.conftest import TINY_DATA_MODEL
from tests.conftest import cli as run_tlopt
from tests.test_data import messy_folder, save
from tlopt.config import load_config
from tlopt.errors import StorageError
from tlopt.tune import study as studies
from tlopt.tune.storage import mask_url, study_names

ROOT = Path(__file__).resolve().parent.parent

TINY = (
    """
name = "tiny"
seed = 3
n_trials = 2
"""
    + TINY_DATA_MODEL
    + """[search]
batch_size = [32]
epochs = [1]
decay = ["constant"]
lr = [3e-3]
optimizer = ["sgd"]
dropout = [0.0, 0.1]  # 2 points for the budget of 2 (no point runs twice)
[pruner]
type = "nop"
"""
)


def study_file(folder: Path, extra: str = "", base: str = TINY) -> Path:
    path = folder / "tiny.toml"
    path.write_text(base + extra)
    return path


def folder_study(folder: Path, data: Path, extra: str = "") -> Path:
    """A tiny study over an image folder (instead of the built-in digits)."""
    base = TINY.replace('source = "digits"', f'source = "folder"\npath = "{data}"')
    return study_file(folder, extra, base)


def cli(*args: str, secret: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``python -m tlopt``; no output may hold a traceback or ``secret``."""
    done = run_tlopt(*args, timeout=300)  # in the test's tmp_path (conftest): writes nothing here
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    if secret:
        assert secret not in done.stderr + done.stdout, "a password was printed"
    return done


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single ``error:`` line of a run that must exit with code 2."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def create_args(config: Path, storage: str, *extra: str) -> tuple[str, ...]:
    return (
        "study",
        "create",
        "--config",
        str(config),
        "--stage",
        "head",
        "--storage",
        storage,
        *extra,
    )


def create_here(config: Path, storage: str) -> None:
    """Create the head study in this process (1 s), where the CLI's create is not under test."""
    assert studies.create(load_config(config), "head", storage).created


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root in a VM")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


# --- 1-2: images and folders, through `tlopt study create` ------------------------------------


def test_too_many_unreadable_files_stop_study_create(tmp_path: Path) -> None:
    data = messy_folder(tmp_path / "pets")  # 3 of 28 files unreadable; the default limit is 10%
    storage = f"sqlite:///{tmp_path}/s.db"
    config = folder_study(tmp_path, data)
    line = one_line_error(
        cli("study", "create", "--config", str(config), "--stage", "head", "--storage", storage),
        "3 of 28 image files",
        "max_bad_fraction",
        "tlopt data check",
    )
    assert str(data) in line
    assert cli("study", "list", "--storage", storage).stdout.startswith("no studies")


def test_skipped_files_are_counted_and_listed_in_the_study(tmp_path: Path) -> None:
    data = messy_folder(tmp_path / "pets")
    storage = f"sqlite:///{tmp_path}/s.db"
    config = folder_study(tmp_path, data, "")
    config.write_text(
        config.read_text().replace("image_size = 16", "image_size = 16\nmax_bad_fraction = 0.2")
    )
    done = cli("study", "create", "--config", str(config), "--stage", "head", "--storage", storage)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any("skipped 3 unreadable image file(s)" in w for w in warnings), done.stderr
    assert "error:" not in done.stderr
    shown = cli("study", "show", "tiny/head", "--storage", storage, "--json")
    attrs = json.loads(shown.stdout)["attrs"]
    # Class names with spaces and non-ASCII letters; hidden and checkpoint folders are no class.
    assert attrs["classes"] == ["cats", "dögs and wölves"]
    assert attrs["skipped"] == 3
    assert sorted(map(tuple, attrs["skipped_files"])) == [
        ("cats/empty.jpg", "empty file"),
        ("cats/text.JPG", "not an image (cannot identify format)"),
        ("dögs and wölves/half.jpg", "truncated image data"),
    ]


def _layout(root: Path, case: str) -> None:
    if case == "empty":
        root.mkdir(parents=True)
    elif case == "file":
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_text("not a folder")
    elif case == "mismatch":
        for split, names in (("train", ("ants", "bees")), ("val", ("ants", "wasps"))):
            for name in names:
                save(root / split / name / "0.png")
    elif case == "hidden-only":
        save(root / ".ipynb_checkpoints" / "a" / "0.png")
        save(root / "a" / "0.png")


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("empty", ("no class folders in",)),
        ("file", ("is a file, not a folder",)),
        ("mismatch", ("only in train: 'bees'; only in val: 'wasps'",)),
        ("hidden-only", ("only one class 'a'",)),
        ("missing", ("does not exist",)),
    ],
)
def test_folder_problems_are_one_line_at_study_create(
    tmp_path: Path, case: str, needles: tuple[str, ...]
) -> None:
    data = tmp_path / "data"
    _layout(data, case)
    config = folder_study(tmp_path, data)
    one_line_error(
        cli("study", "create", "--config", str(config), "--stage", "head", "--dry-run"), *needles
    )


def test_duplicates_across_splits_warn_with_the_count(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            save(data / split / name / "0.png")
            save(data / split / name / "same.png", Image.new("RGB", (8, 8), (9, 9, ord(name[0]))))
    config = folder_study(tmp_path, data)
    done = cli("study", "create", "--config", str(config), "--stage", "head", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "warning: 2 image(s)" in done.stderr and "more than one split" in done.stderr


# --- 3: configs and flags ---------------------------------------------------------------------


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_stage_names_flags_and_paths_that_do_not_exist(tmp_path: Path) -> None:
    config = study_file(tmp_path)
    huge = "freeze" + "9" * 5000  # int() refuses more than 4,300 digits
    one_line_error(
        cli("study", "create", "--config", str(config), "--stage", huge, "--dry-run"),
        "unknown stage",
    )
    stages = study_file(tmp_path, f"[stages.{huge}]\nlr = [1e-3]\n")
    one_line_error(
        cli("study", "create", "--config", str(stages), "--stage", "head", "--dry-run"),
        "stages.freeze999",
    )
    one_line_error(
        cli("study", "list", "--storage", "sqlite:///~no_such_user_tlopt/s.db"), "cannot expand"
    )
    one_line_error(
        cli("study", "create", "--config", str(config), "--stage", "head", "--data", "~nobody_x/d"),
        "--data",
    )
    one_line_error(cli("worker", "--study", "x/head", "--gpus", "0,a"), "--gpus '0,a'")
    wrong_type = cli("worker", "--study", "x/head", "--n-trials", "many")
    assert wrong_type.returncode == 2 and "Invalid value for '--n-trials'" in wrong_type.stderr


def test_config_keys_with_control_characters_stay_one_line_each(tmp_path: Path) -> None:
    config = study_file(tmp_path, '[storage]\n"url\\u001e" = 1\n"art\\nifacts" = 2\n')
    done = cli("study", "create", "--config", str(config), "--stage", "head", "--dry-run")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 == len(done.stderr.splitlines()), done.stderr
    assert "storage.url\\x1e: unknown key" in done.stderr


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_existing_study_with_another_config_is_refused_with_the_difference(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    create_here(study_file(tmp_path), storage)
    changed = tmp_path / "changed.toml"
    changed.write_text(TINY.replace("seed = 3", "seed = 4").replace("epochs = [1]", "epochs = [2]"))
    refused = cli(*create_args(changed, storage))
    one_line_error(refused, "'tiny/head' exists with another config", "seed: 3 -> 4", "--name")
    assert "search.epochs: [1] -> [2]" in refused.stderr
    assert cli(*create_args(changed, storage, "--name", "tiny-b/head")).returncode == 0
    assert cli("study", "list", "--storage", storage).stdout.count("/head") == 2


# --- 4: storage -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_problems_are_one_line_with_the_password_masked(
    postgres_url: str, tmp_path: Path
) -> None:
    url = make_url(postgres_url)
    real = url.password or ""
    wrong = "Wr0ng-" + secrets.token_hex(4)
    cases = [
        (url.set(password=wrong), wrong, "password authentication failed"),
        (url.set(database="tlopt_no_such_db"), real, 'database "tlopt_no_such_db" does not exist'),
        (url.set(host="127.0.0.1", port=9, password=wrong), wrong, "Connection refused"),
    ]
    config = study_file(tmp_path)
    for bad, secret, needle in cases:
        text = bad.render_as_string(hide_password=False)
        line = one_line_error(
            cli("study", "list", "--storage", text, secret=secret), "cannot open storage", needle
        )
        assert ":***@" in line
    text = cases[0][0].render_as_string(hide_password=False)  # every command, one case
    for args in (
        ("study", "create", "--config", str(config), "--stage", "head", "--storage", text),
        ("worker", "--study", "tiny/head", "--storage", text),
    ):
        one_line_error(cli(*args, secret=wrong), "password authentication failed")
    # A password with unencoded '@' and '/': the driver reads part of it as the host name.
    messy = f"postgresql://tlopt:pa@{wrong}/x@127.0.0.1:9/db"
    line = one_line_error(cli("study", "list", "--storage", messy, secret=wrong), "%40")
    assert "pa@" not in line


@pytest.mark.postgres
def test_password_in_the_study_file_is_never_stored_or_printed(
    pg_storage_url: str, tmp_path: Path
) -> None:
    password = make_url(pg_storage_url).password
    assert password
    config = study_file(tmp_path, f'[storage]\nurl = "{pg_storage_url}"\n')
    created = cli("study", "create", "--config", str(config), "--stage", "head", secret=password)
    assert created.returncode == 0 and ":***@" in created.stdout, created.stderr
    study = optuna.load_study(study_name="tiny/head", storage=pg_storage_url)
    assert password not in json.dumps(study.user_attrs)
    assert study.user_attrs["tlopt.config"]["storage"]["url"] == ""  # no URL in the study
    # The stored (masked) URL does not count as a change of config.
    again = cli("study", "create", "--config", str(config), "--stage", "head", secret=password)
    one_line_error(again, "already exists")
    worker = cli("worker", "--study", "tiny/head", "--storage", pg_storage_url, secret=password)
    assert worker.returncode == 0, worker.stderr[-2000:]
    shown = cli(
        "study", "show", "tiny/head", "--json", "--storage", pg_storage_url, secret=password
    )
    assert shown.returncode == 0, shown.stderr


def test_mask_url_hides_every_password_shape() -> None:
    for url, secret in (
        ("postgresql://me:s3cret@db:5432/t", "s3cret"),
        ("postgresql+psycopg://me:p@ss/w:rd@db/t", "ss/w"),
        ("postgresql://:only@db/t", "only"),
    ):
        assert secret not in mask_url(url) and ":***@db" in mask_url(url)
    assert mask_url("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert mask_url("postgresql://db:5432/t") == "postgresql://db:5432/t"
    # Secrets in the query: libpq's password and sslpassword, a driver's token.
    for url, secret in (
        ("postgresql://me@db/t?password=s3cret", "s3cret"),
        ("postgresql://me@db/t?sslmode=require&sslpassword=k3y&x=1", "k3y"),
        ("postgresql+psycopg://me:pw@db/t?PASSWORD=a@b/c", "a@b"),
        ("grpc://db:50051?token=t0ken#x", "t0ken"),
    ):
        masked = mask_url(url)
        assert secret not in masked and "=***" in masked and "db" in masked, masked
    assert mask_url("postgresql://db/t?sslmode=require") == "postgresql://db/t?sslmode=require"


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_read_only_sqlite_folder_is_one_line(tmp_path: Path) -> None:
    config = study_file(tmp_path)
    with tmpfs(tmp_path / "ro", "1m") as folder:
        storage = f"sqlite:///{folder}/s.db"
        # Through the CLI: this process must hold no connection to the file when it is remounted.
        assert cli(*create_args(config, storage)).returncode == 0
        remount_read_only(folder)
        for args in (
            create_args(config, storage, "--name", "b/head"),
            ("worker", "--study", "tiny/head", "--storage", storage),
            ("study", "list", "--storage", storage),
            ("study", "delete", "tiny/head", "--yes", "--storage", storage),
        ):
            one_line_error(cli(*args), str(folder / "s.db"), "read-only")
        one_line_error(
            cli("study", "list", "--storage", f"sqlite:///{folder}/new/s.db"),
            "cannot create the folder",
        )


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_immutable_sqlite_file_reads_but_refuses_writes(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    config = study_file(tmp_path)
    create_here(config, storage)
    db = tmp_path / "s.db"
    done = subprocess.run(["chattr", "+i", str(db)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        listed = cli("study", "list", "--storage", storage)
        assert listed.returncode == 0 and "tiny/head" in listed.stdout, listed.stderr
        line = one_line_error(
            cli(*create_args(config, storage, "--name", "b/head")), "the file is read-only"
        )
        assert "--storage" in line
        one_line_error(cli("worker", "--study", "tiny/head", "--storage", storage), "read-only")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_disk_full_while_writing_an_artifact(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    with tmpfs(tmp_path / "artifacts", "64k") as artifacts:
        config = study_file(tmp_path, f'[storage]\nartifacts = "{artifacts}"\n')
        create_here(config, storage)
        with contextlib.suppress(OSError):  # fill the disk to the last block
            (artifacts / "filler").write_bytes(bytes(1 << 20))
        worker = cli("worker", "--study", "tiny/head", "--storage", storage)
        one_line_error(worker, str(artifacts), "no space left on device", "queued again")
        study = optuna.load_study(study_name="tiny/head", storage=storage)
        # Every trial it asked (head trials are asked several at once) failed and was queued
        # again; the worker stopped.
        states = [t.state for t in study.trials]
        asked = len(states) // 2
        assert asked >= 1 and states == [TrialState.FAIL] * asked + [TrialState.WAITING] * asked
        assert sorted(p.name for p in artifacts.iterdir()) == ["filler"]  # no partial file
        # A study is not created where its trials could not save anything.
        one_line_error(
            cli(*create_args(config, storage, "--name", "b/head")),
            "cannot write in the artifact folder",
        )
        assert study_names(optuna.storages.RDBStorage(storage)) == ["tiny/head"]


def test_no_half_created_study_when_a_write_fails(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(study_file(tmp_path))
    real = optuna.Study.set_user_attr

    def failing(self: optuna.Study, key: str, value: object) -> None:
        if key == "tlopt.fingerprint":
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("disk I/O error"))
        real(self, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", failing)
    with pytest.raises(StorageError, match="cannot create study 'tiny/head'.*disk I/O error"):
        studies.create(config, "head", storage_url)
    assert study_names(optuna.storages.RDBStorage(storage_url)) == []
    monkeypatch.setattr(optuna.Study, "set_user_attr", real)
    assert studies.create(config, "head", storage_url).created  # and the name is free again


# --- 5: training ------------------------------------------------------------------------------


def test_nan_learning_rate_prunes_the_trial_and_the_study_goes_on(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    config = study_file(tmp_path)
    # lr 10 (the largest allowed) with weight decay 1: each SGD step multiplies the weights by
    # about -9, so the loss overflows in the second epoch.
    diverge = "lr = [10.0]\nweight_decay = [1.0]\nmomentum = [0.99]"
    config.write_text(TINY.replace("lr = [3e-3]", diverge).replace("epochs = [1]", "epochs = [2]"))
    create_here(config, storage)
    worker = cli("worker", "--study", "tiny/head", "--storage", storage)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "worker done: 0 complete, 2 pruned, 0 failed" in worker.stdout
    study = optuna.load_study(study_name="tiny/head", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        reason = trial.user_attrs["tlopt.prune_reason"]
        assert "loss became" in reason and ("nan" in reason or "inf" in reason), reason
    shown = cli("study", "show", "tiny/head", "--storage", storage)
    assert "loss became" in shown.stdout


def _first_trial_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_out: Callable[[], None], **work: Any
) -> tuple[Any, optuna.trial.FrozenTrial]:
    """A head study whose first trial calls ``run_out`` before training: (summary, trial 0)."""
    from tlopt.tune import worker

    storage = f"sqlite:///{tmp_path}/s.db"
    studies.create(load_config(study_file(tmp_path)), "head", storage)
    real = worker.objective
    calls: list[int] = []

    def first_runs_out(trial: optuna.Trial, ctx: object) -> float:
        calls.append(trial.number)
        if len(calls) == 1:
            run_out()
        return real(trial, ctx)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "objective", first_runs_out)
    summary = worker.work("tiny/head", storage, **work)
    return summary, optuna.load_study(study_name="tiny/head", storage=storage).trials[0]


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulated CUDA OOM (the CPU has none); ``test_real_cuda_oom`` does it on a GPU."""

    def simulated() -> None:
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total)"
        )

    summary, failed = _first_trial_runs_out(tmp_path, monkeypatch, simulated)
    assert (summary.failed, summary.complete) == (1, 2)
    assert failed.state == TrialState.FAIL
    assert "CUDA out of memory" in failed.user_attrs["tlopt.error"]


def test_out_of_memory_frees_the_failed_step_before_emptying_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The traceback of an OOM holds fit's frames and their tensors: while it lives,
    ``empty_cache`` frees nothing and --per-gpu siblings keep running out. The worker drops
    it first, so a tensor the failed step held is gone when the cache is emptied."""
    from tlopt.train import trainer
    from tlopt.tune import worker

    storage = f"sqlite:///{tmp_path}/s.db"
    studies.create(load_config(study_file(tmp_path)), "scratch", storage)  # trained by fit
    held: list[weakref.ref[torch.Tensor]] = []
    freed_when_emptied: list[bool] = []
    real_check = trainer.check_stop

    def step_runs_out(should_stop: Callable[[], bool] | None, epoch: int) -> None:
        if not held:  # the first step of the first trial
            activations = torch.ones(2**22)  # 16 MB the step holds when it runs out
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_check(should_stop, epoch)

    monkeypatch.setattr(trainer, "check_stop", step_runs_out)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: freed_when_emptied.append(held[0]() is None)
    )
    summary = worker.work("tiny/scratch", storage, device="cpu")
    assert (summary.failed, summary.complete) == (1, 2)
    assert freed_when_emptied == [True]


@pytest.mark.gpu
def test_real_cuda_oom_fails_one_trial_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    def real() -> None:  # a real allocation far beyond any GPU (4 TB)
        torch.empty(2**40, dtype=torch.float32, device="cuda")

    summary, failed = _first_trial_runs_out(tmp_path, monkeypatch, real, device="cuda")
    assert (summary.failed, summary.complete) == (1, 2)
    assert "CUDA out of memory" in failed.user_attrs["tlopt.error"]


# --- 6: security ------------------------------------------------------------------------------


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_torch_load_only_with_weights_only_and_no_code_from_data() -> None:
    loads = 0
    for path in sorted((ROOT / "tlopt").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name, call in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name == "torch.load":
                loads += 1
                flags = {k.arg: k.value for k in call.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant), where
                assert flags["weights_only"].value is True, where  # type: ignore[attr-defined]
            assert name not in ("eval", "exec", "compile", "pickle.load", "pickle.loads"), where
            assert not name.endswith(("yaml.load", "yaml.unsafe_load", "runpy.run_path")), where
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not {"dill", "joblib", "yaml", "cloudpickle"} & set(names), path
                assert not ({"load"} & set(names) and getattr(node, "module", "") == "torch")
    assert loads >= 2  # the weights-file reader and the checkpoint reader
    # The one pickle reader (CIFAR-10 batches) is a restricted Unpickler with an allow-list.
    source = (ROOT / "tlopt" / "data" / "cifar.py").read_text()
    assert "class _BatchUnpickler(pickle.Unpickler)" in source and "def find_class" in source
    # Study files are TOML, read as data: tomllib is the only parser of configs.
    config = (ROOT / "tlopt" / "config.py").read_text()
    assert "tomllib.loads" in config and "import yaml" not in config


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_pickled_weights_file_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as handle:
        pickle.dump({"conv_stem.weight": _Evil(marker)}, handle)  # torch.load reads plain pickles
    assert not marker.exists()
    one_line_error(
        cli("model", "summary", "test_efficientnet", "--weights", f"file:{evil}"),
        f"cannot read weights file '{evil}'",
        "safetensors or torch.save",
    )
    assert not marker.exists(), "the pickle in the weights file was executed"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    one_line_error(
        cli("model", "summary", "test_efficientnet", "--weights", f"file:{broken}"),
        "cannot read weights file",
    )


def test_config_files_are_data_never_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    code = tmp_path / "study.py"
    code.write_text(f"open({str(marker)!r}, 'w')\nname = 'x'\n")
    one_line_error(
        cli("study", "create", "--config", str(code), "--stage", "head", "--dry-run"),
        "not valid TOML",
    )
    injected = tmp_path / "injected.toml"
    injected.write_text(f"description = \"__import__('os').remove({str(marker)!r})\"\n" + TINY)
    assert (
        cli("study", "create", "--config", str(injected), "--stage", "head", "--dry-run").returncode
        == 0
    )
    assert not marker.exists()


def test_study_commands_start_without_torch() -> None:
    """'study list/show/delete' only read the storage: no torch import, no 4 s start-up."""
    code = (
        "import sys, tlopt.tune.study as s; assert 'torch' not in sys.modules, 'torch'; "
        "from tlopt.tune.context import ATTR; assert s.ATTR == ATTR"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``root`` (links too) with its size and modification time."""
    found = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_dir():
            info = path.lstat()
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.mark.slow
def test_export_files_stay_inside_out(tmp_path: Path) -> None:
    """``export-best`` writes exactly the files its manifest lists, all inside ``--out``."""
    from tlopt.export.bundle import FILES
    from tlopt.tune.worker import work

    storage = f"sqlite:///{tmp_path}/s.db"
    create_here(study_file(tmp_path), storage)
    assert work("tiny/head", storage, n_trials=1).complete == 1
    out = tmp_path / "exports" / "tiny"
    (tmp_path / "exports").mkdir()
    before = _files(tmp_path)
    done = cli("export-best", "--study", "tiny/head", "--storage", storage, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    after = _files(tmp_path)

    # Nothing outside --out is new or changed (the working directory is tmp_path too); reading
    # the study may only touch the SQLite file and its -wal/-shm.
    outside = {
        p
        for p in (after.keys() - before.keys()) | {p for p in before if after.get(p) != before[p]}
        if not p.is_relative_to(out) and not p.name.startswith("s.db")
    }
    assert outside == set(), sorted(map(str, outside))
    written = sorted(p.relative_to(out).as_posix() for p in after if p.is_relative_to(out))
    assert written == sorted(FILES)  # no stray file left behind
    assert [p.name for p in out.rglob("*") if p.is_dir()] == ["model"]  # nor a temporary folder
    for path in after:
        if path.is_relative_to(out):
            assert not path.is_symlink() and path.resolve().is_relative_to(out.resolve()), path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == list(FILES)
