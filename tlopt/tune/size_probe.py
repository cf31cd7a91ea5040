"""The image size chosen by the data: a linear probe on the frozen backbone's features, per size.

For each size the images are decoded at that size (the decoded-image cache the workers then
read), the backbone with the study's weights maps each training image to its pooled features
(the export's descriptors), and a logistic regression (scikit-learn, one fit per C) is scored
on the validation split. The head stage is such a probe, so a size with a lower probe loss
gives a better head, and the fine-tuning stages start from it. The probe leaves out the mirror
images the head trains on too: they cost as much as the images again at every size, and only
the chosen size's serve the head stage, which adds them to the plain views the probe cached
(``Inputs``) when the plan or its first trial asks for them (issue 28.1).

The backbone's own size is probed first (a photo smaller than it may still do best upsampled
to it: flowers of 128 px probed 1.02 at 128 and 0.76 at 224), then the others smallest first;
with a time limit the probe leaves out a size whose cost (about the last one's times the ratio
of pixels) would pass it, and goes on with the cheaper ones. The chosen size is the smallest
unless a larger one is better beyond noise: a paired bootstrap over the validation images'
log losses must put its mean below the smaller one's in :data:`CONFIDENCE` of resamples (a
larger size costs about (size / smaller) ** 2 as much per epoch). Rows without per-image
losses (records made before) fall back to :data:`BETTER_BY`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
BETTER_BY = 0.02  # without per-image losses: a larger size must lower the loss by 2%
CONFIDENCE = 0.95  # a larger size is chosen when its loss is lower in this share of resamples
RESAMPLES = 2000  # bootstrap resamples of the validation images (seeded: the same choice)
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
    # Each validation image's log loss (not in the record: the choice is made once).
    losses: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if k != "losses"}


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
) -> tuple[float, int, tuple[float, ...]]:
    """Validation log loss, correct count and each image's log loss of a logistic regression
    fitted at ``c``."""
    clf = LogisticRegression(C=c, max_iter=5000).fit(*train)
    p = clf.predict_proba(val[0])
    picked = p[np.arange(len(val[1])), np.searchsorted(clf.classes_, val[1])]
    each = -np.log(np.clip(picked, 1e-12, 1.0))
    hits = int((clf.classes_[p.argmax(1)] == val[1]).sum())
    return float(each.mean()), hits, tuple(float(v) for v in each)


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

    @functools.cache
    def backbone() -> torch.nn.Module:
        model = create_backbone(config.model.backbone, config.model.weights, len(source.classes))
        return model.eval().to(device)

    def features(pixels: np.ndarray, yy: np.ndarray) -> np.ndarray:
        mean, std = normalization(backbone())
        data = ImageSet.from_arrays(pixels, yy, mean, std, torch.device(device))
        return predict(backbone(), data)[0]

    def pooled(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Train and val features as the head stage computes them, into the process's
        frozen-feature cache (the chosen size's serve the plan and the head worker). None: the
        backbone's head is not a linear layer on pooled features."""
        from tlopt.tune.plan import Pieces
        from tlopt.tune.runner import pooled_features

        at = replace(config, data=replace(config.data, image_size=size))
        ctx = Pieces(at, source, str(device)).context("head")
        ready = pooled_features(ctx, False)
        if ready is None:
            return None
        train, val = ready[2][0].cpu().numpy(), ready[3].cpu().numpy()
        ytr, yva = ctx.split("train").labels.cpu().numpy(), ctx.split("val").labels.cpu().numpy()
        return train, ytr, val, yva

    rows: list[ProbeRow] = []
    began = time.perf_counter()
    native = native_size(backbone())
    for size in sorted(sizes, key=lambda s: (s != native, s)):  # its own size first
        if rows and seconds is not None:
            expected = rows[-1].seconds * (size / rows[-1].size) ** 2
            if time.perf_counter() - began + expected > seconds:
                say(f"size probe: {size} px left out (about {expected:.0f} s; its share is spent)")
                continue
        start = time.perf_counter()
        if (got := pooled(size)) is not None:
            x, yy, val = got[0], got[1], (got[2], got[3])
        else:  # another head (e.g. a cut backbone's): the export's descriptors
            pixels = decode_source(source, size, cache)
            tr, ytr = pixels[index["train"]], y[index["train"]]
            x, yy = features(tr, ytr), ytr
            val = (features(pixels[index["val"]], y[index["val"]]), y[index["val"]])
        (loss, hits, each), c = min((probe_fit((x, yy), val, c), c) for c in C_VALUES)
        row = ProbeRow(size, time.perf_counter() - start, loss, hits, len(val[1]), c, each)
        say(f"size probe: {size:>4} px  val loss {loss:.4f}  {hits}/{row.val} correct  "
            f"({row.seconds:.0f} s)")  # fmt: skip
        rows.append(row)
    return sorted(rows, key=lambda r: r.size)


def lower_share(smaller: ProbeRow, larger: ProbeRow) -> float | None:
    """The share of paired bootstrap resamples of the validation images in which ``larger``'s
    mean log loss is below ``smaller``'s (None: no per-image losses to pair)."""
    if not smaller.losses or len(smaller.losses) != len(larger.losses):
        return None
    diff = np.asarray(smaller.losses) - np.asarray(larger.losses)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(diff), size=(RESAMPLES, len(diff)))
    return float((diff[picks].mean(axis=1) > 0).mean())


def choose(rows: list[ProbeRow]) -> int:
    """The smallest size, a larger one only when it is lower beyond noise than the best smaller
    one (:func:`lower_share` at least :data:`CONFIDENCE`; without per-image losses
    :data:`BETTER_BY` lower): it costs more per epoch."""
    ordered = sorted(rows, key=lambda r: r.size)
    best = ordered[0]
    for row in ordered[1:]:
        share = lower_share(best, row)
        better = row.loss < best.loss * (1 - BETTER_BY) if share is None else share >= CONFIDENCE
        if better and row.loss < best.loss:
            best = row
    return best.size


def probe_table(rows: list[ProbeRow], chosen: int) -> list[str]:
    """The probe as comment lines for the study file and the report."""
    lines = [f"image size chosen by a linear probe on the frozen features: {chosen} px"]
    pick = next(r for r in rows if r.size == chosen)
    for r in rows:
        share = lower_share(r, pick) if r.size != chosen else None
        margin = "" if share is None else f"  chosen lower in {share:.0%} of resamples"
        lines.append(
            f"  {r.size:>4} px  val log loss {r.loss:.4f}  {r.correct}/{r.val} correct  "
            f"C={r.c:g}  {r.seconds:.0f} s" + ("  <- chosen" if r.size == chosen else margin)
        )
    return lines
