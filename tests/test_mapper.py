"""The mapper: its cosine loss, the optional ranking term (losses.py), training on held-out clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_refiner import _toy_pairs  # two noisy rotated queries per clip

from diffgap.training.losses import group_mask, ranking_loss
from diffgap.training.mapper import MapperConfig, train_mapper
from diffgap.training.metrics import metrics, ranks_query_to_audio


def test_symmetric_ranking_loss_averages_both_ways():
    torch.manual_seed(0)
    est, tgt = torch.randn(6, 8), torch.randn(6, 8)
    logits = F.normalize(est, dim=-1) @ F.normalize(tgt, dim=-1).T / 0.1
    by_hand = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert ranking_loss(est, tgt, 0.1, None, symmetric=True) == pytest.approx(float(by_hand), rel=1e-6)
    assert ranking_loss(est, tgt, 0.1, None) == pytest.approx(float(F.cross_entropy(logits, torch.arange(6))))


def test_rows_of_one_clip_are_not_each_others_negatives():
    # a batch that drew clip 0 twice: with the mask a perfect estimate is not punished for matching
    # both copies, without it the duplicate counts as a negative as close as the positive
    target = F.normalize(torch.randn(4, 8), dim=-1)[[0, 0, 1, 2]]  # (4, d), rows 0 and 1 the same clip
    groups = torch.tensor([0, 0, 1, 2])
    masked = ranking_loss(target, target, 0.05, group_mask(groups), symmetric=True)
    unmasked = ranking_loss(target, target, 0.05, None, symmetric=True)
    assert float(masked) < 0.01 < float(unmasked)
    assert group_mask(groups).tolist()[0] == [True, True, False, False]


@pytest.mark.parametrize("weight", [0.0, 0.2])
def test_mapper_learns_held_out_queries_with_and_without_the_ranking_term(weight):
    train, test = _toy_pairs(n_groups=100).split(0.3, seed=0)
    direct = metrics(ranks_query_to_audio(test.query, test.audio, test.query_group))["R@1"]
    mapper = train_mapper(train, 0, MapperConfig(iterations=300, hidden=64, ranking_weight=weight))
    mapped = metrics(ranks_query_to_audio(mapper.map(test.query), test.audio, test.query_group))["R@1"]
    assert direct < 0.2 and mapped >= 0.9, (direct, mapped)  # a rotation, learnt from other clips' pairs


def test_the_ranking_term_changes_what_is_learnt():
    data = _toy_pairs(n_groups=100)
    plain = train_mapper(data, 0, MapperConfig(iterations=50, hidden=32, ranking_weight=0.0))
    ranked = train_mapper(data, 0, MapperConfig(iterations=50, hidden=32, ranking_weight=0.2))
    again = train_mapper(data, 0, MapperConfig(iterations=50, hidden=32, ranking_weight=0.2))
    x = data.query[:8]
    assert np.array_equal(ranked.map(x), again.map(x))  # seeded: the same weights
    assert not np.allclose(plain.map(x), ranked.map(x), atol=1e-4)
