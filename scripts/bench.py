"""Benchmark: the usual pipeline (ImageFolder + DataLoader + float32 eager, as the reference
projects train) against tlopt's trainer, per stage, on the same data and device in one run.

    scripts/bench --device cpu                     # built-in digits, EfficientNet-Lite0
    scripts/bench --data path/to/folder --model resnet34 --weights none --image-size 224

For each stage it trains the same model for the same epochs both ways and reports training
images per second (tlopt's with its frozen-prefix cache filled; the one-off pass that fills it
is reported as "prefix s"), then runs a small study of that stage with tlopt and reports its
wall time beside the usual pipeline's time for the same trials at its measured rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.data.source import open_source
from tlopt.devices import pick_device
from tlopt.errors import ConfigError, DataError, TloptError
from tlopt.models.backbones import create_backbone, normalization
from tlopt.models.stages import apply_stage, parse_stage, set_train_mode
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.ledger import TrainParams
from tlopt.train.trainer import fit
from tlopt.tune.supervisor import worker_threads

STAGES = ("head", "freeze1", "freeze2")


def digits_folder(root: Path) -> Path:
    """The digits as PNG files in a train/val ImageFolder layout, as a user's folder would be."""
    source = open_source("digits", val_fraction=0.2, test_fraction=0.0, seed=0)
    for split in ("train", "val"):
        for i, item in enumerate(source.split_items(split)):
            folder = root / split / source.classes[item.label]
            folder.mkdir(parents=True, exist_ok=True)
            source.load(item).save(folder / f"{i:04d}.png")
    return root


def baseline(args: argparse.Namespace, folder: Path, stage: str, mean, std) -> float:
    """Training images/s the way the seeds train: decode every epoch, fp32, eager, validate."""
    torch.manual_seed(0)
    model = create_backbone(args.model, args.weights, num_classes=args.classes).to(args.device)
    apply_stage(model, parse_stage(stage))
    transform = transforms.Compose(
        [
            transforms.Resize(args.image_size),
            transforms.CenterCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
    )
    plain = transforms.Compose(
        [t for t in transform.transforms if not isinstance(t, transforms.RandomHorizontalFlip)]
    )
    val_loader = DataLoader(
        datasets.ImageFolder(str(folder / "val"), plain),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen, began = 0, time.perf_counter()
    for _ in range(args.epochs):
        set_train_mode(model, True, bn_train=False)
        for x, y in loader:
            x, y = x.to(args.device), y.to(args.device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        # Validation after every epoch, as Keras' fit(validation_data=...) in the seeds does
        # (tlopt's trainer validates every epoch too, for the pruner).
        set_train_mode(model, False)
        with torch.no_grad():
            for x, y in val_loader:
                F.cross_entropy(model(x.to(args.device)), y.to(args.device))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - began)


def tlopt_rate(
    args: argparse.Namespace, data: tuple[ImageSet, ImageSet], stage: str
) -> tuple[float, float]:
    """(training images/s with the frozen prefix cached, seconds of the one-off prefix pass).

    A study computes the frozen prefix once and reuses it in every epoch of every trial, so
    the first run (which fills the cache) is timed apart from the second (which trains).
    """
    cache = FeatureCache()  # one study's cache: the second fit finds the prefix's outputs
    seconds = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_backbone(args.model, args.weights, num_classes=args.classes)
        apply_stage(model, parse_stage(stage))
        model.to(args.device)
        params = TrainParams(batch_size=args.batch_size, epochs=args.epochs, lr=1e-3)
        began = time.perf_counter()
        fit(model, data[0], data[1], params, cache=cache, compile=args.compile)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    # fit also validates once per epoch; count training images only, as the baseline does.
    return len(data[0]) * args.epochs / seconds[1], max(seconds[0] - seconds[1], 0.0)


def study_seconds(
    args: argparse.Namespace, stage: str, work_dir: Path
) -> tuple[float, list[tuple[int, int]]]:
    """(wall seconds of a small study of ``stage``, each finished trial's (batch size, epochs
    it trained)): the trials the usual pipeline is timed on."""
    from tlopt.config import load_config
    from tlopt.tune import study as studies
    from tlopt.tune.worker import work

    head = stage == "head"
    trials, epochs = (args.head_trials, args.head_epochs) if head else (args.trials, args.epochs)
    config = work_dir / "bench.toml"
    source = (
        'source = "digits"' if args.data is None else f'source = "folder"\npath = "{args.data}"'
    )
    config.write_text(f"""
name = "bench"
n_trials = {trials}
[data]
{source}
image_size = {args.image_size}
test_fraction = 0.0
[model]
backbone = "{args.model}"
weights = "{args.weights}"
[search]
batch_size = [8, 16, 32]
epochs = [{epochs}]
decay = ["constant", "step", "polynomial", "exponential"]
[pruner]
type = "median"
""")
    url = f"sqlite:///{work_dir}/bench.db"
    cfg = load_config(config)
    if stage != "head" and "bench/head" not in [r["name"] for r in studies.list_studies(url)]:
        studies.create(cfg, "head", url)
        work("bench/head", url, n_trials=1, device=args.device, threads=args.threads)
    began = time.perf_counter()
    studies.create(cfg, stage, url)
    work(
        f"bench/{stage}",
        url,
        n_trials=trials,
        device=args.device,
        heads_at_once=args.heads_at_once,
        compile=args.compile,
        threads=args.threads,
    )
    seconds = time.perf_counter() - began
    done = studies.load(f"bench/{stage}", url).get_trials(deepcopy=False, states=studies.FINISHED)
    ran = [(int(t.params.get("batch_size", args.batch_size)), _epochs_run(t)) for t in done]
    return seconds, ran


def _epochs_run(trial: Any) -> int:
    """The epochs a finished trial trained (a pruned one: up to its last report)."""
    if "epochs_run" in trial.user_attrs:
        return int(trial.user_attrs["epochs_run"])
    return max((step for step in trial.intermediate_values if step > 0), default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None, help="image folder (default: built-in digits)")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="bundled")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--trials", type=int, default=4, help="trials of each fine-tuning stage's small study"
    )
    parser.add_argument("--head-trials", type=int, default=16, help="trials of the head study")
    parser.add_argument(
        "--head-epochs", type=int, default=10, help="epochs of each head trial (cheap: cached)"
    )
    parser.add_argument(
        "--heads-at-once", type=int, default=8, help="head trials trained together (1: one by one)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="tlopt's trials through torch.compile (CUDA graphs on a GPU), as worker --compile",
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch's CPU threads (default: a worker's)"
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    try:
        return _bench(args)
    except TloptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    counts = ["image_size", "batch_size", "epochs", "trials", "heads_at_once", "threads"]
    counts += ["head_trials", "head_epochs"]
    for name in counts:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} {getattr(args, name)}: give a number of 1 or more")
    for stage in args.stages.split(","):
        parse_stage(stage)  # an unknown stage fails before any training
    if args.data is not None and not (
        (Path(args.data) / "train").is_dir() and (Path(args.data) / "val").is_dir()
    ):
        raise DataError(
            f"--data {args.data}: bench needs a folder with train/ and val/ class folders "
            "(the ImageFolder layout the baseline reads)"
        )
    # Both pipelines and the studies at one thread count: a worker's, unless told.
    args.threads = worker_threads(args.threads, os.environ, pick_device(args.device).type)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        os.environ.setdefault("TLOPT_CACHE", str(work_dir / "cache"))
        if args.data is None:
            folder = digits_folder(work_dir / "digits")
            source = open_source("digits", val_fraction=0.2, test_fraction=0.0, seed=0)
        else:
            source = open_source("folder", args.data, val_fraction=0.2, test_fraction=0.0, seed=0)
            folder = Path(args.data)
        args.classes = len(source.classes)
        mean, std = normalization(create_backbone(args.model, "none"))
        images = decode_source(source, args.image_size, work_dir / "cache")
        y, index = labels(source), split_indices(source)
        data = tuple(
            ImageSet.from_arrays(np.asarray(images[index[s]]), y[index[s]], mean, std, args.device)
            for s in ("train", "val")
        )
        report = {
            "device": args.device,
            "model": args.model,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "stages": {},
        }
        n_train = len(data[0])
        report["train_images"] = n_train
        print(
            f"{'stage':<9}{'baseline img/s':>15}{'tlopt img/s':>13}{'ratio':>8}{'prefix s':>10}"
            f"{'study s':>9}{'baseline study s':>18}{'study ratio':>13}"
        )
        for stage in args.stages.split(","):
            base = baseline(args, folder, stage, mean, std)
            fast, prefix = tlopt_rate(args, data, stage)  # type: ignore[arg-type]
            seconds, ran = study_seconds(args, stage, work_dir)
            # The usual pipeline's study: the same trials, each at its batch size's rate for
            # the epochs it trained in tlopt's study (its rate measured at each batch size).
            rates = {args.batch_size: base}
            for bs in sorted({bs for bs, _ in ran} - set(rates)):
                rates[bs] = baseline(argparse.Namespace(**{**vars(args), "batch_size": bs}),
                                     folder, stage, mean, std)  # fmt: skip
            base_study = sum(epochs * n_train / rates[bs] for bs, epochs in ran)
            report["stages"][stage] = {
                "baseline_img_s": round(base, 1),
                "tlopt_img_s": round(fast, 1),
                "ratio": round(fast / base, 2),
                "prefix_s": round(prefix, 1),
                "study_s": round(seconds, 1),
                "baseline_study_s": round(base_study, 1),
                "study_ratio": round(base_study / seconds, 2),
                "baseline_img_s_by_batch_size": {bs: round(r, 1) for bs, r in rates.items()},
                "trials": [{"batch_size": bs, "epochs": e} for bs, e in ran],
            }
            print(
                f"{stage:<9}{base:>15.1f}{fast:>13.1f}{fast / base:>8.2f}{prefix:>10.1f}"
                f"{seconds:>9.1f}{base_study:>18.1f}{base_study / seconds:>13.2f}",
                flush=True,
            )
        print(
            f"(studies: head {args.head_trials} trials of {args.head_epochs} epochs, the others "
            f"{args.trials} of {args.epochs}, on {n_train} training images; baseline study s = "
            "the same trials, each trial's epochs x images / the baseline's img/s at its batch "
            "size)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
