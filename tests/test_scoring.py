"""The refiner as a scorer: conditional denoising error ranks a query's own audio above others,
reranking only reorders what it was given, and a batch scores as its queries do alone."""

from __future__ import annotations

import numpy as np
import pytest
from test_refiner import _toy_pairs

from diffgap.diffusion.scoring import ScoreSpec, denoising_errors, rerank
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.training.metrics import ranks_after_rerank, ranks_query_to_audio
from diffgap.training.refiner import RefinerTrainConfig, train_refiner


@pytest.fixture(scope="module")
def trained():
    data = _toy_pairs(n_groups=64, d=16)
    cfg = RefinerTrainConfig(iterations=400, batch_size=64, lr=2e-3, eval_every=10_000)
    refiner, _ = train_refiner(data, cfg=cfg, net_cfg=RefinerNetConfig(audio_dim=16, query_dim=16, hidden=64))
    return refiner, data


def test_a_querys_own_audio_denoises_better_than_a_random_one(trained):
    refiner, data = trained
    rng = np.random.default_rng(1)
    own = data.query_group  # (P,)
    other = (own + rng.integers(1, len(data.audio), len(own))) % len(data.audio)  # never the own target
    candidates = np.stack([data.audio[own], data.audio[other]], axis=1)  # (P, 2, d)
    errors = denoising_errors(refiner, data.query, candidates, ScoreSpec(levels=8))  # (P, 2)
    assert errors.shape == (len(own), 2) and np.isfinite(errors).all()
    assert np.mean(errors[:, 0] < errors[:, 1]) >= 0.8


def test_rerank_only_reorders_and_batches_score_as_single_queries(trained):
    refiner, data = trained
    spec = ScoreSpec(depth=10, levels=4)
    rng = np.random.default_rng(2)
    ids = np.stack([rng.permutation(len(data.audio))[:10] for _ in range(5)])  # (5, 10)
    ids[4, 7:] = -1  # a query with only 7 results
    vectors = data.audio[np.maximum(ids, 0)]  # (5, 10, d)
    together = rerank(refiner, data.query[:5], ids, vectors, spec)
    for i in range(5):
        assert sorted(together[i].tolist()) == sorted(ids[i].tolist())  # nothing dropped, nothing added
        alone = rerank(refiner, data.query[i : i + 1], ids[i : i + 1], vectors[i : i + 1], spec)
        assert np.array_equal(alone[0], together[i])
    assert (together[4, 7:] == -1).all()  # missing results stay last


def test_reranked_ranks_keep_the_targets_below_the_top(trained):
    refiner, data = trained
    spec = ScoreSpec(depth=8, levels=4)
    before = ranks_query_to_audio(data.query, data.audio, data.query_group)

    def reorder(rows, top, scores):
        return rerank(refiner, data.query[rows], top, data.audio[top], spec)

    after = ranks_after_rerank(data.query, data.audio, data.query_group, reorder, spec.depth)
    assert np.array_equal(after[before > 8], before[before > 8])  # outside the top: untouched
    assert (after[before <= 8] <= 8).all()  # inside: still inside


def test_a_fused_rerank_moves_between_the_dense_order_and_the_error_order(trained):
    refiner, data = trained
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(len(data.audio))[:12] for _ in range(4)])  # (4, 12)
    vectors = data.audio[ids]
    scores = np.sort(rng.random((4, 12)), axis=1)[:, ::-1].copy()  # dense order: as given
    dense_only = rerank(refiner, data.query[:4], ids, vectors, ScoreSpec(depth=12, levels=4, weight=0.0), scores)
    assert np.array_equal(dense_only, ids)
    error_only = rerank(refiner, data.query[:4], ids, vectors, ScoreSpec(depth=12, levels=4, weight=1.0), scores)
    half = rerank(refiner, data.query[:4], ids, vectors, ScoreSpec(depth=12, levels=4, weight=0.5), scores)
    for row in range(4):
        assert sorted(half[row]) == sorted(ids[row]) == sorted(error_only[row])
    with pytest.raises(AssertionError, match="dense scores"):
        rerank(refiner, data.query[:4], ids, vectors, ScoreSpec(depth=12, levels=4, weight=0.5))
