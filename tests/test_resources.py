"""Thread pools: torch and FAISS get the asked-for threads, numpy's BLAS one beside a torch pool."""

from __future__ import annotations

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
