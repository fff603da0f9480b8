"""`--index-type auto`: exact while small, HNSW above the size limit, search effort tuned to a
measured recall, and a per-query effort that overrides it without touching the shared index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from test_store import FP, _fill, _unit

from diffgap.index import ann
from diffgap.index.ann import EFFORTS, TARGET_RECALL, exact_neighbours, resolve_index_type, tune_effort
from diffgap.index.faiss_sync import sync_faiss
from diffgap.index.layout import IDS_FILE, VECTORS_FILE
from diffgap.index.store import IndexStore
from diffgap.index.vectors import effort_knob, new_faiss_index, search_params
from indexer.cli import main


def test_resolve_index_type():
    limit = ann.AUTO_FLAT_MAX_FLOATS
    assert resolve_index_type("auto", 0, 512) == "Flat"
    assert resolve_index_type("auto", limit // 512, 512) == "Flat"
    assert resolve_index_type("auto", limit // 512 + 1, 512) == "HNSW32"
    assert resolve_index_type("auto", limit // 256 + 1, 256) == "HNSW32"  # the limit counts floats, not items
    assert resolve_index_type("IVF64,Flat", 10, 8) == "IVF64,Flat"  # a named type is kept at any size


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 20 centres: neighbourhoods an approximate index can get wrong at low effort."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng, 20, d)
    x = centres[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_index_switches_to_hnsw_and_back(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX_FLOATS", 200 * 16)  # Flat up to 200 vectors of 16-d
    xb = _clustered(1200, 16, 0)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=16)
    assert store.manifest.index_type == "auto"
    _fill(store, xb[:100])
    sync_faiss(store)
    assert store.manifest.faiss_type == "Flat" and store.manifest.tuning == {}
    assert (store.root / VECTORS_FILE).exists()

    _fill(store, xb[100:], first_file=25)
    assert sync_faiss(store) == {"added": 1200, "removed": 0, "total": 1200}  # outgrew Flat: rebuilt
    m = store.manifest
    assert m.faiss_type == "HNSW32" and effort_knob(store.vector_index().faiss) == "efSearch"
    assert not (store.root / VECTORS_FILE).exists() and not (store.root / IDS_FILE).exists()
    assert m.tuning["knob"] == "efSearch" and m.tuning["queries"] == 200 and m.tuning["effort"] in EFFORTS
    assert store.vector_index().default_effort == m.tuning["effort"]
    assert m.tuning["recall_at_10"] >= TARGET_RECALL or m.tuning["effort"] == EFFORTS[-1]
    _, ids = store.search(xb[:50], 1)
    assert np.mean(ids[:, 0] == np.arange(1, 51)) >= 0.95  # each finds itself (ids start at 1)
    fresh = _clustered(200, 16, 7)  # queries from outside: the held-out measurement predicts their recall
    truth = exact_neighbours(fresh, [(np.arange(1, 1201), xb)], 10)
    assert ann.recall_at_10(store.search(fresh, 10)[1], truth) >= m.tuning["recall_at_10"] - 0.05
    assert store.verify() == []
    store.close()

    with IndexStore.open(tmp_path / "idx", readonly=True) as reader:  # what a server opens
        assert reader.manifest.faiss_type == "HNSW32"
        assert reader.vector_index().default_effort == m.tuning["effort"]

    store = IndexStore.open(tmp_path / "idx")
    store.remove_files([f"f{i}.wav" for i in range(25, 300)])  # down to 100 vectors: exact again
    assert sync_faiss(store)["total"] == 100
    assert store.manifest.faiss_type == "Flat" and store.manifest.tuning == {}
    assert (store.root / VECTORS_FILE).exists() and store.verify() == []
    store.close()


def _hnsw(xb: np.ndarray) -> faiss.Index:
    index = new_faiss_index(xb.shape[1], "HNSW32")
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64) + 100)
    return index


def test_tuning_picks_the_smallest_effort_that_reaches_the_target():
    xb = _clustered(3000, 32, 1)
    xq = _clustered(200, 32, 9)  # not in the index, as the store's held-out sample is not
    index = _hnsw(xb)
    ids = np.arange(len(xb), dtype=np.int64) + 100
    tuning = tune_effort(index, xq, [(ids, xb)], target=0.99)
    assert tuning is not None and tuning.knob == "efSearch" and tuning.queries == 200
    truth = exact_neighbours(xq, [(ids, xb)], 10)
    for effort in EFFORTS:  # recomputed here: each effort below the chosen one misses the target
        recall = ann.recall_at_10(index.search(xq, 10, params=search_params(index, effort))[1], truth)
        if effort < tuning.effort:
            assert recall < 0.99
        if effort == tuning.effort:
            assert recall == pytest.approx(tuning.recall_at_10, abs=1e-4)
    assert tuning.effort > EFFORTS[0]  # these clusters need more than the least effort for 0.99
    assert tune_effort(new_faiss_index(32, "Flat"), xq, [(ids, xb)]) is None  # exact: nothing to tune


def test_exact_neighbours_over_blocks_equals_one_pass():
    xb = _clustered(500, 8, 2)
    ids = np.arange(500, dtype=np.int64) * 3
    blocks = [(ids[i : i + 64], xb[i : i + 64]) for i in range(0, 500, 64)]
    assert np.array_equal(exact_neighbours(xb[:20], blocks, 7), exact_neighbours(xb[:20], [(ids, xb)], 7))


def test_per_query_effort_leaves_the_shared_index_alone():
    xb = _clustered(4000, 32, 3)
    index = _hnsw(xb)
    inner = faiss.downcast_index(index.index)
    before = inner.hnsw.efSearch
    ids = np.arange(len(xb), dtype=np.int64) + 100
    xq = _clustered(100, 32, 8)
    truth = exact_neighbours(xq, [(ids, xb)], 10)
    low = ann.recall_at_10(index.search(xq, 10, params=search_params(index, 1))[1], truth)
    high = ann.recall_at_10(index.search(xq, 10, params=search_params(index, 512))[1], truth)
    assert high > low and high >= 0.99
    assert inner.hnsw.efSearch == before
    ivf = new_faiss_index(32, "IVF16,Flat")
    ivf.train(xb)
    ivf.add_with_ids(xb, ids)
    assert effort_knob(ivf) == "nprobe" and search_params(ivf, 4000).nprobe == 16  # capped at nlist


def test_cli_effort_is_bounded(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["search", str(tmp_path), "--text", "x", "--effort", "0"])
    assert exc.value.code == 2 and "must be 1 to 4096" in capsys.readouterr().err


def test_named_hnsw_is_measured_on_vectors_outside_the_graph(tmp_path):
    xb = _clustered(2000, 16, 4)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=16, index_type="HNSW32")
    _fill(store, xb[:1200])
    sync_faiss(store)  # a first fill: built in one go, 200 vectors held out of the graph while measured
    first = dict(store.manifest.tuning)
    assert first["queries"] == 200 and 0 < first["recall_at_10"] <= 1
    fresh = _clustered(200, 16, 5)
    truth = exact_neighbours(fresh, [(np.arange(1, 1201), xb[:1200])], 10)
    assert abs(ann.recall_at_10(store.search(fresh, 10)[1], truth) - first["recall_at_10"]) <= 0.05
    _fill(store, xb[1200:1240], first_file=300)  # 40 new vectors: too few to measure with
    assert sync_faiss(store)["added"] == 40 and store.manifest.tuning == first
    _fill(store, xb[1240:], first_file=310)  # 760 new: measured again with them, before they join
    assert sync_faiss(store)["added"] == 760 and store.manifest.tuning["queries"] == 200
    assert store.verify() == []
    store.close()
    empty = new_faiss_index(16, "HNSW32")
    assert tune_effort(empty, fresh, [(np.zeros(0, np.int64), np.zeros((0, 16), np.float32))]) is None
