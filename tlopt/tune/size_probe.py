"""The image size chosen by the data: a linear probe on the frozen backbone's features, per size.

For each size the images are decoded at that size (the decoded-image cache the workers then
read), the backbone with the study's weights maps each training image and its mirror image to
its pooled features (the export's descriptors), and a logistic regression (scikit-learn, one
fit per C) is scored on the validation split. The head stage is such a probe, so a size with a
lower probe loss gives a better head, and the fine-tuning stages start from it.

Sizes are probed smallest first; with a time limit the probe stops before a size whose cost
(about the last one's times the ratio of pixels) would pass it. The chosen size has the lowest
validation log loss; a larger size must beat a smaller one by :data:`BETTER_BY` (it costs
about (size / smaller) ** 2 as much per epoch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from tlopt.config import StudyConfig
from tlopt.data.cache import decode_source, labels, split_indices
from tlopt.data.source import Source
from tlopt.errors import DataError
from tlopt.models.backbones import create_backbone, normalization
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict

C_VALUES = (0.1, 1.0)
BETTER_BY = 0.02  # a larger size must lower the probe's loss by 2% to be chosen
STEPS = (1.0, 8 / 7, 9 / 7, 10 / 7)  # around the backbone's own size: 224 -> 224..320
SIDE_SAMPLE = 64  # images whose sides are read to know how large the photos are


@dataclass(frozen=True)
class ProbeRow:
    size: int
    seconds: float
    loss: float  # the lowest validation log loss over C_VALUES
    correct: int
    val: int
    c: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def native_size(model: torch.nn.Module) -> int:
    """The side the backbone's weights were trained at (timm's ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-1])


def median_side(source: Source) -> int:
    """The median shorter side of (up to :data:`SIDE_SAMPLE` of) the training images."""
    items = source.split_items("train")
    step = max(1, len(items) // SIDE_SAMPLE)
    sides = [min(source.load(item).size) for item in items[::step][:SIDE_SAMPLE]]
    return int(np.median(sides)) if sides else 0


def candidate_sizes(native: int, side: int) -> list[int]:
    """Sizes to probe: the backbone's own and up to 10/7 of it, in steps of 32 px, none larger
    than the photos (upscaling adds no detail); photos smaller than the backbone's size: half
    of it and their own size up to it (at least 32 px)."""

    def round32(x: float) -> int:
        return max(32, int(round(x / 32)) * 32)

    if side >= native:
        sizes = {round32(native * k) for k in STEPS}
        return sorted(s for s in sizes if s <= max(native, side))
    sizes = {round32(native / 2), native, *(round32(side * k) for k in (1, 2, 4))}
    return sorted(s for s in sizes if s <= native)


def probe_fit(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], c: float
) -> tuple[float, int]:
    """Validation log loss and correct count of a logistic regression fitted at ``c``."""
    clf = LogisticRegression(C=c, max_iter=5000).fit(*train)
    p = clf.predict_proba(val[0])
    picked = p[np.arange(len(val[1])), np.searchsorted(clf.classes_, val[1])]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
    return loss, int((clf.classes_[p.argmax(1)] == val[1]).sum())


def probe_sizes(
    config: StudyConfig,
    source: Source,
    sizes: list[int],
    cache: Path,
    device: str | torch.device = "cpu",
    seconds: float | None = None,
    say: Callable[[str], object] = print,
) -> list[ProbeRow]:
    """One row per size probed, smallest first; ``seconds``: stop before passing it."""
    index, y = split_indices(source), labels(source)
    if "val" not in index or not len(index["val"]):
        raise DataError("the size probe needs a validation split: give the data a val/ folder")
    mirror = any(config.search.flip)

    @functools.cache
    def backbone() -> torch.nn.Module:
        model = create_backbone(config.model.backbone, config.model.weights, len(source.classes))
        return model.eval().to(device)

    def features(pixels: np.ndarray, yy: np.ndarray) -> np.ndarray:
        mean, std = normalization(backbone())
        data = ImageSet.from_arrays(pixels, yy, mean, std, torch.device(device))
        return predict(backbone(), data)[0]

    def pooled(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Train (and mirror) and val features as the head stage computes them, into the
        process's frozen-feature cache: the chosen size's serve the plan and the head worker.
        None: the backbone's head is not a linear layer on pooled features."""
        from tlopt.tune.plan import Pieces
        from tlopt.tune.runner import pooled_features

        at = replace(config, data=replace(config.data, image_size=size))
        ctx = Pieces(at, source, str(device)).context("head")
        ready = pooled_features(ctx, mirror)
        if ready is None:
            return None
        train, val = ready[2].cpu().numpy(), ready[3].cpu().numpy()
        ytr = ctx.split("train").labels.cpu().numpy()
        x = train.reshape(-1, train.shape[-1])
        return x, np.tile(ytr, train.shape[0]), val, ctx.split("val").labels.cpu().numpy()

    rows: list[ProbeRow] = []
    began = time.perf_counter()
    for size in sorted(sizes):
        if rows and seconds is not None:
            expected = rows[-1].seconds * (size / rows[-1].size) ** 2
            if time.perf_counter() - began + expected > seconds:
                say(f"size probe: {size} px left out (about {expected:.0f} s; its share is spent)")
                break
        start = time.perf_counter()
        if (got := pooled(size)) is not None:
            x, yy, val = got[0], got[1], (got[2], got[3])
        else:  # another head (e.g. a cut backbone's): the export's descriptors
            pixels = decode_source(source, size, cache)
            tr, ytr = pixels[index["train"]], y[index["train"]]
            x, yy = features(tr, ytr), ytr
            if mirror:  # the head trains on mirrors too: so does the probe
                x = np.concatenate([x, features(tr[:, :, ::-1], ytr)])
                yy = np.concatenate([ytr, ytr])
            val = (features(pixels[index["val"]], y[index["val"]]), y[index["val"]])
        (loss, hits), c = min((probe_fit((x, yy), val, c), c) for c in C_VALUES)
        row = ProbeRow(size, time.perf_counter() - start, loss, hits, len(val[1]), c)
        say(f"size probe: {size:>4} px  val loss {loss:.4f}  {hits}/{row.val} correct  "
            f"({row.seconds:.0f} s)")  # fmt: skip
        rows.append(row)
    return rows


def choose(rows: list[ProbeRow]) -> int:
    """The size with the lowest probe loss, a larger one only when it is :data:`BETTER_BY`
    lower than every smaller one (it costs more per epoch)."""
    best = rows[0]
    for row in rows[1:]:
        if row.loss < best.loss * (1 - BETTER_BY):
            best = row
    return best.size


def probe_table(rows: list[ProbeRow], chosen: int) -> list[str]:
    """The probe as comment lines for the study file and the report."""
    lines = [f"image size chosen by a linear probe on the frozen features: {chosen} px"]
    lines += [
        f"  {r.size:>4} px  val log loss {r.loss:.4f}  {r.correct}/{r.val} correct  C={r.c:g}"
        f"  {r.seconds:.0f} s" + ("  <- chosen" if r.size == chosen else "")
        for r in rows
    ]
    return lines
