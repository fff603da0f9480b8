"""Contrastive training of the compact encoders on paired data.

- text <-> audio: CLAP-style symmetric InfoNCE over the batch, with a learnable temperature.
- video <-> audio: CAVP-style InfoNCE at clip level, plus GMS-CAVP-style multi-scale temporal
  alignment: both sequences are pooled into 2 and 4 segments and each audio segment must pick
  its own video segment among all segments of the batch (other times of the same clip included),
  which teaches the towers when things happen, not only what.
Audio and video are decoded once and kept in memory as float16/uint8.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from diffgap.encoders.compact import CompactModel, _pad_frames, _pad_waves, train_tokenizer
from diffgap.encoders.prior import check_prior_mode, load_prior, prior_kind
from diffgap.encoders.sentence import SentenceEncoder, load_sentence_encoder
from diffgap.media.audio import AudioDecodeError, decode_audio
from diffgap.media.video import VideoDecodeError, decode_video
from diffgap.models.audio_net import AudioNetConfig
from diffgap.models.segments import segment_pool
from diffgap.models.text_net import TextNetConfig, mix_sides
from diffgap.models.video_net import VideoNetConfig
from diffgap.training.metrics import metrics, ranks_query_to_audio
from diffgap.training.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class EncoderTrainConfig:
    epochs: int = 20
    batch_size: int = 64  # InfoNCE negatives per step; 64 fits 2 CPU cores
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warmup; at most a fifth of all steps (short runs must reach the full rate)
    video_weight: float = 1.0  # weight of the video-audio losses next to text-audio
    segment_scales: tuple[int, ...] = (2, 4)  # GMS-CAVP temporal scales (segments per clip)
    max_seconds: float = 10.0  # audio longer than this is cut for training
    gain_jitter_db: float = 6.0  # random gain: loudness words stay relative to the background
    seed: int = 0
    max_minutes: float = 0.0  # stop early after this wall time (0 = no limit)
    # Stop after this many steps (0 = no limit): a compute budget that, unlike a time budget, gives the
    # same encoders on a busy machine as on an idle one (benchmarks comparing two trainings use it).
    max_steps: int = 0
    # Augmentation for labels that describe whole clips (a library's names): a random crop, white noise
    # mixed in and masked spectrogram bands keep such labels true. Wrong for captions that say when and
    # over what things happen ("at the start", "over a faint hiss"); on the real library of BENCHMARKS.md
    # it also cost held-out R@10 at the same epochs, so it is opt-in.
    augment: bool = False
    crop_min: float = 0.6  # a crop keeps at least this share of the clip
    noise_snr_db: tuple[float, float] = (10.0, 30.0)  # noise at a random SNR in this range, half of the time
    spec_masks: int = 2  # SpecAugment: mel bands and time spans masked per clip
    # With validation pairs: keep the weights of the epoch with the best validation MRR@10 and stop after
    # this many epochs without a better one (0: train every epoch, keep the last).
    patience: int = 0
    # A "beside" text tower's sentence head (diffgap/models/text_net.py) is fitted after the towers, on
    # the sentence model's readings computed once, for this many batches of 256 captions. A count of
    # steps, not epochs: a small library needs as many updates to fit as a large one. Measured on
    # SynthCaps's 12,000 captions: 1,200 (25 epochs) for the states head, 17 min on a slow 2-core
    # machine; the linear head, seconds, was measured at ~1,400.
    head_steps: int = 1200
    audio: AudioNetConfig = field(default_factory=AudioNetConfig)
    text: TextNetConfig = field(default_factory=TextNetConfig)
    video: VideoNetConfig = field(default_factory=VideoNetConfig)


@dataclass
class Clip:
    wave: np.ndarray  # float16 (S,)
    texts: list[str]
    frames: np.ndarray | None  # uint8 (T, H, W, 3)


def load_clips(
    pairs: Sequence[Pair], cfg: EncoderTrainConfig, use_video: bool, progress: Callable[[int], None] | None = None
) -> list[Clip]:
    by_key: dict[str, Clip] = {}
    broken: set[str] = set()
    for p in pairs:
        if p.key in broken:
            continue
        if p.key not in by_key:
            try:
                wave = decode_audio(p.audio, cfg.audio.sample_rate, max_seconds=cfg.max_seconds).wave
                frames = None
                if use_video and p.video is not None:
                    frames = decode_video(p.video, cfg.video.fps, size=cfg.video.size, max_seconds=cfg.max_seconds)
            except (AudioDecodeError, VideoDecodeError) as exc:
                log.warning("skipping %s: %s", p.audio, exc)
                broken.add(p.key)
                continue
            by_key[p.key] = Clip(wave.astype(np.float16), [], frames)
            if progress:
                progress(1)
        if p.text:
            by_key[p.key].texts.append(p.text)
    return list(by_key.values())


class SentenceStates:
    """A frozen sentence model's token states for every training caption, computed once (float16):
    the model is frozen, so running it again at every step would only cost time."""

    def __init__(self, sentence: SentenceEncoder, texts: Sequence[str], max_tokens: int, batch: int = 128) -> None:
        unique = list(dict.fromkeys(texts))
        self.by_text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for start in range(0, len(unique), batch):
            chunk = unique[start : start + batch]
            h, mask, ids = sentence.token_states(chunk)  # (b, L, P), (b, L), (b, L)
            for text, hi, mi, ii in zip(chunk, h, mask, ids, strict=True):
                self.by_text[text] = (hi[mi][:max_tokens].to(torch.float16).clone(), ii[mi][:max_tokens].clone())
        log.info("token states of %d captions from %s", len(unique), sentence.ref.name)

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.by_text[t] for t in texts]
        width = max(len(r) for r, _ in rows)
        states = torch.zeros(len(rows), width, rows[0][0].shape[1])  # (B, L, P)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)  # (B, L)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L)
        for i, (r, t) in enumerate(rows):
            states[i, : len(r)] = r.float()
            mask[i, : len(r)] = True
            ids[i, : len(t)] = t
        return {"states": states, "mask": mask, "ids": ids}


class SentenceVectors:
    """A frozen sentence model's vector for every training caption, computed once (a dual tower's
    second input; diffgap/models/text_net.py)."""

    def __init__(self, sentence: SentenceEncoder, texts: Sequence[str]) -> None:
        unique = list(dict.fromkeys(texts))
        vectors = sentence.encode(unique)  # (N, P)
        self.row = {text: i for i, text in enumerate(unique)}
        self.vectors = torch.from_numpy(vectors)
        log.info("sentence vectors of %d captions from %s", len(unique), sentence.ref.name)

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"sentence": self.vectors[[self.row[t] for t in texts]]}  # (B, P)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors a (N, d) and b (N, d)."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.T  # (N, N)
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def augment_wave(wave: np.ndarray, cfg: EncoderTrainConfig, rng: np.random.Generator) -> np.ndarray:
    """A random crop of at least cfg.crop_min of the clip, and half of the time white noise at a random SNR."""
    n = len(wave)
    keep = max(1, int(n * rng.uniform(cfg.crop_min, 1.0)))
    start = int(rng.integers(0, n - keep + 1))
    out = wave[start : start + keep].astype(np.float32)
    if rng.random() < 0.5:
        power = float(np.mean(out**2)) + 1e-10
        snr = rng.uniform(*cfg.noise_snr_db)
        out = out + rng.standard_normal(len(out)).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
    return out


def validation_mrr(model: CompactModel, clips: Sequence[Clip], text_inputs: Callable) -> float:
    """MRR@10 of each validation clip's first text among the validation clips' audio (eval mode)."""
    model.eval()
    with torch.no_grad():
        xa = embed_clips(model, clips)
        xt = [model.text(**text_inputs([c.texts[0] for c in clips[s : s + 32]])) for s in range(0, len(clips), 32)]
    model.train()
    ranks = ranks_query_to_audio(torch.cat(xt).numpy(), xa.numpy(), np.arange(len(clips)))
    return metrics(ranks)["MRR@10"]


@dataclass
class HeadFit:
    """How a head over a frozen sentence model is fitted (`fit_head`)."""

    steps: int  # batches of 256 texts: a count of updates, so small sets get as many as large ones
    lr: float
    weight_decay: float
    seed: int
    one_cycle: bool  # warm up and anneal (a transformer head, as measured); False: a constant rate
    # Steps between scores on held-out texts, when `fit_head` is given a way to score them (0: never).
    # The best-scoring weights are kept: a few hundred captions are memorised long before the last step.
    check_every: int = 0
    # Held-out scores in a row without a better one before fitting stops (only a time saver: the best
    # weights are kept either way; the one-cycle rate has not annealed when it stops early).
    patience: int = 6


@dataclass
class HeadFitResult:
    loss: float  # the last training batch's InfoNCE
    steps: int  # steps taken (fewer than asked when held-out scores stopped improving)
    best_step: int | None = None  # the step whose weights were kept (None: the last; no held-out scores)
    best_score: float | None = None  # its held-out score


HEAD_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # a beside tower's sentence share, tried on held-out clips
HEAD_LOG_EVERY = 200  # steps between progress lines while a sentence head fits (minutes for a states head)


def fit_sentence_head(
    model: CompactModel, clips: Sequence[Clip], val_clips: Sequence[Clip], cfg: EncoderTrainConfig
) -> dict[str, float]:
    """Fit a beside tower's sentence head to the trained towers and pick its weight: the frozen sentence
    model's reading of every training caption (its token states, or its vector for a linear head) is
    placed onto its clip's audio vector by InfoNCE (the towers stay as trained), then the sentence share
    with the best MRR@10 on the held-out clips is kept (none held out: the config's). Returns what it
    did, for the training stats."""
    text, sentence = model.text, model.sentence
    assert text is not None and text.beside and sentence is not None, "only a beside tower has a sentence head"
    model.eval()
    captions = [(t, i) for i, c in enumerate(clips) for t in c.texts]
    texts = [t for t, _ in captions]
    with torch.no_grad():
        xa = embed_clips(model, clips)  # (N, dim)
    linear = text.cfg.sentence_head == "linear"
    reading = SentenceVectors(sentence, texts) if linear else SentenceStates(sentence, texts, text.cfg.max_tokens)
    target = torch.tensor([i for _, i in captions])  # (C,) each caption's clip
    # a transformer head warms up and anneals (as measured); the linear one kept a constant rate
    fit = HeadFit(cfg.head_steps, cfg.lr, cfg.weight_decay, cfg.seed, one_cycle=not linear)
    fitted = fit_head(text.head, lambda batch: text.sentence_side(**sentence_reading(batch)), reading, texts,
                      xa[target], fit)  # fmt: skip
    model.eval()
    stats = {"head_loss": fitted.loss, "head_captions": len(captions)}
    if val_clips:
        by_weight = {}
        with torch.no_grad():
            xq = [c.texts[0] for c in val_clips]
            inputs = model.text_inputs(xq)
            corpus = text(inputs["ids"])  # (V, dim)
            side = text.sentence_side(**sentence_reading(inputs))  # (V, dim)
            xb = embed_clips(model, val_clips).numpy()  # (V, dim)
        for w in HEAD_WEIGHTS:
            ranks = ranks_query_to_audio(mix_sides(corpus, side, inputs["unknown"], w).numpy(), xb, np.arange(len(xq)))
            by_weight[w] = metrics(ranks)["MRR@10"]
        text.cfg.prior_weight = max(HEAD_WEIGHTS, key=lambda w: (by_weight[w], -w))
        log.info("sentence head: weight %.2f picked on %d held-out clips (MRR@10 by weight: %s)",
                 text.cfg.prior_weight, len(val_clips), {w: round(v, 3) for w, v in by_weight.items()})  # fmt: skip
    stats["head_weight"] = text.cfg.prior_weight
    return stats


def fit_head(
    head: torch.nn.Module, side: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    reading: SentenceStates | SentenceVectors, texts: Sequence[str], xa: torch.Tensor, fit: HeadFit,
    held_out: Callable[[], float] | None = None,
) -> HeadFitResult:  # fmt: skip
    """Train only `head`, by InfoNCE, so that `side` (the head's unit vectors (b, dim) from a batch of
    the sentence model's readings) places each text onto its audio vector (xa (C, dim), row-aligned
    with texts), for fit.steps batches of 256. With `held_out` (a score of the head as it is, higher is
    better, run in eval mode without gradients) and `fit.check_every`, the best-scoring weights are
    kept and fitting stops after `fit.patience` checks without a better score."""
    gen = torch.Generator().manual_seed(fit.seed)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    opt = torch.optim.AdamW([*head.parameters(), logit_scale], lr=fit.lr, weight_decay=fit.weight_decay)
    steps = fit.steps if len(texts) > 1 else 0  # one caption has no negatives
    sched = None
    if fit.one_cycle and steps:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, fit.lr, total_steps=steps)
    batch, loss, order = 256, torch.zeros(()), torch.zeros(0, dtype=torch.long)
    checking = held_out is not None and fit.check_every > 0
    result = HeadFitResult(loss=0.0, steps=0)
    best_state: dict[str, torch.Tensor] | None = None
    misses = 0
    head.train()
    for step in range(steps):
        if len(order) < 2:  # a new pass over the captions in a new order
            order = torch.randperm(len(texts), generator=gen)
        rows, order = order[:batch], order[batch:]
        loss = info_nce(side(reading.batch([texts[r] for r in rows])), xa[rows], logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        result.steps = step + 1
        if (step + 1) % HEAD_LOG_EVERY == 0:
            log.info("sentence head: step %d of %d, loss %.3f", step + 1, steps, float(loss.detach()))
        if checking and ((step + 1) % fit.check_every == 0 or step + 1 == steps):
            assert held_out is not None  # checking says so
            head.eval()
            with torch.no_grad():
                score = held_out()
            head.train()
            if result.best_score is None or score > result.best_score:
                result.best_step, result.best_score, misses = step + 1, score, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                misses += 1
            if misses >= fit.patience:
                log.info("sentence head: stopping at step %d of %d, held-out score %.3f at step %d and "
                         "no better since", step + 1, steps, result.best_score, result.best_step)  # fmt: skip
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    result.loss = float(loss.detach())
    return result


def sentence_reading(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a beside tower's sentence head reads, out of a batch's text inputs."""
    return {k: v for k, v in inputs.items() if k in ("sentence", "states", "mask")}


def embed_clips(model: CompactModel, clips: Sequence[Clip], batch: int = 32) -> torch.Tensor:
    """(N, dim) the audio tower's vectors of these clips, in the model's current mode."""
    out = []
    for start in range(0, len(clips), batch):
        waves = [c.wave.astype(np.float32) for c in clips[start : start + batch]]
        out.append(model.audio(*_pad_waves(waves, model.audio.cfg.n_fft))[0])
    return torch.cat(out)


def train_compact_encoders(
    pairs: Sequence[Pair],
    out: str | Path,
    cfg: EncoderTrainConfig | None = None,
    *,
    use_video: bool = True,
    val_pairs: Sequence[Pair] = (),
    progress: Callable[[int, int, float], None] | None = None,
    load_progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train, save to `out` (safetensors + JSON + tokenizer) and return final training stats. With
    `val_pairs` (text pairs held out of training), each epoch is scored on them, the best epoch's
    weights are kept, and training stops after `cfg.patience` epochs without a better one."""
    import time

    cfg = cfg or EncoderTrainConfig()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    clips = load_clips(pairs, cfg, use_video, load_progress)
    has_text = any(c.texts for c in clips)
    has_video = use_video and any(c.frames is not None for c in clips)
    if len(clips) < 4:
        raise ValueError(f"need at least 4 usable clips to train, got {len(clips)}")
    if not has_text and not has_video:
        raise ValueError("pairs have neither text nor video to align audio with")
    tokenizer, text_cfg, table, states = None, None, None, None

    def corpus_tokenizer() -> Tokenizer:  # a WordPiece vocabulary of the training captions' own words
        return train_tokenizer((t for c in clips for t in c.texts), cfg.text.vocab_size)

    if has_text and cfg.text.prior and prior_kind(cfg.text.prior) == "sentence":
        sentence = load_sentence_encoder(cfg.text.prior)
        check_prior_mode(cfg.text.prior, cfg.text.prior_mode)
        texts = [t for c in clips for t in c.texts] + [p.text for p in val_pairs if p.text]
        if cfg.text.prior_mode == "dual":  # corpus tokens as without a prior, and the sentence vectors
            tokenizer = corpus_tokenizer()
            vocab_size, states = tokenizer.get_vocab_size(), SentenceVectors(sentence, texts)
        elif cfg.text.prior_mode == "beside":  # the towers train as without a prior; the head comes after
            tokenizer = corpus_tokenizer()
            vocab_size = tokenizer.get_vocab_size()
        else:
            vocab_size, states = sentence.vocab_size, SentenceStates(sentence, texts, cfg.text.max_tokens)
        text_cfg = TextNetConfig(**{**asdict(cfg.text), "prior_dim": sentence.dim, "prior_sha256": sentence.ref.sha256,
                                    "vocab_size": vocab_size})  # fmt: skip
    elif has_text and cfg.text.prior:
        check_prior_mode(cfg.text.prior, cfg.text.prior_mode)
        prior = load_prior(cfg.text.prior)
        tokenizer, table = prior.tokenizer(), prior.table
        text_cfg = TextNetConfig(**{**asdict(cfg.text), "vocab_size": table.shape[0], "d_model": table.shape[1],
                                    "prior_sha256": prior.sha256})  # fmt: skip
    elif has_text:
        tokenizer = corpus_tokenizer()
        text_cfg = TextNetConfig(**{**asdict(cfg.text), "vocab_size": tokenizer.get_vocab_size()})
    audio_cfg = AudioNetConfig(**{**asdict(cfg.audio), "max_seconds": cfg.max_seconds})
    model = CompactModel(audio_cfg, text_cfg, cfg.video if has_video else None, tokenizer).train()
    groups: list[dict] = [{"params": [p for n, p in model.named_parameters() if n != "text.tok.weight"]}]
    if table is not None and model.text is not None:
        weight = model.text.tok.weight
        with torch.no_grad():
            weight.copy_(torch.from_numpy(table))
        if text_cfg.prior_mode == "finetune":
            groups.append({"params": [weight], "lr": cfg.lr * text_cfg.prior_lr_scale})
        else:
            weight.requires_grad_(False)  # frozen and pooled keep the prior as it is
    elif model.text is not None and hasattr(model.text, "tok"):  # learnt token embeddings (residual ones too)
        groups[0]["params"].append(model.text.tok.weight)

    def text_inputs(texts: list[str]) -> dict[str, torch.Tensor]:
        inputs = states.batch(texts) if states is not None else {}
        if tokenizer is not None:  # the tower reads corpus (or table) token ids
            inputs["ids"] = model.tokenize(texts)
        return inputs

    val_clips = [c for c in load_clips(val_pairs, cfg, False) if c.texts] if val_pairs and has_text else []
    best: dict = {"mrr": -1.0, "epoch": -1, "state": None}

    def keep_if_best(epoch: int) -> bool:
        """Score the weights on the validation clips and keep them if they are the best so far."""
        if not val_clips:
            return False
        mrr = validation_mrr(model, val_clips, text_inputs)
        if mrr > best["mrr"]:
            best.update(mrr=mrr, epoch=epoch, state=copy.deepcopy(model.state_dict()))
        log.info("epoch %d: validation MRR@10 %.3f on %d held-out clips (best %.3f, epoch %d)", epoch, mrr,
                 len(val_clips), best["mrr"], best["epoch"])  # fmt: skip
        return True

    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(clips) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    budget = {"total": total}  # shrinks once the time budget shows how many steps fit

    # A warmup of at most a fifth of the steps: the demo's 60 steps never left a 100-step warmup (the
    # rate rose to 0.6 lr and stopped). Capped, its held-out text R@1 went 0.49 -> 0.61 and video 0.69
    # -> 0.71 (seed 1: 0.45 -> 0.43, 0.26 -> 0.49) on 51 queries; runs of 500+ steps are unchanged.
    warmup = min(cfg.warmup_steps, max(1, total // 5))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, budget["total"] - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(cfg.seed)
    start = time.monotonic()
    stats: dict[str, float] = {}
    step = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(clips))
        for s in range(steps_per_epoch):
            batch = [clips[i] for i in order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
            gains = 10 ** (rng.uniform(-cfg.gain_jitter_db, cfg.gain_jitter_db, len(batch)) / 20)
            waves = [augment_wave(c.wave, cfg, rng) if cfg.augment else c.wave.astype(np.float32) for c in batch]
            wave, lengths = _pad_waves([w * g for w, g in zip(waves, gains, strict=True)], audio_cfg.n_fft)
            a_clip, a_seq, a_mask = model.audio(wave, lengths, cfg.spec_masks if cfg.augment else 0)
            loss = torch.zeros(())
            if has_text:
                with_text = [i for i, c in enumerate(batch) if c.texts]
                t_clip = model.text(**text_inputs([random.choice(batch[i].texts) for i in with_text]))
                loss_text = info_nce(a_clip[with_text], t_clip, model.logit_scale_text)
                loss = loss + loss_text
                stats["loss_text"] = float(loss_text.detach())
            if has_video:
                with_video = [i for i, c in enumerate(batch) if c.frames is not None]
                frames, flen = _pad_frames([batch[i].frames for i in with_video], cfg.video.max_frames)
                v_clip, v_seq, v_mask = model.video(frames, flen)
                loss_video = info_nce(a_clip[with_video], v_clip, model.logit_scale_video)
                for scale in cfg.segment_scales:
                    a_seg = segment_pool(a_seq[with_video], a_mask[with_video], scale).reshape(-1, a_seq.shape[-1])
                    v_seg = segment_pool(v_seq, v_mask, scale).reshape(-1, v_seq.shape[-1])
                    loss_video = loss_video + info_nce(a_seg, v_seg, model.logit_scale_video) / len(cfg.segment_scales)
                loss = loss + cfg.video_weight * loss_video
                stats["loss_video"] = float(loss_video.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            stats["loss"] = float(loss.detach())
            if cfg.max_minutes and step == 20:  # the cosine decay must end when the time budget does
                per_step = (time.monotonic() - start) / step
                budget["total"] = min(total, max(step + 1, int(cfg.max_minutes * 60 / per_step)))
            if progress:
                progress(step, budget["total"], stats["loss"])
            out_of_time = bool(cfg.max_minutes) and time.monotonic() - start > cfg.max_minutes * 60
            if step >= budget["total"] or out_of_time:
                minutes = (time.monotonic() - start) / 60
                why = (
                    f"the time budget of {cfg.max_minutes:g} minutes ran out"
                    if out_of_time
                    else f"all {budget['total']} steps are done"
                    + (f" (the number that fits {cfg.max_minutes:g} minutes)" if budget["total"] < total else "")
                )
                log.info("stopping after %.1f minutes, epoch %d, step %d: %s", minutes, epoch, step, why)
                break
        else:  # the epoch ran to its end
            if val_clips and keep_if_best(epoch) and cfg.patience and epoch - best["epoch"] >= cfg.patience:
                minutes = (time.monotonic() - start) / 60
                why = (
                    f"no better validation MRR@10 in {cfg.patience} epochs "
                    f"(best {best['mrr']:.3f}, epoch {best['epoch']})"
                )
                log.info("stopping after %.1f minutes, epoch %d, step %d: %s", minutes, epoch, step, why)
                break
            continue
        keep_if_best(epoch)  # stopped inside an epoch: its weights compete too
        break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        stats.update(best_epoch=best["epoch"], val_mrr_at_10=best["mrr"], val_clips=len(val_clips))
    if model.text is not None and model.text.beside:
        stats.update(fit_sentence_head(model, clips, val_clips, cfg))
    stats.update(steps=step, clips=len(clips), seconds=time.monotonic() - start)
    model.eval().save(
        out,
        extra={"training": {**{k: v for k, v in asdict(cfg).items() if k not in ("audio", "text", "video")}, **stats}},
    )
    return stats
