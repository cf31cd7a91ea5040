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

import contextlib
from collections.abc import Callable, Iterator

import torch
from timm.models._features import _module_list
from torch import nn

from tlopt.models.backbones import classifier_name
from tlopt.models.fold import fold_batchnorm, folded_features, folded_like

# Names timm gives to the parts of ``forward_head`` (pooling, pre-logits, classifier).
_HEAD_PARTS = {"global_pool", "pre_logits", "head", "fc", "classifier", "head_drop", "fc_norm"}
_HEAD_DROPOUTS = (".head_drop", ".head.drop")
_VERIFIED: dict[tuple[str, str, int | None, int], tuple[bool, bool]] = {}


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def head_dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The head's dropout, its mask drawn from the trial's ``generator`` (global one if None).

    Every path a trial can take applies the head's dropout here, in this form, drawn right
    after the step's flips (and crops): the batched head trainer, ``fit`` on cached features,
    on images or on the whole model. So one trial's history does not depend on its path.
    """
    if p <= 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1 - p)


class SplitModel:
    """``rest(prefix(x)) == model(x)``, with ``prefix`` frozen and deterministic.

    The model's own head dropout (timm applies it inside ``forward_head``, before the
    classifier) never runs: ``rest`` applies :func:`head_dropout` in its place, at the
    model's ``drop_rate``, so the prefix gives the same output in train and eval mode and
    every path draws the same masks.

    Attributes:
        mode: ``"pooled"`` (prefix gives the pooled pre-logits vector, rest is dropout and the
            classifier), ``"body"`` (prefix is the first ``cut`` body modules) or ``"none"``.
    """

    def __init__(self, model: nn.Module, image_size: int) -> None:
        self.model = model
        self.body = self._body_modules(model)
        classifier = classifier_name(model)
        self.classifier: nn.Module = model.get_submodule(classifier)
        sequential, self.head_split = self._verify(model, image_size, self.classifier)
        self.drop = float(getattr(model, "drop_rate", 0.0) or 0.0)
        # What reads the training flag for the head's dropout: a model's forward_head
        # (F.dropout(training=self.training): ResNet, EfficientNet, MobileNet, CutModel; the
        # model itself, or a timm model inside another module) and the Dropout right before
        # the classifier (ViT's head_drop, ConvNeXt's and VGG's head.drop; VGG's
        # pre_logits.drop is part of its MLP and keeps its own).
        self._head_flags: list[nn.Module] = [
            m
            for n, m in model.named_modules()
            if hasattr(m, "forward_head")
            or (isinstance(m, nn.Dropout) and f".{n}".endswith(_HEAD_DROPOUTS))
        ]
        only_classifier = all(
            not p.requires_grad or n.startswith(classifier + ".")
            for n, p in model.named_parameters()
        )
        self.cut = 0
        if sequential:
            while self.cut < len(self.body) and _frozen(self.body[self.cut]):
                self.cut += 1
        if sequential and only_classifier and self.head_split:
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

    def _verify(
        self, model: nn.Module, image_size: int, classifier: nn.Module
    ) -> tuple[bool, bool]:
        """(the body modules run in order give ``forward_features``; the classifier on the
        pre-logits gives ``forward_head``), checked in eval mode once per architecture."""
        key = (
            model.pretrained_cfg.get("architecture", ""),
            type(model).__name__,
            getattr(model, "cut", None),
            image_size,
        )
        if key not in _VERIFIED:
            # Each module's own mode comes back after: a stage's frozen parts stay in eval
            # mode while the rest trains (set_train_mode), which model.train(True) would undo.
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            x = torch.randn(
                2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
            )
            x = x.to(next(model.parameters()).device)
            with torch.no_grad():
                expected = model.forward_features(x)
                logits = model.forward_head(expected)
                # Not so where the head adds more after the pre-logits (DeiT's distilled head).
                head = classifier(model.forward_head(expected, pre_logits=True))
                try:
                    got = x
                    for module in self.body:
                        got = module(got)
                    sequential = got.shape == expected.shape and torch.allclose(
                        got, expected, atol=1e-4, rtol=1e-3
                    )
                except Exception:  # any model whose top level is not a plain sequence
                    sequential = False
            _VERIFIED[key] = (
                sequential,
                bool(
                    head.shape == logits.shape
                    and torch.allclose(head, logits, atol=1e-5, rtol=1e-4)
                ),
            )
            for m, training in modes:
                m.training = training
        return _VERIFIED[key]

    @property
    def has_prefix(self) -> bool:
        return self.mode != "none"

    @contextlib.contextmanager
    def _no_head_dropout(self) -> Iterator[None]:
        saved = [m.training for m in self._head_flags]
        for m in self._head_flags:
            m.training = False
        try:
            yield
        finally:
            for m, training in zip(self._head_flags, saved, strict=True):
                m.training = training

    def pre_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_head(features, pre_logits=True)`` without the head's own dropout."""
        with self._no_head_dropout():
            return self.model.forward_head(features, pre_logits=True)  # type: ignore[no-any-return]

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part; call under ``torch.no_grad()``. Its output does not depend on the
        model's train mode (frozen modules stay in eval mode, the head's dropout is in rest)."""
        if self.mode == "pooled":
            return self.pre_logits(self.model.forward_features(x))
        for module in self.body[: self.cut]:
            x = module(x)
        return x

    def folded_prefix(self, sample: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`prefix` run by a copy with its BatchNorms folded into the convolutions
        (tlopt.models.fold), where it gives the prefix's output on ``sample``; else
        :meth:`prefix`. For a pass over a whole split: the copy is built anew each call."""
        if self.mode == "none":
            return self.prefix

        def build() -> Callable[[torch.Tensor], torch.Tensor] | None:
            if self.mode == "pooled":  # the copy is in eval mode: no head dropout
                return folded_features(self.model)
            body, folds = fold_batchnorm(nn.Sequential(*self.body[: self.cut]))
            return body if folds else None

        return folded_like(self.prefix, build, sample)

    def rest(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The trainable part, from the prefix's output to the logits; in train mode the
        head's dropout draws its mask from ``generator`` (:func:`head_dropout`)."""
        if self.mode == "none":
            z = self.model.forward_features(z)
        elif self.mode == "body":
            for module in self.body[self.cut :]:
                z = module(z)
        if not self.head_split:  # a head that is more than its classifier runs as timm's
            return self.model.forward_head(z)  # type: ignore[no-any-return]
        if self.mode != "pooled":
            z = self.pre_logits(z)
        if self.classifier.training:
            z = head_dropout(z, self.drop, generator)
        return self.classifier(z)  # type: ignore[no-any-return]
