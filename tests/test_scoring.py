"""The refiner as a scorer: conditional denoising error ranks a query's own audio above others,
reranking only reorders what it was given, a batch scores as its queries do alone, and the weight a
requested rerank gives the error is picked on held-out pairs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from test_refiner import _toy_pairs

from diffgap.diffusion.refiner import Refiner
from diffgap.diffusion.scoring import (
    RERANK,
    ScoreSpec,
    denoising_errors,
    paired_errors,
    rerank,
    rerank_spec,
    reranked_scores,
)
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.training.metrics import metrics, query_ranks, ranks_after_rerank, ranks_query_to_audio
from diffgap.training.refiner import RERANK_GRID, RefinerTrainConfig, fit_rerank_weight, train_refiner


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


def test_the_other_direction_and_the_unconditional_branch_score_as_they_should(trained):
    refiner, data = trained
    rng = np.random.default_rng(4)
    own = data.query_group  # (P,)
    other = (own + rng.integers(1, len(data.audio), len(own))) % len(data.audio)
    audio = np.stack([data.audio[own], data.audio[other]], axis=1)  # (P, 2, d)
    query = np.broadcast_to(data.query[:, None], audio.shape)  # (P, 2, c)
    # BST trained the audio -> query network too: a query denoises better given its own audio
    errors = paired_errors(refiner, query, audio, ScoreSpec(levels=8), direction=1).mean(-1)  # (P, 2)
    assert np.mean(errors[:, 0] < errors[:, 1]) >= 0.8
    # without the condition the same rows get the same errors, whichever query they came with
    shuffled = query[rng.permutation(len(query))]
    alone = paired_errors(refiner, audio, query, ScoreSpec(levels=4), unconditional=True)
    assert np.allclose(alone, paired_errors(refiner, audio, shuffled, ScoreSpec(levels=4), unconditional=True))
    assert not np.allclose(paired_errors(refiner, audio, query, ScoreSpec(levels=4)), alone)


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


def test_reranked_scores_rank_as_the_rerank_orders(trained):
    refiner, data = trained
    spec = ScoreSpec(depth=10, levels=4, weight=0.5)
    scores = data.query[:6] @ data.audio.T  # (6, N)
    top = np.argsort(-scores, axis=1)[:, :10]  # (6, 10)
    errors = denoising_errors(refiner, data.query[:6], data.audio[top], spec)  # (6, 10)
    for weight in (0.0, 0.5, 1.0):
        spec = ScoreSpec(depth=10, levels=4, weight=weight)
        reordered = rerank(refiner, data.query[:6], top, data.audio[top], spec, np.take_along_axis(scores, top, 1))
        as_scores = np.argsort(-reranked_scores(scores, top, errors, weight), axis=1, kind="stable")
        assert np.array_equal(as_scores[:, :10], reordered)  # the top in the rerank's order
        rest = np.argsort(-scores, axis=1, kind="stable")[:, 10:]
        assert np.array_equal(as_scores[:, 10:], rest)  # the rest in their order as before
        if weight == 0:
            assert np.array_equal(reordered, top)  # the dense score alone: the order it came in


def test_the_rerank_weight_is_picked_where_the_error_knows_more_than_the_score(trained):
    refiner, data = trained
    # the same network, ranking by the query as encoded: the queries are a rotation of their audio,
    # so that score is blind, while the network learned the pairs and denoises a query's own audio best
    blind = Refiner(copy.deepcopy(refiner.config), refiner.net)
    blind.config.mix = {"refined": 0.0, "mapped": 0.0, "direct": 1.0}
    report: dict = {}
    fit_rerank_weight(blind, data, report)
    by_weight = report["val_MRR@10_by_rerank_weight"]
    assert set(by_weight) == {str(w) for w in RERANK_GRID} and blind.config.rerank_weight in RERANK_GRID
    assert blind.config.rerank_weight > 0 and by_weight[str(blind.config.rerank_weight)] > by_weight["0.0"] + 0.2
    # what a search then does: the weight picked, through rerank_spec; the fixed 0.5 for older refiners
    assert rerank_spec(blind).weight == blind.config.rerank_weight and rerank_spec(blind).depth == RERANK.depth
    assert rerank_spec(refiner) == RERANK and RERANK.weight == 0.5
    plain = metrics(query_ranks(blind.scores(data.query, data.audio), data.query_group))["MRR@10"]
    assert by_weight["0.0"] == pytest.approx(plain, abs=1e-4)  # weight 0 is the ranking as it was
