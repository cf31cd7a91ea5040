"""Fine-tuning stages as data: which block groups are frozen, and where a stage starts from.

Block groups follow timm's own structure (``group_matcher(coarse=True)``): group 0 is the stem,
then one group per block stage (ResNet's ``layer1..4``, EfficientNet's ``blocks.0..6``). Where
timm's groups are finer than its feature stages (VGG: one group per conv), groups are merged at
the ``feature_info`` boundaries, so ``freeze1`` means "stem and first block group" everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models import group_modules
from torch import nn

from tlopt.errors import ConfigError
from tlopt.models.backbones import classifier_name
from tlopt.names import STAGE_FORMS, Stage, parse_stage

__all__ = [
    "STAGE_FORMS",
    "Stage",
    "StagePlan",
    "apply_stage",
    "block_groups",
    "frozen_module_set",
    "parse_stage",
    "set_train_mode",
]


def block_groups(model: nn.Module) -> list[list[str]]:
    """Module names of each block group, stem first, the classifier excluded."""
    if hasattr(model, "tlopt_block_groups"):
        return list(model.tlopt_block_groups())
    classifier = classifier_name(model)
    grouped = group_modules(model, model.group_matcher(coarse=True))
    groups = [
        [n for n in names if n != classifier and not n.startswith(classifier + ".")]
        for _, names in sorted(grouped.items())
    ]
    groups = [g for g in groups if g]
    stages = getattr(model, "feature_info", None)
    fine = group_modules(model, model.group_matcher(coarse=False))
    if stages is not None and len(fine) == len(grouped) and len(groups) > len(stages) + 1:
        # Coarse groups as fine as the finest (VGG: one per conv): merge them into stages.
        groups = _merge_by_feature_stages(model, groups, [f["module"] for f in stages])
    return groups


def _merge_by_feature_stages(
    model: nn.Module, groups: list[list[str]], stage_ends: list[str]
) -> list[list[str]]:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    ends = [order[m] for m in stage_ends if m in order]
    merged: list[list[str]] = [[] for _ in range(len(ends) + 1)]
    for group in groups:
        position = order.get(group[0], len(order))
        index = next((i for i, end in enumerate(ends) if position <= end), len(ends))
        merged[index].extend(group)
    return [g for g in merged if g]


@dataclass(frozen=True)
class StagePlan:
    """The outcome of applying a stage to a model."""

    stage: str
    trainable_params: int
    total_params: int


def apply_stage(model: nn.Module, stage: Stage, freeze_modules: int | None = None) -> StagePlan:
    """Set ``requires_grad`` for ``stage`` and return what is frozen.

    ``freeze_modules = N`` instead freezes the first N layers (leaf modules), in order
    (seed 001's "first 140 layers" of ResNet-50).
    """
    classifier = classifier_name(model)
    groups = block_groups(model)
    if freeze_modules is not None:
        # Leaf modules in order, as Keras counts layers (activations and pools included):
        # the first 140 of timm's ResNet-50 end at layer3.4.conv3, Keras's conv4_block5.
        leaves = [n for n, m in model.named_modules() if n and not any(m.children())]
        leaves = [n for n in leaves if not _inside(n, classifier)]
        if freeze_modules > len(leaves):
            raise ConfigError(
                f"freeze_modules = {freeze_modules} but the backbone has only {len(leaves)} "
                "layers before its classifier"
            )
        frozen = leaves[:freeze_modules]
    elif stage.frozen_groups is None:
        frozen = [n for g in groups for n in g]
    else:
        if stage.frozen_groups > len(groups):
            raise ConfigError(
                f"stage '{stage.name}' freezes {stage.frozen_groups} groups but this backbone "
                f"has {len(groups)} (stem + {len(groups) - 1} block groups)"
            )
        frozen = [n for g in groups[: stage.frozen_groups] for n in g]
    frozen_set = set(frozen)
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        param.requires_grad = not any(owner == f or owner.startswith(f + ".") for f in frozen_set)
    if stage.frozen_groups is None and freeze_modules is None:
        # The head stage trains the classifier only, whatever timm's groups say.
        for name, param in model.named_parameters():
            param.requires_grad = _inside(name, classifier)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return StagePlan(stage.name, trainable, total)


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def frozen_module_set(model: nn.Module) -> list[nn.Module]:
    """Modules whose parameters are all frozen (kept in eval mode while training)."""
    out = []
    for module in model.modules():
        params = list(module.parameters(recurse=True))
        if params and not any(p.requires_grad for p in params):
            out.append(module)
    return out


def set_train_mode(model: nn.Module, training: bool, bn_train: bool = False) -> None:
    """``model.train(training)``, but frozen parts (their BatchNorm, dropout) stay in eval.

    With ``bn_train`` False, every BatchNorm layer also stays in eval mode (its affine weights
    still train): batch statistics of 8 to 32 small images differ from the running statistics
    the pretrained weights and the tuned head were fitted to, and switching to them wrecks the
    first fine-tuning epochs (Keras's transfer-learning guide keeps BatchNorm in inference mode
    for the same reason). The ``scratch`` stage has no running statistics to keep and trains them.
    """
    model.train(training)
    if training:
        for module in frozen_module_set(model):
            module.eval()
        if not bn_train:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
