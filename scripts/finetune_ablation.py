"""First-epoch and best validation accuracy of one fine-tuning setting, with and without
warm-up and layer decay, all from the same head and the same seed.

    python scripts/finetune_ablation.py --study hymenoptera/freeze1 --storage sqlite:///x.db \
        --lr 3e-4 --epochs 10 --batch-size 16

Other variants than the four (warm-up, layer decay) pairs: ``--variant`` once per run, each a
comma-separated list of search-space fields with one value, e.g.
``--variant warmup_epochs=1,layer_decay=0.7,label_smoothing=0.1 --variant optimizer=sgd,lr=1e-3``.

The study must exist (``tlopt study create --stage freeze1``); its trials are not touched:
every run is a replay through the trainer, as ``export-best`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from typing import Any

import optuna

from tlopt.config import SearchSpace
from tlopt.config_parser import Parser
from tlopt.errors import ConfigError, TloptError
from tlopt.models.split import SplitModel
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.inputs import Inputs
from tlopt.train.trainer import evaluate
from tlopt.tune.context import StudyContext
from tlopt.tune.runner import run_trial
from tlopt.tune.study import load

VARIANTS = [(0.0, 1.0), (1.0, 1.0), (0.0, 0.7), (1.0, 0.7)]  # (warmup_epochs, layer_decay)
# Search-space fields a variant may fix: all but the per-decay parameters (the study's own
# first values are used).
VARIANT_FIELDS = {f.name for f in dataclasses.fields(SearchSpace)} - {"decay_params"}
WHOLE_FIELDS = {"batch_size", "epochs", "patience", "cut"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decay", default="polynomial")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--variant", action="append", default=[], help="FIELD=VALUE,... (search-space fields)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = {
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "decay": args.decay,
        "dropout": args.dropout,
        "warmup_epochs": 0.0,
        "layer_decay": 1.0,
    }
    try:
        variants = [_parse_variant(v) for v in args.variant] or [
            {"warmup_epochs": w, "layer_decay": d} for w, d in VARIANTS
        ]
        study_ctx = StudyContext.open(load(args.study, args.storage), args.device)
        # Each variant on the study's own space, so that no setting of one variant carries
        # into the next, checked as a study file's [search] table is.
        _space(study_ctx.space, base, "--batch-size, --epochs, --lr, --decay, --dropout")
        spaces = [_space(study_ctx.space, {**base, **v}, f"--variant {_name(v)}") for v in variants]
    except TloptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for variant, space in zip(variants, spaces, strict=True):
        ctx = dataclasses.replace(study_ctx, space=space)
        decay = space.decay[0]
        fixed = {k: v[0] for k, v in ctx.space.decay_params.get(decay, {}).items()}
        trial = optuna.trial.FixedTrial({f"{decay}.{k}": v for k, v in fixed.items()})
        run = run_trial(trial, ctx)
        result, history = run.result, run.result.history
        test_acc = None
        if ctx.has_split("test"):  # the best epoch's weights on the held-out test split
            test = ctx.split("test")
            split = SplitModel(run.model, int(test.images.shape[1]))
            inputs = Inputs(split, test, False, FeatureCache())
            test_acc = evaluate(split, inputs, test.labels)[1]
        rows.append(
            {
                "variant": _name(variant),
                "epoch0_acc": history[0].val_accuracy,
                "epoch1_acc": history[1].val_accuracy,
                "epoch1_val_loss": history[1].val_loss,
                "best_acc": result.best_val_accuracy,
                "best_val_loss": result.best_val_loss,
                "best_epoch": result.best_epoch,
                "accs": [round(r.val_accuracy, 4) for r in history],
                "test_acc": test_acc,
                "params": dataclasses.asdict(run.params),  # what the run trained with
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{args.study}: lr {args.lr:g}, {args.epochs} epochs, bs {args.batch_size}, "
        f"{args.decay}, dropout {args.dropout:g}, seed {study_ctx.config.seed}"
    )
    print("epoch0 acc  epoch1 acc  epoch1 loss  best acc  best loss  epoch  variant")
    for r in rows:
        print(
            f"{r['epoch0_acc']:>10.4f}  "
            f"{r['epoch1_acc']:>10.4f}  {r['epoch1_val_loss']:>11.4f}  {r['best_acc']:>8.4f}  "
            f"{r['best_val_loss']:>9.4f}  {r['best_epoch']:>5d}  {r['variant']}  test acc "
            f"{r['test_acc'] if r['test_acc'] is None else round(r['test_acc'], 4)}  "
            f"(val acc by epoch: {' '.join(f'{a:.3f}' for a in r['accs'])})"
        )
    return 0


def _name(variant: dict[str, object]) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def _space(study: SearchSpace, values: dict[str, object], source: str) -> SearchSpace:
    """``study``'s space with every field in ``values`` fixed to its one value.

    Raises:
        ConfigError: a value a study file's ``[search]`` would refuse (named by ``source``).
    """
    parser = Parser(source)
    scalar = ("patience", "bn_train")
    space = parser.search({k: v if k in scalar else [v] for k, v in values.items()}, "", study)
    if parser.problems:
        raise ConfigError(parser.problems[0])
    return space


def _parse_variant(text: str) -> dict[str, object]:
    """``warmup_epochs=1,optimizer=sgd`` -> {"warmup_epochs": 1.0, "optimizer": "sgd"}."""
    values: dict[str, object] = {}
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if key not in VARIANT_FIELDS or not sep or not raw:
            raise ConfigError(
                f"--variant {text}: '{item}' is not FIELD=VALUE with a search-space field "
                f"({', '.join(sorted(VARIANT_FIELDS))})"
            )
        value: object = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            with contextlib.suppress(ValueError):
                value = int(raw) if key in WHOLE_FIELDS else float(raw)
        values[key] = value
    return values


if __name__ == "__main__":
    sys.exit(main())
