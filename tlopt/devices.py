"""Which device a command runs on: ``--device`` checked in one place, for every command."""

from __future__ import annotations

import gc
import os
import traceback

import torch

from tlopt.errors import TloptError


def check_device(device: str | None) -> str | None:
    """``--device`` as torch names it ("gpu" is "cuda"), or a one-line TloptError.

    Example:
        >>> check_device("cpu"), check_device(None), check_device("auto")
        ('cpu', None, 'auto')
    """
    if device in (None, "", "auto"):
        return device
    assert device is not None
    name = device.strip().lower()
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise TloptError(
            f"--device {device}: unknown device; use cpu, cuda, cuda:N or auto"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise TloptError(
                f"--device {device}: no CUDA device is visible{where}; use --device cpu, or "
                "--device auto to take a GPU when there is one"
            )
        if parsed.index is not None and parsed.index >= count:
            raise TloptError(
                f"--device {device}: only {count} CUDA devices are visible; use cuda:0.."
                f"cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise TloptError(f"--device {device}: MPS is not available here; use --device cpu")
    return name


def pick_device(device: str | None = None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; a named device is checked
    (:func:`check_device`: one line, exit 2, for "gpu" without one)."""
    name = check_device(device)
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def free_after(exc: BaseException) -> None:
    """Give back the device memory a failed step held (after a CUDA out-of-memory error).

    The exception's traceback holds the frames of the step that failed, and they hold its
    tensors: while it lives, ``empty_cache`` frees nothing, and the next trial (or a sibling
    process on the same GPU) runs out too. So the frames are cleared and the tracebacks of
    ``exc`` and of the exceptions chained to it dropped, then garbage is collected (frames
    sit in reference cycles) before the cache is emptied.
    """
    chain, seen = [exc], set()
    while chain:
        current = chain.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)  # skips frames still running
            current.__traceback__ = None
        chain += [e for e in (current.__cause__, current.__context__) if e is not None]
    gc.collect()
    torch.cuda.empty_cache()
