"""Thread pools: torch and FAISS get the asked-for threads, numpy's BLAS one beside a torch pool."""

from __future__ import annotations

import os

import faiss
import torch
from threadpoolctl import threadpool_info

from diffgap.resources import available_cpus, blas_threads_beside, set_compute_threads


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_blas_gets_one_thread_beside_a_torch_pool():
    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), _blas_threads())
    try:
        assert blas_threads_beside(2) == 1 and blas_threads_beside(1) == available_cpus()
        set_compute_threads(2)
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
        assert _blas_threads() == {1}
        set_compute_threads(1)
        assert torch.get_num_threads() == 1 and _blas_threads() == {available_cpus()}
        set_compute_threads(1, blas_threads=1)
        assert _blas_threads() == {1}
    finally:
        set_compute_threads(before[0], max(before[2]) if before[2] else None)
        faiss.omp_set_num_threads(before[1])


def test_tokenizers_pool_is_off_unless_the_user_chose(monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    before = (torch.get_num_threads(), faiss.omp_get_max_threads(), _blas_threads())
    try:
        set_compute_threads(1)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
        set_compute_threads(1)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # an explicit choice is kept
    finally:
        set_compute_threads(before[0], max(before[2]) if before[2] else None)
        faiss.omp_set_num_threads(before[1])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "dog": 1, "barks": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    encoded = tokenizer.encode_batch(["dog barks", "a dog"] * 50)  # a batch still encodes without the pool
    assert [e.ids for e in encoded[:2]] == [[1, 2], [0, 1]]


def test_busy_cpus_sees_a_spinning_process_at_once():
    """Another process spinning on one of this process's CPUs counts as one busy CPU within the
    sample, not a minute later as the load average would, and training gets one thread fewer."""
    import subprocess
    import sys
    import time

    from diffgap.resources import busy_cpus, free_cpus

    core = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]
    )
    try:
        time.sleep(0.3)  # the child is spinning on its core
        busy = busy_cpus(sample_s=0.5)
        assert busy is not None and 0.8 <= busy <= len(os.sched_getaffinity(0)) + 1e-6, busy
        if available_cpus() >= 2:
            assert free_cpus() <= available_cpus() - 1
    finally:
        spinner.kill()
        spinner.wait()
