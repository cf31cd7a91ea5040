"""Placement: worker processes per GPU or CPU slot, their threads and devices; restarts.

The supervisor numbers its worker processes (``TLOPT_WORKER_SLOT``), pins each to its GPU with
``CUDA_VISIBLE_DEVICES``, gives each its share of the CPU cores, restarts a slot whose process
dies and passes SIGINT/SIGTERM on to all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

import psutil

from tlopt.errors import TloptError
from tlopt.tune.sampling import RESTARTS_ENV, SLOT_ENV, worker_slot
from tlopt.tune.storage import resolve_url
from tlopt.tune.study import load

log = logging.getLogger("tlopt.worker")


def omp_threads(env: Mapping[str, str]) -> int | None:
    """The thread count ``$OMP_NUM_THREADS`` asks for (its first level), if it is valid."""
    first = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


# A worker on the CPU runs one torch thread per core that is idle when it starts (at least
# one) unless told otherwise (--threads, OMP_NUM_THREADS). Timed on a 2-core machine shared
# with other jobs (README, CPU threads), 1 thread against torch's default of 2 ran the head
# trials' epochs, a freeze1 epoch and the frozen-feature pass 2-4x faster (medians): OpenMP's
# threads wait for each other at every operation, and on cores other processes use, each wait
# can cost a time slice. A core is counted busy by what ran on it over the last fraction of a
# second (busy_cores; only the cores this process may use), so a busy machine gets one thread
# and an idle one keeps torch's pool of every core. On a GPU the host threads barely matter
# and torch's default stays.
BUSY_SAMPLE_S = 0.6

# The fields of psutil's CPU times that count as busy (user, nice, system, interrupts), and
# all of them (with idle, I/O wait and steal); those a platform lacks count as 0.
_BUSY = ("user", "nice", "system", "irq", "softirq")
_ALL = (*_BUSY, "idle", "iowait", "steal")


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity (as a container's cpuset or ``taskset``
    sets it) where the system tells it (psutil: Linux, Windows, FreeBSD), else every CPU."""
    try:
        cpus = sorted(psutil.Process().cpu_affinity() or [])
    except (AttributeError, psutil.Error, OSError):  # macOS has no affinity
        cpus = []
    return cpus or list(range(psutil.cpu_count() or 1))


def busy_cores(seconds: float = BUSY_SAMPLE_S, slices: int = 3) -> float | None:
    """The cores other processes keep busy now, of those this process may use
    (:func:`allowed_cpus`): their CPU time less this process's own, in the least busy of
    ``slices`` parts of ``seconds``; None where the CPU times cannot be read.

    Only the allowed CPUs count: in a container pinned to 2 cores of a busy 64-core host, the
    host's other cores say nothing about the 2 this worker's threads run on.
    Not the 1-minute load average: it lags by minutes, so right after another run ends it
    still counts that run's cores as busy (a run started then got one thread of two). The
    least busy slice, not the mean: the kernel's work right after a large process exits
    (freeing its memory, writing its files) lasts a moment, another training job does not.
    Time a hypervisor gives other machines (steal) is not counted: it slows every thread.
    """

    def times() -> tuple[float, float, float, float]:  # busy, all CPU s; own CPU s, wall s
        mine = [t for i, t in enumerate(psutil.cpu_times(percpu=True)) if i in cpus]
        busy = sum(sum(getattr(t, f, 0.0) for f in _BUSY) for t in mine)
        ticks = sum(sum(getattr(t, f, 0.0) for f in _ALL) for t in mine)
        return busy, ticks, time.process_time(), time.monotonic()

    readings = []
    try:
        cpus = set(allowed_cpus())
        if max(cpus) >= len(psutil.cpu_times(percpu=True)):
            # psutil lists the online CPUs in order: with some offline, ids and places differ.
            cpus = set(range(len(psutil.cpu_times(percpu=True))))
        before = times()
        for _ in range(max(1, slices)):
            time.sleep(seconds / max(1, slices))
            after = times()
            busy, ticks, own, wall = (a - b for a, b in zip(after, before, strict=True))
            cores = len(cpus) * busy / ticks if ticks > 0 else 0.0
            readings.append(max(0.0, cores - own / max(wall, 1e-6)))
            before = after
    except (psutil.Error, OSError, ValueError, IndexError):
        return None
    return min(readings)


def idle_cores(cores: int, load: float) -> int:
    """The cores not busy with other work (``load``: busy cores, see :func:`busy_cores`), at
    least one.

    Example:
        >>> idle_cores(2, 4.7), idle_cores(2, 0.1), idle_cores(16, 3.6)
        (1, 2, 12)
    """
    return max(1, min(cores, int(cores - load + 0.5)))


def worker_threads(threads: int | None, env: Mapping[str, str], device_type: str) -> int | None:
    """Torch's CPU threads in a worker: ``--threads``, else ``$OMP_NUM_THREADS``, else the
    cores idle now on the CPU (:func:`idle_cores`; None on a GPU: torch's own default).
    """
    if threads or omp_threads(env):
        return threads or omp_threads(env)
    if device_type != "cpu":
        return None
    load = busy_cores()
    if load is None:  # the CPU times were not readable: the 1-minute load average
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = available_cores()
    idle = idle_cores(cores, load)
    if idle < cores:  # say why: a user may expect every core
        log.info(
            "%.1f of %d CPU cores busy with other work: %d torch thread(s) (--threads sets it)",
            load,
            cores,
            idle,
        )
    return idle


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as a cgroup cpuset sets it)."""
    return len(allowed_cpus())


def slot_threads(slots: int, threads: int | None, env: Mapping[str, str], cores: int) -> int:
    """CPU threads per worker process: ``--threads``, else ``$OMP_NUM_THREADS``, else a share.

    As torchrun does, each of ``slots`` processes gets ``cores // slots`` threads (at least
    one): each with torch's default pool of every core, N processes on N cores ran one epoch
    ten times slower than one process alone.

    Example:
        >>> slot_threads(3, None, {}, cores=16), slot_threads(4, None, {"OMP_NUM_THREADS": "2"}, 4)
        (5, 2)
    """
    return threads or omp_threads(env) or max(1, cores // max(slots, 1))


def slot_env(
    env: Mapping[str, str],
    url: str,
    gpu: str | None,
    slot: int,
    restarts: int,
    threads: int,
) -> dict[str, str]:
    """The environment of one worker process started by the supervisor.

    The storage URL travels here, not in argv: ``ps`` would show its password.
    """
    return {
        **env,
        "TLOPT_STORAGE": url,
        "CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "",
        SLOT_ENV: str(slot),
        RESTARTS_ENV: str(restarts),
        "OMP_NUM_THREADS": str(threads),
    }


def parse_gpus(gpus: str | None) -> list[str]:
    """``"0,1"`` -> ["0", "1"]; ``"all"`` -> every visible CUDA device; None/"" -> []."""
    if not gpus or gpus == "none":
        return []
    if gpus == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise TloptError(
                "--gpus all: no CUDA device is visible; leave out --gpus to use the CPU"
            )
        return [str(i) for i in range(count)]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not all(g.isdigit() for g in ids):
        raise TloptError(f"--gpus '{gpus}' is not a comma-separated list of GPU ids (e.g. 0,1)")
    return ids


def slot_devices(
    gpus: list[str], per_gpu: int, processes: int, visible: str = ""
) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker slot (None: a CPU slot).

    GPU ids are indices into the devices this process sees, as torch numbers them; under a
    scheduler that already set ``CUDA_VISIBLE_DEVICES`` (Slurm: "2,3"), index 0 is device "2".

    Example:
        >>> slot_devices(["0", "1"], per_gpu=2, processes=1, visible="2,3")
        ['2', '2', '3', '3']
    """
    if not gpus:
        return [None] * processes
    devices = [v.strip() for v in visible.split(",") if v.strip()]
    slots: list[str | None] = []
    for gpu in gpus:
        if devices and int(gpu) >= len(devices):
            raise TloptError(
                f"--gpus {gpu}: only {len(devices)} GPUs are visible (CUDA_VISIBLE_DEVICES="
                f"{visible}); use ids 0..{len(devices) - 1}"
            )
        slots += [devices[int(gpu)] if devices else gpu] * per_gpu
    return slots


def supervise(
    study_name: str,
    storage_url: str | None,
    n_trials: int | None,
    timeout: float | None,
    gpus: list[str],
    per_gpu: int = 1,
    processes: int = 1,
    heads_at_once: int = 1,
    compile: bool = False,
    max_restarts: int = 3,
    threads: int | None = None,
) -> int:
    """Run one worker process per slot (``per_gpu`` per GPU, or ``processes`` on the CPU).

    ``per_gpu=0`` sizes each GPU's slots from its memory (``--per-gpu auto``, see placement).
    Each slot is pinned with ``CUDA_VISIBLE_DEVICES``, gets its share of the CPU cores
    (``slot_threads``) and its number (``slot_env``), and opens its own storage connection.
    A slot whose process dies is restarted (up to ``max_restarts`` times) with its number;
    SIGINT/SIGTERM are passed to every slot, which fail and re-queue their running trials
    before exiting.
    """
    url = resolve_url(storage_url)
    load(study_name, url)  # fail fast, in one line, on a wrong name or storage
    slots = slot_devices(
        gpus, max(per_gpu, 1), processes, os.environ.get("CUDA_VISIBLE_DEVICES", "")
    )
    if gpus and per_gpu == 0:
        from tlopt.tune.placement import auto_per_gpu

        devices = list(dict.fromkeys(slots))
        slots = [d for d in devices for _ in range(auto_per_gpu(study_name, url, str(d)))]
    first = worker_slot()
    per_slot = slot_threads(len(slots), threads, os.environ, available_cores())
    log.info("%d worker processes with %d CPU threads each", len(slots), per_slot)
    base = [sys.executable, "-m", "tlopt", "worker", "--study", study_name]
    if n_trials:
        base += ["--n-trials", str(n_trials)]
    if timeout:
        base += ["--timeout", str(timeout)]
    base += ["--heads-at-once", str(heads_at_once)] + (["--compile"] if compile else [])

    restarts = [0] * len(slots)

    def start(i: int) -> subprocess.Popen[bytes]:
        gpu = slots[i]
        env = slot_env(os.environ, url, gpu, first + i, restarts[i], per_slot)
        return subprocess.Popen(base + ["--device", "cpu" if gpu is None else "cuda"], env=env)

    procs = [start(i) for i in range(len(slots))]
    stopping = False

    from tlopt.tune.worker import STOP  # worker imports this module

    STOP.clear()

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        STOP.set()  # the caller (tlopt tune) stops after this stage too
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or code in (0, 2) or stopping:
                    continue
                if restarts[i] < max_restarts:
                    restarts[i] += 1
                    log.warning("slot %d (gpu %s) died with %d; restarting", i, slots[i], code)
                    procs[i] = start(i)
        for p in procs:
            code = p.returncode or 0
            worst = max(worst, 2 if code == 2 else (1 if code else 0))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return worst
