"""``tlopt predict`` on a tiny export (issue 15.2): columns, agreement, skipped files, errors.

The export is the one of ``tests/test_export_preprocess.py`` (the ``export`` fixture of
``tests/conftest.py``): a head study on digits written as PNGs at 48 px, evaluated by
``export-best`` on its validation split.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_export_preprocess import CLASSES, cli, read_csv
from tlopt.data.source import DataWarning
from tlopt.errors import DataError, TloptError
from tlopt.export.predict import predict_images


def one_error(done: Any, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.slow  # 15-25 s of CLI subprocesses: the full tier (fast tier under 5 min)
def test_predict_agrees_with_the_export(export: dict[str, Any], tmp_path: Path) -> None:
    out, root = export["out"], export["root"]
    target = tmp_path / "p.csv"
    args = ["--model", str(out), "--images", str(root / "val"), "--out", str(target)]
    done = cli("predict", *args, "--json", "--batch-size", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert summary["count"] == 3 * 8 and summary["skipped"] == 0
    assert summary["out"] == str(target) and summary["device"] in ("cpu", "cuda", "cuda:0")
    assert list(summary["class_counts"]) == list(CLASSES)
    assert sum(summary["class_counts"].values()) == 3 * 8

    with open(target, newline="") as handle:
        assert next(csv.reader(handle)) == ["path", "class", *(f"p_{c}" for c in CLASSES)]
    rows = read_csv(target)
    assert len(rows) == 3 * 8
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert [r["class"] for r in rows] == [CLASSES[i] for i in probs.argmax(axis=1)]
    counts = {c: sum(r["class"] == c for r in rows) for c in CLASSES}
    assert counts == summary["class_counts"]

    # The export evaluated the same images: the same confusion matrix, hence the same accuracy.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val"
    truth = [CLASSES.index(r["path"].split("/")[0]) for r in rows]
    predicted = [CLASSES.index(r["class"]) for r in rows]
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (truth, predicted), 1)
    assert confusion.tolist() == metrics["confusion_matrix"]
    accuracy = float(np.mean(np.array(truth) == np.array(predicted)))
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-12)

    # Without --json: a readable summary, the same file.
    again = tmp_path / "again.csv"
    done = cli("predict", *args[:-1], str(again), "--device", "cpu")
    assert done.returncode == 0 and f"wrote {3 * 8} predictions" in done.stdout
    # Another batch size may take other kernels: the same files and classes, probabilities
    # within float tolerance (they differed in the 8th digit on another 2-core machine).
    assert_same_predictions(read_csv(again), rows)


def assert_same_predictions(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    assert [(r["path"], r["class"]) for r in got] == [(r["path"], r["class"]) for r in want]
    columns = [c for c in want[0] if c.startswith("p_")]
    assert list(got[0]) == list(want[0])
    probs = [[float(r[c]) for c in columns] for r in got]
    assert np.allclose(probs, [[float(r[c]) for c in columns] for r in want], atol=1e-5)


def test_unreadable_files_are_skipped_and_counted(export: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(export["root"] / "val" / "one", folder / "nested" / "one")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: ignored, not counted")
    (folder / ".hidden").mkdir()
    shutil.copy(next((folder / "nested" / "one").iterdir()), folder / ".hidden" / "x.png")
    target = tmp_path / "out" / "p.csv"
    with pytest.warns(DataWarning) as caught:
        summary = predict_images(export["out"], folder, target, device="cpu", batch_size=3)
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        "skipped broken.jpg",
        "skipped empty.png",
    ]
    assert (summary["count"], summary["skipped"]) == (8, 2)
    assert {s["path"] for s in summary["skipped_files"]} == {"broken.jpg", "empty.png"}
    paths = [r["path"] for r in read_csv(target)]
    assert paths == sorted(f"nested/one/{p.name}" for p in (folder / "nested" / "one").iterdir())

    # The command says so on stderr and keeps stdout for the JSON.
    done = cli("predict", "--model", str(export["out"]), "--images", str(folder), "--out",
               str(target), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["skipped"] == 2
    assert "warning: skipped broken.jpg" in done.stderr
    assert "warning: skipped empty.png: empty file" in done.stderr


def test_one_image_file(export: dict[str, Any], tmp_path: Path) -> None:
    image = sorted((export["root"] / "val" / "zero").iterdir())[0]
    summary = predict_images(export["out"] / "model", image, tmp_path / "one.csv", "cpu")
    rows = read_csv(tmp_path / "one.csv")
    assert summary["count"] == 1 and [r["path"] for r in rows] == [str(image)]


@pytest.mark.slow  # CLI subprocesses (a worker, or one per bad input): the full tier
def test_bad_input_is_one_line(export: dict[str, Any], tmp_path: Path) -> None:
    out, val = str(export["out"]), str(export["root"] / "val")
    csv_out = str(tmp_path / "p.csv")
    one_error(
        cli("predict", "--model", str(tmp_path / "nope"), "--images", val, "--out", csv_out),
        "does not exist",
        "tlopt export-best --out",
    )
    one_error(
        cli("predict", "--model", str(tmp_path), "--images", val, "--out", csv_out),
        "is not a tlopt export",
        "tlopt export-best --out",
    )
    (tmp_path / "empty").mkdir()
    one_error(
        cli("predict", "--model", out, "--images", str(tmp_path / "empty"), "--out", csv_out),
        "no image files",
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="none of the 1 image files"):
        predict_images(export["out"], tmp_path / "bad", tmp_path / "p.csv")
    with pytest.raises(TloptError, match="--batch-size 0: use at least 1"):
        predict_images(export["out"], Path(val), tmp_path / "p.csv", batch_size=0)
    with pytest.raises(TloptError, match="--device cuda:x: unknown device; use cpu, cuda"):
        predict_images(export["out"], Path(val), tmp_path / "p.csv", device="cuda:x")
    assert not (tmp_path / "p.csv").exists()
