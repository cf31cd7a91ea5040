"""Run a staged model as a frozen prefix and a trainable rest.

With flips as the only augmentation, the frozen prefix of a stage maps each image (and its
mirror) to the same tensor in every epoch of every trial. The trainer computes those outputs
once and trains the rest on them: for the head stage the prefix is the whole backbone up to the
pooled features, for ``freezeN`` it is the stem and the first N block groups.

The split walks timm's top-level modules in order (the same walk timm's ``FeatureListNet``
does). That equals ``forward_features`` only for models built as a plain sequence of blocks, so
the split is verified numerically once per architecture; where it does not hold, the prefix is
empty and the whole model runs every step (correct, just slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models._features import _module_list
from torch import nn

from tlopt.models.backbones import classifier_name

# Names timm gives to the parts of ``forward_head`` (pooling, pre-logits, classifier).
_HEAD_PARTS = {"global_pool", "pre_logits", "head", "fc", "classifier", "head_drop", "fc_norm"}
_VERIFIED: dict[tuple[str, str, int | None, int], bool] = {}


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class SplitModel:
    """``rest(prefix(x)) == model(x)``, with ``prefix`` frozen and deterministic.

    Attributes:
        mode: ``"pooled"`` (prefix gives the pooled pre-logits vector, rest is dropout and the
            classifier), ``"body"`` (prefix is the first ``cut`` body modules) or ``"none"``.
    """

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model = model
        self.body = self._body_modules(model)
        sequential = self._verify(model, image_size)
        classifier = classifier_name(model)
        self.classifier: nn.Module = model.get_submodule(classifier)
        only_classifier = all(
            not p.requires_grad or n.startswith(classifier + ".")
            for n, p in model.named_parameters()
        )
        self.cut = 0
        if sequential:
            while self.cut < len(self.body) and _frozen(self.body[self.cut]):
                self.cut += 1
        if sequential and only_classifier:
            self.mode = "pooled"
        elif self.cut > 0:
            self.mode = "body"
        else:
            self.mode = "none"

    @staticmethod
    def _body_modules(model: nn.Module) -> list[nn.Module]:
        body = []
        for _, name, module in _module_list(model, flatten_sequential=True):
            if name.split(".")[0] in _HEAD_PARTS:
                break
            body.append(module)
        return body

    def _verify(self, model: nn.Module, image_size: int) -> bool:
        key = (
            model.pretrained_cfg.get("architecture", ""),
            type(model).__name__,
            getattr(model, "cut", None),
            image_size,
        )
        if key not in _VERIFIED:
            was_training = model.training
            model.eval()
            x = torch.randn(
                2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
            )
            x = x.to(next(model.parameters()).device)
            try:
                with torch.no_grad():
                    expected = model.forward_features(x)
                    got = x
                    for module in self.body:
                        got = module(got)
                _VERIFIED[key] = got.shape == expected.shape and torch.allclose(
                    got, expected, atol=1e-4, rtol=1e-3
                )
            except Exception:  # any model whose top level is not a plain sequence
                _VERIFIED[key] = False
            model.train(was_training)
        return _VERIFIED[key]

    @property
    def has_prefix(self) -> bool:
        return self.mode != "none"

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part; call under ``torch.no_grad()`` with the prefix in eval mode."""
        if self.mode == "pooled":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        for module in self.body[: self.cut]:
            x = module(x)
        return x

    def rest(self, z: torch.Tensor) -> torch.Tensor:
        """The trainable part, from the prefix's output to the logits."""
        if self.mode == "pooled":
            drop = float(getattr(self.model, "drop_rate", 0.0) or 0.0)
            return self.classifier(F.dropout(z, p=drop, training=self.classifier.training))
        if self.mode == "none":
            return self.model(z)
        for module in self.body[self.cut :]:
            z = module(z)
        return self.model.forward_head(z)
