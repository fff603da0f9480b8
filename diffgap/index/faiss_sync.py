"""Bring an index directory's FAISS file (derived state) in line with its SQLite catalogue (the truth).

`sync_faiss` adds missing ids, removes stale ones, or rebuilds (a corrupt file, duplicate ids, an
index type that cannot remove, an `auto` index that outgrew Flat), trains approximate index types on
a sample of the vectors, measures an approximate index's recall and picks its search effort
(`diffgap/index/ann.py`), and replaces the files atomically: for Flat indexes the aligned
vectors.npy + ids.npy first (a reader trusts them only when their ids match index.faiss), then
index.faiss, then the manifest's counts.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from diffgap.atomic import atomic_write
from diffgap.index.ann import SearchTuning, held_out_count, resolve_index_type, tune_effort
from diffgap.index.layout import FAISS_FILE, IDS_FILE, MANIFEST, VECTORS_FILE, IndexStoreError
from diffgap.index.store import IndexStore
from diffgap.index.vectors import FlatView, VectorIndex, effort_knob, is_flat, new_faiss_index, read_faiss

TRAINING_SAMPLE = 100_000  # vectors an IVF/PQ index is trained on


def write_faiss_atomic(index: faiss.Index, path) -> None:  # noqa: ANN001 - str or Path
    atomic_write(path, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))


def save_npy_atomic(array: np.ndarray, path) -> None:  # noqa: ANN001 - str or Path
    # .npy pads its header, so the data starts 64-byte aligned: what memory-mapped BLAS needs
    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array)))


def sync_faiss(store: IndexStore) -> dict[str, int]:
    """Make index.faiss hold exactly the items in SQLite, then write it atomically."""
    assert not store.readonly, "read-only store"
    m = store.manifest
    path = store.root / FAISS_FILE
    want = store.item_ids()
    target = resolve_index_type(m.index_type, len(want), m.dim)
    try:
        index = read_faiss(path) if path.exists() else new_faiss_index(m.dim, m.current_type)
        have = VectorIndex(index).ids()
    except IndexStoreError:
        index, have = None, None  # a corrupt file is rebuilt from SQLite
    if (
        index is None
        or have is None
        or target != m.current_type
        or not index.is_trained
        or len(np.unique(have)) != len(have)
        or len(np.setdiff1d(want, have)) > len(have)  # more new than old (a first fill): build in one go
    ):
        (index, tuning), added, removed = _rebuild(store, want, target), len(want), 0
    else:
        tuning = SearchTuning.from_dict(m.tuning)
        stale = np.setdiff1d(have, want)
        missing = np.setdiff1d(want, have)
        removed = len(stale)
        if len(stale):
            try:
                index.remove_ids(faiss.IDSelectorBatch(stale))
            except RuntimeError:  # HNSW and friends cannot remove: rebuild instead
                index, tuning = _rebuild(store, want, target)
                missing = np.zeros(0, np.int64)
        if effort_knob(index) and len(missing) >= held_out_count(len(want)) > 0:
            # enough new vectors to measure with again: they are not in the index yet
            tuning = _tune(store, index, queries=missing, indexed=np.setdiff1d(want, missing))
        for xids, xb in store.iter_vectors(ids=missing):
            index.add_with_ids(xb, xids)
        added = len(missing)
    assert index.ntotal == len(want), f"faiss has {index.ntotal} vectors, SQLite {len(want)} items"
    flat = None
    if is_flat(index):
        flat = FlatView(index)
        save_npy_atomic(flat.xb, store.root / VECTORS_FILE)
        save_npy_atomic(flat.ids, store.root / IDS_FILE)
    else:
        for stale_file in (VECTORS_FILE, IDS_FILE):
            (store.root / stale_file).unlink(missing_ok=True)
    write_faiss_atomic(index, path)
    store.use_vectors(VectorIndex(index, flat, tuning.effort if tuning else None))
    m.faiss_type = target
    m.tuning = tuning.to_dict() if tuning else {}
    m.counts = store.counts()
    m.updated_at = time.time()
    m.save(store.root / MANIFEST)
    return {"added": added, "removed": removed, "total": int(index.ntotal)}


def _tune(store: IndexStore, index: faiss.Index, queries: np.ndarray, indexed: np.ndarray) -> SearchTuning | None:
    """Measure `index` (holding exactly `indexed`) with a sample of `queries` (vectors not in it)."""
    size = min(len(queries), held_out_count(len(queries) + len(indexed)))
    sample = np.random.default_rng(0).choice(queries, size=size, replace=False)
    xq = store.vectors(np.sort(sample))[1]
    return tune_effort(index, xq, store.iter_vectors(ids=indexed))


def _rebuild(store: IndexStore, ids: np.ndarray, index_type: str) -> tuple[faiss.Index, SearchTuning | None]:
    """A new index of `index_type` over `ids`; an approximate one is measured on a held-out sample
    (`diffgap/index/ann.py`) before that sample is added."""
    index = new_faiss_index(store.manifest.dim, index_type)
    if not index.is_trained:
        index.train(training_sample(store, ids))
    held = np.zeros(0, np.int64)
    if effort_knob(index) and held_out_count(len(ids)):
        held = np.sort(np.random.default_rng(0).choice(ids, size=held_out_count(len(ids)), replace=False))
    rest = np.setdiff1d(ids, held)
    for xids, xb in store.iter_vectors(ids=rest):
        index.add_with_ids(xb, xids)
    tuning = _tune(store, index, queries=held, indexed=rest) if len(held) else None
    for xids, xb in store.iter_vectors(ids=held):
        index.add_with_ids(xb, xids)
    return index, tuning


def training_sample(store: IndexStore, ids: np.ndarray, max_n: int = TRAINING_SAMPLE, seed: int = 0) -> np.ndarray:
    assert len(ids) > 0, f"index type {store.manifest.index_type} needs training vectors, and there are none"
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ids, size=min(max_n, len(ids)), replace=False))
    return store.vectors(sample)[1]
