"""DiffGAP training (Algorithm 1) with bidirectional split training, on cached embedding pairs.

For j = 1..M: draw a minibatch of (query, audio) pairs; with (condition, target) = (query, audio)
in direction 0 or (audio, query) in direction 1, minimise ||eps - eps_theta(z_n, n, F^c)||^2;
every m iterations switch the direction (BST). Without BST the direction stays 0.
Extras the paper does not have: a CMMD-style contrastive term on the denoised estimate (on by
default), condition dropout for classifier-free guidance (off by default), an exponential moving
average of the weights and a warmup + cosine learning-rate decay (both eval rows; see the defaults).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from diffgap.atomic import atomic_write_bytes, atomic_write_json
from diffgap.diffusion.adapter import TextAdapter
from diffgap.diffusion.refiner import DEFAULT_STEPS, SPAN_MAPS, Refiner, RefinerConfig, mix
from diffgap.diffusion.schedule import NoiseSchedule, ScheduleConfig
from diffgap.diffusion.scoring import RERANK, reranked_scores, top_errors
from diffgap.encoders import EncoderSet
from diffgap.models.refiner_net import RefinerNet, RefinerNetConfig
from diffgap.models.segments import segment_scores, with_segment_scores
from diffgap.training.adapter import AdapterTrainConfig, fit_adapter, sentence_model_for, wanted
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.losses import group_mask, ranking_loss
from diffgap.training.mapper import MapperConfig, train_mapper
from diffgap.training.metrics import (
    LIBRARY_GRID,
    choose_blend,
    choose_library_weight,
    choose_mix,
    choose_score_weight,
    metrics,
    query_ranks,
    score_mapping,
)

log = logging.getLogger(__name__)

# Below this many pairs the held-out share that picks the weights is a few dozen queries, and what it
# picks may rank below direct search on a new library: on SynthCaps video with frozen encoders that
# did not know the domain, 100 pairs shipped 0.430 / 0.367 R@1 against direct search's 0.423 / 0.398
# (seeds 0 / 1), 300 pairs 0.440 / 0.439 (BENCHMARKS.md run 12). `fit_refiner` says so; it still trains.
# Not for pairs with time spans: there 100 pairs shipped 0.670 / 0.603 against 0.423 / 0.398 (run 16).
FEW_PAIRS = 300

# Where the held-out queries are ranked while the weight of the time-span score is picked: among their
# own clips only ("held-out"), or among those and every training clip ("library"). The spans tell
# near-duplicates apart, and a few dozen held-out clips rarely hold a target's near-duplicate: there
# the clip vectors rank them at MRR@10 0.94 already and the spans got no weight (seed 0 with 100 and 300
# pairs, BENCHMARKS.md run 13); among every clip they did, on both seeds (run 14). The mix's own
# weights stay on the held-out clips: picked among every clip they scored lower at 1,000 pairs on both.
SPAN_GALLERIES = ("held-out", "library")

# The ranking term of the two span mappers (query spans -> audio spans and back), whatever the clip
# mappers' (`--mapper-ranking-weight`): the span score is used only to rank, and with the refiner's
# 0.2 the query-side span mapper alone ranked better on both SynthCaps seeds (0.802 / 0.768 against
# 0.773 / 0.747 video R@1; 0.5 and 1.0 less so), as did the spans' library side (BENCHMARKS.md run 16).
SPAN_MAPPER_RANKING_WEIGHT = 0.2


@dataclass
class RefinerTrainConfig:
    iterations: int = 6000  # M; the paper's 30 epochs of AudioCaps at batch 64 is ~21k
    batch_size: int = 128
    lr: float = 2e-4  # the paper's Adam learning rate
    bidirectional: bool = True  # BST on/off (Table V ablation)
    switch_every: int = 0  # m; 0 = iterations // 5: five phases, ending on query->audio as the paper does
    cond_dropout: float = 0.0  # > 0 trains the unconditional branch for guidance
    contrastive_weight: float = 0.2  # CMMD-style InfoNCE on the denoised estimate: ranks, not just regresses
    contrastive_temperature: float = 0.05
    # > 0: the same ranking loss on what search actually computes, the one-step refinement from the
    # prior's mean (z_N = 0, n = N - 1), which the diffusion loss never trains directly.
    path_weight: float = 0.0
    # The paper's eps-MSE: with well-aligned encoders it beat z_0-MSE ("sample") in both modalities and
    # both seeds measured (SynthCaps run 4); "sample" did better only with run 1's weak text encoder.
    prediction_type: str = "epsilon"
    weight_decay: float = 0.0
    # > 0: ship an exponential moving average of the weights (decay per iteration) instead of the last
    # iterate, the usual practice for diffusion models (DDPM, EDM); 0 ships the last weights.
    ema_decay: float = 0.0
    # "constant" (the paper's Adam at a fixed rate) or "cosine": a linear warmup over the first 2% of
    # iterations, then a cosine decay to a tenth of `lr`, so the last iterations settle instead of
    # hopping around the minimum at full step size.
    lr_schedule: str = "constant"
    seed: int = 0
    eval_every: int = 500

    def interval(self) -> int:
        return self.switch_every or max(1, self.iterations // 5)

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of `lr` at 0-based `iteration`."""
        if self.lr_schedule == "constant":
            return 1.0
        assert self.lr_schedule == "cosine", f"unknown lr_schedule {self.lr_schedule!r}; expected constant or cosine"
        warmup = max(1, self.iterations // 50)
        if iteration < warmup:
            return (iteration + 1) / warmup
        progress = (iteration - warmup) / max(1, self.iterations - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


LR_SCHEDULES = ("constant", "cosine")


class WeightAverage:
    """An exponential moving average of a network's parameters. The decay ramps up from ~0.1 as
    (1 + t) / (10 + t) so the first iterations' random weights do not linger in the average."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        assert 0.0 < decay < 1.0, f"EMA decay must be in (0, 1), got {decay}"
        self.decay = decay
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, live in zip(self.net.parameters(), net.parameters(), strict=True):
            avg.lerp_(live.detach(), 1.0 - d)
        for avg, live in zip(self.net.buffers(), net.buffers(), strict=True):
            avg.copy_(live)
        self.updates += 1


@dataclass
class TrainHistory:
    train_loss: list[float]
    val_loss: list[float]
    directions: list[int]  # direction used at each iteration (for BST checks)


def direction_at(iteration: int, cfg: RefinerTrainConfig) -> int:
    """Algorithm 1: start with (c, d) = (query, audio); flip at every multiple of m."""
    if not cfg.bidirectional:
        return 0
    return (iteration // cfg.interval()) % 2


def diffusion_loss(
    net: RefinerNet,
    schedule: NoiseSchedule,
    target: torch.Tensor,
    cond: torch.Tensor,
    direction: int,
    cfg: RefinerTrainConfig,
    generator: torch.Generator,
    same_group: torch.Tensor | None = None,
) -> torch.Tensor:
    """target (B, d) and cond (B, c) already rescaled to per-coordinate variance ~1."""
    b = target.shape[0]
    n = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator)  # (B,)
    eps = torch.randn(target.shape, generator=generator)  # (B, d)
    z_n = schedule.add_noise(target, eps, n)  # (B, d)
    mask = None
    if cfg.cond_dropout > 0:
        mask = torch.rand(b, generator=generator) >= cfg.cond_dropout  # (B,) True keeps the condition
    out = net(z_n, n, cond, direction, cond_mask=mask)
    truth = eps if cfg.prediction_type == "epsilon" else target
    loss = F.mse_loss(out, truth)
    if cfg.contrastive_weight > 0:
        _, z0 = schedule.to_eps_and_z0(out, z_n, n, cfg.prediction_type)
        loss = loss + cfg.contrastive_weight * ranking_loss(z0, target, cfg.contrastive_temperature, same_group)
    if cfg.path_weight > 0:
        # Search refines from the prior's mean: z_N = 0 at the last step, an input the diffusion loss
        # never shows the network (its z_N are noise draws). Rank that very output too.
        top = torch.full((b,), schedule.num_train_timesteps - 1, dtype=torch.long)  # (B,)
        z_top = torch.zeros_like(target)  # (B, d)
        _, z0 = schedule.to_eps_and_z0(net(z_top, top, cond, direction), z_top, top, cfg.prediction_type)
        loss = loss + cfg.path_weight * ranking_loss(z0, target, cfg.contrastive_temperature, same_group)
    return loss


@torch.no_grad()
def validation_loss(
    net: RefinerNet, schedule: NoiseSchedule, data: PairEmbeddings, cfg: RefinerTrainConfig, max_pairs: int = 2048
) -> float:
    """Direction-0 diffusion loss on held-out pairs with fixed noise, so values are comparable."""
    if len(data.query) == 0:
        return float("nan")
    net.eval()
    generator = torch.Generator().manual_seed(1234)
    idx = torch.arange(min(len(data.query), max_pairs))
    target, cond = _scaled(data, idx)
    eval_cfg = RefinerTrainConfig(**{**asdict(cfg), "cond_dropout": 0.0, "contrastive_weight": 0.0, "path_weight": 0.0})
    loss = float(diffusion_loss(net, schedule, target, cond, 0, eval_cfg, generator))
    net.train()
    return loss


def _scaled(data: PairEmbeddings, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio, query) rows for query indices, times sqrt(dim): unit vectors -> unit per-coordinate variance."""
    audio = torch.from_numpy(data.audio[data.query_group[idx.numpy()]]) * math.sqrt(data.audio.shape[1])
    query = torch.from_numpy(data.query[idx.numpy()]) * math.sqrt(data.query.shape[1])
    return audio, query


def train_refiner(
    train: PairEmbeddings,
    val: PairEmbeddings | None = None,
    *,
    cfg: RefinerTrainConfig | None = None,
    net_cfg: RefinerNetConfig | None = None,
    schedule_cfg: ScheduleConfig | None = None,
    progress: Callable[[int, float], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
) -> tuple[Refiner, TrainHistory]:
    """Algorithm 1. With `checkpoint`, the full training state (weights, Adam moments, random
    generator, history) is saved atomically every `checkpoint_every` iterations and picked up again
    by the next call with the same settings, which then ends bit-identical to an uninterrupted run."""
    cfg = cfg or RefinerTrainConfig()
    torch.manual_seed(cfg.seed)
    net_cfg = net_cfg or RefinerNetConfig(audio_dim=train.audio.shape[1], query_dim=train.query.shape[1])
    assert (net_cfg.audio_dim, net_cfg.query_dim) == (train.audio.shape[1], train.query.shape[1]), (
        f"refiner dims {(net_cfg.audio_dim, net_cfg.query_dim)} vs data {(train.audio.shape[1], train.query.shape[1])}"
    )
    assert len(train.query) >= 2, "need at least two training pairs"
    schedule = NoiseSchedule(schedule_cfg)
    net = RefinerNet(net_cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = WeightAverage(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    history = TrainHistory([], [], [])
    groups = torch.from_numpy(train.query_group)
    identity = {
        "cfg": asdict(cfg),
        "net": asdict(net_cfg),
        "pairs": int(len(train.query)),
        "data": float(np.float64(train.query.sum()) + np.float64(train.audio.sum())),
    }
    first = 0
    if checkpoint is not None:
        first = _load_checkpoint(Path(checkpoint), identity, net, opt, generator, history, average)
        if first:
            log.info("resuming refiner training at iteration %d from %s", first, checkpoint)
    for it in range(first, cfg.iterations):
        direction = direction_at(it, cfg)
        idx = torch.randint(0, len(train.query), (min(cfg.batch_size, len(train.query)),), generator=generator)
        audio, query = _scaled(train, idx)
        target, cond = (audio, query) if direction == 0 else (query, audio)
        same = group_mask(groups[idx])  # (B, B)
        loss = diffusion_loss(net, schedule, target, cond, direction, cfg, generator, same)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cfg.lr_factor(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average is not None:
            average.update(net)
        shipped = average.net if average is not None else net
        history.train_loss.append(float(loss.detach()))
        history.directions.append(direction)
        if val is not None and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations):
            history.val_loss.append(validation_loss(shipped, schedule, val, cfg))
        if checkpoint is not None and (it + 1) % checkpoint_every == 0 and it + 1 < cfg.iterations:
            _save_checkpoint(Path(checkpoint), identity, it + 1, net, opt, generator, history, average)
        if progress:
            progress(it, float(loss.detach()))
    config = RefinerConfig(
        net=net_cfg,
        schedule=schedule.cfg,
        prediction_type=cfg.prediction_type,
        query_modality=train.modality,
        training={**asdict(cfg), "pairs": int(len(train.query))},
    )
    shipped = average.net if average is not None else net
    return Refiner(config, shipped.eval()), history


def _save_checkpoint(
    path: Path,
    identity: dict,
    iteration: int,
    net: RefinerNet,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    history: TrainHistory,
    average: WeightAverage | None = None,
) -> None:
    """Tensors in safetensors, the rest in JSON; the JSON is replaced last, so it always names a complete set."""
    path.mkdir(parents=True, exist_ok=True)
    opt_state = opt.state_dict()
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    for pid, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(value).contiguous()
    tensors["generator"] = generator.get_state()
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in average.net.state_dict().items()})
    weights = path / f"state-{iteration}.safetensors"
    atomic_write_bytes(weights, safetensors_bytes(tensors))
    meta = {
        "identity": identity,
        "iteration": iteration,
        "weights": weights.name,
        "param_groups": opt_state["param_groups"],
        "history": asdict(history),
        "ema_updates": average.updates if average is not None else 0,
    }
    atomic_write_json(path / "checkpoint.json", meta, indent=None)
    for old in path.glob("state-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)


def _load_checkpoint(
    path: Path,
    identity: dict,
    net: RefinerNet,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    history: TrainHistory,
    average: WeightAverage | None = None,
) -> int:
    meta_path = path / "checkpoint.json"
    if not meta_path.exists():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("identity") != json.loads(json.dumps(identity)):
        log.warning("ignoring checkpoint %s: it was made with other settings or data", path)
        return 0
    tensors = load_file(str(path / meta["weights"]))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["generator"])
    if average is not None:
        average.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        average.updates = int(meta.get("ema_updates", 0))
    for name, values in meta["history"].items():
        getattr(history, name).extend(values)
    return int(meta["iteration"])


def checkpoint_dir(out: str | Path) -> Path:
    """Where training state for a refiner bound for `out` is kept: beside it, not inside (the service
    reads `out`), and removed once the finished refiner is saved."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def fit_refiner(
    data: PairEmbeddings,
    encoders: EncoderSet,
    out: str | Path,
    *,
    cfg: RefinerTrainConfig | None = None,
    net_cfg: RefinerNetConfig | None = None,
    val_fraction: float = 0.1,
    eval_steps: int = DEFAULT_STEPS,
    blend: float | None = None,
    ensemble: bool = True,
    checkpoint_every: int = 500,
    record: dict[str, Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
    adapter: AdapterTrainConfig | None = None,
    mapper: MapperConfig | None = None,
    two_sided: bool = True,
    span_gallery: str = "library",
) -> tuple[Refiner, dict[str, Any]]:
    """Everything `train-refiner` does: hold out a share of the audio targets, train (resumably) on the
    rest, score refined against direct search on the held-out pairs, pick the blend weight there
    (unless `blend` fixes it), stamp the encoders' fingerprints, save to `out`; returns the refiner
    and the report. `record` (e.g. the encoder specs) is kept in the refiner's training notes.
    With `ensemble` (and no fixed `blend`), an MLP mapper (`mapper`: its loss and size) is trained on
    the same pairs and the weights of the refined, mapped and direct scores are picked on the
    held-out pairs too (`config.mix`):
    on SynthCaps it matched or beat both the mapper and the refiner alone in every table of run 7.
    With `adapter` as well (text pairs), a text adapter (diffgap/diffusion/adapter.py) is fitted on the
    same training pairs and its score is a fourth part of that choice. Then (with `two_sided`) a
    backward mapper and the weight of the library side (`config.library_weight`) against that mix, on
    the same held-out pairs. Where the pairs have time spans, last the weight of the span score, with the
    held-out queries ranked among `span_gallery` (SPAN_GALLERIES): their own clips, or every clip."""
    assert span_gallery in SPAN_GALLERIES, f"unknown span gallery {span_gallery!r}; expected one of {SPAN_GALLERIES}"
    cfg = cfg or RefinerTrainConfig()
    query_encoder = encoders.for_modality(data.modality)
    if len(data.query) < FEW_PAIRS and data.query_segments is None:
        log.warning(
            "only %d training pairs: with fewer than %d a refiner may rank below direct search "
            "(BENCHMARKS.md run 12); compare the two on pairs it did not train on before serving it "
            "(`refiner eval --refiner DIR --test-pairs CSV`)",
            len(data.query),
            FEW_PAIRS,
        )
    train, val = data.split(val_fraction, seed=cfg.seed)
    out = Path(out)
    checkpoint = checkpoint_dir(out)
    refiner, history = train_refiner(
        train,
        val if len(val.query) else None,
        cfg=cfg,
        net_cfg=net_cfg,
        progress=progress,
        checkpoint=checkpoint if checkpoint_every else None,
        checkpoint_every=checkpoint_every or 1,
    )
    refiner.config.audio_fingerprint = encoders.audio.fingerprint.to_dict()
    refiner.config.query_fingerprint = query_encoder.fingerprint.to_dict()
    refiner.config.training.update(record or {})
    report: dict[str, Any] = {
        "val_loss": history.val_loss[-1] if history.val_loss else None,
        "bytes": refiner.num_bytes,
        "pairs_train": int(len(train.query)),
        "pairs_val": int(len(val.query)),
    }
    if len(val.query):
        refined, _ = score_mapping(val, lambda x: refiner.refine(x, steps=eval_steps, blend=0.0), None)
        report["val_refined"] = refined
        direct = None
        if data.audio.shape[1] == data.query.shape[1]:
            direct = report["val_direct"] = score_mapping(val, lambda x: x, None)[0]
        chosen, by_weight = choose_blend(refiner, val, steps=eval_steps)
        if by_weight:
            report["val_MRR@10_by_blend"] = {str(w): round(v, 4) for w, v in by_weight.items()}
            log.info("blend %.2f picked on the held-out pairs (MRR@10 by weight: %s)", chosen, by_weight)
        refiner.config.blend = chosen if blend is None else blend  # what the rerank's weight is picked against
        # `mapper` (default MapperConfig()) with half the refiner's iterations, the 3,000 of every
        # eval table at the default 6,000, and the refiner's seed; the span mapper is trained alike
        mapper_cfg = replace(mapper or MapperConfig(), iterations=max(1, cfg.iterations // 2), seed=cfg.seed)
        if ensemble and blend is None:
            text_adapter, want = None, wanted(encoders, adapter)
            if want and (train.texts is None or val.texts is None):
                log.warning("no text adapter: the pairs are not text pairs with their texts kept")
            elif want:
                assert adapter is not None  # wanted() says so
                text_adapter, fitted = fit_adapter(train, sentence_model_for(encoders, adapter), adapter, val)
                report["adapter_fit"] = asdict(fitted)
            _fit_mix(refiner, train, val, eval_steps, mapper_cfg, report, text_adapter, two_sided)
        gallery = val
        if val.query_segments is not None and val.audio_segments is not None:
            gallery = val.with_distractors(train) if span_gallery == "library" else val
            fit_segment_weight(refiner, train, gallery, mapper_cfg, report, two_sided)
        # last, on the ranking a search makes: among every clip where the spans have a weight (as it was picked)
        fit_rerank_weight(refiner, gallery if refiner.config.segment_weight else val, report)
        refiner.config.training["validation"] = report
        log.info(
            "held-out %s->audio R@1: refined %.3f%s (R@10 %.3f), %d queries",
            data.modality,
            refined["R@1"],
            f" vs direct {direct['R@1']:.3f}" if direct else "",
            refined["R@10"],
            refined["n"],
        )
    if blend is not None:
        refiner.config.blend = blend
    report["blend"] = refiner.config.blend
    report["mix"] = refiner.config.mix
    report["library_weight"] = refiner.config.library_weight
    report["segment_weight"] = refiner.config.segment_weight
    report["span_library_weight"] = refiner.config.span_library_weight
    report["rerank_weight"] = refiner.config.rerank_weight
    refiner.save(out)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the finished model supersedes it
    log.info("saved refiner (%d bytes of weights) to %s", refiner.num_bytes, out)
    return refiner, report


def _fit_mix(
    refiner: Refiner,
    train: PairEmbeddings,
    val: PairEmbeddings,
    steps: int,
    mapper_cfg: MapperConfig,
    report: dict[str, Any],
    adapter: TextAdapter | None = None,
    two_sided: bool = True,
) -> None:
    """Train the query -> audio mapper on `train` and pick the weights of the refined, mapped, (in one
    space) direct and (with an `adapter` fitted on `train`) adapted scores by held-out MRR@10 on `val`;
    then (`two_sided`) a backward (audio -> query) mapper and the weight of the library side against
    that mix. The refiner keeps each mapper and the adapter only when it has a weight."""
    mapper = train_mapper(train, 0, mapper_cfg)
    parts = {
        "refined": lambda: refiner.refine(val.query, steps=steps, blend=0.0),
        "mapped": lambda: mapper.map(val.query),
    }
    if val.query.shape[1] == val.audio.shape[1]:
        parts["direct"] = lambda: val.query
    if adapter is not None:
        assert val.texts is not None, "scoring the adapter on held-out pairs needs their texts"
        parts["adapted"] = lambda: adapter.encode(val.texts)
    vectors = [make() for make in parts.values()]
    weights, score = choose_mix(val, vectors)
    refiner.config.mix = {name: float(w) for name, w in zip(parts, weights, strict=True)}
    refiner.config.mapper_hidden = mapper_cfg.hidden
    report["mapper_ranking_weight"] = mapper_cfg.ranking_weight
    refiner.mapper = mapper if refiner.config.mix["mapped"] > 0 else None
    refiner.adapter = adapter if refiner.config.mix.get("adapted", 0) > 0 else None
    if adapter is not None:
        report["adapter_bytes"] = adapter.num_bytes
    report["val_MRR@10_mix"] = round(score, 4)
    log.info("score weights %s picked on the held-out pairs (MRR@10 %.4f)", refiner.config.mix, score)
    if not two_sided:
        return
    # then the library side: the held-out audio mapped back into the query space, weighed against the mix
    back = train_mapper(train, 1, mapper_cfg)
    library, library_score = choose_library_weight(val, mix(vectors, weights), back.map(val.audio))
    refiner.config.library_weight = float(library)
    refiner.mapper_back = back if library > 0 else None
    report["val_MRR@10_two_sided"] = round(library_score, 4)
    log.info("library-side weight %.3f picked on the held-out pairs (MRR@10 %.4f)", library, library_score)


def fit_segment_weight(
    refiner: Refiner,
    train: PairEmbeddings,
    val: PairEmbeddings,
    mapper_cfg: MapperConfig,
    report: dict[str, Any],
    two_sided: bool = True,
    span_maps: tuple[str, ...] = SPAN_MAPS,
) -> None:
    """The weight of the time-segment score (`with_segment_scores`) against everything the refiner
    scores already, how the query's spans reach audio space (`span_map`: refined as the query is, or
    by a mapper trained on `train`'s span pairs) and (`two_sided`) the weight of the spans' library
    side (a mapper trained on the same span pairs the other way), picked together on the held-out
    queries' spans among `val`'s clips (BENCHMARKS.md runs 13-16): for each span map the library
    weight that ranks best by the span score alone, then the segment weight against the rest.
    Ties: the refined spans, then the smaller weights. `span_maps` narrows the choice (the bench gives
    a mapper baseline this machinery with the span mapper alone)."""
    assert val.query_segments is not None and val.audio_segments is not None, "held-out pairs without spans"
    report["span_gallery_clips"] = int(len(val.audio))
    base = refiner.scores(val.query, val.audio)  # (P, G) everything but the spans
    span_cfg = replace(mapper_cfg, ranking_weight=SPAN_MAPPER_RANKING_WEIGHT)
    refiner.mapper_spans = train_mapper(train.span_pairs(), 0, span_cfg)
    refiner.mapper_spans_back = train_mapper(train.span_pairs(), 1, span_cfg) if two_sided else None
    refiner.config.mapper_hidden = mapper_cfg.hidden  # the width every saved mapper of this refiner has
    library = None
    if refiner.mapper_spans_back is not None:
        library = segment_scores(val.query_segments, refiner.map_library_spans(val.audio_segments))  # (P, G)
    assert span_maps and set(span_maps) <= set(SPAN_MAPS), f"span maps {span_maps}; known: {SPAN_MAPS}"
    picks = {}
    for span_map in span_maps:
        refiner.config.span_map = span_map
        spans = segment_scores(refiner.refine_with_spans(val.query, val.query_segments)[1], val.audio_segments)
        span_library = 0.0
        if library is not None:
            span_library = choose_score_weight(spans, library, val.query_group)[0]
            spans = with_segment_scores(spans, library, span_library)  # (P, G), as `Refiner.span_scores` mixes
        picks[span_map] = (*choose_score_weight(base, spans, val.query_group), span_library)  # weight, MRR, l
    span_map = max(span_maps, key=lambda name: picks[name][1])  # max keeps the first of equal scores
    weight, score, span_library = picks[span_map]
    refiner.config.span_map = span_map
    refiner.config.segment_weight = float(weight)
    refiner.config.segments = int(val.query_segments.shape[1]) if weight > 0 else 0
    refiner.config.span_library_weight = float(span_library) if weight > 0 else 0.0
    if span_map != "mapped" or weight == 0:
        refiner.mapper_spans = None
    if not refiner.spans_two_sided:
        refiner.mapper_spans_back = None
    report["span_map"] = span_map
    report["span_mapper_ranking_weight"] = SPAN_MAPPER_RANKING_WEIGHT
    report["val_MRR@10_segments"] = round(score, 4)
    report["val_MRR@10_segments_by_span_map"] = {name: round(mrr, 4) for name, (_, mrr, _) in picks.items()}
    log.info(
        "time-segment weight %.3f, spans %s, their library side %.3f, picked on the held-out pairs (MRR@10 %.4f)",
        weight,
        span_map,
        refiner.config.span_library_weight,
        score,
    )


# The weights a requested rerank may give the denoising error against the final score: the eighths
# 0-1, as the library side's. Ties go to the smaller weight, so an error that adds nothing there gets 0.
RERANK_GRID = LIBRARY_GRID


def fit_rerank_weight(refiner: Refiner, val: PairEmbeddings, report: dict[str, Any]) -> None:
    """The weight of the denoising error in a requested rerank (`config.rerank_weight`), picked last by
    held-out MRR@10 on the ranking everything else makes: each held-out query's top RERANK.depth
    among `val`'s clips (with their spans, where the refiner weighs them) reordered by the fused score.
    One pass of the network per candidate; each weight then costs a sort."""
    adapted = refiner.adapt(val.texts) if refiner.reads_text and val.texts is not None else None
    spans = None
    if refiner.config.segment_weight and val.query_segments is not None and val.audio_segments is not None:
        spans = (val.query_segments, val.audio_segments)
    scores = refiner.scores(val.query, val.audio, adapted=adapted, segments=spans)  # (P, G)
    top, errors = top_errors(refiner, val.query, val.audio, scores, RERANK)  # (P, K), (P, K)
    by_weight = {
        w: metrics(query_ranks(reranked_scores(scores, top, errors, w), val.query_group))["MRR@10"] for w in RERANK_GRID
    }
    weight = max(RERANK_GRID, key=lambda w: by_weight[w])  # max keeps the first (smallest) of equal scores
    refiner.config.rerank_weight = float(weight)
    report["rerank_weight"] = float(weight)
    report["val_MRR@10_by_rerank_weight"] = {str(w): round(v, 4) for w, v in by_weight.items()}
    log.info("rerank weight %.3f picked on the held-out pairs (MRR@10 %.4f, %.4f without)", weight,
             by_weight[weight], by_weight[0.0])  # fmt: skip
