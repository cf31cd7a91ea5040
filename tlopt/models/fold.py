"""Frozen modules for inference with each BatchNorm folded into the convolution before it.

A frozen prefix runs BatchNorm on its running statistics: an affine map per channel, which the
convolution before it can absorb (``torch.nn.utils.fuse_conv_bn_weights``). On this 2-core CPU
EfficientNet-Lite0's features of 32 images at 288 px took 1.10 s as timm builds it and 0.76 s
folded (``scripts/bench_fold.py``): the size probe, the head's features, the fine-tuning
stages' frozen prefixes and the export's descriptors all run such passes.

The fold pairs a convolution with the BatchNorm registered right after it in the same parent,
which is how timm's CNN blocks are written (``conv_dw``, ``bn1``; ``conv1``, ``bn1``). Where a
model's forward does not follow its registration order, the folded copy computes something
else: :func:`folded_like` runs both on real inputs and keeps the copy only when they agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils import fuse_conv_bn_weights

# Relative agreement a folded copy must reach (float32 rounding reorders the sums: EfficientNet-
# Lite0's pooled features differed by 4e-5 at most, of values up to 6).
RTOL, ATOL = 1e-3, 1e-4


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """(an eval-mode deep copy of ``module`` with its BatchNorms folded, how many were folded).

    A BatchNorm is folded when it is exactly ``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``
    (which keeps its dropout and activation), holds running statistics, and is registered right
    after an ``nn.Conv2d`` (timm's ``Conv2dSame`` included) of as many output channels.
    """
    folded = copy.deepcopy(module).eval()
    count = 0
    for parent in list(folded.modules()):
        names = list(parent._modules)  # registration order; no public accessor gives it by name
        for before, name in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[before], parent._modules[name]
            if not (isinstance(conv, nn.Conv2d) and _foldable(bn, conv.out_channels)):
                continue
            assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            assert bn.running_var is not None
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            parent._modules[name] = (
                nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            )
            count += 1
    return folded, count


def folded_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A timm model's pooled pre-logits features, ``forward_head(forward_features(x),
    pre_logits=True)``, run by a folded eval-mode copy (None: no BatchNorm to fold)."""
    copy_, folds = fold_batchnorm(model)
    if not folds:
        return None
    return lambda x: copy_.forward_head(copy_.forward_features(x), pre_logits=True)


def _foldable(bn: nn.Module | None, channels: int) -> bool:
    return (
        type(bn) in (nn.BatchNorm2d, BatchNormAct2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == channels
    )


def agrees(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``got`` equals ``expected`` up to float32 rounding, relative to its scale."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return got.shape == expected.shape and torch.allclose(
        got.float(), expected.float(), rtol=RTOL, atol=ATOL * max(1.0, scale)
    )


def folded_like(
    run: Callable[[torch.Tensor], torch.Tensor],
    build: Callable[[], Callable[[torch.Tensor], torch.Tensor] | None],
    sample: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``build()``'s folded function where it gives ``run``'s output on ``sample`` (both in
    float32, without gradients), else ``run`` itself. ``build`` returns None when there is
    nothing to fold."""
    fast = build()
    if fast is None:
        return run
    with torch.no_grad(), torch.autocast(sample.device.type, enabled=False):
        ok = agrees(fast(sample), run(sample))
    return fast if ok else run
