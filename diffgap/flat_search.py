"""Exact inner-product search as one BLAS matmul + top-k, over the vectors of a FAISS Flat index.

Measured on 2 cores (BENCHMARKS.md, "Exact search"): faiss-cpu's IndexFlatIP.search is slower than
numpy's `xq @ xb.T` + top-k over the same vectors - for a batch of queries by 4-9x (its blocked
BLAS + heap reduction makes more passes than one GEMM), and for one query on 2 OpenMP threads too
(it parallelises over queries, so one query gets one thread plus the fork/join cost). So Flat
indexes are searched here, on zero-copy views of the FAISS arrays (a memory-mapped index stays
memory-mapped); faiss still owns the file format, adds and removals.

FAISS's file puts the vectors at an offset that is not a multiple of 4 bytes, and BLAS on a
misaligned array falls back to a loop ~50x slower, so the index store also writes them as an
aligned `vectors.npy` (+ `ids.npy`) that the service memory-maps (`FlatView.from_arrays`).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


class FlatView:
    """(ids, xb) views into an IndexIDMap2 over IndexFlat, or given arrays; `search` has faiss's signature."""

    @classmethod
    def from_arrays(cls, ids: np.ndarray, xb: np.ndarray) -> FlatView:
        assert ids.shape == (xb.shape[0],), f"{ids.shape[0]} ids for {xb.shape[0]} vectors"
        view = cls.__new__(cls)
        view._index, view.ids, view.xb, view.ntotal = None, ids, xb, int(xb.shape[0])
        return view

    def __init__(self, index: faiss.Index) -> None:
        inner = faiss.downcast_index(index.index)
        assert isinstance(inner, faiss.IndexFlat), f"not a Flat index: {type(inner).__name__}"
        assert inner.metric_type == faiss.METRIC_INNER_PRODUCT, "only inner-product Flat indexes"
        self._index = index  # the views below point into its memory: it must outlive them
        n, d = int(inner.ntotal), int(inner.d)
        self.ntotal = n
        # rev_swig_ptr wraps the index's own buffer: no copy, and mmap'd pages load on demand
        self.xb = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
        self.ids = faiss.vector_to_array(index.id_map).astype(np.int64) if n else np.zeros(0, np.int64)

    def search(self, xq: np.ndarray, k: int, block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q, k), ids (Q, k)); ids -1 and scores -inf past the end, as faiss does."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nq = xq.shape[0]
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        if self.ntotal == 0 or nq == 0:
            return scores, ids
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        with torch.inference_mode():
            for start in range(0, self.ntotal, block):  # blocks bound the (Q, block) score matrix
                # numpy's BLAS: 2-3x faster than this torch build's for these shapes (BENCHMARKS.md)
                sims = torch.from_numpy(xq @ self.xb[start : start + block].T)  # (Q, B)
                top = min(k, sims.shape[1])
                s, i = torch.topk(sims, top, dim=1)  # (Q, top)
                i = i + start
                if best_s is None:
                    best_s, best_i = s, i
                else:
                    merged_s = torch.cat([best_s, s], dim=1)
                    merged_i = torch.cat([best_i, i], dim=1)
                    keep = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1).indices
                    best_s, best_i = merged_s.gather(1, keep), merged_i.gather(1, keep)
        assert best_s is not None and best_i is not None
        found = best_s.shape[1]
        scores[:, :found] = best_s.numpy()
        ids[:, :found] = self.ids[best_i.numpy()]
        return scores, ids


def is_flat(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT
