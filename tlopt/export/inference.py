"""Run an exported model on image files, prepared as its training prepared them.

``tlopt extract`` and ``tlopt predict`` share this path: the files of a folder (or one file),
decoded on a thread pool, fitted to the exported input size by
:func:`tlopt.data.images.resize_square` (the function that built the training cache),
normalised with the exported mean and std, and run in batches on the chosen device.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
from torch import nn

from tlopt.data.images import bomb_guard, decode_rgb, is_image_file, read_bytes, resize_square
from tlopt.data.source import DataWarning
from tlopt.devices import pick_device
from tlopt.errors import BadImage, DataError, TloptError
from tlopt.models.backbones import TLOPT_CROP_MODE, TLOPT_CROP_PCT, TLOPT_INTERPOLATION
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict

log = logging.getLogger(__name__)

# Images decoded and run per round: bounds memory (1,024 images of 224 px are 154 MB).
CHUNK = 1024


@dataclass(frozen=True)
class Preprocess:
    """How an exported model's images are prepared: square side, mean and std."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, model: nn.Module, export_dir: Path | None = None) -> Preprocess:
        """The preprocessing in the model's ``pretrained_cfg``, as timm resolves it.

        tlopt trains on the shorter side resized bilinearly and the centre square cut
        (crop_pct 1.0, crop_mode center). An export written before tlopt saved that names its
        backbone's ImageNet settings instead; its ``manifest.json`` gives the size it trained at.
        """
        cfg = timm.data.resolve_model_data_config(model)
        size = int(cfg["input_size"][-1])
        ours = (
            cfg.get("interpolation") == TLOPT_INTERPOLATION
            and float(cfg.get("crop_pct") or 0.0) == TLOPT_CROP_PCT
            and (cfg.get("crop_mode") or "center") == TLOPT_CROP_MODE
            and int(cfg["input_size"][-2]) == size
        )
        if not ours:
            size = _manifest_size(export_dir, cfg)
        return cls(size, tuple(cfg["mean"]), tuple(cfg["std"]))

    def array(self, path: Path) -> np.ndarray:
        """One file as a ``(size, size, 3)`` uint8 array; raises BadImage when unreadable."""
        return resize_square(decode_rgb(read_bytes(path), str(path))[0], self.size)


def _manifest_size(export_dir: Path | None, cfg: dict[str, object]) -> int:
    places = [] if export_dir is None else [Path(export_dir), Path(export_dir).parent]
    manifest = next((p / "manifest.json" for p in places if (p / "manifest.json").is_file()), None)
    if manifest is None:
        raise TloptError(
            f"the model's preprocessing (interpolation {cfg.get('interpolation')}, crop_pct "
            f"{cfg.get('crop_pct')}, crop_mode {cfg.get('crop_mode')}) is not the one tlopt "
            "trains with: pass a folder written by 'tlopt export-best'"
        )
    size = int(json.loads(manifest.read_text())["image_size"])
    warnings.warn(
        f"'{export_dir}' was exported by an older tlopt that did not save its preprocessing: "
        f"using the size it trained at ({size} px, from manifest.json); export it again so "
        "that timm's loader reads it too",
        DataWarning,
        stacklevel=2,
    )
    return size


def image_files(path: Path) -> list[tuple[Path, str]]:
    """(file, name) of an image file, or of every image file under a folder (recursively).

    Names are POSIX paths relative to the folder (the path as given for a single file);
    hidden files and folders are left out, files are in name order.
    """
    if path.is_file():
        if not is_image_file(path):
            raise DataError(
                f"'{path}' is not an image file (.jpg, .png, ...): pass an image or a folder"
            )
        return [(path, str(path))]
    if not path.is_dir():
        raise DataError(f"'{path}' does not exist: pass --images with an image file or a folder")
    found = sorted(
        (p, p.relative_to(path).as_posix())
        for p in path.rglob("*")
        if is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.is_file()
    )
    if not found:
        raise DataError(f"no image files (.jpg, .png, ...) under '{path}': pass another folder")
    return found


@dataclass
class Outputs:
    """What the model gave for the readable files, in file order."""

    names: list[str]
    descriptors: np.ndarray
    logits: np.ndarray
    skipped: list[tuple[str, str]]
    device: str


def run_files(
    model: nn.Module,
    prep: Preprocess,
    files: Sequence[tuple[Path, str]],
    device: str | None = None,
    batch_size: int = 128,
) -> Outputs:
    """Descriptors and logits of every readable file; unreadable ones are warned and skipped."""
    if batch_size < 1:
        raise TloptError(f"--batch-size {batch_size}: use at least 1")
    target = pick_device(device)
    model.to(target)

    def decode(item: tuple[Path, str]) -> np.ndarray | BadImage:
        try:
            return prep.array(item[0])
        except BadImage as bad:
            return bad

    names: list[str] = []
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with bomb_guard(), ThreadPoolExecutor() as pool:
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            arrays = []
            for (_, name), got in zip(chunk, pool.map(decode, chunk), strict=True):
                if isinstance(got, BadImage):
                    warnings.warn(f"skipped {name}: {got.reason}", DataWarning, stacklevel=2)
                    skipped.append((name, got.reason))
                else:
                    arrays.append(got)
                    names.append(name)
            if arrays:
                images = ImageSet.from_arrays(
                    np.stack(arrays), np.zeros(len(arrays)), prep.mean, prep.std, target
                )
                f, lo = predict(model, images, batch_size)
                feats.append(f)
                logits.append(lo)
            if len(files) > CHUNK:
                log.info("%d of %d images", min(start + CHUNK, len(files)), len(files))
    if not names:
        raise DataError(
            f"none of the {len(files)} image files could be read (first: {skipped[0][0]}: "
            f"{skipped[0][1]}): pass readable images"
        )
    return Outputs(names, np.concatenate(feats), np.concatenate(logits), skipped, str(target))
