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

`VectorIndex` is what a reader searches: the FAISS index of a directory, and for Flat indexes the
flat view chosen once when it is opened (not per query).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from diffgap.index.layout import FAISS_FILE, IDS_FILE, VECTORS_FILE, IndexStoreError


def new_faiss_index(dim: int, index_type: str) -> faiss.Index:
    """An empty IndexIDMap2 over `index_type` (a faiss factory string: Flat, HNSW32, IVF256,Flat, ...)."""
    base = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIDMap2(base)


MAX_EFFORT = 4096  # the most search effort a query may ask for: a bound on what one query can cost


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def effort_knob(index: faiss.Index) -> str | None:
    """The name of the search-effort setting of `index` (an IndexIDMap2 or a bare index), if it has one."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    if isinstance(inner, faiss.IndexIVF):
        return "nprobe"
    return None


def search_params(index: faiss.Index, effort: int | None) -> faiss.SearchParameters | None:
    """Per-call parameters for `index.search(..., params=)`: nothing is changed on the shared index,
    so concurrent queries may each ask for their own effort."""
    knob = effort_knob(index)
    if effort is None or knob is None:
        return None
    assert 1 <= effort <= MAX_EFFORT, f"search effort {effort} outside 1..{MAX_EFFORT}"
    if knob == "efSearch":
        return faiss.SearchParametersHNSW(efSearch=int(effort))
    return faiss.SearchParametersIVF(nprobe=int(min(effort, _inner(index).nlist)))


def read_faiss(path: Path, *, mmap: bool = False) -> faiss.Index:
    # IO_FLAG_MMAP_IFC maps a flat index's vectors (IO_FLAG_MMAP alone still reads them in)
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexStoreError(f"{path} is corrupt: {exc}") from exc


def faiss_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, np.int64)


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
        self.ids = faiss_ids(index)

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
    inner = _inner(index)
    return isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT


def open_flat_view(root: Path, index: faiss.Index) -> FlatView:
    """The aligned, memory-mapped vectors.npy when it matches index.faiss, else a view into FAISS."""
    view = FlatView(index)
    try:
        ids = np.load(root / IDS_FILE, mmap_mode="r")
        xb = np.load(root / VECTORS_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return view
    if xb.shape == view.xb.shape and xb.dtype == np.float32 and np.array_equal(ids, view.ids):
        return FlatView.from_arrays(np.asarray(ids), xb)
    return view  # stale (a writer died between the two files): FAISS is the truth


class VectorIndex:
    """The searchable vectors of one index directory, opened once."""

    def __init__(self, index: faiss.Index, flat: FlatView | None = None, default_effort: int | None = None) -> None:
        self.faiss = index
        self.flat = flat  # exact search by matmul when the index is Flat (see the module docstring)
        self.default_effort = default_effort  # an approximate index's tuned effort (diffgap/index/ann.py)

    @classmethod
    def open(
        cls, root: Path, dim: int, index_type: str, *, mmap: bool = False, default_effort: int | None = None
    ) -> VectorIndex:
        path = root / FAISS_FILE
        index = read_faiss(path, mmap=mmap) if path.exists() else new_faiss_index(dim, index_type)
        return cls(index, open_flat_view(root, index) if is_flat(index) else None, default_effort)

    @property
    def knob(self) -> str | None:
        """efSearch (HNSW), nprobe (IVF) or None (exact): what a query's search effort sets."""
        return effort_knob(self.faiss)

    @property
    def ntotal(self) -> int:
        return int(self.faiss.ntotal)

    def ids(self) -> np.ndarray:
        return faiss_ids(self.faiss)

    def search(self, xq: np.ndarray, k: int, effort: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row; ids are -1 where fewer than k items exist. `effort`
        (approximate indexes; exact ones ignore it) overrides the tuned default for this call."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        assert xq.ndim == 2 and xq.shape[1] == self.faiss.d, f"query shape {xq.shape}, dim {self.faiss.d}"
        if self.flat is not None:
            return self.flat.search(xq, k)
        return self.faiss.search(xq, k, params=search_params(self.faiss, effort or self.default_effort))
