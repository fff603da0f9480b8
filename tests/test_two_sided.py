"""The library side of a refiner's score: each candidate's audio mapped into the query space by a
backward mapper and scored against the query as encoded, mixed with the query-side score."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_refiner import _toy_pairs  # two noisy rotated queries per clip

from diffgap.diffusion.refiner import MAPPER_BACK_FILE, Refiner, RefinerConfig, RefinerError, two_sided_scores
from diffgap.models.mapper_net import Mapper
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.metrics import LIBRARY_GRID, choose_library_weight, choose_score_weight, metrics, query_ranks

DIM = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_two_sided_scores_weigh_both_sides_and_weight_zero_is_the_query_side():
    rng = np.random.default_rng(0)
    query_side = rng.standard_normal((3, 5)).astype(np.float32)  # (R, C)
    raw, mapped = _unit(rng.standard_normal((3, DIM))), _unit(rng.standard_normal((5, DIM)))
    assert two_sided_scores(query_side, raw, mapped, 0.0) is query_side
    np.testing.assert_allclose(two_sided_scores(query_side, raw, mapped, 1.0), raw @ mapped.T, rtol=1e-6)
    by_hand = np.array([[0.75 * query_side[r, c] + 0.25 * raw[r] @ mapped[c] for c in range(5)] for r in range(3)])
    np.testing.assert_allclose(two_sided_scores(query_side, raw, mapped, 0.25), by_hand, rtol=1e-5)


def _held_out() -> tuple[PairEmbeddings, np.ndarray, np.ndarray]:
    """Toy pairs whose query-side vectors are the targets blurred by noise, and the targets mapped
    into the query space exactly: the library side carries what the query side lost."""
    data = _toy_pairs(n_groups=60, d=DIM, seed=1)
    rng = np.random.default_rng(2)
    noisy = _unit(data.audio[data.query_group] + 0.9 * rng.standard_normal(data.query.shape))  # (P, d)
    rot = np.linalg.lstsq(data.audio[data.query_group], data.query, rcond=None)[0]  # audio -> query space
    return data, noisy, _unit(data.audio @ rot)  # (G, c)


def test_the_library_weight_is_picked_where_the_library_side_helps_and_zero_where_it_is_noise():
    data, noisy, mapped = _held_out()
    weight, score = choose_library_weight(data, noisy, mapped)
    assert weight > 0 and weight in LIBRARY_GRID
    alone = metrics(query_ranks(noisy @ data.audio.T, data.query_group))["MRR@10"]
    assert score > alone + 0.1
    junk = _unit(np.random.default_rng(3).standard_normal(mapped.shape))
    exact = data.audio[data.query_group]  # a query side that is already right: nothing to add
    assert choose_library_weight(data, exact, junk) == (0.0, 1.0)
    # direction 1, audio rows against the queries: their query-space vectors blurred, and the queries
    # mapped into audio space exactly (each its own clip's audio)
    rows = _unit(mapped + 0.9 * np.random.default_rng(4).standard_normal(mapped.shape))  # (G, c)
    weight, score = choose_library_weight(data, rows, data.audio[data.query_group], direction=1)
    assert weight > 0 and score == 1.0


def test_a_score_weight_is_picked_on_score_matrices_alone():
    rng = np.random.default_rng(5)
    groups = np.arange(40)
    base = rng.standard_normal((40, 40))  # scores that know nothing
    other = base + 8 * np.eye(40)  # scores that know each query's clip
    weight, score = choose_score_weight(base, other, groups)
    assert weight > 0 and score == 1.0
    assert choose_score_weight(other, base, groups) == (0.0, 1.0)  # noise adds nothing: the smaller weight
    weight, score = choose_score_weight(base.T, other.T, groups, direction=1)  # clips against their queries
    assert weight > 0 and score == 1.0


def _served(library_weight: float, back: Mapper | None) -> Refiner:
    config = RefinerConfig(
        net=RefinerNetConfig(audio_dim=DIM, query_dim=DIM, hidden=32, n_blocks=1),
        mix={"refined": 0.0, "mapped": 0.0, "direct": 1.0},
        mapper_hidden=8,
        library_weight=library_weight,
    )
    return Refiner(config, mapper_back=back)


def test_the_backward_mapper_is_saved_with_its_weight_and_a_broken_one_is_a_clear_error(tmp_path):
    back = Mapper(DIM, DIM, hidden=8)
    x = _unit(np.random.default_rng(0).standard_normal((4, DIM)))
    _served(0.5, back).save(tmp_path / "r")
    loaded = Refiner.load(tmp_path / "r")
    assert loaded.two_sided and loaded.config.library_weight == 0.5
    np.testing.assert_array_equal(loaded.map_library(x), back.map(x))
    xb = _unit(np.random.default_rng(1).standard_normal((6, DIM)))  # audio rows
    by_hand = 0.5 * (x @ xb.T) + 0.5 * (x @ back.map(xb).T)  # the mix is direct search here
    np.testing.assert_allclose(loaded.scores(x, xb), by_hand, atol=1e-5)
    config_file = tmp_path / "r" / "refiner.json"
    cfg = json.loads(config_file.read_text())
    for bad in (1.5, -0.1, "half"):
        config_file.write_text(json.dumps({**cfg, "library_weight": bad}))
        with pytest.raises(RefinerError, match=r"library_weight in refiner.json must be in \[0, 1\]"):
            Refiner.load(tmp_path / "r")
    config_file.write_text(json.dumps(cfg))
    (tmp_path / "r" / MAPPER_BACK_FILE).unlink()
    with pytest.raises(RefinerError, match=MAPPER_BACK_FILE):
        Refiner.load(tmp_path / "r")
    # no library weight: no file, and refiners saved before the field load one-sided
    _served(0.0, None).save(tmp_path / "one")
    assert not (tmp_path / "one" / MAPPER_BACK_FILE).exists()
    np.testing.assert_allclose(Refiner.load(tmp_path / "one").scores(x, xb), x @ xb.T, atol=1e-6)
    del cfg["library_weight"]
    config_file.write_text(json.dumps(cfg))
    assert not Refiner.load(tmp_path / "r").two_sided


def test_a_two_sided_search_rescored_its_candidates_alone_and_in_a_batch(tiny_clap, tmp_path, monkeypatch):
    from conftest import tone

    from diffgap.media.audio import write_audio
    from diffgap.pipeline import build
    from diffgap.retrieval.search import Query, RefineSpec, open_searcher

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for freq in (300, 500, 700, 1000, 1500, 2200, 3000, 4000):
        write_audio(corpus / f"{freq}.wav", tone(freq, 1.0, 16000), 16000)
    build(tmp_path / "idx", f"clap:{tiny_clap}", corpus=corpus)
    searcher = open_searcher(tmp_path / "idx")
    dim = searcher.store.manifest.dim
    back = Mapper(dim, dim, hidden=8)
    refiner = _served(0.5, back)
    refiner.config = replace(
        refiner.config, net=RefinerNetConfig(audio_dim=dim, query_dim=searcher.query_dim("text"), hidden=32, n_blocks=1)
    )
    refiner.net = type(refiner.net)(refiner.config.net).eval()
    searcher.refiners["text"] = refiner
    texts = ["a high whistle", "a low hum"]
    encoded = searcher.encoders.for_modality("text").encode(texts)  # (2, c)
    ids, xb = searcher.store.vectors()  # (N,), (N, d) every window
    by_hand = {
        t: dict(zip(ids.tolist(), two_sided_scores(q[None] @ xb.T, q[None], back.map(xb), 0.5)[0], strict=True))
        for t, q in zip(texts, encoded, strict=True)
    }
    alone = [searcher.search(Query("text", k=5, text=t, refine=RefineSpec())).hits for t in texts]
    for t, hits in zip(texts, alone, strict=True):
        want = sorted(by_hand[t].values(), reverse=True)[:5]  # the mix is direct search: every window a candidate
        np.testing.assert_allclose([h.score for h in hits], want, atol=1e-4)
        np.testing.assert_allclose([h.score for h in hits], [by_hand[t][h.item.id] for h in hits], atol=1e-4)
    assert len(searcher._library[refiner]) == len(ids)  # every window mapped once, kept for the next query
    batched = searcher.run([Query("text", k=5, text=t, refine=RefineSpec()) for t in texts])
    for one, many in zip(alone, batched, strict=True):
        assert [h.item.id for h in one] == [h.item.id for h in many.hits]
        np.testing.assert_allclose([h.score for h in one], [h.score for h in many.hits], atol=1e-6)  # BLAS order
    # a server maps every window when it starts (an index within the bound): queries then map nothing
    fresh = open_searcher(tmp_path / "idx")
    fresh.refiners["text"] = refiner
    assert fresh.warm_library() == {"text": len(ids)} and len(fresh._library[refiner]) == len(ids)
    for t, hits in zip(texts, alone, strict=True):
        warm = fresh.search(Query("text", k=5, text=t, refine=RefineSpec())).hits
        assert [h.item.id for h in warm] == [h.item.id for h in hits]
    fresh.store.close()
    # a bounded store of mapped windows: past it, the searcher starts over, with the same results
    import diffgap.retrieval.search as search_module

    monkeypatch.setattr(search_module, "LIBRARY_KEPT", 3)
    assert searcher.warm_library() == {}  # too many windows to keep them all: queries bring them up
    searcher._library.clear()
    bounded = [searcher.search(Query("text", k=5, text=t, refine=RefineSpec())).hits for t in texts]
    assert len(searcher._library[refiner]) == len(ids)  # one query's candidates are all mapped, then kept
    for one, other in zip(alone, bounded, strict=True):
        assert [h.item.id for h in one] == [h.item.id for h in other]
    # a search that names its blend uses the refiner's network alone: no library side
    named = searcher.search(Query("text", k=5, text=texts[0], refine=RefineSpec(blend=1.0))).hits
    np.testing.assert_allclose([h.score for h in named], sorted(xb @ encoded[0], reverse=True)[:5], atol=1e-4)
    searcher.store.close()


def test_mapped_windows_keep_rows_by_id_across_blocks_and_start_over_past_their_bound(monkeypatch):
    import diffgap.retrieval.search as search_module
    from diffgap.retrieval.search import MappedWindows

    monkeypatch.setattr(MappedWindows, "BLOCK", 4)
    kept = MappedWindows()
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)  # (10, c)
    kept.add(list(range(100, 110)), rows)  # three blocks
    got, missing = kept.get([109, 5, 100, 104], 3)
    np.testing.assert_array_equal(got[[0, 2, 3]], rows[[9, 0, 4]])
    assert missing == [1] and not got[1].any() and len(kept) == 10
    kept.add([100], rows[:1] + 50)  # a window already kept keeps its row
    np.testing.assert_array_equal(kept.get([100], 3)[0][0], rows[0])
    monkeypatch.setattr(search_module, "LIBRARY_KEPT", 12)
    kept.add([1, 2, 3], rows[:3])  # 13 > 12: start over with these
    assert len(kept) == 3 and kept.get([100, 1], 3)[1] == [0]
