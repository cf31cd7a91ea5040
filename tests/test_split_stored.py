"""The split lives in the study: workers whose NumPy draws other streams still agree with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_DATA_MODEL
from tlopt.config import load_config
from tlopt.data import split as split_module
from tlopt.errors import StudyError
from tlopt.names import ATTR
from tlopt.tune import study as studies
from tlopt.tune.context import StudyContext, forget_sources, open_config_source


def _another_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy does not promise its streams across versions: draw splits from other ones."""
    real = np.random.default_rng
    monkeypatch.setattr(
        split_module.np.random, "default_rng", lambda seed: real([*np.atleast_1d(seed), 99])
    )


def test_workers_on_another_numpy_use_the_stored_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n' + TINY_DATA_MODEL)
    config = load_config(path)
    url = f"sqlite:///{tmp_path}/s.db"
    studies.create(config, "head", url)
    study = studies.load("s/head", url)
    held_out = study.user_attrs[ATTR + "held_out"]
    assert set(held_out.values()) == {"val", "test"}
    assert len(held_out) == sum(study.user_attrs[ATTR + "counts"][s] for s in ("val", "test"))

    _another_numpy(monkeypatch)
    forget_sources()  # a worker is another process: it opens the data itself
    redrawn = open_config_source(config)  # what a worker without the stored split would see
    assert redrawn.fingerprint != study.user_attrs[ATTR + "fingerprint"]
    ctx = StudyContext.open(study, "cpu")  # no "the data changed": the stored split is used
    assert {i.key: i.split for i in ctx.source.items if i.split != "train"} == held_out
    assert ctx.source.fingerprint == study.user_attrs[ATTR + "fingerprint"]

    # A study from before the split was stored: the worker draws it again, and says so.
    study.set_user_attr(ATTR + "held_out", None)
    with pytest.raises(StudyError, match="changed since it was created"):
        StudyContext.open(study, "cpu")
