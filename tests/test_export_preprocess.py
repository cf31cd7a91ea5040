"""An export prepares images as its training did, at the trained size (issue 13.3).

A tiny head study on an image folder at 48 px (scikit-learn digits written as PNGs of
assorted, non-square sizes, so that the resize and the crop matter), exported with
``tlopt export-best --json``; ``tlopt extract`` on its validation images must reproduce the
export's descriptors, and timm's own loader must read the trained preprocessing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tests.conftest import TINY_DATA_MODEL, cli
from tlopt.config import load_config
from tlopt.data.images import load_rgb, resize_square
from tlopt.models.backbones import create_backbone, normalization
from tlopt.tune import study as studies
from tlopt.tune.worker import work

SIZE = 48
CLASSES = ("one", "two", "zero")  # sorted, as tlopt sorts class folders
DATA_MODEL = TINY_DATA_MODEL.replace('source = "digits"', 'source = "folder"\npath = "data"')
STUDY = f"""name = "px"
seed = 1
n_trials = 2
{DATA_MODEL.replace("image_size = 16", f"image_size = {SIZE}")}
[search]
batch_size = [16]
epochs = [3]
decay = ["constant"]
lr = [3e-3]
optimizer = ["adam"]
dropout = [0.0]
[pruner]
type = "nop"
"""


def write_images(root: Path, per_class: dict[str, int]) -> None:
    """Digits 0, 1, 2 as grey PNGs of assorted sizes in root/<split>/<class>/."""
    digits = load_digits()
    names = {0: "zero", 1: "one", 2: "two"}
    for digit, name in names.items():
        pictures = digits.images[digits.target == digit]
        start = 0
        for split, count in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (pictures[start + i] * 255 / 16).astype(np.uint8)
                size = (40 + 3 * (i % 7), 52 - 2 * (i % 5))  # width, height: never 48 x 48
                Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST).save(
                    folder / f"{split}{i:03d}.png"
                )
            start += count


def build_export(base: Path) -> dict[str, Any]:
    """Data folder, head study and export under ``base``; returns the paths and the JSON."""
    write_images(base / "data", {"train": 24, "val": 8})
    (base / "px.toml").write_text(STUDY)
    url = f"sqlite:///{base}/studies.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLOPT_CACHE", str(base / "cache"))
        mp.delenv("TLOPT_STORAGE", raising=False)
        studies.create(load_config(base / "px.toml"), "head", url)
        work("px/head", url)
        out = base / "export"
        done = cli(
            "export-best", "--study", "px/head", "--storage", url, "--out", str(out), "--json"
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": base / "data", "out": out, "json": json.loads(done.stdout), "url": url}


# ``export``, the session-scoped fixture in tests/conftest.py, is build_export's: one export
# for this module and tests/test_predict.py, on one pytest-xdist worker (conftest's XDIST_GROUPS).


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_export_best_json_names_paths_and_metrics(export: dict[str, Any]) -> None:
    info, out = export["json"], export["out"]
    assert info["study"] == "px/head" and info["out"] == str(out.resolve())
    for name, path in info["files"].items():
        assert Path(path) == (out / name).resolve() and Path(path).is_file(), name
    assert info["metrics"] == json.loads((out / "metrics.json").read_text())
    assert info["metrics"]["split"] == "val" and info["metrics"]["count"] == 3 * 8


def test_config_holds_the_trained_preprocessing(export: dict[str, Any]) -> None:
    out, root = export["out"], export["root"]
    config = json.loads((out / "model" / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    mean, std = normalization(create_backbone("test_efficientnet", "none", 3))
    assert cfg["input_size"] == [3, SIZE, SIZE]
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bilinear", 1.0, "center")
    assert tuple(cfg["mean"]) == mean and tuple(cfg["std"]) == std
    assert config["label_names"] == list(CLASSES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["input_size"] == [3, SIZE, SIZE]

    # A plain timm user: local-dir loading and timm's eval transform give tlopt's pixels.
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, SIZE, SIZE)
    transform = timm.data.create_transform(**data)
    for path in sorted((root / "val" / "two").iterdir())[:3]:
        image = load_rgb(path)
        ours = torch.from_numpy(resize_square(image, SIZE).copy()).permute(2, 0, 1) / 255.0
        ours = (ours - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(transform(image), ours, rtol=0, atol=1e-6)


def test_descriptors_csv_agrees_with_the_files(export: dict[str, Any]) -> None:
    out, root = export["out"], export["root"]
    rows = read_csv(out / "descriptors.csv")
    assert list(rows[0]) == ["row", "path", "label", "class", "split"]
    assert json.loads((out / "manifest.json").read_text())["data_path"] == str(root)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    assert {r["path"] for r in rows} == files and len(rows) == len(files) == 3 * 32
    for i, row in enumerate(rows):
        split, name, _ = row["path"].split("/")
        assert int(row["row"]) == i and (root / row["path"]).is_file()
        assert row["split"] == split and row["class"] == name == CLASSES[int(row["label"])]
    assert np.load(out / "descriptors.npy").shape[0] == len(rows)


def test_extract_reproduces_the_export_descriptors(export: dict[str, Any], tmp_path: Path) -> None:
    out, root = export["out"], export["root"]
    target = tmp_path / "val.npy"
    done = cli("extract", "--model", str(out), "--images", str(root / "val"), "--out", str(target))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {3 * 8} descriptors" in done.stdout
    extracted = np.load(target)
    names = [r["path"] for r in read_csv(target.with_suffix(".csv"))]
    exported = np.load(out / "descriptors.npy")
    row_of = {r["path"]: int(r["row"]) for r in read_csv(out / "descriptors.csv")}
    assert len(names) == 3 * 8 and extracted.shape == (len(names), exported.shape[1])
    expected = exported[[row_of[f"val/{name}"] for name in names]]
    np.testing.assert_allclose(extracted, expected, rtol=1e-4, atol=1e-5)


def test_an_export_from_before_the_fix_uses_the_trained_size(
    export: dict[str, Any], tmp_path: Path
) -> None:
    """Older exports named the backbone's ImageNet settings (160 px, bicubic, crop 0.95)."""
    import shutil

    from tlopt.data.source import DataWarning
    from tlopt.export.extract import extract_folder

    old = tmp_path / "old"
    shutil.copytree(export["out"], old)
    config = json.loads((old / "model" / "config.json").read_text())
    config["pretrained_cfg"].update(
        input_size=[3, 160, 160], interpolation="bicubic", crop_pct=0.95
    )
    (old / "model" / "config.json").write_text(json.dumps(config))
    with pytest.warns(DataWarning, match="older tlopt.*48 px"):
        count, skipped = extract_folder(old, export["root"] / "val", tmp_path / "v.npy")
    assert (count, skipped) == (3 * 8, 0)
    names = [r["path"] for r in read_csv(tmp_path / "v.csv")]
    row_of = {r["path"]: int(r["row"]) for r in read_csv(old / "descriptors.csv")}
    expected = np.load(old / "descriptors.npy")[[row_of[f"val/{n}"] for n in names]]
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, rtol=1e-4, atol=1e-5)
