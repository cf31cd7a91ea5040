"""Study configuration: typed, frozen, validated, loaded from TOML.

A study file describes one family of studies (one per stage): where the data is, which
backbone and weights, the search space, the pruner, the budget and the storage. Every problem
is reported as ``FILE: KEY: what is wrong``, one line each, all of them at once.

Search values are lists (a categorical choice; one element fixes the value) or, for ``lr`` and
``weight_decay``, a range table ``{low = 1e-5, high = 1e-2, log = true}``. ``[stages.NAME]``
tables override ``[search]`` for one stage (fine-tuning usually wants a lower ``lr``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from tlopt.durations import format_duration
from tlopt.errors import ConfigError

# Batch sizes are powers of two: each one is a separate compiled/captured shape on a GPU, and
# the reference projects searched 8, 16 and 32.
BATCH_SIZES = tuple(2**k for k in range(1, 11))
DEFAULT_STORAGE_DIR = Path("studies")


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


Choice = tuple[Any, ...]


AUTO_SIZE = 0  # data.image_size = "auto": tlopt tune's size probe chooses it (tune.size_probe)


@dataclass(frozen=True)
class DataConfig:
    source: str = "folder"
    path: str = ""
    image_size: int = 224
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    max_bad_fraction: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet34"
    weights: str = "pretrained"
    freeze_modules: int | None = None


@dataclass(frozen=True)
class SearchSpace:
    batch_size: Choice = (8, 16, 32)
    epochs: Choice = (10, 25, 50, 75, 100, 150)
    decay: Choice = ("constant", "step", "polynomial", "exponential")
    decay_params: dict[str, dict[str, Choice]] = field(default_factory=dict)
    lr: Choice | FloatRange = (1e-3,)
    optimizer: Choice = ("adam",)
    dropout: Choice = (0.2,)
    weight_decay: Choice | FloatRange = (0.0,)
    momentum: Choice = (0.9,)
    patience: int = 0
    flip: Choice = (True,)  # random horizontal flips; [true, false] searches it (seed 004)
    bn_train: bool | None = None  # None: only the scratch stage trains BatchNorm statistics
    cut: Choice = ()  # feature stages to cut the backbone at (seed 004); empty: no cut
    warmup_epochs: Choice = (0.0,)  # linear warm-up of the rate, in epochs (fractions allowed)
    layer_decay: Choice = (1.0,)  # rate scale per block group from the head down; 1: off
    # The batch size the written lr is the rate of; a trial at batch size b trains at
    # lr * b / lr_batch_size (0: as written, at every batch size). Adam moves each weight by
    # about lr per step whatever the batch, so at a quarter of the batch an epoch of four times
    # the steps moves four times as far; the linear rule (Goyal et al. 2017) keeps an epoch's
    # movement the same at every batch size. Fine-tuning stages default to 32 (issue 21.6).
    lr_batch_size: int = 0
    label_smoothing: Choice = (0.0,)  # of the training loss
    # Random-resized-crop augmentation: the smallest share of the image a training crop keeps
    # (aspect 3/4..4/3, resized back to image_size); 1: off. Below 1 the frozen prefix runs
    # every step (a crop changes its output), so head trials train one at a time.
    crop_scale: Choice = (1.0,)


# A fine-tuning stage starts from a trained head on a pretrained backbone, and the first full-
# rate steps there undo the head (issue 12: the demo's freeze2 fell from 83% to 47% val in its
# first epoch at the head's rate). Unless its [stages.NAME] table says otherwise, it searches
# 0.01, 0.03, 0.1, 0.3 and 1 times the head's rates: how far the backbone should move depends
# on how far the data is from ImageNet (the digits fine-tune best at 1e-4..2e-4, a tenth of
# their head's 1e-3; hymenoptera's ants and bees, which ImageNet holds, at 1e-5..3e-5, and at a
# tenth every trial of a 20-minute budget ended above the head's validation loss: README,
# Accuracy; flower photos at 128 px, far from it, reached 79.3% val at a tenth to three tenths
# of 1e-3 against 75.0% at 0.01..0.1: issue 28.3). A rate that undoes the head shows in its
# first epoch, where a run's median pruner drops it (tlopt.run.options: FOLDER_PRUNER). It warms
# up over its first epoch and scales the rate by
# 0.7 per block group from the head down (EfficientNet-Lite0's earliest trained group at
# 0.7**6 = 0.12, against fastai's 0.01 over more groups; measured on hymenoptera: README,
# Accuracy). Its rate is the rate at batch size 32 (lr_batch_size): at 1e-4 with the rate as
# written, a first epoch at batch size 8 (four times the Adam steps of one at 32) lost 3.3
# points of the digits head against 0.8 at batch size 32 (README, Accuracy; issue 21.6).
FINE_TUNE_LR_FACTORS = (0.01, 0.03, 0.1, 0.3, 1.0)
# A value [search] writes holds for every stage, even one equal to the [search] default: the
# parser records which of these fields the file wrote (decided by presence, never by equality).
FINE_TUNE_DEFAULTS: dict[str, Any] = {
    "warmup_epochs": (1.0,),
    "layer_decay": (0.7,),
    "lr_batch_size": 32,
}
# The rules a config is read by, numbered: a study stores the number with its snapshot and is
# read by its own rules ever after, so that a study made by an older tlopt resumes (and its
# trials are replayed by export-best) as they were made. A study file is read by the newest.
#   1  (before presence): a snapshot holds every [search] field; a fine-tuning stage takes warm-up
#      1 and layer decay 0.7 where [search] equals the [search] default, a tenth of the rate, and
#      the rate as written at every batch size.
#   2  presence: a [search] value written on purpose holds (the snapshot leaves out the others).
#   3  lr_batch_size: a fine-tuning stage's rate is the rate at batch size 32.
#   4  a fine-tuning stage searches 0.01, 0.03 and 0.1 of the rate.
#   5  ... and 0.3 and 1 of it too (issue 28.3).
RULES = 5
_LR_FACTORS = {1: (0.1,), 2: (0.1,), 3: (0.1,), 4: (0.01, 0.03, 0.1), 5: FINE_TUNE_LR_FACTORS}


def rules_of(raw: dict[str, Any]) -> int:
    """The rules a stored snapshot was written under: its ``rules``; a snapshot without it
    that holds warm-up and layer decay but no ``lr_batch_size`` was written before presence
    (rules 1, which held every field); any other, by this version's (rules 2 and 3 wrote the
    same fields as 4 and cannot be told from it)."""
    if isinstance(raw.get("rules"), int):
        return int(raw["rules"])
    search: dict[str, Any] = raw["search"] if isinstance(raw.get("search"), dict) else {}
    old = "warmup_epochs" in search and "layer_decay" in search and "lr_batch_size" not in search
    return 1 if old else RULES


def fine_tunes_from_head(stage: str) -> bool:
    """Whether ``stage`` starts from the best head: every stage but ``head`` and ``scratch``."""
    return stage not in ("head", "scratch")


@dataclass(frozen=True)
class PrunerConfig:
    type: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 3
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageConfig:
    url: str = ""
    artifacts: str = ""
    heartbeat_interval: int = 30
    grace_period: int = 90
    max_retry: int = 3
    checkpoint: bool = True  # fine-tuning trials save each epoch, to resume after a crash


@dataclass(frozen=True)
class StudyConfig:
    name: str
    seed: int = 0
    n_trials: int = 20
    timeout: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchSpace = field(default_factory=SearchSpace)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # The FINE_TUNE_DEFAULTS fields [search] wrote; the snapshot (to_dict) leaves out the others.
    search_written: frozenset[str] = frozenset()
    time_budget: float = 0.0  # [budget] time, in seconds (0: none): tlopt tune --time
    rules: int = RULES  # the rules it is read by (see RULES)

    def space_for(self, stage: str) -> SearchSpace:
        """The search space of ``stage``: ``[search]`` with ``[stages.STAGE]`` on top.

        A fine-tuning stage takes the ``FINE_TUNE_DEFAULTS`` of the fields ``[search]`` did not
        write (a value written on purpose holds, even when it equals the default) and
        ``FINE_TUNE_LR_FACTORS`` of the head's learning rates, under its own table.
        """
        space = self.search
        if fine_tunes_from_head(stage):
            tuned: dict[str, Any] = {
                name: fine for name, fine in FINE_TUNE_DEFAULTS.items() if self._takes_default(name)
            }
            factors = _LR_FACTORS[self.rules]
            lr, low, high = space.lr, min(factors), max(factors)
            if isinstance(lr, FloatRange):
                tuned["lr"] = replace(lr, low=lr.low * low, high=lr.high * high)
            else:
                rates = {float(f"{v * f:.6g}") for v in lr for f in factors}
                tuned["lr"] = tuple(sorted(rates))
            space = replace(space, **tuned)
        override = self.stages.get(stage, {})
        return replace(space, **override) if override else space

    def _takes_default(self, name: str) -> bool:
        """Does a fine-tuning stage take FINE_TUNE_DEFAULTS[name], by this config's rules?"""
        if name == "lr_batch_size" and self.rules < 3:
            return False
        if self.rules == 1:  # by equality with the [search] default, as written then
            return bool(getattr(self.search, name) == getattr(SearchSpace(), name))
        return name not in self.search_written

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (stored in the study) that parses back to ``self``.

        ``[search]`` leaves out the ``FINE_TUNE_DEFAULTS`` fields the file did not write, so
        that the snapshot, like the file, says which values were set on purpose.
        """
        raw = asdict(self)
        written = raw.pop("search_written")
        for name in FINE_TUNE_DEFAULTS:
            held = self.rules == 1 and name != "lr_batch_size"  # rules 1 held every field
            if name not in written and not held:
                del raw["search"][name]
        if seconds := raw.pop("time_budget"):
            raw["budget"] = {"time": format_duration(seconds)}
        if raw["data"]["image_size"] == AUTO_SIZE:
            raw["data"]["image_size"] = "auto"
        return _jsonable(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<snapshot>") -> StudyConfig:
        from tlopt.config_parser import Parser  # it builds these classes: imported on use

        return Parser(source).study({**raw, "rules": rules_of(raw)}, base_dir=None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# Checks of what only a heavier layer can judge (is the backbone a timm model? does Optuna's
# pruner take these options?): (model, pruner) -> [(key, problem)]. The caller hands one in
# (the tuning layer's ``buildable_problems``), so this module imports no torch, timm or Optuna
# and a study file's problems are still reported all at once.
Check = Callable[["ModelConfig", "PrunerConfig"], list[tuple[str, str]]]


def load_config(
    path: str | Path, data_path: str | None = None, check: Check | None = None
) -> StudyConfig:
    """Load and validate a study file; raises ConfigError with one line per problem.

    Relative data paths are resolved against the study file's folder. ``check`` adds the
    problems of the layers that build models and pruners.

    Example:
        >>> cfg = load_config("studies/demo.toml")
        >>> cfg.space_for("head").batch_size
        (8, 16, 32)
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' does not exist: pass --config studies/NAME.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    raw.setdefault("name", path.stem)
    if data_path is not None:
        data = raw.setdefault("data", {})
        if isinstance(data, dict):
            try:
                data["path"] = str(Path(data_path).expanduser().resolve())
            except (RuntimeError, ValueError) as exc:  # unknown '~user', NUL character
                raise ConfigError(f"--data '{data_path}': not a usable path ({exc})") from None
    from tlopt.config_parser import Parser

    return Parser(str(path), check).study(raw, base_dir=path.parent)
