"""The vocabulary of a study file, torch-free: stages, optimizers, pruners, data sources.

``tlopt.config`` validates a study file against these lists without importing torch, timm or
Optuna; the modules that build the named things (``tlopt.models.stages``,
``tlopt.train.trainer``, ``tlopt.tune.pruners``, ``tlopt.data.source``) use the same lists,
so a name is accepted by the parser exactly when it can be built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlopt.errors import ConfigError

ATTR = "tlopt."  # prefix of every study and trial attribute tlopt writes
# A fine-tuning study's head its new trials start from, and each trial's the one it started
# from: the study moves on when a rerun finds a better head, and export-best replays a trial
# from its own. FIRST_HEAD: the study's first, for trials from before heads were recorded.
HEAD = ATTR + "head"
FIRST_HEAD = ATTR + "first_head"
DATA_SOURCES = ("folder", "digits", "cifar10")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "patient", "nop")
WEIGHTS_FORMS = "'pretrained', 'bundled', 'none' or 'file:PATH'"
STAGE_FORMS = "head, freeze<N> (freeze1, freeze2, ...), full, scratch"


@dataclass(frozen=True)
class Stage:
    """A fine-tuning stage.

    Attributes:
        name: ``head``, ``freeze<N>``, ``full`` or ``scratch``.
        frozen_groups: block groups frozen, the stem counted as group 0 (None: all but the head).
        pretrained: whether the backbone starts from pretrained weights.
        from_head: whether the head starts from the best ``head`` trial.
    """

    name: str
    frozen_groups: int | None
    pretrained: bool = True
    from_head: bool = True


def parse_stage(name: str) -> Stage:
    """Parse a stage name; raises ConfigError listing the valid forms.

    Example:
        >>> parse_stage("freeze2").frozen_groups  # the stem and the first two block groups
        3
    """
    if name == "head":
        return Stage("head", None, pretrained=True, from_head=False)
    if name == "full":
        return Stage("full", 0)
    if name == "scratch":
        return Stage("scratch", 0, pretrained=False, from_head=False)
    match = re.fullmatch(r"freeze([0-9]{1,4})", name)
    if match:
        # freezeN freezes the stem and the first N block groups: N + 1 groups.
        return Stage(name, int(match.group(1)) + 1)
    raise ConfigError(f"unknown stage '{name}': use one of {STAGE_FORMS}")


def weights_problem(spec: str) -> str | None:
    """What is wrong with a ``[model] weights`` value, or None (the file is checked later)."""
    if spec in ("pretrained", "bundled", "none") or (spec.startswith("file:") and len(spec) > 5):
        return None
    return f"weights '{spec}' is not valid: use {WEIGHTS_FORMS}"
