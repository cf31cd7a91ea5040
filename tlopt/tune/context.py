"""Everything a worker needs for a study's trials, rebuilt from the study itself.

A study holds its config snapshot, class list, data fingerprint and (for fine-tuning stages)
the head weights to start from, so a worker needs only the storage URL and the study name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import download_artifact
from torch import nn

from tlopt.config import StudyConfig
from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.data.source import Source, open_source
from tlopt.devices import pick_device
from tlopt.errors import StudyError
from tlopt.models.backbones import classifier_name, create_backbone, normalization
from tlopt.models.stages import Stage, apply_stage, parse_stage
from tlopt.names import ATTR
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.ledger import EpochRecord, TrainParams
from tlopt.tune.storage import artifact_store


def cache_dir() -> Path:
    """Decoded images, shared by all workers on this machine (``TLOPT_CACHE`` to move it)."""
    return Path(os.environ.get("TLOPT_CACHE", Path.home() / ".cache" / "tlopt"))


def open_config_source(config: StudyConfig, held_out: dict[str, str] | None = None) -> Source:
    """The study's data; ``held_out``: the split a study stored (see ``open_source``)."""
    d = config.data
    return open_source(
        d.source,
        d.path or None,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=config.seed,
        max_bad_fraction=d.max_bad_fraction,
        held_out=held_out,
    )


# What the interface does with a finished trial (the report package writes its
# curves and note): handed in, so that the tuning layer imports no report.
TrialDone = Callable[[optuna.Trial, "StudyContext", list[EpochRecord], TrainParams], None]


class StudyContext:
    """The data on the device, the model factory and the head weights of one study."""

    def __init__(
        self,
        study: optuna.Study,
        device: str | None = None,
        progress: bool = False,
        *,
        should_stop: Callable[[], bool] | None = None,
        compile: bool = False,
        on_trial_done: TrialDone | None = None,
    ):
        attrs = study.user_attrs
        if ATTR + "config" not in attrs:
            raise StudyError(
                f"study '{study.study_name}' was not created by tlopt: "
                "create one with 'tlopt study create --config FILE --stage STAGE'"
            )
        self.study_name = study.study_name
        self.config = StudyConfig.from_dict(attrs[ATTR + "config"], f"study '{study.study_name}'")
        self.stage: Stage = parse_stage(attrs[ATTR + "stage"])
        self.space = self.config.space_for(self.stage.name)
        self.classes: list[str] = list(attrs[ATTR + "classes"])
        self.device = pick_device(device)
        self.artifacts = artifact_store(attrs[ATTR + "artifacts"])
        # The split the study stored (studies made before it was stored draw it again).
        self.source = open_config_source(self.config, attrs.get(ATTR + "held_out"))
        if self.source.fingerprint != attrs[ATTR + "fingerprint"]:
            raise StudyError(
                f"the data of study '{study.study_name}' changed since it was created "
                f"(fingerprint {self.source.fingerprint[:12]} != "
                f"{attrs[ATTR + 'fingerprint'][:12]}): restore the data or create a new study "
                "with --name"
            )
        self.images = decode_source(
            self.source, self.config.data.image_size, cache_dir(), progress=progress
        )
        self.labels = labels(self.source)
        self.index = split_indices(self.source)
        self.head_state: dict[str, torch.Tensor] | None = None
        head = attrs.get(ATTR + "head")
        if self.stage.from_head and head:
            self.head_state = self._download_state(head["artifact_id"])
            if "cut" in head.get("params", {}):  # the head fits only the cut it was trained at
                self.space = replace(self.space, cut=(int(head["params"]["cut"]),))
        probe = create_backbone(self.config.model.backbone, "none", len(self.classes))
        self.mean, self.std = normalization(probe)
        self.sets: dict[str, ImageSet] = {}
        self.should_stop = should_stop  # the worker's stop flag, checked every batch
        self.prefix_cache = FeatureCache()  # frozen features, shared by the study's trials
        self.pooled_heads: dict[bool, Any] = {}  # runner: head trials' start, by mirror
        self.compile = compile  # tlopt worker --compile: torch.compile / CUDA graphs (trainer)
        self.on_trial_done = on_trial_done

    def split(self, name: str) -> ImageSet:
        """One split (train, val, test) resident on the device, built once."""
        if name not in self.sets:
            idx = self.index[name]
            self.sets[name] = ImageSet.from_arrays(
                np.asarray(self.images[idx]),
                self.labels[idx],
                self.mean,
                self.std,
                self.device,
                name=f"{self.source.fingerprint[:16]}/{name}/{self.config.data.image_size}px",
            )
        return self.sets[name]

    def has_split(self, name: str) -> bool:
        return name in self.index and len(self.index[name]) > 0

    def build_model(self, dropout: float, cut: int | None = None) -> nn.Module:
        """A fresh model for one trial: seeded head, stage applied, on the device."""
        cfg = self.config.model
        torch.manual_seed(self.config.seed)
        weights = cfg.weights if self.stage.pretrained else "none"
        model = create_backbone(cfg.backbone, weights, len(self.classes), dropout, cut)
        if self.head_state is not None:
            model.get_submodule(classifier_name(model)).load_state_dict(self.head_state)
        freeze_modules = cfg.freeze_modules if self.stage.name != "head" else None
        apply_stage(model, self.stage, freeze_modules=freeze_modules)
        model.to(self.device)
        return model

    def _download_state(self, artifact_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "head.safetensors"
            download_artifact(
                artifact_store=self.artifacts, file_path=str(path), artifact_id=artifact_id
            )
            return load_file(str(path))
