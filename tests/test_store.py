from __future__ import annotations

import numpy as np
import pytest

from diffgap.encoders.base import EncoderFingerprint
from diffgap.index.faiss_sync import sync_faiss
from diffgap.index.layout import SEGMENTS_TABLE, SQLITE
from diffgap.index.store import FileRecord, IndexStore, IndexStoreError

FP = EncoderFingerprint("compact", "x", "ab" * 32, "audio", {"sample_rate": 16000})


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fill(store: IndexStore, xb: np.ndarray, per_file: int = 4, first_file: int = 0) -> None:
    """Files f{first_file}.wav, ... of `per_file` windows each, holding the rows of xb in order."""
    records = []
    for f in range(len(xb) // per_file):
        windows = [(float(i), float(i + 1)) for i in range(per_file)]
        records.append(
            FileRecord(
                f"f{first_file + f}.wav",
                f"h{first_file + f}",
                10,
                0.0,
                "indexed",
                duration=per_file,
                sample_rate=16000,
                channels=1,
                windows=windows,
                vectors=xb[f * per_file : (f + 1) * per_file],
            )
        )
    store.commit_files(records)


@pytest.mark.parametrize("index_type", ["Flat", "HNSW16", "IVF4,Flat", "IVF4,PQ4"])
def test_search_finds_the_stored_vectors(tmp_path, index_type):
    rng = np.random.default_rng(0)
    xb = _unit(rng, 400, 16)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=16, index_type=index_type)
    _fill(store, xb)
    assert sync_faiss(store)["total"] == 400
    scores, ids = store.search(xb[:50], 5)
    top = ids[:, 0] - 1  # ids start at 1 in insertion order
    recall = float(np.mean(top == np.arange(50)))
    assert recall >= (1.0 if index_type == "Flat" else 0.6), recall
    assert store.verify() == []
    store.close()
    reopened = IndexStore.open(tmp_path / "idx", readonly=True)
    assert reopened.ntotal == 400 and reopened.manifest.counts["items"] == 400


def test_removal_and_stable_ids(tmp_path):
    rng = np.random.default_rng(1)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=8)
    _fill(store, _unit(rng, 40, 8))
    sync_faiss(store)
    before = store.items(range(1, 41))
    assert store.remove_files(["f0.wav", "f3.wav"]) == 8
    assert sync_faiss(store) == {"added": 0, "removed": 8, "total": 32}
    after = store.items(store.item_ids())
    assert all(after[i] == before[i] for i in after)  # survivors keep their ids and metadata
    assert set(store.vector_index().ids()) == set(after)
    # ids are never reused
    store.commit_files([FileRecord("new.wav", "hn", 1, 0.0, "indexed", windows=[(0.0, 1.0)], vectors=_unit(rng, 1, 8))])
    assert int(store.item_ids().max()) == 41


def test_other_encoder_is_refused(tmp_path):
    IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=8).close()
    other = EncoderFingerprint("compact", "x", "cd" * 32, "audio", {"sample_rate": 16000})
    with pytest.raises(IndexStoreError, match="cannot be mixed"):
        IndexStore.create(tmp_path / "idx", encoder_spec="compact:y", fingerprint=other, dim=8)
    moved = EncoderFingerprint("compact", "elsewhere", "ab" * 32, "audio", {"sample_rate": 16000})
    IndexStore.create(tmp_path / "idx", encoder_spec="compact:y", fingerprint=moved, dim=8).close()


def test_verify_detects_out_of_step_and_sync_repairs(tmp_path):
    rng = np.random.default_rng(2)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=8)
    _fill(store, _unit(rng, 8, 8))
    sync_faiss(store)
    _fill(store, _unit(rng, 8, 8))  # committed but not yet in FAISS: as after a crash
    assert any("out of step" in p for p in store.verify())
    sync_faiss(store)
    assert store.verify() == []
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    assert any("corrupt" in p for p in store.verify())
    sync_faiss(store)  # rebuilt from SQLite
    assert store.verify() == []


def test_bad_directories(tmp_path):
    with pytest.raises(IndexStoreError, match="not an index directory"):
        IndexStore.open(tmp_path)
    with pytest.raises(RuntimeError):
        IndexStore.create(tmp_path / "x", encoder_spec="compact:x", fingerprint=FP, dim=8, index_type="Bogus99")
    assert not list(tmp_path.glob("*/*.tmp"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    root = tmp_path / "idx"
    IndexStore.create(root, encoder_spec="compact:x", fingerprint=FP, dim=8, index_type="HNSW16", window_s=4.0).close()
    # settings left out take the index's own: a resumed build keeps what the index was made with
    with IndexStore.create(root, encoder_spec="compact:x", fingerprint=FP, dim=8) as store:
        assert (store.manifest.index_type, store.manifest.window_s, store.manifest.hop_s) == ("HNSW16", 4.0, 5.0)
    with IndexStore.create(root, encoder_spec="compact:x", fingerprint=FP, dim=8, index_type="HNSW16") as store:
        assert store.manifest.index_type == "HNSW16"
    for changed in ({"index_type": "Flat"}, {"window_s": 10.0}, {"hop_s": 2.5}):
        with pytest.raises(IndexStoreError, match="already exists with other settings"):
            IndexStore.create(root, encoder_spec="compact:x", fingerprint=FP, dim=8, **changed)
    assert IndexStore.open(root).manifest.index_type == "HNSW16"  # nothing was changed by the refusals


def test_windows_keep_their_time_spans_and_an_index_from_before_them_opens(tmp_path):
    import sqlite3

    rng = np.random.default_rng(3)
    store = IndexStore.create(tmp_path / "idx", encoder_spec="compact:x", fingerprint=FP, dim=8, segments=4)
    spans = np.stack([_unit(rng, 4, 8) for _ in range(2)])  # (2 windows, 4 spans, 8)
    store.commit_files([
        FileRecord("a.wav", "h", 1, 0.0, "indexed", windows=[(0.0, 1.0), (1.0, 2.0)], vectors=_unit(rng, 2, 8),
                   segments=spans),
        FileRecord("b.wav", "i", 1, 0.0, "indexed", windows=[(0.0, 1.0)], vectors=_unit(rng, 1, 8)),
    ])  # fmt: skip
    ids = store.item_ids()  # a.wav's two windows, then b.wav's
    got = store.segment_vectors(ids[[1, 0]])  # (2, 4, 8) in the order asked, float16 on disk
    assert got is not None and np.allclose(got, spans[[1, 0]], atol=1e-3)
    assert store.segment_vectors(ids) is None  # b.wav has no spans: no segment score for that set
    store.remove_files(["a.wav"])  # an item's spans go with it
    assert store.db.execute(f"SELECT COUNT(*) FROM {SEGMENTS_TABLE}").fetchone()[0] == 0
    store.close()
    assert IndexStore.open(tmp_path / "idx", readonly=True).manifest.segments == 4
    # an index written before spans existed: no spans table, and a manifest without the field
    db = sqlite3.connect(tmp_path / "idx" / SQLITE)
    db.execute(f"DROP TABLE {SEGMENTS_TABLE}")
    db.commit()
    db.close()
    legacy = IndexStore.open(tmp_path / "idx", readonly=True)
    assert not legacy.has_segments and legacy.segment_vectors(ids) is None and len(legacy.vectors(ids)[0]) == 1
    legacy.close()
    writer = IndexStore.open(tmp_path / "idx")  # a writer adds the table back, empty
    assert writer.has_segments and writer.segment_vectors(ids) is None  # b.wav's window never had spans
    writer.close()
