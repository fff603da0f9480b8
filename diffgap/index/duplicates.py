"""Duplicates in an index: exact ones (the same bytes, by content hash) and near ones (files whose
sound is almost the same: the cosine of their mean window vectors above a threshold)."""

from __future__ import annotations

import numpy as np

from diffgap.index.store import IndexStore

NEAR_THRESHOLD = 0.98


def file_vectors(store: IndexStore) -> tuple[list[str], np.ndarray]:
    """Each indexed file and the normalised mean of its window vectors, (F, d)."""
    paths, means = [], []
    for path, ids in sorted(store.item_ids_of(p for p, (_, status) in store.file_state().items()
                                              if status == "indexed").items()):  # fmt: skip
        _, xb = store.vectors(np.asarray(ids, dtype=np.int64))
        mean = xb.mean(axis=0)
        paths.append(path)
        means.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return paths, np.asarray(means, dtype=np.float32).reshape(len(paths), store.manifest.dim)


def near_groups(store: IndexStore, threshold: float = NEAR_THRESHOLD, block: int = 4096) -> list[list[str]]:
    """Groups (two or more files) linked by a cosine of at least `threshold`, transitively; exact
    duplicates fall in them too. Blocks of rows keep the similarity matrix small."""
    assert 0.0 < threshold <= 1.0, f"threshold {threshold} outside (0, 1]"
    paths, xb = file_vectors(store)
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(paths), block):
        sims = xb[start : start + block] @ xb.T  # (B, F)
        rows, cols = np.nonzero(sims >= threshold - 1e-6)
        for r, c in zip(rows + start, cols, strict=True):
            if r < c:
                parent[root(int(r))] = root(int(c))
    groups: dict[int, list[str]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(root(i), []).append(path)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g))
