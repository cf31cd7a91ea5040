"""Every shipped study file: it validates, and a tiny run of it on generated data of the same
layout completes a trial of each stage it names (real backbones, random weights, 32 px)."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from optuna.trial import TrialState
from PIL import Image

from tlopt.config import StudyConfig, load_config
from tlopt.tune import study as studies
from tlopt.tune.worker import work

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))


def image_folder(root: Path, split: bool, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    splits = {"train": per_class, "val": 3} if split else {"": per_class}
    for name, count in splits.items():
        for c in range(classes):
            folder = root / name / f"class {c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] = 255  # each class has its own dominant channel
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def cifar_folder(root: Path) -> Path:
    """CIFAR-10's python batches, in the real format, with 20 images each."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(20)],
            b"batch_label": name.encode(),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def tiny(config: StudyConfig, data: Path) -> StudyConfig:
    """The same study, shrunk: 32 px, one epoch, batch 8, random weights, one trial."""
    small = {"epochs": (1,), "batch_size": (8,), "lr": (1e-3,)}  # no diverging first trial
    search = dataclasses.replace(config.search, **small)
    stages = {name: {**over, **small} for name, over in config.stages.items()}
    return dataclasses.replace(
        config,
        n_trials=1,
        data=dataclasses.replace(config.data, path=str(data), image_size=32),
        model=dataclasses.replace(config.model, weights="none"),
        search=search,
        stages=stages,
    )


# Up to a minute each on 2 cores (vgg16: 138M parameters built and trained per stage): the only
# run of each shipped study file's stages on its real backbone.
@pytest.mark.slow
@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_study_runs_on_data_of_its_layout(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    if config.data.source == "cifar10":
        data = cifar_folder(tmp_path / "cifar")
    elif config.data.source == "folder":
        split = "hymenoptera" in path.stem  # train/ and val/ folders, like the real set
        data = image_folder(tmp_path / "images", split)
    else:
        data = Path()
    config = tiny(config, data)
    url = f"sqlite:///{tmp_path}/studies.db"
    plan = studies.create(config, "head", url, dry_run=True)
    assert not plan.created and plan.trainable_params > 0
    stages = ["head"] + [s for s in config.stages if s != "head"]
    for stage in stages:
        studies.create(config, stage, url)
        summary = work(f"{config.name}/{stage}", url)
        # A pruned trial (a loss gone NaN, a diverging run) is no proof that the stage trains.
        assert (summary.complete, summary.pruned, summary.failed) == (1, 0, 0), (stage, summary)
        trials = studies.load(f"{config.name}/{stage}", url).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE], (stage, trials)
        value = trials[0].value
        assert value is not None and math.isfinite(value), (stage, value)
        accuracy = trials[0].user_attrs["val_accuracy"]
        assert 0.0 <= accuracy <= 1.0, (stage, accuracy)
