"""Compact encoders trained for a few real steps, then used for indexing, refining and searching."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import build_and_refine

from diffgap.encoders import load_encoders
from diffgap.media.audio import decode_audio
from diffgap.media.synthetic import generate_demo_corpus
from diffgap.media.video import decode_video
from diffgap.models.audio_net import AudioNetConfig
from diffgap.models.segments import SEGMENTS, segment_pool
from diffgap.models.text_net import TextNetConfig
from diffgap.models.video_net import VideoNetConfig
from diffgap.training.encoders import EncoderTrainConfig, info_nce, train_compact_encoders
from diffgap.training.pairs import read_pairs
from indexer.cli import main

TINY = dict(
    audio=AudioNetConfig(channels=(8, 8, 16, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
    text=TextNetConfig(vocab_size=200, d_model=32, n_layers=1, n_heads=2, dim=32),
    video=VideoNetConfig(channels=(8, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
)


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    return generate_demo_corpus(tmp_path_factory.mktemp("demo"), 24, seed=1)


def test_demo_corpus_is_well_formed(demo_corpus):
    pairs = read_pairs(demo_corpus / "captions.csv")
    assert len({p.key for p in pairs}) == 24
    assert {p.audio.suffix for p in pairs} == {".wav", ".flac", ".ogg", ".mp3", ".m4a"}
    assert all(p.video and p.video.exists() and p.audio.exists() for p in pairs)


def test_segment_pool_and_info_nce():
    seq = torch.arange(8.0).reshape(1, 8, 1).repeat(1, 1, 2)  # (1, 8, 2)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    pooled = segment_pool(seq, mask, 2)  # means over steps 0-2 and 3-5, then unit-normalised
    assert pooled.shape == (1, 2, 2) and torch.allclose(pooled.norm(dim=-1), torch.ones(1, 2))
    # fewer valid steps than spans: each span takes the step its stretch of time lies in, so a clip
    # of 3 steps and the same clip at twice the step rate (6 steps) give the same 8 spans
    short = torch.eye(3).reshape(1, 3, 3)  # (1, 3, 3): step k points along axis k
    fine = short.repeat_interleave(2, dim=1)  # (1, 6, 3): each step twice
    padded = torch.cat([short, torch.zeros(1, 2, 3)], 1)  # (1, 5, 3), the last 2 steps padding
    few = segment_pool(padded, torch.tensor([[True] * 3 + [False] * 2]), 8)  # (1, 8, 3)
    assert torch.equal(few.argmax(-1), torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]]))  # in time order, none empty
    assert torch.allclose(few, segment_pool(fine, torch.ones(1, 6, dtype=torch.bool), 8))
    a = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    assert float(info_nce(a, a, torch.tensor(3.0))) < float(info_nce(a, a.roll(1, 0), torch.tensor(3.0)))


def test_segments_come_from_the_same_pass_as_the_clip_vector(demo_corpus, tmp_path):
    pairs = read_pairs(demo_corpus / "captions.csv")
    cfg = EncoderTrainConfig(epochs=1, batch_size=8, warmup_steps=1, max_steps=2, **TINY)
    train_compact_encoders(pairs, tmp_path / "enc", cfg)
    enc = load_encoders(f"compact:{tmp_path / 'enc'}")
    waves = [decode_audio(p.audio, enc.audio.sample_rate).wave for p in pairs[:3]]
    waves[1] = waves[1][: len(waves[1]) // 3]  # a shorter clip padded in the batch
    videos = [decode_video(p.video, enc.video.fps, size=enc.video.size) for p in pairs[:3]]
    for encoder, batch in ((enc.audio, waves), (enc.video, videos)):
        clip, segs = encoder.encode_with_segments(batch, 4)  # (3, dim), (3, 4, dim)
        assert segs.shape == (3, 4, 32) and np.allclose(np.linalg.norm(segs, axis=-1), 1, atol=1e-5)
        assert np.allclose(clip, encoder.encode(batch), atol=1e-6)  # the clip vectors are the usual ones
        # one span is the whole clip: its vector is the clip vector (the tower's own masked mean)
        assert np.allclose(encoder.encode_with_segments(batch, 1)[1][:, 0], clip, atol=1e-5)
        alone = encoder.encode_with_segments(batch[1:2], 4)[1]  # padding beside longer clips changes nothing
        assert np.allclose(alone[0], segs[1], atol=1e-4)
        assert encoder.encode_with_segments(batch, 0)[1].shape == (3, 0, 32)
    with pytest.raises(NotImplementedError, match="keep no time segments"):
        enc.text.encode_with_segments(["a beep"], 4)


def test_train_index_refine_search(demo_corpus, tmp_path, capsys):
    pairs = read_pairs(demo_corpus / "captions.csv")
    cfg = EncoderTrainConfig(epochs=3, batch_size=8, warmup_steps=2, **TINY)
    losses = []
    stats = train_compact_encoders(pairs, tmp_path / "enc", cfg, progress=lambda s, t, loss: losses.append(loss))
    assert stats["steps"] == 9 and np.isfinite(losses).all()
    capped = dataclasses.replace(cfg, epochs=50, max_steps=4)  # a compute budget ends training, not the epochs
    assert train_compact_encoders(pairs, tmp_path / "capped", capped)["steps"] == 4
    saved = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert saved["format"] == "diffgap-compact" and saved["video"] is not None
    enc = load_encoders(f"compact:{tmp_path / 'enc'}")
    assert enc.text.dim == enc.audio.dim == enc.video.dim == 32
    spec = f"compact:{tmp_path / 'enc'}"
    index = tmp_path / "idx"
    build_and_refine(demo_corpus, index, spec)
    capsys.readouterr()
    assert main(["search", str(index), "--text", "a high beep twice at the start", "--refine", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 10 and all(h["path"].startswith("demo_") for h in hits)
    # a rerank weighs the denoising error as the refiner's held-out pairs chose: 0 leaves the ranking be
    saved = json.loads((index / "refiner-text" / "refiner.json").read_text())
    assert saved["rerank_weight"] in [k / 8 for k in range(9)]
    query = ["search", str(index), "--text", "a high beep twice at the start", "--refine", "--json", "-k", "24"]
    ranked = {}
    for weight in (0.0, 1.0, None):
        (index / "refiner-text" / "refiner.json").write_text(json.dumps({**saved, "rerank_weight": weight}))
        assert main([*query, *(["--rerank"] if weight is not None else [])]) == 0
        ranked[weight] = [h["path"] for h in json.loads(capsys.readouterr().out)]
    assert ranked[0.0] == ranked[None] and sorted(ranked[1.0]) == sorted(ranked[None])
    (index / "refiner-text" / "refiner.json").write_text(json.dumps(saved))
    # query by example with a compact encoder finds the clip itself
    clip = sorted((demo_corpus / "audio").iterdir())[0]
    assert main(["search", str(index), "--audio", str(clip), "--json", "-k", "24"]) == 0
    hits = json.loads(capsys.readouterr().out)
    own = [h for h in hits if h["path"] == clip.name]
    # its own vector scores 1; a barely trained encoder may tie others with it, so no rank is asserted
    assert own and own[0]["score"] > 0.9999 and own[0]["score"] >= hits[0]["score"] - 1e-4


def test_demo_command_end_to_end(tmp_path, caplog):
    """`diffgap-index demo` (what `make demo` runs before serving), at toy sizes; a rerun skips finished steps."""
    args = [
        "demo",
        "--workdir",
        str(tmp_path / "demo"),
        "--clips",
        "12",
        "--epochs",
        "1",
        "--refiner-iterations",
        "5",
        "--compact",
        "-j",
        "1",
        "-q",
    ]
    assert main(args) == 0
    index = tmp_path / "demo" / "index"
    assert (index / "manifest.json").exists()
    assert (index / "refiner-text" / "refiner.json").exists() and (index / "refiner-video" / "refiner.json").exists()
    assert main(["verify", str(index)]) == 0
    before = (index / "refiner-text" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (index / "refiner-text" / "model.safetensors").stat().st_mtime_ns == before


def test_video_queries_mix_in_the_time_spans_of_their_candidates(demo_corpus, tmp_path, monkeypatch):
    from diffgap.pipeline import build
    from diffgap.retrieval.search import Query, RefineSpec, open_searcher

    pairs = read_pairs(demo_corpus / "captions.csv")
    cfg = EncoderTrainConfig(epochs=1, batch_size=8, warmup_steps=1, max_steps=2, **TINY)
    train_compact_encoders(pairs, tmp_path / "enc", cfg)
    spec = f"compact:{tmp_path / 'enc'}"
    build(tmp_path / "plain", spec, corpus=demo_corpus / "audio", segments=0)
    build_and_refine(demo_corpus, tmp_path / "idx", spec)  # compact audio keeps time: SEGMENTS spans a window
    searcher = open_searcher(tmp_path / "idx")
    assert searcher.store.manifest.segments == SEGMENTS
    assert open_searcher(tmp_path / "plain").store.manifest.segments == 0
    refiner = searcher.refiners["video"]
    validation = refiner.config.training["validation"]
    assert "val_MRR@10_segments" in validation  # the pairs came with spans and a weight was picked (0 allowed)
    # by default among every clip, held-out and training ones (a held-out clip has one query or more)
    assert validation["span_gallery_clips"] > validation["pairs_val"]
    # a weight this barely trained tower may not earn
    refiner.config.segment_weight, refiner.config.segments = 0.5, SEGMENTS
    refiner.config.span_library_weight, refiner.mapper_spans_back = 0.0, None  # the spans' library side comes last
    assert searcher.segment_weight("video") == 0.5
    video = searcher.encoders.for_modality("video")
    clips = [decode_video(p.video, video.fps, size=video.size) for p in pairs[:3:2]]
    xq, q_spans = video.encode_with_segments(clips, SEGMENTS)  # (2, c), (2, S, c)
    ids, xb = searcher.store.vectors()  # every window: fewer than a search's candidates
    by_hand = refiner.scores(xq, xb, segments=(q_spans, searcher.store.segment_vectors(ids)))  # (2, N)
    alone = [searcher.search(Query("video", k=5, media=c, refine=RefineSpec())).hits for c in clips]
    for row, hits in zip(by_hand, alone, strict=True):
        score_of = dict(zip(ids.tolist(), row, strict=True))
        np.testing.assert_allclose([h.score for h in hits], [score_of[h.item.id] for h in hits], atol=1e-3)
        np.testing.assert_allclose([h.score for h in hits], sorted(row, reverse=True)[:5], atol=1e-3)
    batched = searcher.run([Query("video", k=5, media=c, refine=RefineSpec()) for c in clips])
    for one, many in zip(alone, batched, strict=True):
        # alike up to BLAS order (the network's float32 rows depend on the batch's size): the same scores,
        # each window the same score, so only windows within 1e-5 of each other (this tower's near-ties) swap
        np.testing.assert_allclose([h.score for h in one], [h.score for h in many.hits], atol=1e-5)
        score_of = {h.item.id: h.score for h in one}
        assert all(abs(score_of[h.item.id] - h.score) < 1e-5 for h in many.hits if h.item.id in score_of)
    # spans mapped by a span mapper instead of refined: served as `Refiner.scores` computes them
    from diffgap.models.mapper_net import Mapper

    torch.manual_seed(0)
    refiner.config.span_map, refiner.mapper_spans = "mapped", Mapper(xq.shape[1], xb.shape[1], 32).eval()
    mapped = refiner.scores(xq, xb, segments=(q_spans, searcher.store.segment_vectors(ids)))  # (2, N)
    assert not np.allclose(mapped, by_hand, atol=1e-3)
    for row, clip in zip(mapped, clips, strict=True):
        hits = searcher.search(Query("video", k=5, media=clip, refine=RefineSpec())).hits
        np.testing.assert_allclose([h.score for h in hits], sorted(row, reverse=True)[:5], atol=1e-3)
    refiner.config.span_map, refiner.mapper_spans = "refined", None
    # the spans' library side: each window's spans mapped back (once, then kept) against the query's as encoded
    refiner.config.span_library_weight, refiner.mapper_spans_back = 0.5, Mapper(xb.shape[1], xq.shape[1], 32).eval()
    two_sided = refiner.scores(xq, xb, segments=(q_spans, searcher.store.segment_vectors(ids)))  # (2, N)
    assert not np.allclose(two_sided, by_hand, atol=1e-3)
    searcher._library_spans.clear()
    for row, clip in zip(two_sided, clips, strict=True):
        hits = searcher.search(Query("video", k=5, media=clip, refine=RefineSpec())).hits
        np.testing.assert_allclose([h.score for h in hits], sorted(row, reverse=True)[:5], atol=1e-3)
    assert len(searcher._library_spans[refiner]) == len(ids)  # each candidate's spans mapped once, then kept
    searcher._library_spans.clear()
    assert searcher.warm_library()["video"] == len(ids)  # every window, once for this refiner
    assert len(searcher._library_spans[refiner]) == len(ids)
    # the memory they may take is in bytes: one window more than it holds, and none is mapped at start
    import diffgap.retrieval.search as search_module

    per_window = SEGMENTS * xq.shape[1] * 2  # one window's spans mapped back, float16
    monkeypatch.setattr(search_module, "SPANS_KEPT_BYTES", per_window * (len(ids) - 1))
    searcher._library_spans.clear()
    searcher.warm_library()
    assert refiner not in searcher._library_spans
    refiner.config.span_library_weight, refiner.mapper_spans_back = 0.0, None
    # a query given as a vector has no spans: the refiner's other scores alone
    plain = searcher.search(Query("video", k=5, vector=xq[0], refine=RefineSpec())).hits
    np.testing.assert_allclose([h.score for h in plain], sorted(refiner.scores(xq, xb)[0], reverse=True)[:5], atol=1e-3)
    # a named blend ranks by the refined vector alone, with neither the library side nor spans
    blended = searcher.search(Query("video", k=5, media=clips[0], refine=RefineSpec(blend=0.0))).hits
    np.testing.assert_allclose([h.score for h in blended], sorted((refiner.refine(xq, blend=0.0) @ xb.T)[0],
                                                                  reverse=True)[:5], atol=1e-3)  # fmt: skip
