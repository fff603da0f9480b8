"""Exact search by matmul must return what faiss's own exhaustive search returns."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from diffgap.index.faiss_sync import write_faiss_atomic
from diffgap.index.vectors import FlatView, is_flat, new_faiss_index


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n,k,block", [(1000, 10, 1 << 18), (1000, 7, 64), (5, 10, 2), (0, 3, 8)])
def test_matches_faiss(n: int, k: int, block: int) -> None:
    rng = np.random.default_rng(n + k)
    index = new_faiss_index(32, "Flat")
    xb = unit(rng, n, 32)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)  # sparse ids, as after removals
    if n:
        index.add_with_ids(xb, ids)
    xq = unit(rng, 9, 32)
    want_s, want_i = index.search(xq, k)
    got_s, got_i = FlatView(index).search(xq, k, block=block)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s[got_i >= 0], want_s[want_i >= 0], rtol=1e-5, atol=1e-6)
    assert (got_i[:, min(n, k) :] == -1).all()


def test_memory_mapped_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    index = new_faiss_index(16, "Flat")
    index.add_with_ids(unit(rng, 500, 16), np.arange(500, dtype=np.int64) * 3)
    write_faiss_atomic(index, tmp_path / "index.faiss")
    mapped = faiss.read_index(str(tmp_path / "index.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    xq = unit(rng, 4, 16)
    np.testing.assert_array_equal(FlatView(mapped).search(xq, 5)[1], index.search(xq, 5)[1])


def test_only_flat_inner_product_is_routed() -> None:
    assert is_flat(new_faiss_index(8, "Flat"))
    assert not is_flat(new_faiss_index(8, "HNSW8"))
