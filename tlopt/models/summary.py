"""``tlopt model summary``: the seeds' ``model.summary()`` plus what each stage trains."""

from __future__ import annotations

import torch
from torch import nn

from tlopt.models.backbones import classifier_name
from tlopt.models.stages import apply_stage, block_groups, parse_stage

STAGES = ("head", "freeze1", "freeze2", "full", "scratch")


def _layer_table(model: nn.Module, image_size: int) -> list[tuple[str, str, str, int]]:
    """(name, type, output shape, params) for each top-level module, from one forward pass."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, module in model.named_children():

        def hook(mod: nn.Module, _inp: object, out: object, name: str = name) -> None:
            shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else "-"
            rows.append(
                (name, type(mod).__name__, str(shape), sum(p.numel() for p in mod.parameters()))
            )

        hooks.append(module.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return rows


def summary_text(model: nn.Module, name: str, image_size: int = 224) -> str:
    """The model with its head, without it, and per stage the frozen groups and trainable count."""
    lines = [f"{name}: input 3x{image_size}x{image_size}"]
    classifier = classifier_name(model)
    rows = _layer_table(model, image_size)
    lines.append(f"{'module':<16}{'type':<24}{'output':<22}{'params':>12}")
    for row in rows:
        lines.append(f"{row[0]:<16}{row[1]:<24}{row[2]:<22}{row[3]:>12,}")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_submodule(classifier).parameters())
    lines.append(
        f"with head: {total:,} parameters; classifier '{classifier}' "
        f"({model.num_classes} outputs) has {head:,}"
    )
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 3, image_size, image_size))
        pooled = model.forward_head(feats, pre_logits=True)
    lines.append(
        f"without head: {total - head:,} parameters; features "
        f"{tuple(feats.shape[1:])}, pooled descriptor {tuple(pooled.shape[1:])}"
    )
    groups = block_groups(model)
    lines.append("")
    lines.append(f"block groups (timm group_matcher): stem + {len(groups) - 1}")
    for i, group in enumerate(groups):
        label = "stem" if i == 0 else f"group {i}"
        lines.append(f"  {label:<9}{group[0]} .. {group[-1]} ({len(group)} modules)")
    lines.append("")
    lines.append(f"{'stage':<10}{'frozen':<34}{'trainable params':>18}")
    for stage_name in STAGES:
        stage = parse_stage(stage_name)
        plan = apply_stage(model, stage)
        if stage.frozen_groups is None:
            frozen = "everything but the classifier"
        elif stage.frozen_groups == 0:
            frozen = "nothing" + (" (random init)" if not stage.pretrained else "")
        else:
            n = stage.frozen_groups - 1
            frozen = "stem" + ("" if n == 0 else " + group 1" if n == 1 else f" + groups 1..{n}")
        lines.append(f"{stage_name:<10}{frozen:<34}{plan.trainable_params:>18,}")
    return "\n".join(lines)
