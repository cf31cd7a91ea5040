"""Study configuration: typed, frozen, validated, loaded from TOML.

A study file describes one family of studies (one per stage): where the data is, which
backbone and weights, the search space, the pruner, the budget and the storage. Every problem
is reported as ``FILE: KEY: what is wrong``, one line each, all of them at once.

Search values are lists (a categorical choice; one element fixes the value) or, for ``lr`` and
``weight_decay``, a range table ``{low = 1e-5, high = 1e-2, log = true}``. ``[stages.NAME]``
tables override ``[search]`` for one stage (fine-tuning usually wants a lower ``lr``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from tlopt.errors import ConfigError
from tlopt.names import DATA_SOURCES, OPTIMIZERS, PRUNERS, parse_stage, weights_problem
from tlopt.schedules import DECAY_TYPES, validate_decay_params

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
    label_smoothing: Choice = (0.0,)  # of the training loss


# A fine-tuning stage starts from a trained head on a pretrained backbone, and the first full-
# rate steps there undo the head (issue 12: the demo's freeze2 fell from 83% to 47% val in its
# first epoch at the head's rate). Unless its [stages.NAME] table says otherwise, it trains at
# a tenth of the head's rates (the demo and hymenoptera fine-tune best at 1e-4..3e-4 against
# the head's 1e-3..3e-3), warms up over its first epoch, and scales the rate by 0.7 per block
# group from the head down (EfficientNet-Lite0's earliest trained group at 0.7**6 = 0.12,
# against fastai's 0.01 over more groups). Measured on hymenoptera: README, Accuracy.
FINE_TUNE_LR_FACTOR = 0.1
FINE_TUNE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    # field: (the [search] default it replaces, the fine-tuning default)
    "warmup_epochs": ((0.0,), (1.0,)),
    "layer_decay": ((1.0,), (0.7,)),
}


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

    def space_for(self, stage: str) -> SearchSpace:
        """The search space of ``stage``: ``[search]`` with ``[stages.STAGE]`` on top.

        A fine-tuning stage takes its defaults from ``FINE_TUNE_DEFAULTS`` (where ``[search]``
        left them at theirs) and a tenth of the head's learning rates, under its own table.
        """
        space = self.search
        if fine_tunes_from_head(stage):
            tuned: dict[str, Any] = {
                name: fine if getattr(space, name) == default else getattr(space, name)
                for name, (default, fine) in FINE_TUNE_DEFAULTS.items()
            }
            lr = space.lr
            if isinstance(lr, FloatRange):
                tuned["lr"] = replace(
                    lr, low=lr.low * FINE_TUNE_LR_FACTOR, high=lr.high * FINE_TUNE_LR_FACTOR
                )
            else:
                tuned["lr"] = tuple(float(f"{v * FINE_TUNE_LR_FACTOR:.6g}") for v in lr)
            space = replace(space, **tuned)
        override = self.stages.get(stage, {})
        return replace(space, **override) if override else space

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (stored in the study)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<snapshot>") -> StudyConfig:
        return _Parser(source).study(raw, base_dir=None)


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
    return _Parser(str(path), check).study(raw, base_dir=path.parent)


def _one_line(text: str) -> str:
    """``text`` with the characters that would break or hide a line escaped (one problem, one line).

    Keys and values come from the user's file: a key may hold a newline, a record separator
    (which ``str.splitlines`` also splits at) or a terminal escape.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser:
    """Walks the raw TOML dict, collecting every problem before raising."""

    def __init__(self, source: str, check: Check | None = None) -> None:
        self.source = source
        self.check = check
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(_one_line(f"{self.source}: {key}: {message}"))

    def known(self, table: dict[str, Any], allowed: list[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (
                    f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
                )
                self.fail(f"{where}{key}", f"unknown key: {hint}")

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ([{key}]), got {value!r}")
            return {}
        return value

    def number(
        self,
        raw: dict[str, Any],
        key: str,
        default: Any,
        kind: type,
        low: float,
        high: float,
        where: str,
    ) -> Any:
        value = raw.get(key, default)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
            what = "an integer" if kind is int else "a number"
            self.fail(f"{where}{key}", f"{value!r} is not {what} in [{low:g}, {high:g}]")
            return default
        return kind(value)

    def text(
        self,
        raw: dict[str, Any],
        key: str,
        default: str,
        where: str,
        choices: tuple[str, ...] | None = None,
    ) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str):
            self.fail(f"{where}{key}", f"{value!r} must be a string")
            return default
        if "\x00" in value:  # no path, URL or database text field may hold one
            self.fail(f"{where}{key}", f"{value!r} contains a NUL character (\\u0000)")
            return default
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(f"{where}{key}", f"'{value}' is not one of {', '.join(choices)}{hint}")
            return default
        return value

    def study(self, raw: dict[str, Any], base_dir: Path | None) -> StudyConfig:
        top = [
            "name",
            "seed",
            "n_trials",
            "timeout",
            "data",
            "model",
            "search",
            "stages",
            "pruner",
            "storage",
            "description",
        ]
        self.known(raw, top, "")
        name = self.text(raw, "name", "study", "")
        if "/" in name or not name:
            self.fail("name", f"'{name}' must be non-empty and contain no '/' (stages add it)")
        d = StudyConfig(name)
        seed = self.number(raw, "seed", d.seed, int, 0, 2**32 - 1, "")
        n_trials = self.number(raw, "n_trials", d.n_trials, int, 1, 1_000_000, "")
        timeout = self.number(raw, "timeout", d.timeout, float, 0, 1e9, "")
        data = self.data(self.table(raw, "data"), base_dir)
        model = self.model(self.table(raw, "model"))
        search = self.search(self.table(raw, "search"), "search.", SearchSpace())
        stages: dict[str, dict[str, Any]] = {}
        for stage, table in self.table(raw, "stages").items():
            try:
                parse_stage(stage)
            except ConfigError as exc:
                self.fail(f"stages.{stage[:40]}", str(exc)[:200])
                continue
            if not isinstance(table, dict):
                self.fail(f"stages.{stage}", "must be a table")
                continue
            merged = self.search(table, f"stages.{stage}.", search)
            stages[stage] = {k: getattr(merged, k) for k in table if hasattr(merged, k)}
        pruner = self.pruner(self.table(raw, "pruner"))
        storage = self.storage(self.table(raw, "storage"), base_dir)
        if self.check is not None:
            for key, problem in self.check(model, pruner):
                self.fail(key, problem)
        if self.problems:
            raise ConfigError("\n".join(self.problems))
        return StudyConfig(
            name, seed, n_trials, timeout, data, model, search, stages, pruner, storage
        )

    def data(self, raw: dict[str, Any], base_dir: Path | None) -> DataConfig:
        w = "data."
        self.known(raw, [f for f in DataConfig.__dataclass_fields__], w)
        d = DataConfig()
        source = self.text(raw, "source", d.source, w, DATA_SOURCES)
        path = self.text(raw, "path", d.path, w)
        if source in ("folder", "cifar10") and not path:
            self.fail(f"{w}path", f"source '{source}' needs a path to the data folder")
        if path and base_dir is not None:
            try:
                expanded = Path(path).expanduser()
            except RuntimeError:  # '~someone/...' for a user this machine does not know
                self.fail(f"{w}path", f"'{path}': cannot expand '~' (no such user or no HOME)")
            else:
                if not expanded.is_absolute():
                    path = str((base_dir / expanded).resolve())
        size = self.number(raw, "image_size", d.image_size, int, 8, 2048, w)
        val = self.number(raw, "val_fraction", d.val_fraction, float, 0.01, 0.9, w)
        test = self.number(raw, "test_fraction", d.test_fraction, float, 0.0, 0.9, w)
        if val + test >= 0.95:
            self.fail(
                f"{w}val_fraction",
                f"val_fraction + test_fraction = {val + test:g} "
                "leaves too little to train on; keep the sum below 0.95",
            )
        bad = self.number(raw, "max_bad_fraction", d.max_bad_fraction, float, 0.0, 1.0, w)
        return DataConfig(source, path, size, val, test, bad)

    def model(self, raw: dict[str, Any]) -> ModelConfig:
        # The backbone's name is checked against timm where models are built (study create):
        # the parser stays free of torch and timm.
        w, d = "model.", ModelConfig()
        self.known(raw, [f for f in ModelConfig.__dataclass_fields__], w)
        backbone = self.text(raw, "backbone", d.backbone, w)
        weights = self.text(raw, "weights", d.weights, w)
        problem = weights_problem(weights)
        if problem:
            self.fail(f"{w}weights", problem)
        freeze = self.number(raw, "freeze_modules", d.freeze_modules, int, 0, 100_000, w)
        return ModelConfig(backbone, weights, freeze)

    def choices(
        self,
        raw: dict[str, Any],
        key: str,
        default: Any,
        where: str,
        check: Any,
        allow_range: bool = False,
    ) -> Any:
        if key not in raw:
            return default
        value = raw[key]
        if allow_range and isinstance(value, dict):
            self.known(value, ["low", "high", "log"], f"{where}{key}.")
            low, high, log = value.get("low"), value.get("high"), value.get("log", False)
            if not isinstance(log, bool):
                self.fail(f"{where}{key}.log", f"{log!r} must be true or false")
                return default
            for bound in (low, high):
                problem = check(bound)
                if problem:
                    self.fail(f"{where}{key}", problem)
                    return default
            if low is None or high is None or not low < high:
                self.fail(f"{where}{key}", f"low ({low}) must be below high ({high})")
                return default
            return FloatRange(float(low), float(high), log)
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(f"{where}{key}", "is empty: give at least one value")
            return default
        ok = True
        for v in values:
            problem = check(v)
            if problem:
                self.fail(f"{where}{key}", problem)
                ok = False
        return tuple(values) if ok else default

    def search(self, raw: dict[str, Any], w: str, base: SearchSpace) -> SearchSpace:
        self.known(raw, [f for f in SearchSpace.__dataclass_fields__], w)

        def positive_int(high: int, low: int = 1) -> Any:
            def check(v: Any) -> str | None:
                if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                    return f"{v!r} is not a whole number between {low} and {high}"
                return None

            return check

        def batch(v: Any) -> str | None:
            if v not in BATCH_SIZES or isinstance(v, bool):
                return f"{v!r} is not one of {', '.join(map(str, BATCH_SIZES))}"
            return None

        def among(options: tuple[str, ...]) -> Any:
            def check(v: Any) -> str | None:
                if v not in options:
                    close = difflib.get_close_matches(str(v), options, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    return f"{v!r} is not one of {', '.join(options)}{hint}"
                return None

            return check

        def real(low: float, high: float, low_open: bool = False) -> Any:
            def check(v: Any) -> str | None:
                if (
                    isinstance(v, bool)
                    or not isinstance(v, (int, float))
                    or math.isnan(v)
                    or not (low < v if low_open else low <= v)
                    or not v <= high
                ):
                    side = "(" if low_open else "["
                    return f"{v!r} is not a number in {side}{low:g}, {high:g}]"
                return None

            return check

        decay = self.choices(raw, "decay", base.decay, w, among(DECAY_TYPES))
        decay_params = dict(base.decay_params)
        raw_params = raw.get("decay_params", {})
        if not isinstance(raw_params, dict):
            self.fail(f"{w}decay_params", "must be a table of tables, one per decay type")
            raw_params = {}
        for kind, params in raw_params.items():
            if kind not in DECAY_TYPES:
                self.fail(f"{w}decay_params.{kind}", among(DECAY_TYPES)(kind) or "")
                continue
            if not isinstance(params, dict):
                self.fail(f"{w}decay_params.{kind}", "must be a table of parameter values")
                continue
            parsed: dict[str, Choice] = {}
            for pname, pvalue in params.items():
                values = pvalue if isinstance(pvalue, list) else [pvalue]
                try:
                    for v in values:
                        validate_decay_params(kind, {pname: v})
                    parsed[pname] = tuple(values)
                except ConfigError as exc:
                    self.fail(f"{w}decay_params.{kind}.{pname}", str(exc))
            decay_params[kind] = parsed
        patience = raw.get("patience", base.patience)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            self.fail(f"{w}patience", f"{patience!r} is not a whole number >= 0 (0: off)")
            patience = base.patience

        def boolean(v: Any) -> str | None:
            return None if isinstance(v, bool) else f"{v!r} must be true or false"

        flip = self.choices(raw, "flip", base.flip, w, boolean)
        bn_train = raw.get("bn_train", base.bn_train)
        if bn_train is not None and not isinstance(bn_train, bool):
            self.fail(f"{w}bn_train", f"{bn_train!r} must be true or false")
            bn_train = base.bn_train
        return SearchSpace(
            cut=()
            if raw.get("cut") == []  # the snapshot of "no cut"
            else self.choices(raw, "cut", base.cut, w, positive_int(64, low=0)),
            bn_train=bn_train,
            batch_size=self.choices(raw, "batch_size", base.batch_size, w, batch),
            epochs=self.choices(raw, "epochs", base.epochs, w, positive_int(10_000)),
            decay=decay,
            decay_params=decay_params,
            lr=self.choices(raw, "lr", base.lr, w, real(0, 10, low_open=True), allow_range=True),
            optimizer=self.choices(raw, "optimizer", base.optimizer, w, among(OPTIMIZERS)),
            dropout=self.choices(raw, "dropout", base.dropout, w, real(0, 0.95)),
            weight_decay=self.choices(
                raw, "weight_decay", base.weight_decay, w, real(0, 1), allow_range=True
            ),
            momentum=self.choices(raw, "momentum", base.momentum, w, real(0, 0.999)),
            patience=patience,
            flip=flip,
            warmup_epochs=self.choices(raw, "warmup_epochs", base.warmup_epochs, w, real(0, 1000)),
            layer_decay=self.choices(
                raw, "layer_decay", base.layer_decay, w, real(0, 1, low_open=True)
            ),
            label_smoothing=self.choices(
                raw, "label_smoothing", base.label_smoothing, w, real(0, 0.5)
            ),
        )

    def pruner(self, raw: dict[str, Any]) -> PrunerConfig:
        # Options are checked by building the pruner where Optuna is loaded (study create).
        w, d = "pruner.", PrunerConfig()
        kind = self.text(raw, "type", d.type, w)
        if kind not in PRUNERS:
            close = difflib.get_close_matches(kind, PRUNERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(f"{w}type", f"'{kind}' is not one of {', '.join(PRUNERS)}{hint}")
            kind = d.type
        startup = self.number(raw, "n_startup_trials", d.n_startup_trials, int, 0, 100_000, w)
        warmup = self.number(raw, "n_warmup_steps", d.n_warmup_steps, int, 0, 100_000, w)
        options = {
            k: v
            for k, v in raw.items()
            if k not in ("type", "n_startup_trials", "n_warmup_steps", "options")
        }
        if isinstance(raw.get("options"), dict):
            options.update(raw["options"])
        elif "options" in raw:
            self.fail(f"{w}options", f"{raw['options']!r} must be a table of pruner arguments")
        return PrunerConfig(kind, startup, warmup, options)

    def storage(self, raw: dict[str, Any], base_dir: Path | None) -> StorageConfig:
        w = "storage."
        self.known(raw, [f for f in StorageConfig.__dataclass_fields__], w)
        url = self.text(raw, "url", "", w)
        artifacts = self.text(raw, "artifacts", "", w)
        d = StorageConfig()
        interval = self.number(raw, "heartbeat_interval", d.heartbeat_interval, int, 1, 86_400, w)
        grace = self.number(raw, "grace_period", d.grace_period, int, 2, 864_000, w)
        if grace <= interval:
            self.fail(f"{w}grace_period", f"{grace} must exceed heartbeat_interval ({interval})")
        retry = self.number(raw, "max_retry", d.max_retry, int, 0, 100, w)
        checkpoint = raw.get("checkpoint", True)
        if not isinstance(checkpoint, bool):
            self.fail(f"{w}checkpoint", f"{checkpoint!r} must be true or false")
            checkpoint = True
        return StorageConfig(url, artifacts, interval, grace, retry, checkpoint)
