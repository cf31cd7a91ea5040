"""Where a run's trials train: the worker flags of ``tlopt tune``, checked as ``tlopt worker``
checks them, and the CPU threads this process decides once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from tlopt.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    gpus: list[str] = field(default_factory=list)
    per_gpu: int = 1  # 0: fit the slots to each GPU's memory
    processes: int = 1
    heads_at_once: int = 8
    device: str | None = None
    threads: int | None = None  # torch's CPU threads here: the plan's and the workers' (tune)

    @property
    def plan_device(self) -> str | None:
        """The device the plan measures on: the first GPU of the workers', else the flag's."""
        return f"cuda:{self.gpus[0]}" if self.gpus else self.device


def placement(
    gpus: str | None, per_gpu: str, processes: int, heads_at_once: int, device: str | None
) -> Placement:
    from tlopt.devices import check_device
    from tlopt.tune.supervisor import parse_gpus

    device, ids = check_device(device), parse_gpus(gpus)
    slots = 0 if per_gpu == "auto" else int(per_gpu) if per_gpu.isdigit() else -1
    if slots < 0 or (slots == 0 and per_gpu != "auto"):
        raise ConfigError(f"--per-gpu {per_gpu}: give a number of processes (1, 2, ...) or 'auto'")
    if slots == 0 and not ids:
        raise ConfigError("--per-gpu auto sizes GPU slots: pass --gpus too (e.g. --gpus all)")
    if processes < 1 or heads_at_once < 1:
        raise ConfigError("--processes and --heads-at-once must be at least 1")
    if processes > 1 and not ids and device not in (None, "", "auto", "cpu"):
        raise ConfigError(f"--processes runs CPU workers; on a GPU: --gpus 0 --per-gpu {processes}")
    return Placement(ids, slots, processes, heads_at_once, device)


def threads_now(p: Placement) -> Placement:
    """Decide the CPU threads once, before the plan's work loads the machine: the plan
    measures at the count the workers then run at. Once decided, the count stands (a second
    call returns it).

    With ``--processes N`` on the CPU the plan is timed at the threads one of the N workers
    gets (the cores shared among them), so that its epoch costs are a worker's.
    """
    import torch

    from tlopt.devices import pick_device
    from tlopt.tune.supervisor import available_cores, slot_threads, worker_threads

    if p.gpus or p.threads:
        return p
    if p.processes > 1:  # what the supervisor gives each of its worker processes
        threads: int | None = slot_threads(p.processes, None, os.environ, available_cores())
    else:
        threads = worker_threads(None, os.environ, pick_device(p.device).type)
    if threads:
        torch.set_num_threads(threads)
    return replace(p, threads=threads)
