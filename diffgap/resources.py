"""How many CPUs this process may really use (affinity and container CPU quotas included), and
how its thread pools are sized.

`os.cpu_count()` reports the host's cores; inside a container limited to 2 CPUs, torch and FAISS
would start one thread per host core and thrash. Both faces size their thread pools from this.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, or v1 cfs files), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """min(affinity, cgroup quota rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def busy_cpus(sample_s: float = 0.2, proc_stat: Path = Path("/proc/stat")) -> float | None:
    """CPUs that other work keeps busy right now: the non-idle share of this process's CPUs (its
    affinity) over `sample_s`, while this process sleeps, times their count. None where /proc/stat
    cannot be read (not Linux) or did not advance.

    Why not the load average: it trails by minutes. `make demo` on a fresh clone starts training
    right after pip has spent a minute on both cores; the 1-minute load average still said 1.3, the
    demo trained on one thread of an idle machine (encoders 127 s instead of ~70). It also counts
    this process's own earlier steps as someone else's."""

    def snapshot() -> tuple[int, int]:
        total = idle = 0
        for line in proc_stat.read_text().splitlines():
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in mine:
                continue
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            idle += ticks[3] + ticks[4]
        return total, idle

    try:
        mine = os.sched_getaffinity(0)
        total0, idle0 = snapshot()
        time.sleep(sample_s)
        total1, idle1 = snapshot()
    except (AttributeError, OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    return len(mine) * (1.0 - (idle1 - idle0) / (total1 - total0))


def free_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), sample: bool = True) -> int:
    """CPUs not already busy: the available ones less what other work uses now (`busy_cpus`; the
    1-minute load average where that cannot be read, or without `sample`: a command that computes for
    a moment need not wait 0.2 s to learn it), at least 1. On a machine running another
    CPU-bound job, training threads that spin against it lose more than they gain (BENCHMARKS.md
    measured 1 thread finishing where the default did not), so 1 is the answer there."""
    cpus = available_cpus(cgroup_root)
    busy = busy_cpus() if sample else None
    if busy is not None:  # the affinity's busy share, scaled to what the quota lets this process use
        busy *= cpus / max(1, len(os.sched_getaffinity(0)))
    else:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return cpus
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def blas_threads_beside(torch_threads: int, cpus: int | None = None) -> int:
    """numpy's BLAS threads (exact search) beside a torch pool of `torch_threads`.

    Both pools spin-wait after each parallel region, so with torch running a pool, a BLAS call right
    after a torch call (search after encode, in every query) finds torch's threads still spinning on
    the same cores, and the reverse. Measured on 2 cores, full-size CLAP text encode (torch, 2
    threads) alternating with a 10k x 512 exact search: encode 40 -> 89 ms and search 0.2 -> 3.9 ms
    with BLAS at 2 threads; 46 and 0.9 ms with BLAS at 1. With torch on one thread there is no pool
    to spin against, and BLAS on both cores searched 100k x 256 in 3.1 ms instead of 4.6 between
    the compact encoder's calls (BENCHMARKS.md, "Two thread pools on two cores").
    """
    return 1 if torch_threads > 1 else (cpus or available_cpus())


def set_compute_threads(threads: int, blas_threads: int | None = None, cpus: int | None = None) -> None:
    """torch's and FAISS's pools get `threads`; numpy's BLAS gets `blas_threads`, by default
    `blas_threads_beside(threads, cpus)`, `cpus` being this process's share (a server's worker gets
    the available CPUs divided by the workers). Hugging Face tokenizers' own pool is turned off unless
    TOKENIZERS_PARALLELISM is set: it would tokenize a batch on every core right before torch's pool
    encodes it on the same cores, the contention measured between torch and BLAS above. The service's
    CLAP throughput with and without the pool stayed within the noise of three sittings, so this rests
    on that contention, not on a measured gain (BENCHMARKS.md, "Batching the CLAP text tower")."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read by the tokenizers library at each batch
    torch.set_num_threads(max(1, threads))
    faiss.omp_set_num_threads(max(1, threads))
    blas = blas_threads if blas_threads is not None else blas_threads_beside(threads, cpus)
    threadpool_limits(limits=max(1, blas), user_api="blas")
