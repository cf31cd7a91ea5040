"""What the trainable part of a model sees: cached frozen-prefix outputs, or the images.

With flips as the only augmentation, the frozen prefix of a stage maps each image (and its
mirror) to the same tensor in every epoch of every trial: :class:`Inputs` computes those
outputs once into a :class:`~tlopt.train.feature_cache.FeatureCache` and serves batches from
it (or, where they do not fit, runs the prefix per batch). Random-resized crops change what
the prefix sees at every step, so with them the prefix runs per batch. Also the precision and
compilation the trainer runs the trainable part with.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from tlopt.models.split import SplitModel
from tlopt.progress import bar
from tlopt.train.data import ImageSet, random_resized_crop
from tlopt.train.feature_cache import FeatureCache

log = logging.getLogger("tlopt.worker")


class Inputs:
    """Training inputs as the trainable part sees them: cached prefix outputs, or images."""

    def __init__(
        self,
        split: SplitModel,
        data: ImageSet,
        mirror: bool,
        cache: FeatureCache,
        crop_scale: float = 1.0,
    ):
        self.split, self.data, self.mirror, self.crop_scale = split, data, mirror, crop_scale
        self.cached: torch.Tensor | None = None
        self._prefix: Callable[[torch.Tensor], torch.Tensor] | None = None  # per step, folded
        if split.has_prefix and crop_scale >= 1.0:
            # The cache belongs to one study, whose trials share the prefix's weights: the key
            # names the data by content, the prefix by its cut, and the views.
            cut = getattr(split.model, "cut", None)
            what = data.name or f"object {id(data)}"
            key = f"{what}|{split.mode}:{split.cut}|cut{cut}|mirror="
            self.cached = cache.get(key + str(mirror))
            if self.cached is None:
                # The mirror views add to the plain ones when those are cached (the size probe
                # computes plain views at every size, the head stage wants both at the chosen).
                plain = cache.get(key + "False") if mirror else None
                self.cached = self._compute(cache, plain)
                if self.cached is not None:
                    cache.put(key + str(mirror), self.cached, owner=None if data.name else data)

    @torch.no_grad()
    def _compute(self, cache: FeatureCache, plain: torch.Tensor | None) -> torch.Tensor | None:
        """Every view's prefix outputs; ``plain``: the unmirrored view's, computed before."""
        n = len(self.data)
        sample = self.data.batch(torch.arange(min(n, 2), device=self.data.images.device))
        with autocast(self.data.images.device):
            probe = self.split.prefix(sample)
        per_item = probe[0].numel() * 4 * (2 if self.mirror else 1)
        if not cache.fits(per_item * n):
            log.info(
                "frozen features of %s (%.0f MiB) exceed the feature cache (%.0f MiB): the "
                "prefix runs every step",
                self.data.name or "the images",
                per_item * n / 2**20,
                cache.max_bytes / 2**20,
            )
            return None
        views = [False, True] if self.mirror else [False]
        out = [] if plain is None else [plain[0]]
        views = views[len(out) :]
        prefix = self.split.folded_prefix(sample)  # a third faster on the CPU
        shown = bar(total=n * len(views), desc="frozen features", unit="img")
        for flipped in views:
            chunks = []
            step = inference_batch(self.data.images.device)
            for start in range(0, n, step):
                index = torch.arange(start, min(start + step, n), device=self.data.images.device)
                flip = torch.full_like(index, flipped, dtype=torch.bool)
                with autocast(self.data.images.device):
                    z = prefix(self.data.batch(index, flip)).float()
                # Feature maps are kept as NHWC, so that a gathered batch is channels_last
                # (see fit) without a copy per step; pooled vectors stay as they are.
                chunks.append(z.permute(0, 2, 3, 1).contiguous() if z.dim() == 4 else z)
                shown.update(len(index))
            out.append(torch.cat(chunks))
        shown.close()
        return torch.stack(out)

    def get(
        self,
        index: torch.Tensor,
        flip: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The batch ``index`` (mirrored where ``flip``; cropped at random from ``generator``
        when the inputs crop)."""
        if self.cached is None:
            x = self.data.batch(index, flip)
            if self.crop_scale < 1.0 and generator is not None:
                x = random_resized_crop(x, self.crop_scale, generator)
            if self.split.has_prefix:
                with torch.no_grad():
                    if self._prefix is None:  # checked once, on the first batch
                        self._prefix = self.split.folded_prefix(x[:2])
                    x = self._prefix(x)
            return x
        # One gather; view 1 holds the mirror images. NHWC maps are viewed back as NCHW.
        x = self.cached[0, index] if flip is None else self.cached[flip.long(), index]
        return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def cached_prefix(
    split: SplitModel, data: ImageSet, mirror: bool, cache: FeatureCache
) -> torch.Tensor | None:
    """The frozen prefix's outputs for every image of ``data`` (``[views, N, ...]``: view 1
    the mirror images when ``mirror``), kept in ``cache`` as ``fit`` keeps them; None when
    they would not fit the cache limit."""
    return Inputs(split, data, mirror, cache).cached


def inference_batch(device: torch.device) -> int:
    """Images per forward pass that keeps no gradient (frozen features, validation, descriptors).

    A GPU wants large batches; on the CPU a small one stays in cache: EfficientNet-Lite0's
    features at 288 px on 2 threads ran 17.8 img/s at 16, 17.1 at 32, 15.4 at 64 and 11.8 at
    256 (README, Performance).
    """
    return 32 if device.type == "cpu" else 256


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Any:
    """``torch.compile(fn)``: CUDA graphs on CUDA ("reduce-overhead"), inductor on the CPU.

    ``dynamic=False``: one graph per batch shape (the search space has three batch sizes, plus
    each epoch's last, shorter batch); past torch's recompile limit it runs eagerly.
    """
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(fn, mode=mode, dynamic=False)


def autocast(device: torch.device) -> Any:
    # bf16 on CUDA devices that support it (the reference H100 figures); float32 elsewhere:
    # on the CPU bf16 is slower, and fp16 on older GPUs would need a gradient scaler.
    if device.type == "cuda" and _bf16_supported(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)


@functools.cache
def _bf16_supported(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
