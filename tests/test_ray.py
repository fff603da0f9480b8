"""The Ray indexing path, on a local Ray instance: same items and vectors as the local indexer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # a local Ray instance takes ~20 s to start


def rows(index: Path) -> dict[tuple[str, float], np.ndarray]:
    db = sqlite3.connect(index / "meta.sqlite")
    out = {(p, s): np.frombuffer(v, "<f4") for p, s, v in db.execute("SELECT path, start, vector FROM items")}
    db.close()
    return out


def test_ray_build_matches_local_build(mixed_corpus: Path, tiny_clap: Path, tmp_path: Path) -> None:
    spec = f"clap:{tiny_clap}"
    assert main(["-q", "build", str(mixed_corpus), "-o", str(tmp_path / "local"), "--encoder", spec]) == 0
    try:
        rc = main(["-q", "build", str(mixed_corpus), "-o", str(tmp_path / "ray"), "--encoder", spec,
                   "--index-type", "IVF4,Flat", "--ray", "local", "-j", "2"])  # fmt: skip
    finally:
        ray.shutdown()
    assert rc == 0
    local, distributed = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert local.keys() == distributed.keys() and len(local) > 5
    for key, vector in local.items():
        np.testing.assert_allclose(distributed[key], vector, atol=1e-5)
    db = sqlite3.connect(tmp_path / "ray" / "meta.sqlite")
    skipped = dict(db.execute("SELECT path, status FROM files WHERE status = 'skipped'").fetchall())
    assert "corrupt.wav" in skipped  # reported, not crashed
    assert list((tmp_path / "ray" / "shards").glob("*.parquet")), "embedding shards are kept"
    assert main(["-q", "verify", str(tmp_path / "ray")]) == 0
    # the IVF index was trained on a sample and filled from the shards: a search finds each item itself
    from diffgap.index.store import IndexStore

    with IndexStore.open(tmp_path / "ray", readonly=True) as store:
        ids, xb = store.vectors()
        _, found = store.search(xb, 1)
        assert (found[:, 0] == ids).mean() > 0.9
