"""Images as tensors: a decoded uint8 set, normalised and flipped as batch tensor operations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import roi_align


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Decoded images of one split, resident on the training device.

    Attributes:
        images: uint8 tensor (N, H, W, 3), as decoded once by ``tlopt.data.cache``.
        labels: int64 tensor (N,).
        mean, std: per-channel normalisation the pretrained weights expect.
        name: what the images are, by content (fingerprint, split, size): the key of their
            frozen features in a ``FeatureCache``; None keys them by this object.
        scale: ``mean`` and ``std`` as ``(1, C, 1, 1)`` float tensors on the images' device,
            made once here: built per batch they cost a blocking host-to-device copy per step
            on a GPU.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str | None = None
    scale: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        device = self.images.device
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        object.__setattr__(self, "scale", (mean, std))  # frozen: set once, here

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        name: str | None = None,
    ) -> ImageSet:
        return cls(
            torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device),
            tuple(mean),
            tuple(std),
            name,
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float NCHW batch; ``flip`` (bool per image) mirrors left-right."""
        x = self.images[index].permute(0, 3, 1, 2).float().div_(255.0)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        mean, std = self.scale
        x = (x - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)  # see fit: faster on CUDA and CPU
        return x


def random_resized_crop(
    x: torch.Tensor, min_scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Each image of an NCHW batch cropped at random and resized back to its size.

    As torchvision's ``RandomResizedCrop``, on the device and for the whole batch at once: a
    box of area share U(``min_scale``, 1) and aspect ratio log-uniform in [3/4, 4/3] (clipped
    to the image), placed uniformly, sampled bilinearly (``roi_align``, one sample per output
    pixel, so a box of the whole image gives the image back).
    """
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator, device=x.device)
    area = min_scale + (1.0 - min_scale) * u[:, 0]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
    box_w = torch.sqrt(area * aspect).clamp(max=1.0) * w
    box_h = torch.sqrt(area / aspect).clamp(max=1.0) * h
    x0, y0 = u[:, 2] * (w - box_w), u[:, 3] * (h - box_h)
    image = torch.arange(n, device=x.device, dtype=torch.float32)
    boxes = torch.stack([image, x0, y0, x0 + box_w, y0 + box_h], dim=1)
    out = roi_align(
        x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True
    )
    return out.contiguous(memory_format=torch.channels_last)
