"""``tlopt worker --gpus ... --per-gpu auto``: as many trial processes per GPU as its memory holds.

Small batches leave a GPU mostly idle, and several trial processes share it well (the
performance issue's figures: 8 processes at bs 8 give 2.5x one process's throughput). How
many fit depends on the model, the image size, the batch sizes and the data, so the
supervisor measures it: a probe process on each GPU builds the study's model, puts the data
and the frozen-prefix cache on the GPU, and trains one epoch at the largest batch size of the
search space; its peak memory, plus the CUDA context, is one trial's need.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from tlopt.errors import TloptError

log = logging.getLogger("tlopt.worker")
# Memory a CUDA context takes outside PyTorch's allocator (kernels, cuBLAS/cuDNN workspaces).
CONTEXT_BYTES = 600 * 2**20
HEADROOM = 0.9  # leave 10% of the free memory: fragmentation, the driver, other users
MAX_PER_GPU = 8


def per_gpu_from_memory(free_bytes: int, need_bytes: int, cap: int = MAX_PER_GPU) -> int:
    """Trial processes one GPU holds: 90% of its free memory over one trial's need, 1 to cap.

    Example:
        >>> per_gpu_from_memory(free_bytes=80 * 2**30, need_bytes=6 * 2**30)
        8
        >>> per_gpu_from_memory(free_bytes=24 * 2**30, need_bytes=6 * 2**30)
        3
    """
    if need_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * HEADROOM // need_bytes)))


def probe(study_name: str, storage_url: str | None = None) -> dict[str, int]:
    """In a process pinned to one GPU: its free memory and one trial's peak need (bytes)."""
    import torch

    from tlopt.train.trainer import TrainParams, fit
    from tlopt.tune.context import StudyContext
    from tlopt.tune.study import load

    if not torch.cuda.is_available():
        raise TloptError("--per-gpu auto needs a CUDA device; pass --per-gpu N")
    torch.cuda.init()
    free, _total = torch.cuda.mem_get_info()
    ctx = StudyContext.open(load(study_name, storage_url), "cuda")
    space = ctx.space
    model = ctx.build_model(float(space.dropout[0]))
    params = TrainParams(batch_size=max(space.batch_size), epochs=1, flip=any(space.flip))
    fit(model, ctx.split("train"), ctx.split("val"), params, cache=ctx.prefix_cache)
    torch.cuda.synchronize()
    need = torch.cuda.max_memory_reserved() + CONTEXT_BYTES
    return {"free": int(free) + CONTEXT_BYTES, "need": int(need)}


def auto_per_gpu(study_name: str, storage_url: str, gpu: str) -> int:
    """Run ``probe`` in a child pinned to ``gpu`` (CUDA_VISIBLE_DEVICES) and size its slots."""
    # The URL travels in the environment, not argv: `ps` would show its password.
    code = (
        "import json, sys; from tlopt.tune.placement import probe; "
        "print(json.dumps(probe(sys.argv[1])))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "TLOPT_STORAGE": storage_url}
    done = subprocess.run(
        [sys.executable, "-c", code, study_name], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TloptError(
            f"--per-gpu auto: the memory probe on GPU {gpu} failed ({last[:200]}); "
            "pass --per-gpu N instead"
        )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    count = per_gpu_from_memory(figures["free"], figures["need"])
    log.info(
        "GPU %s: %.1f GiB free, a trial needs %.1f GiB: %d trial processes",
        gpu,
        figures["free"] / 2**30,
        figures["need"] / 2**30,
        count,
    )
    return count
