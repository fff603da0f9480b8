"""Bring an index directory's FAISS file (derived state) in line with its SQLite catalogue (the truth).

`sync_faiss` adds missing ids, removes stale ones, or rebuilds (a corrupt file, duplicate ids, an
index type that cannot remove), trains approximate index types on a sample of the vectors, and
replaces the files atomically: for Flat indexes the aligned vectors.npy + ids.npy first (a reader
trusts them only when their ids match index.faiss), then index.faiss, then the manifest's counts.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from diffgap.atomic import atomic_write
from diffgap.index.layout import FAISS_FILE, IDS_FILE, MANIFEST, VECTORS_FILE, IndexStoreError
from diffgap.index.store import IndexStore
from diffgap.index.vectors import FlatView, VectorIndex, is_flat, new_faiss_index, read_faiss

TRAINING_SAMPLE = 100_000  # vectors an IVF/PQ index is trained on


def write_faiss_atomic(index: faiss.Index, path) -> None:  # noqa: ANN001 - str or Path
    atomic_write(path, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))


def save_npy_atomic(array: np.ndarray, path) -> None:  # noqa: ANN001 - str or Path
    # .npy pads its header, so the data starts 64-byte aligned: what memory-mapped BLAS needs
    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array)))


def sync_faiss(store: IndexStore) -> dict[str, int]:
    """Make index.faiss hold exactly the items in SQLite, then write it atomically."""
    assert not store.readonly, "read-only store"
    path = store.root / FAISS_FILE
    try:
        index = read_faiss(path) if path.exists() else new_faiss_index(store.manifest.dim, store.manifest.index_type)
        have = VectorIndex(index).ids()
    except IndexStoreError:
        index, have = None, None  # a corrupt file is rebuilt from SQLite
    want = store.item_ids()
    if index is None or have is None or not index.is_trained or len(np.unique(have)) != len(have):
        index, added, removed = _rebuild(store, want), len(want), 0
    else:
        stale = np.setdiff1d(have, want)
        missing = np.setdiff1d(want, have)
        removed = len(stale)
        if len(stale):
            try:
                index.remove_ids(faiss.IDSelectorBatch(stale))
            except RuntimeError:  # HNSW and friends cannot remove: rebuild instead
                index = _rebuild(store, want)
                missing = np.zeros(0, np.int64)
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
    store.use_vectors(VectorIndex(index, flat))
    store.manifest.counts = store.counts()
    store.manifest.updated_at = time.time()
    store.manifest.save(store.root / MANIFEST)
    return {"added": added, "removed": removed, "total": int(index.ntotal)}


def _rebuild(store: IndexStore, ids: np.ndarray) -> faiss.Index:
    index = new_faiss_index(store.manifest.dim, store.manifest.index_type)
    if not index.is_trained:
        index.train(training_sample(store, ids))
    for xids, xb in store.iter_vectors(ids=ids):
        index.add_with_ids(xb, xids)
    return index


def training_sample(store: IndexStore, ids: np.ndarray, max_n: int = TRAINING_SAMPLE, seed: int = 0) -> np.ndarray:
    assert len(ids) > 0, f"index type {store.manifest.index_type} needs training vectors, and there are none"
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ids, size=min(max_n, len(ids)), replace=False))
    return store.vectors(sample)[1]
