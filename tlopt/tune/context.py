"""Everything a worker needs for a study's trials, rebuilt from the study itself.

A study holds its config snapshot, class list, data fingerprint and (for fine-tuning stages)
the head weights to start from, so a worker needs only the storage URL and the study name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import download_artifact
from torch import nn

from tlopt.config import SearchSpace, StudyConfig
from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.data.source import Source, open_source
from tlopt.devices import pick_device
from tlopt.errors import StudyError
from tlopt.models.backbones import classifier_name, create_backbone, normalization
from tlopt.models.stages import Stage, apply_stage, parse_stage
from tlopt.names import ATTR, HEAD
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.ledger import EpochRecord, TrainParams
from tlopt.tune.artifacts import artifact_store


def cache_dir() -> Path:
    """Decoded images, shared by all workers on this machine (``TLOPT_CACHE`` to move it)."""
    return Path(os.environ.get("TLOPT_CACHE", Path.home() / ".cache" / "tlopt"))


def open_config_source(config: StudyConfig, held_out: dict[str, str] | None = None) -> Source:
    """The study's data; ``held_out``: the split a study stored (see ``open_source``).

    Each file's bytes are hashed, but only files this machine has not decoded before (its
    record sits with the decoded images, :func:`cache_dir`) are decoded to check them. A
    process opens the same data once while its files stay as they were (``tlopt tune``'s
    checks, size probe, plan and each stage's worker share it): their names, sizes and times
    are the key, a stat per file against a hash of every byte.
    """
    d = config.data
    key = (d.source, d.path, d.val_fraction, d.test_fraction, config.seed, d.max_bad_fraction,
           tuple(sorted((held_out or {}).items())), _folder_state(d.path))  # fmt: skip
    if key in _SOURCES:
        return _SOURCES[key]
    source = open_source(
        d.source,
        d.path or None,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=config.seed,
        max_bad_fraction=d.max_bad_fraction,
        held_out=held_out,
        verified=cache_dir(),
    )
    while len(_SOURCES) >= SOURCES_KEPT:
        del _SOURCES[next(iter(_SOURCES))]
    _SOURCES[key] = source
    return source


SOURCES_KEPT = 4  # the data sets a process keeps open (a tune run uses one)
_SOURCES: dict[tuple[Any, ...], Source] = {}


def forget_sources() -> None:
    """Open every data set afresh from now on (tests that change what opening depends on)."""
    _SOURCES.clear()


def _folder_state(path: str) -> tuple[tuple[str, int, int], ...] | None:
    """Every file under ``path`` with its size and modification time (None: not a folder)."""
    if not path or not os.path.isdir(path):
        return None
    state = []
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            state.append((full, st.st_size, st.st_mtime_ns))
    return tuple(sorted(state))


_CACHES: dict[tuple[str, str, int | None], FeatureCache] = {}


def shared_cache(config: StudyConfig) -> FeatureCache:
    """The frozen-prefix cache of every context of this backbone and weights in this process:
    ``tlopt tune``'s plan, then each stage's worker, compute a prefix's outputs once.

    Its keys name the data by content and the prefix by stage mode and cut (``Inputs``); the
    prefix's weights are the backbone's own, frozen, so one cache per backbone and weights.
    """
    m = config.model
    key = (m.backbone, m.weights, m.freeze_modules)
    if key not in _CACHES:
        _CACHES[key] = FeatureCache()
    return _CACHES[key]


# What the interface does with a finished trial (the report package writes its
# curves and note): handed in, so that the tuning layer imports no report.
TrialDone = Callable[[optuna.Trial, "StudyContext", list[EpochRecord], TrainParams], None]


@dataclass(frozen=True, eq=False)
class StudyContext:
    """The data on the device, the model factory and the head weights of one study.

    Built once per worker by :meth:`open` and never reassigned: the stop flag, the compile
    option and the trial callback come in with it. Its three containers are caches that fill
    as trials ask (the splits on the device, the frozen features, the head trials' start).
    """

    study_name: str
    config: StudyConfig
    stage: Stage
    space: SearchSpace
    classes: list[str]
    device: torch.device
    artifacts: Any  # an Optuna artifact store (tlopt.tune.artifacts.artifact_store)
    source: Source
    images: np.ndarray  # decoded, [N, H, W, 3] uint8 (memory-mapped from the cache)
    labels: np.ndarray
    index: dict[str, np.ndarray]
    head: dict[str, Any] | None  # the head the trials start from (study.best_head's record)
    head_state: dict[str, torch.Tensor] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    should_stop: Callable[[], bool] | None = None  # the worker's stop flag, checked every step
    compile: bool = False  # tlopt worker --compile: torch.compile / CUDA graphs (trainer)
    on_trial_done: TrialDone | None = None
    sets: dict[str, ImageSet] = field(default_factory=dict)
    prefix_cache: FeatureCache = field(default_factory=FeatureCache)  # shared by the trials
    pooled_heads: dict[bool, Any] = field(default_factory=dict)  # runner: head trials' start
    starts: dict[int | None, tuple[float, float]] = field(default_factory=dict)  # by cut

    @classmethod
    def open(
        cls,
        study: optuna.Study,
        device: str | None = None,
        progress: bool = False,
        *,
        should_stop: Callable[[], bool] | None = None,
        compile: bool = False,
        on_trial_done: TrialDone | None = None,
        head: dict[str, Any] | None = None,
    ) -> StudyContext:
        """Everything from the study itself: its config, classes, split, data and head.

        ``head``: the head to start from instead of the study's (the one a trial recorded,
        for export-best to replay it: the study may have moved on to a better head since).
        """
        attrs = study.user_attrs
        if ATTR + "config" not in attrs:
            raise StudyError(
                f"study '{study.study_name}' was not created by tlopt: "
                "create one with 'tlopt study create --config FILE --stage STAGE'"
            )
        config = StudyConfig.from_dict(attrs[ATTR + "config"], f"study '{study.study_name}'")
        stage = parse_stage(attrs[ATTR + "stage"])
        space = config.space_for(stage.name)
        classes = list(attrs[ATTR + "classes"])
        artifacts = artifact_store(attrs[ATTR + "artifacts"])
        # The split the study stored (studies made before it was stored draw it again).
        source = open_config_source(config, attrs.get(ATTR + "held_out"))
        if source.fingerprint != attrs[ATTR + "fingerprint"]:
            raise StudyError(
                f"the data of study '{study.study_name}' changed since it was created "
                f"(fingerprint {source.fingerprint[:12]} != "
                f"{attrs[ATTR + 'fingerprint'][:12]}): restore the data or create a new study "
                "with --name"
            )
        head_state = None
        head = (head or attrs.get(HEAD)) if stage.from_head else None
        if head:
            head_state = download_state(artifacts, head["artifact_id"])
            if "cut" in head.get("params", {}):  # the head fits only the cut it was trained at
                space = replace(space, cut=(int(head["params"]["cut"]),))
        mean, std = normalization(create_backbone(config.model.backbone, "none", len(classes)))
        return cls(
            study_name=study.study_name,
            config=config,
            stage=stage,
            space=space,
            classes=classes,
            device=pick_device(device),
            artifacts=artifacts,
            source=source,
            images=decode_source(source, config.data.image_size, cache_dir(), progress=progress),
            labels=labels(source),
            index=split_indices(source),
            head=head,
            head_state=head_state,
            mean=mean,
            std=std,
            should_stop=should_stop,
            compile=compile,
            on_trial_done=on_trial_done,
            prefix_cache=shared_cache(config),
        )

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


def download_state(artifacts: Any, artifact_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.safetensors"
        download_artifact(artifact_store=artifacts, file_path=str(path), artifact_id=artifact_id)
        return load_file(str(path))
