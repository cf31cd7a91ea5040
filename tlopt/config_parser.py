"""The study file's parser: walks the TOML, checks every value, collects every problem.

Every problem is one line, ``FILE: KEY: what is wrong``, and all of them are reported at once
(:class:`~tlopt.errors.ConfigError`). Defaults come from the dataclasses of ``tlopt.config``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from tlopt.config import (
    AUTO_SIZE,
    FINE_TUNE_DEFAULTS,
    RULES,
    Choice,
    DataConfig,
    ModelConfig,
    PrunerConfig,
    SearchSpace,
    StorageConfig,
    StudyConfig,
)
from tlopt.config_checks import Checks, among, batch, boolean, positive_int, real
from tlopt.durations import parse_duration
from tlopt.errors import ConfigError
from tlopt.names import DATA_SOURCES, OPTIMIZERS, PRUNERS, parse_stage, weights_problem
from tlopt.schedules import DECAY_TYPES, validate_decay_params


class Parser(Checks):
    """Walks the raw TOML dict section by section, collecting every problem before raising."""

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
            "budget",
            "description",
            "rules",
        ]
        self.known(raw, top, "")
        name = self.text(raw, "name", "study", "")
        if "/" in name or not name:
            self.fail("name", f"'{name}' must be non-empty and contain no '/' (stages add it)")
        d = StudyConfig(name)
        seed = self.number(raw, "seed", d.seed, int, 0, 2**32 - 1, "")
        n_trials = self.number(raw, "n_trials", d.n_trials, int, 1, 1_000_000, "")
        timeout = self.number(raw, "timeout", d.timeout, float, 0, 1e9, "")
        rules = self.number(raw, "rules", RULES, int, 1, RULES, "")
        data = self.data(self.table(raw, "data"), base_dir)
        model = self.model(self.table(raw, "model"))
        search_raw = self.table(raw, "search")
        search = self.search(search_raw, "search.", SearchSpace())
        written = frozenset(k for k in FINE_TUNE_DEFAULTS if k in search_raw)
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
        time_budget = self.budget(self.table(raw, "budget"))
        if self.check is not None:
            for key, problem in self.check(model, pruner):
                self.fail(key, problem)
        if self.problems:
            raise ConfigError("\n".join(self.problems))
        return StudyConfig(
            name, seed, n_trials, timeout, data, model, search, stages, pruner, storage, written,
            time_budget, rules,
        )  # fmt: skip

    def budget(self, raw: dict[str, Any]) -> float:
        """``[budget] time = "20m"``: the whole run's wall time for tlopt tune (0: none)."""
        self.known(raw, ["time"], "budget.")
        if "time" not in raw:
            return 0.0
        text = raw["time"]
        try:
            if not isinstance(text, str):
                raise ConfigError(f'{text!r}: give a string with a unit, e.g. "20m" or "1.5h"')
            return parse_duration(text, "time")
        except ConfigError as exc:
            self.fail("budget.time", str(exc))
            return 0.0

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
        if raw.get("image_size") in ("auto", AUTO_SIZE):  # tlopt tune's size probe chooses it
            size = AUTO_SIZE
        else:
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

    def search(self, raw: dict[str, Any], w: str, base: SearchSpace) -> SearchSpace:
        self.known(raw, [f for f in SearchSpace.__dataclass_fields__], w)

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
        lr_batch_size = raw.get("lr_batch_size", base.lr_batch_size)
        if (
            isinstance(lr_batch_size, bool)
            or not isinstance(lr_batch_size, int)
            or not 0 <= lr_batch_size <= 65_536
        ):
            self.fail(
                f"{w}lr_batch_size",
                f"{lr_batch_size!r} is not a whole number in [0, 65536] (0: lr as written)",
            )
            lr_batch_size = base.lr_batch_size

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
            lr_batch_size=lr_batch_size,
            label_smoothing=self.choices(
                raw, "label_smoothing", base.label_smoothing, w, real(0, 0.5)
            ),
            crop_scale=self.choices(raw, "crop_scale", base.crop_scale, w, real(0.05, 1)),
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
