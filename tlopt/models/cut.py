"""Cut layers: features from an intermediate stage instead of the last (seed 004's pool3/4/5).

``CutModel`` keeps a timm backbone up to the end of feature stage ``cut`` (timm's
``feature_info[cut]``; for VGG-16 stages 2, 3 and 4 end in conv3_3, conv4_3 and conv5_3, the
layers before pool3, pool4 and pool5) and puts the usual head on it: global average pool,
dropout, linear. It speaks the part of timm's model API tlopt uses (``forward_features``,
``forward_head``, ``get_classifier``, ``pretrained_cfg``), so stages, the trainer's cached
prefix and descriptors work unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import FeatureListNet
from torch import nn

from tlopt.errors import ConfigError


class CutModel(nn.Module):
    """A backbone cut after feature stage ``cut``, with a new classification head."""

    def __init__(self, base: nn.Module, cut: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        stages = getattr(base, "feature_info", None)
        if stages is None or not 0 <= cut < len(stages):
            count = len(stages) if stages is not None else 0
            raise ConfigError(
                f"cut = {cut}: '{base.pretrained_cfg.get('architecture')}' has feature "
                f"stages 0..{count - 1}; choose one of them"
            )
        features = None
        for flatten in (True, False):  # VGG's convs sit in one Sequential; ResNet's do not
            try:
                features = FeatureListNet(base, out_indices=(cut,), flatten_sequential=flatten)
                break
            except AssertionError:
                continue
        if features is None:
            raise ConfigError(f"cut = {cut}: cannot cut this backbone at that stage")
        # The truncated module list, run in order, ends with the cut stage's output.
        self.body = nn.Sequential(OrderedDict(features.items()))
        self.cut = cut
        self.num_features = int(stages[cut]["num_chs"])
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes)
        base_cfg: dict[str, Any] = dict(base.pretrained_cfg)  # type: ignore[arg-type]
        self.pretrained_cfg = {**base_cfg, "classifier": "fc"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def tlopt_block_groups(self) -> list[list[str]]:
        """One group per body module: cut models fine-tune whole (``full``) or not at all."""
        return [[f"body.{name}"] for name, _ in self.body.named_children()]
