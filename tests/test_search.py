"""The query path's rules, on a real index: refinement runs when a refiner exists, and a query from
another space than the index's cannot be searched without one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tone

from diffgap.encoders import NoEncoderError
from diffgap.media.audio import write_audio
from diffgap.pipeline import build
from diffgap.retrieval.search import NeedsRefinerError, Query, RefineSpec, decode_query, open_searcher


@pytest.fixture(scope="module")
def clap_index(tmp_path_factory, tiny_clap):
    root = tmp_path_factory.mktemp("search")
    (root / "corpus").mkdir()
    for f in (300, 700, 1500):
        write_audio(root / "corpus" / f"tone_{f}.wav", tone(f, 1.0, 16000), 16000)
    assert build(root / "index", f"clap:{tiny_clap}", corpus=root / "corpus").total_items == 3
    return root


def test_refinement_is_skipped_without_a_refiner_and_the_result_says_so(clap_index):
    searcher = open_searcher(clap_index / "index")
    try:
        assert searcher.refiners == {}
        asked = searcher.search(Query("text", 2, text="a tone", refine=RefineSpec()))
        plain = searcher.search(Query("text", 2, text="a tone"))
        assert asked.refined is False and "refine" not in asked.timings_ms
        assert [h.item.id for h in asked.hits] == [h.item.id for h in plain.hits]
        wave = decode_query(clap_index / "corpus" / "tone_700.wav", "audio", searcher.encoders)
        by_example = searcher.search(Query("audio", 1, media=wave))
        assert by_example.hits[0].item.path == "tone_700.wav" and by_example.hits[0].score > 0.99
    finally:
        searcher.store.close()


def test_a_query_from_another_space_needs_a_refiner(clap_index, tiny_clip):
    searcher = open_searcher(clap_index / "index", video_encoder=f"clip:{tiny_clip}")
    try:
        frames = np.zeros((8, 32, 32, 3), np.uint8)
        with pytest.raises(NeedsRefinerError, match="need a video refiner"):
            searcher.search(Query("video", 2, media=frames, refine=RefineSpec()))
    finally:
        searcher.store.close()


def test_a_modality_without_an_encoder_is_a_clear_error(clap_index):
    searcher = open_searcher(clap_index / "index")
    try:
        with pytest.raises(NoEncoderError, match="no video encoder"):
            searcher.search(Query("video", 2, media=np.zeros((4, 8, 8, 3), np.uint8)))
    finally:
        searcher.store.close()
