from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone

from diffgap.diffusion.refiner import ADAPTER_FILE, MAPPER_BACK_FILE, MAPPER_FILE, Refiner, RefinerError
from diffgap.diffusion.schedule import DDIMSampler, NoiseSchedule, ScheduleConfig
from diffgap.encoders import load_encoders
from diffgap.encoders.base import EncoderFingerprint
from diffgap.media.audio import write_audio
from diffgap.models.mapper_net import Mapper
from diffgap.models.refiner_net import RefinerNet, RefinerNetConfig
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.evaluate import DIRECT, UPPER, Row, add_recovery, format_table
from diffgap.training.losses import ranking_loss
from diffgap.training.mapper import MapperConfig
from diffgap.training.metrics import (
    BLEND_GRID,
    LIBRARY_GRID,
    choose_blend,
    choose_mix,
    metrics,
    mix,
    query_ranks,
    ranks_audio_to_query,
    ranks_query_to_audio,
    simplex_grid,
)
from diffgap.training.refiner import (
    FEW_PAIRS,
    SPAN_MAPPER_RANKING_WEIGHT,
    RefinerTrainConfig,
    WeightAverage,
    diffusion_loss,
    direction_at,
    fit_refiner,
    fit_segment_weight,
    train_refiner,
)
from indexer.cli import main


def test_linear_schedule_matches_hand_computation():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=4, beta_schedule="linear", beta_start=0.1, beta_end=0.4))
    np.testing.assert_allclose(s.betas.numpy(), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), [0.9, 0.72, 0.504, 0.3024])
    z0, eps = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    zn = s.add_noise(z0, eps, torch.tensor([1]))
    assert float(zn) == pytest.approx(math.sqrt(0.72) * 2 + math.sqrt(0.28) * 1, rel=1e-6)


def test_cosine_schedule_is_monotone_and_ends_near_pure_noise():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=1000))
    abar = s.alphas_cumprod.numpy()
    assert np.all(np.diff(abar) < 0) and abar[0] > 0.999 and abar[-1] < 1e-4


def test_ddim_steps_match_hand_computation():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=4, beta_schedule="linear", beta_start=0.1, beta_end=0.4))
    sampler = DDIMSampler(s, "epsilon")
    assert sampler.set_timesteps(2).tolist() == [3, 0]
    assert sampler.set_timesteps(10).tolist() == [3, 2, 1, 0]  # never more steps than exist
    assert sampler.set_timesteps(2, start_step=2).tolist() == [2, 0]
    sampler.set_timesteps(2)
    z3, eps = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    # from n=3 to n'=0: z0_hat = (z3 - sqrt(1-.3024) eps) / sqrt(.3024); z_0' = sqrt(.9) z0_hat + sqrt(.1) eps
    z0_hat = (1.0 - math.sqrt(1 - 0.3024) * 0.5) / math.sqrt(0.3024)
    out = sampler.step(eps, 3, z3)
    assert float(out) == pytest.approx(math.sqrt(0.9) * z0_hat + math.sqrt(0.1) * 0.5, rel=1e-6)
    # the last step returns the clean estimate itself
    z0_from_0 = (1.0 - math.sqrt(0.1) * 0.5) / math.sqrt(0.9)
    assert float(sampler.step(eps, 0, z3)) == pytest.approx(z0_from_0, rel=1e-6)
    # with x0-prediction the same transition uses the predicted sample
    sample_sampler = DDIMSampler(s, "sample")
    sample_sampler.set_timesteps(2)
    eps_hat = (1.0 - math.sqrt(0.3024) * 2.0) / math.sqrt(1 - 0.3024)
    assert float(sample_sampler.step(torch.tensor([[2.0]]), 3, z3)) == pytest.approx(
        math.sqrt(0.9) * 2.0 + math.sqrt(0.1) * eps_hat, rel=1e-6
    )


def _toy_pairs(n_groups=120, d=16, seed=0) -> PairEmbeddings:
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    audio = unit(rng.standard_normal((n_groups, d)))
    groups = np.repeat(np.arange(n_groups), 2)
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    query = unit(audio[groups] @ rot + 0.05 * rng.standard_normal((len(groups), d)))
    return PairEmbeddings(audio, query, groups, [str(i) for i in range(n_groups)], "text")


def test_training_on_few_pairs_says_the_refiner_may_rank_below_direct_search(tiny_clap, tmp_path, caplog):
    encoders = load_encoders(f"clap:{tiny_clap}")  # only their fingerprints are stamped on the refiner
    cfg, net = RefinerTrainConfig(iterations=4), RefinerNetConfig(audio_dim=16, query_dim=16, hidden=32, n_blocks=1)
    for n_groups in (60, FEW_PAIRS // 2):  # two pairs a clip: 120 pairs, then just enough
        caplog.clear()
        data = _toy_pairs(n_groups=n_groups, seed=5)
        refiner, _ = fit_refiner(data, encoders, tmp_path / str(n_groups), cfg=cfg, net_cfg=net, checkpoint_every=0)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert (len(data.query) < FEW_PAIRS) == any("may rank below direct search" in m for m in warned), warned
        assert refiner.config.mix  # it trains and picks its weights either way
    # pairs with time spans beat direct search from 100 pairs on (BENCHMARKS.md run 16): no warning
    caplog.clear()
    data = _toy_pairs(n_groups=60, seed=5)
    spans = {"query_segments": _unit(np.repeat(data.query[:, None], 4, 1)),
             "audio_segments": _unit(np.repeat(data.audio[:, None], 4, 1))}  # fmt: skip
    fit_refiner(dataclasses.replace(data, **spans), encoders, tmp_path / "s", cfg=cfg, net_cfg=net, checkpoint_every=0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_one_training_step_reduces_the_loss():
    data = _toy_pairs()
    net = RefinerNet(RefinerNetConfig(audio_dim=16, query_dim=16, hidden=64, n_blocks=2))
    schedule = NoiseSchedule()
    cfg = RefinerTrainConfig()
    idx = torch.arange(64)
    target = torch.from_numpy(data.audio[data.query_group[:64]]) * 4
    cond = torch.from_numpy(data.query[idx.numpy()]) * 4

    def loss() -> torch.Tensor:
        return diffusion_loss(net, schedule, target, cond, 0, cfg, torch.Generator().manual_seed(7))

    before = loss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.zero_grad()
    before.backward()
    opt.step()
    assert float(loss().detach()) < float(before.detach())


def test_bst_switches_direction_every_m_iterations():
    cfg = RefinerTrainConfig(iterations=12, switch_every=3)
    assert [direction_at(i, cfg) for i in range(12)] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert all(direction_at(i, RefinerTrainConfig(bidirectional=False, switch_every=3)) == 0 for i in range(12))
    assert RefinerTrainConfig(iterations=25000).interval() == 5000  # the paper's m, five phases ending on query->audio
    _, history = train_refiner(
        _toy_pairs(),
        cfg=RefinerTrainConfig(iterations=12, switch_every=3, batch_size=16),
        net_cfg=RefinerNetConfig(audio_dim=16, query_dim=16, hidden=32, n_blocks=1),
    )
    assert history.directions == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]


def test_cosine_lr_warms_up_then_decays_to_a_tenth():
    cfg = RefinerTrainConfig(iterations=1000, lr_schedule="cosine")
    factors = [cfg.lr_factor(i) for i in range(1000)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)  # 2% warmup
    assert all(a >= b for a, b in zip(factors[19:], factors[20:], strict=False))  # then never rises
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert RefinerTrainConfig(iterations=1000).lr_factor(999) == 1.0  # the paper's constant rate by default
    with pytest.raises(AssertionError, match="unknown lr_schedule"):
        RefinerTrainConfig(lr_schedule="step").lr_factor(5)


def test_weight_average_follows_the_weights_slowly():
    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(3):
        average.update(net)
    moved = average.net.weight - start  # every coordinate moved by the same share of the step
    assert torch.allclose(moved, moved.flatten()[0].expand_as(moved))
    # the decay ramps up ((1+t)/(10+t): 0.1, 0.18, 0.25), so the early random weights fade fast
    assert float(moved.flatten()[0]) == pytest.approx(1 - 0.1 * (2 / 11) * (3 / 12), rel=1e-5)
    assert not any(p.requires_grad for p in average.net.parameters())


def test_training_with_ema_and_cosine_lr_resumes_bit_identical(tmp_path):
    data = _toy_pairs(n_groups=40)
    cfg = RefinerTrainConfig(iterations=60, batch_size=16, ema_decay=0.95, lr_schedule="cosine")
    net_cfg = RefinerNetConfig(audio_dim=16, query_dim=16, hidden=32, n_blocks=1)
    whole, _ = train_refiner(data, cfg=cfg, net_cfg=net_cfg)

    class Stop(Exception):
        pass

    def stop_at_45(it: int, loss: float) -> None:
        if it == 45:
            raise Stop

    with pytest.raises(Stop):
        train_refiner(
            data, cfg=cfg, net_cfg=net_cfg, checkpoint=tmp_path / "ck", checkpoint_every=20, progress=stop_at_45
        )
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["ema_updates"] == 40
    resumed, _ = train_refiner(data, cfg=cfg, net_cfg=net_cfg, checkpoint=tmp_path / "ck", checkpoint_every=20)
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what ships is the average, not the last iterate
    last, _ = train_refiner(data, cfg=RefinerTrainConfig(**{**cfg.__dict__, "ema_decay": 0.0}), net_cfg=net_cfg)
    assert not torch.equal(last.net.state_dict()["z_in.0.weight"], a["z_in.0.weight"])
    assert whole.config.training["ema_decay"] == 0.95


@pytest.fixture(scope="module")
def trained() -> tuple[Refiner, PairEmbeddings, PairEmbeddings]:
    train, test = _toy_pairs().split(0.25)
    refiner, history = train_refiner(
        train,
        test,
        cfg=RefinerTrainConfig(iterations=800, eval_every=400),
        net_cfg=RefinerNetConfig(audio_dim=16, query_dim=16, hidden=128, n_blocks=2),
    )
    assert history.val_loss[-1] < history.val_loss[0] * 1.05 and np.mean(history.train_loss[-50:]) < np.mean(
        history.train_loss[:50]
    )
    return refiner, train, test


def test_refined_retrieval_is_deterministic_and_beats_direct(trained):
    refiner, _, test = trained
    for mode in ("sample", "bridge"):
        a = refiner.refine(test.query, steps=5, mode=mode)
        b = refiner.refine(test.query, steps=5, mode=mode)
        np.testing.assert_array_equal(a, b)
        assert a.shape == test.query.shape and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    averaged = refiner.refine(test.query, steps=5, n_samples=4)
    np.testing.assert_array_equal(averaged, refiner.refine(test.query, steps=5, n_samples=4))
    direct = metrics(ranks_query_to_audio(test.query, test.audio, test.query_group))
    refined = metrics(ranks_query_to_audio(refiner.refine(test.query, steps=5), test.audio, test.query_group))
    assert refined["R@1"] > direct["R@1"] + 0.2, (refined, direct)
    back = metrics(ranks_audio_to_query(refiner.refine(test.audio, direction=1, steps=5), test.query, test.query_group))
    assert back["R@1"] > metrics(ranks_audio_to_query(test.audio, test.query, test.query_group))["R@1"]


def test_bad_refine_arguments(trained):
    refiner, _, test = trained
    with pytest.raises(RefinerError, match="expects"):
        refiner.refine(np.zeros((2, 5), np.float32))
    with pytest.raises(RefinerError, match="unknown refinement mode"):
        refiner.refine(test.query[:2], mode="teleport")
    with pytest.raises(RefinerError, match="blend"):
        refiner.refine(test.query[:2], blend=1.5)
    with pytest.raises(TypeError, match="stpes"):  # a misspelt option is an error, not silently ignored
        refiner.refine(test.query[:2], stpes=20)


def test_bridge_starts_from_a_given_estimate(trained):
    refiner, _, test = trained
    truth = test.audio[test.query_group]  # (Q, d): the best estimate there is
    # a little noise on the truth, denoised, stays the truth; from the query it does not (rotated)
    near = refiner.refine(test.query, mode="bridge", start=truth, start_step=20, blend=0.0)
    assert metrics(ranks_query_to_audio(near, test.audio, test.query_group))["R@1"] == 1.0
    assert float(np.mean(np.sum(near * truth, axis=1))) > 0.95
    from_query = refiner.refine(test.query, mode="bridge", start_step=20, blend=0.0)
    assert float(np.mean(np.sum(from_query * truth, axis=1))) < 0.9
    np.testing.assert_allclose(  # the query as `start` is the default (up to renormalising it)
        refiner.refine(test.query, mode="bridge", start=test.query, start_step=20, blend=0.0), from_query, atol=1e-5
    )
    with pytest.raises(RefinerError, match="bridge start of shape"):
        refiner.refine(test.query, mode="bridge", start=truth[:, :8])


def test_the_path_loss_ranks_exactly_what_search_computes(trained):
    refiner, train, _ = trained
    cond = torch.from_numpy(train.query[:32]) * 4  # (B, c) rescaled by sqrt(16), as training does
    target = torch.from_numpy(train.audio[train.query_group[:32]]) * 4
    same = torch.from_numpy(train.query_group[:32])
    same = same[:, None] == same[None, :]
    base = RefinerTrainConfig(contrastive_weight=0.0)

    def loss(path_weight: float) -> float:
        cfg = RefinerTrainConfig(**{**base.__dict__, "path_weight": path_weight})
        out = diffusion_loss(
            refiner.net, refiner.schedule, target, cond, 0, cfg, torch.Generator().manual_seed(3), same
        )
        return float(out.detach())

    searched = torch.from_numpy(refiner.refine(train.query[:32], steps=1, blend=0.0))  # what search ranks by
    expected = ranking_loss(searched, target, base.contrastive_temperature, same)
    assert loss(0.5) - loss(0.0) == pytest.approx(0.5 * float(expected), rel=1e-4)


def test_mix_weights_are_picked_on_held_out_pairs(trained):
    _, _, test = trained
    grid = simplex_grid(3)
    assert len(grid) == 15 and all(sum(w) == pytest.approx(1.0) for w in grid) and len(set(grid)) == 15
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(test.query.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    truth = test.audio[test.query_group]
    weights, score = choose_mix(test, [noise, truth, test.query])
    assert score == 1.0 and max(weights) == weights[1] >= 0.75  # the exact map dominates
    weights, score = choose_mix(test, [noise, test.query])  # two weak maps: the score is the mix's own
    assert (
        score
        == metrics(ranks_query_to_audio(mix([noise, test.query], weights), test.audio, test.query_group))["MRR@10"]
    )
    np.testing.assert_allclose(mix([noise, truth], (0.0, 1.0)), truth, atol=1e-6)
    # audio -> query: the other direction ranks query rows
    queries_of_audio = np.stack([test.query[np.flatnonzero(test.query_group == g)[0]] for g in range(len(test.audio))])
    weights, score = choose_mix(test, [queries_of_audio, test.audio], direction=1)
    assert weights[0] >= 0.75 and score == 1.0


def test_recovery_column_is_the_share_of_the_upper_bound_gained():
    def r1(value: float) -> dict:
        return {"R@1": value, "R@5": value, "R@10": value, "median_rank": 1.0, "MRR@10": value, "n": 10}

    rows = add_recovery(
        [Row(DIRECT, r1(0.2), r1(0.3)), Row(UPPER, r1(0.6), r1(0.3)), Row("refiner", r1(0.5), r1(0.25))]
    )
    assert rows[2].notes == {"recovery_to_audio": 0.75}  # the upper bound is no higher back: no column there
    assert rows[0].notes["recovery_to_audio"] == 0.0 and rows[1].notes["recovery_to_audio"] == 1.0
    table = format_table(rows)
    assert "| recovery |" in table and "| 75% |" in table
    assert "recovery" not in format_table([Row(DIRECT, r1(0.2), None), Row("refiner", r1(0.5), None)])


def test_checkpoint_round_trip_and_encoder_refusal(trained, tmp_path):
    refiner, _, test = trained
    fp_audio = EncoderFingerprint("compact", "m", "aa" * 32, "audio")
    fp_text = EncoderFingerprint("compact", "m", "aa" * 32, "text")
    refiner.config.audio_fingerprint, refiner.config.query_fingerprint = fp_audio.to_dict(), fp_text.to_dict()
    refiner.save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["model.safetensors", "refiner.json"]
    loaded = Refiner.load(tmp_path / "r")
    np.testing.assert_array_equal(loaded.refine(test.query, steps=5), refiner.refine(test.query, steps=5))
    assert loaded.num_bytes == refiner.num_bytes
    loaded.check_encoders(fp_audio, fp_text)
    other = EncoderFingerprint("compact", "m", "bb" * 32, "audio")
    with pytest.raises(RefinerError, match="retrain it"):
        loaded.check_encoders(other, fp_text)
    (tmp_path / "r" / "refiner.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RefinerError):
        Refiner.load(tmp_path / "r")


def test_blend_weight_is_picked_on_held_out_pairs_and_served_by_default(trained, tmp_path):
    refiner, _, test = trained
    # Queries that are their audio's own vector: direct search is perfect, so blending in direct wins.
    easy = PairEmbeddings(test.audio, test.audio[test.query_group], test.query_group, test.audio_keys, "text")
    best, by_weight = choose_blend(refiner, easy)
    assert by_weight[best] == max(by_weight.values()) > by_weight[0.0], by_weight
    assert best == min(w for w in BLEND_GRID if by_weight[w] == by_weight[best])  # ties: the lighter blend
    # Queries rotated away from audio (what the refiner was trained on): refinement alone wins.
    best, by_weight = choose_blend(refiner, test)
    assert best == 0.0 and by_weight[0.0] > by_weight[max(BLEND_GRID)], by_weight
    # Other sizes cannot be blended.
    other = PairEmbeddings(test.audio, test.query[:, :8], test.query_group, test.audio_keys, "text")
    assert choose_blend(refiner, other) == (0.0, {})
    # The stored weight is what refine() uses when the caller names none, and survives a save.
    refiner.config.blend = 0.5
    try:
        refiner.save(tmp_path / "r")
    finally:
        refiner.config.blend = 0.0
    loaded = Refiner.load(tmp_path / "r")
    assert loaded.config.blend == 0.5
    np.testing.assert_array_equal(loaded.refine(test.query), refiner.refine(test.query, blend=0.5))
    assert not np.allclose(loaded.refine(test.query), refiner.refine(test.query))
    np.testing.assert_array_equal(loaded.refine(test.audio, direction=1), refiner.refine(test.audio, direction=1))
    # A refiner saved before the field existed was served unblended.
    cfg = json.loads((tmp_path / "r" / "refiner.json").read_text())
    del cfg["blend"]
    (tmp_path / "r" / "refiner.json").write_text(json.dumps(cfg))
    assert Refiner.load(tmp_path / "r").config.blend == 0.0
    (tmp_path / "r" / "refiner.json").write_text(json.dumps({**cfg, "blend": 1.5}))
    with pytest.raises(RefinerError, match=r"blend in refiner.json must be in \[0, 1\]"):
        Refiner.load(tmp_path / "r")


def test_a_mix_of_refined_mapped_and_direct_scores_is_saved_and_served(trained, tmp_path):
    refiner, _, test = trained
    mapper = Mapper(16, 16, hidden=8)
    served = Refiner(refiner.config, refiner.net, mapper)
    served.config = type(refiner.config)(
        **{**refiner.config.__dict__, "mix": {"refined": 0.5, "mapped": 0.25, "direct": 0.25}}
    )
    served.config.mapper_hidden = 8
    served.save(tmp_path / "m")
    assert (tmp_path / "m" / MAPPER_FILE).exists()
    loaded = Refiner.load(tmp_path / "m")
    refined = refiner.refine(test.query, blend=0.0)
    by_hand = 0.5 * refined + 0.25 * mapper.map(test.query) + 0.25 * test.query
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.refine(test.query), by_hand, atol=1e-5)  # a search naming no blend
    np.testing.assert_array_equal(loaded.refine(test.query, blend=0.0), refined)  # a named blend bypasses it
    np.testing.assert_array_equal(loaded.refine(test.audio, direction=1), refiner.refine(test.audio, direction=1))
    (tmp_path / "m" / MAPPER_FILE).unlink()
    with pytest.raises(RefinerError, match="mixes in mapped scores"):
        Refiner.load(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "refiner.json").read_text())
    for bad in ({"refined": 0.5, "mapped": 0.6}, {"refined": 1.0, "guess": 0.0}, {"refined": -0.5, "direct": 1.5}):
        (tmp_path / "m" / "refiner.json").write_text(json.dumps({**cfg, "mix": bad}))
        with pytest.raises(RefinerError, match="mix in refiner.json"):
            Refiner.load(tmp_path / "m")
    # no mapped weight: no mapper file needed
    (tmp_path / "m" / "refiner.json").write_text(json.dumps({**cfg, "mix": {"refined": 0.75, "direct": 0.25}}))
    np.testing.assert_allclose(Refiner.load(tmp_path / "m").refine(test.query), refiner.refine(test.query, blend=0.25))


def test_default_size_is_near_the_paper_budget():
    clap_sized = RefinerNet(RefinerNetConfig(audio_dim=512, query_dim=512))
    assert 4.0e6 < clap_sized.num_bytes() < 8.0e6  # the paper: 5.4 MB


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("captioned")
    rows = ["id,split,audio,caption"]
    words = {
        200: "low hum",
        400: "low tone",
        700: "mid beep",
        1000: "mid whistle",
        1500: "high beep",
        2200: "high whistle",
        3000: "very high squeal",
        300: "deep drone",
    }
    for i, (freq, text) in enumerate(words.items()):
        write_audio(root / f"{freq}.wav", tone(freq, 1.0, 16000), 16000)
        split = "test" if i % 4 == 3 else "train"
        rows += [f"{freq},{split},{freq}.wav,{text}", f"{freq},{split},{freq}.wav,a {text} sound"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def test_train_refiner_refuses_a_blend_outside_the_unit_interval(captioned, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["refiner", "train", "--pairs", str(captioned / "pairs.csv"), "--out", str(tmp_path / "ref"),
              "--blend", "2"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--blend: must be in [0, 1], got 2" in capsys.readouterr().err
    assert not (tmp_path / "ref").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--adapter-steps", "0"], "--adapter-steps must be at least 1"),
     (["--adapter-check-every", "-5"], "--adapter-check-every must be 0 (no checks) or more"),
     (["--mapper-ranking-weight", "-1"], "--mapper-ranking-weight must be 0 (a plain regression) or more")],
)  # fmt: skip
def test_train_refiner_refuses_bad_settings_for_its_adapter_and_mapper(
    captioned, tiny_clap, tmp_path, caplog, option, message
):
    args = ["refiner", "train", "-q", "--pairs", str(captioned / "pairs.csv"), "--encoder", f"clap:{tiny_clap}",
            "--out", str(tmp_path / "ref"), "--adapter", *option]  # fmt: skip
    assert main(args) == 2
    assert message in caplog.text and not (tmp_path / "ref").exists()


def test_train_refiner_and_eval_commands(captioned, tiny_clap, tmp_path, capsys):
    enc = f"clap:{tiny_clap}"
    assert (
        main(
            [
                "refiner",
                "train",
                "-q",
                "--pairs",
                str(captioned / "pairs.csv"),
                "--encoder",
                enc,
                "--iterations",
                "40",
                "--out",
                str(tmp_path / "ref"),
                "--cache",
                str(tmp_path / "cache"),
                "--val-fraction",
                "0.25",
                "--adapter",  # a CLAP tower reads no sentence model: the adapter is opt-in there
                "--adapter-steps",
                "30",
                "--mapper-ranking-weight",
                "0.1",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_train"] + report["pairs_val"] == 16 and report["val_refined"]["n"] == report["pairs_val"]
    assert "val_direct" in report and report["mapper_ranking_weight"] == 0.1
    cfg = json.loads((tmp_path / "ref" / "refiner.json").read_text())
    assert cfg["audio_fingerprint"]["family"] == "clap" and cfg["training"]["iterations"] == 40
    # the served blend weight is the held-out winner among the weights it tried
    by_weight = report["val_MRR@10_by_blend"]
    assert set(by_weight) == {str(w) for w in BLEND_GRID} and cfg["blend"] == report["blend"]
    assert by_weight[str(cfg["blend"])] == max(by_weight.values())
    # and the four-score mix (the text adapter's among them, asked for), picked on the same pairs, is at
    # least as good there as any blend alone
    assert cfg["mix"] == report["mix"] and set(cfg["mix"]) == {"refined", "mapped", "direct", "adapted"}
    assert sum(cfg["mix"].values()) == pytest.approx(1.0) and report["val_MRR@10_mix"] >= max(by_weight.values()) - 1e-9
    assert (tmp_path / "ref" / MAPPER_FILE).exists() == (cfg["mix"]["mapped"] > 0)
    assert (tmp_path / "ref" / ADAPTER_FILE).exists() == (cfg["mix"]["adapted"] > 0) and report["adapter_bytes"] > 0
    # then the library side against that mix, on the same pairs: never worse there than the mix alone
    assert cfg["library_weight"] == report["library_weight"] and report["library_weight"] in LIBRARY_GRID
    assert report["val_MRR@10_two_sided"] >= report["val_MRR@10_mix"] - 1e-9
    assert (tmp_path / "ref" / MAPPER_BACK_FILE).exists() == (cfg["library_weight"] > 0)
    one = ["refiner", "train", "-q", "--pairs", str(captioned / "pairs.csv"), "--encoder", enc, "--iterations", "4",
           "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "cache"), "--one-sided"]  # fmt: skip
    assert main(one) == 0
    report_one = json.loads(capsys.readouterr().out)
    assert report_one["library_weight"] == 0 and "val_MRR@10_two_sided" not in report_one and report_one["mix"]
    assert not (tmp_path / "one" / MAPPER_BACK_FILE).exists()
    # the adapter was scored on the held-out pairs (the last of its 30 steps at least) and its best step kept
    fit = report["adapter_fit"]
    assert fit["steps"] <= 30 and fit["best_step"] is not None and 0 <= fit["best_score"] <= 1
    (cached,) = (tmp_path / "cache").glob("pairs-*.npz")  # embeddings are cached, with their texts
    with open(captioned / "pairs.csv", newline="") as fh:
        captions = [row["caption"] for row in csv.DictReader(fh)]
    assert sorted(str(t) for t in np.load(cached)["texts"]) == sorted(captions)
    out = tmp_path / "eval.json"
    eval_args = ["refiner", "eval", "-q", "--pairs", str(captioned / "pairs.csv"), "--split", "train"]
    eval_args += ["--test-split", "test", "--encoder", enc]
    assert (
        main(
            [
                *eval_args,
                "--iterations",
                "30",
                "--mapper-iterations",
                "30",
                "--steps",
                "5,20,50",
                "--intervals",
                "10",
                "--adapter",
                "--adapter-steps",
                "20",
                "--mapper-ranking-weight",  # off by default: its row and the mix over the plain mapper
                "0.2",
                "--json",
                str(out),
                "--cache",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    for expected in (
        "direct",
        "regression mapper (MLP)",
        "mapper with a ranking loss (0.2), as the refiner ships it",
        "without BST",
        "5 steps",
        "20 steps",
        "50 steps",
        "m=10",
        "z_0-prediction",
        "bridge",
        "blend 0.5",
        "blend chosen on held-out pairs",
        "direct, top 50 reranked by denoising error",
        "5 steps, top 50 reranked by denoising error",
        "EMA 0.999, sample",
        "EMA 0.999 + cosine LR",
        "bridge from the mapper's estimate",
        "ensemble of refined, mapped and direct scores, weights chosen on held-out pairs",
        "text adapter alone (a head over minilm-l6's token states",
        "ensemble of refined, mapped, direct and adapted scores, weights chosen on held-out pairs",
    ):
        assert any(expected in n for n in names), (expected, names)
    assert "| direct (no refiner) |" in table
    rows = json.loads(out.read_text())["rows"]
    assert all(r["to_audio"]["n"] == 4 for r in rows)  # two test clips, two captions each
    mixes = [r for r in rows if r["name"].startswith("ensemble")]
    ensemble, over_plain, adapted = [r for r in mixes if "two-sided" not in r["name"]]
    assert "with the plain regression mapper" in over_plain["name"]  # what the ranking term adds to the mix
    assert len(ensemble["notes"]["weights"]) == 2 and all(len(w) == 3 for w in ensemble["notes"]["weights"])
    assert [len(w) for w in adapted["notes"]["weights"]] == [4, 3]  # the adapter reads queries, not audio
    # each mix has its two-sided twin: the same weights, and a library-side weight per direction from the grid
    twins = [r for r in mixes if "two-sided" in r["name"]]
    assert [t["name"].split(", two-sided")[0] for t in twins] == [ensemble["name"], over_plain["name"], adapted["name"]]
    for twin, single in zip(twins, (ensemble, over_plain, adapted), strict=True):
        assert twin["notes"]["weights"] == single["notes"]["weights"]
        assert all(w in LIBRARY_GRID for w in twin["notes"]["library_weight"])
        if twin["notes"]["library_weight"] == [0, 0]:  # no library side: the same ranking as the mix
            assert twin["to_audio"] == single["to_audio"] and twin["from_audio"] == single["from_audio"]
    # an upper bound from an index with the same encoders is direct search itself: no recovery to show
    upper = tmp_path / "upper"
    assert main(["build", str(captioned), "-o", str(upper), "--encoder", enc, "-q"]) == 0
    capsys.readouterr()
    args = [*eval_args, "--iterations", "5", "--mapper-iterations", "5", "--steps", "1", "--json", str(out)]
    args += ["--no-adapter", "--no-variants"]
    assert main([*args, "--upper-index", str(upper), "--no-ablations", "--cache", str(tmp_path / "cache")]) == 0
    assert "| in-domain upper bound" in capsys.readouterr().out
    by_name = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert by_name[UPPER]["to_audio"] == by_name[DIRECT]["to_audio"]
    assert not any("z_0" in n or "reranked" in n for n in by_name)  # --no-ablations
    assert not any("EMA" in n or "adapter" in n or "adapted" in n for n in by_name)  # --no-variants, --no-adapter
    assert not any("ranking loss" in n or "plain regression" in n for n in by_name)  # the plain mapper by default
    assert any(n.startswith("ensemble") for n in by_name)
    assert main([*args, "--upper-index", str(tmp_path / "nowhere")]) != 0
    # the trained refiner refuses an index built with another encoder
    from tiny_models import make_tiny_clap

    other = make_tiny_clap(tmp_path / "other", seed=5)
    assert (
        main(
            [
                "refiner",
                "eval",
                "-q",
                "--pairs",
                str(captioned / "pairs.csv"),
                "--split",
                "train",
                "--test-split",
                "test",
                "--encoder",
                f"clap:{other}",
                "--refiner",
                str(tmp_path / "ref"),
                "--iterations",
                "5",
                "--mapper-iterations",
                "5",
            ]
        )
        == 1
    )


def test_search_command_uses_the_refiner(captioned, tiny_clap, tmp_path, capsys):
    enc = f"clap:{tiny_clap}"
    index = tmp_path / "idx"
    assert main(["build", str(captioned), "-o", str(index), "--encoder", enc, "-q"]) == 0
    assert (
        main(
            [
                "refiner",
                "train",
                "-q",
                "--pairs",
                str(captioned / "pairs.csv"),
                "--index",
                str(index),
                "--iterations",
                "20",
            ]
        )
        == 0
    )
    assert (index / "refiner-text" / "refiner.json").exists()
    capsys.readouterr()
    assert main(["search", str(index), "--text", "high beep", "--refine", "--steps", "5", "--json", "-k", "3"]) == 0
    refined = json.loads(capsys.readouterr().out)
    assert main(["search", str(index), "--text", "high beep", "--json", "-k", "3"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert len(refined) == len(direct) == 3 and [h["score"] for h in refined] != [h["score"] for h in direct]


def test_refinement_does_not_depend_on_batch_neighbours(trained):
    refiner, _, test = trained
    for mode in ("sample", "bridge"):
        together = refiner.refine(test.query[:6], steps=5, mode=mode, n_samples=2)
        alone = np.concatenate(
            [refiner.refine(test.query[i : i + 1], steps=5, mode=mode, n_samples=2) for i in range(6)]
        )
        np.testing.assert_allclose(together, alone, atol=1e-5)


def test_traced_network_matches_eager_at_any_batch_size():
    import torch

    from diffgap.diffusion.refiner import Refiner, RefinerConfig

    torch.manual_seed(0)
    refiner = Refiner(RefinerConfig(net=RefinerNetConfig(audio_dim=16, query_dim=12, hidden=32)))
    for p in refiner.net.parameters():  # adaLN-Zero starts as the identity: make every path count
        torch.nn.init.normal_(p, std=0.2)
    for direction, (d, c) in enumerate([(16, 12), (12, 16)]):
        for b in (1, 7):
            z, cond = torch.randn(b, d), torch.randn(b, c)
            steps = torch.randint(0, 1000, (b,))
            with torch.no_grad():
                eager = refiner.net(z, steps, cond, direction)
                traced = refiner._conditional(direction)(z, steps, cond)
            torch.testing.assert_close(traced, eager)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _near_duplicate_video_pairs(family: np.ndarray, query_noise: float, seed: int) -> PairEmbeddings:
    """Video pairs whose clips come in families (`family[i]`: clip i's) of near-duplicates, clip vectors
    0.02 apart, less than a query's noise, told apart only by their 4 time spans; two queries a clip,
    each its clip's vectors with noise."""
    rng = np.random.default_rng(seed)
    n = len(family)
    clip = _unit(rng.standard_normal((int(family.max()) + 1, 16))[family] + 0.02 * rng.standard_normal((n, 16)))
    spans = _unit(rng.standard_normal((n, 4, 16)))  # (n, 4, 16)
    groups = np.repeat(np.arange(n), 2)
    return PairEmbeddings(
        clip, _unit(clip[groups] + query_noise * rng.standard_normal((2 * n, 16))), groups, [str(i) for i in range(n)],
        "video", None, _unit(spans[groups] + 0.05 * rng.standard_normal((2 * n, 4, 16))), spans,
    )  # fmt: skip


SPANS_TRAIN = RefinerTrainConfig(iterations=4)  # a few steps: the weights, not the network, are tested
SPANS_NET = RefinerNetConfig(audio_dim=16, query_dim=16, hidden=32, n_blocks=1)


def test_the_segment_weight_is_picked_where_spans_tell_clips_apart_and_saved(tiny_clap, tiny_clip, tmp_path):
    encoders = load_encoders(f"clap:{tiny_clap}", f"clip:{tiny_clip}")  # only their fingerprints are stamped
    cfg, net = SPANS_TRAIN, SPANS_NET
    blurred = _near_duplicate_video_pairs(np.repeat(np.arange(75), 2), query_noise=0.1, seed=8)
    clip, groups, spans = blurred.audio, blurred.query_group, blurred.audio_segments
    data = PairEmbeddings(clip, blurred.query, groups, blurred.audio_keys, "video")  # the same without spans
    train, val = blurred.split(0.1)
    assert val.query_segments.shape == (len(val.query), 4, 16) and val.audio_segments.shape == (len(val.audio), 4, 16)
    assert np.array_equal(val.audio_segments, spans[np.isin(blurred.audio_keys, val.audio_keys)])
    refiner, report = fit_refiner(blurred, encoders, tmp_path / "r", cfg=cfg, net_cfg=net, checkpoint_every=0)
    assert refiner.config.segment_weight > 0 and refiner.config.segments == 4
    assert report["segment_weight"] == refiner.config.segment_weight and report["val_MRR@10_segments"] > 0.9
    loaded = Refiner.load(tmp_path / "r")
    assert (loaded.config.segment_weight, loaded.config.segments) == (refiner.config.segment_weight, 4)
    with_spans = loaded.scores(val.query, val.audio, segments=(val.query_segments, val.audio_segments))
    assert metrics(query_ranks(with_spans, val.query_group))["R@1"] > 0.9
    # pairs embedded without spans: no weight, as before
    plain, _ = fit_refiner(data, encoders, tmp_path / "p", cfg=cfg, net_cfg=net, checkpoint_every=0)
    assert (plain.config.segment_weight, plain.config.segments) == (0.0, 0)
    bad = json.loads((tmp_path / "r" / "refiner.json").read_text())
    assert loaded.config.rerank_weight == refiner.config.rerank_weight == report["rerank_weight"]  # picked, kept
    bad_values = (
        ("segment_weight", 1.5),
        ("segments", 0),
        ("segments", "4"),
        ("rerank_weight", 1.5),
        ("rerank_weight", "0.5"),
    )
    for field, value in bad_values:
        (tmp_path / "r" / "refiner.json").write_text(json.dumps({**bad, field: value}))
        with pytest.raises(RefinerError, match=field):
            Refiner.load(tmp_path / "r")


def test_a_library_sized_gallery_weighs_the_spans_a_few_held_out_clips_cannot(tiny_clap, tiny_clip, tmp_path):
    encoders = load_encoders(f"clap:{tiny_clap}", f"clip:{tiny_clip}")  # only their fingerprints are stamped
    cfg, net = SPANS_TRAIN, SPANS_NET
    # each held-out clip's near-duplicate a training clip (the split depends only on the number of
    # clips and the seed)
    keys = [str(i) for i in range(150)]
    shape_only = PairEmbeddings(np.zeros((150, 1)), np.zeros((0, 1)), np.zeros(0, int), keys, "video")
    held = [int(k) for k in shape_only.split(0.1)[1].audio_keys]
    rest = [i for i in range(150) if i not in held]
    family = np.empty(150, dtype=np.int64)
    family[held], family[rest[: len(held)]] = np.arange(len(held)), np.arange(len(held))
    family[rest[len(held) :]] = len(held) + np.arange(len(rest) - len(held)) // 2
    data = _near_duplicate_video_pairs(family, query_noise=0.05, seed=9)
    train, val = data.split(0.1)
    gallery = val.with_distractors(train)
    assert len(gallery.audio) == 150 and gallery.audio_segments.shape == (150, 4, 16)
    assert np.array_equal(gallery.query_group, val.query_group) and np.array_equal(
        gallery.audio[: len(val.audio)], val.audio
    )
    assert gallery.audio_keys == [*val.audio_keys, *train.audio_keys]
    alone, alone_report = fit_refiner(
        data, encoders, tmp_path / "a", cfg=cfg, net_cfg=net, checkpoint_every=0, span_gallery="held-out"
    )
    library, report = fit_refiner(data, encoders, tmp_path / "l", cfg=cfg, net_cfg=net, checkpoint_every=0)
    assert (alone_report["span_gallery_clips"], report["span_gallery_clips"]) == (15, 150)
    # among 15 clips of different families the clip vectors rank them already: the spans get no weight
    assert alone.config.segment_weight == 0.0 and alone_report["val_MRR@10_segments"] > 0.95
    # among every clip (the default) the twins confuse the clip vectors, and the spans earn a weight
    assert library.config.segment_weight > 0 and library.config.segments == 4
    # the mix's own weights are picked on the held-out clips either way
    assert library.config.mix == alone.config.mix and report["val_MRR@10_mix"] == alone_report["val_MRR@10_mix"]
    with pytest.raises(AssertionError, match="gallery"):
        fit_refiner(data, encoders, tmp_path / "x", cfg=cfg, net_cfg=net, checkpoint_every=0, span_gallery="test")


def _refuses_to_load(folder: Path, bad: dict, config_says: str, weights_file: str, file_says: str) -> None:
    """A saved refiner fails to load, saying why: first with `bad` values in its refiner.json, then,
    the config restored, without `weights_file`."""
    config = json.loads((folder / "refiner.json").read_text())
    (folder / "refiner.json").write_text(json.dumps({**config, **bad}))
    with pytest.raises(RefinerError, match=config_says):
        Refiner.load(folder)
    (folder / "refiner.json").write_text(json.dumps(config))
    (folder / weights_file).unlink()
    with pytest.raises(RefinerError, match=file_says):
        Refiner.load(folder)


def test_a_span_mapper_is_picked_where_spans_need_a_map_of_their_own_and_saved(tiny_clap, tiny_clip, tmp_path):
    encoders = load_encoders(f"clap:{tiny_clap}", f"clip:{tiny_clip}")  # only their fingerprints are stamped
    data = _near_duplicate_video_pairs(np.repeat(np.arange(75), 2), query_noise=0.05, seed=10)
    # the video tower's spans sit in a rotated space while its clip vectors do not: only a map trained
    # on span pairs can bring them to the clips' spans
    rotation = np.linalg.qr(np.random.default_rng(11).standard_normal((16, 16)))[0].astype(np.float32)
    data = dataclasses.replace(data, query_segments=_unit(data.query_segments @ rotation))
    pairs = data.span_pairs()
    assert pairs.query.shape == (300 * 4, 16) and pairs.audio.shape == (150 * 4, 16)
    assert np.array_equal(pairs.audio[pairs.query_group[4 * 7 + 2]], data.audio_segments[data.query_group[7], 2])
    cfg = RefinerTrainConfig(iterations=40)  # the span mapper trains half as long: enough to learn a rotation
    # one-sided: no library side for the clips nor their spans, so only a span mapper undoes the rotation
    args = {"cfg": cfg, "net_cfg": SPANS_NET, "checkpoint_every": 0}
    refiner, report = fit_refiner(data, encoders, tmp_path / "r", two_sided=False, **args)
    by_map = report["val_MRR@10_segments_by_span_map"]
    assert refiner.config.span_map == report["span_map"] == "mapped" and by_map["mapped"] > by_map["refined"]
    assert refiner.config.segment_weight > 0 and refiner.mapper_spans is not None
    assert (tmp_path / "r" / "mapper_spans.safetensors").exists()
    assert refiner.config.span_library_weight == 0 and not (tmp_path / "r" / "mapper_spans_back.safetensors").exists()
    train, val = data.split(0.1)
    # narrowed to one span map (the bench's mapper baseline), that map is kept whatever scores better
    narrowed, narrow_report = Refiner(copy.deepcopy(refiner.config), refiner.net, refiner.mapper), {}
    fit_segment_weight(narrowed, train, val, MapperConfig(iterations=20), narrow_report, False, ("refined",))
    assert narrowed.config.span_map == narrow_report["span_map"] == "refined" and narrowed.mapper_spans is None
    assert list(narrow_report["val_MRR@10_segments_by_span_map"]) == ["refined"]
    with pytest.raises(AssertionError, match="span maps"):
        fit_segment_weight(narrowed, train, val, MapperConfig(iterations=20), {}, False, ("warped",))
    spans = (val.query_segments, val.audio_segments)
    loaded = Refiner.load(tmp_path / "r")
    np.testing.assert_allclose(loaded.scores(val.query, val.audio, segments=spans),
                               refiner.scores(val.query, val.audio, segments=spans), atol=1e-5)  # fmt: skip
    assert metrics(query_ranks(loaded.scores(val.query, val.audio, segments=spans), val.query_group))["R@1"] > 0.9
    _refuses_to_load(tmp_path / "r", {"span_map": "warped"}, "span_map", "mapper_spans.safetensors", "span mapper")
    # two-sided (the default): a backward span mapper can undo the rotation from the windows' side
    both, both_report = fit_refiner(data, encoders, tmp_path / "b", **args)
    assert both.config.span_library_weight == both_report["span_library_weight"] > 0, both_report
    assert both_report["span_mapper_ranking_weight"] == SPAN_MAPPER_RANKING_WEIGHT
    assert (tmp_path / "b" / "mapper_spans_back.safetensors").exists()
    loaded = Refiner.load(tmp_path / "b")
    served = loaded.scores(val.query, val.audio, segments=spans)
    np.testing.assert_allclose(served, both.scores(val.query, val.audio, segments=spans), atol=1e-5)
    assert metrics(query_ranks(served, val.query_group))["R@1"] > 0.9
    without = dataclasses.replace(loaded.config, span_library_weight=0.0)  # the library side changes the scores
    assert not np.allclose(Refiner(without, loaded.net, loaded.mapper, None, loaded.mapper_back, loaded.mapper_spans)
                           .scores(val.query, val.audio, segments=spans), served, atol=1e-4)  # fmt: skip
    bad = {"span_library_weight": 1.5}
    _refuses_to_load(tmp_path / "b", bad, "span_library_weight", "mapper_spans_back.safetensors", "span_library_weight")
