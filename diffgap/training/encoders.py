"""Contrastive training of the compact encoders on paired data.

- text <-> audio: CLAP-style symmetric InfoNCE over the batch, with a learnable temperature.
- video <-> audio: CAVP-style InfoNCE at clip level, plus GMS-CAVP-style multi-scale temporal
  alignment: both sequences are pooled into 2 and 4 segments and each audio segment must pick
  its own video segment among all segments of the batch (other times of the same clip included),
  which teaches the towers when things happen, not only what.
Audio and video are decoded once and kept in memory as float16/uint8.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffgap.encoders.compact import CompactModel, _pad_frames, _pad_waves, train_tokenizer
from diffgap.encoders.prior import load_prior
from diffgap.media.audio import AudioDecodeError, decode_audio
from diffgap.media.video import VideoDecodeError, decode_video
from diffgap.models.audio_net import AudioNetConfig
from diffgap.models.text_net import TextNetConfig
from diffgap.models.video_net import VideoNetConfig
from diffgap.training.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class EncoderTrainConfig:
    epochs: int = 20
    batch_size: int = 64  # InfoNCE negatives per step; 64 fits 2 CPU cores
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    video_weight: float = 1.0  # weight of the video-audio losses next to text-audio
    segment_scales: tuple[int, ...] = (2, 4)  # GMS-CAVP temporal scales (segments per clip)
    max_seconds: float = 10.0  # audio longer than this is cut for training
    gain_jitter_db: float = 6.0  # random gain: loudness words stay relative to the background
    seed: int = 0
    max_minutes: float = 0.0  # stop early after this wall time (0 = no limit)
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


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors a (N, d) and b (N, d)."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.T  # (N, N)
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def segment_pool(seq: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """(B, T, d) masked sequence -> (B, segments, d) unit vectors, each the mean of its time span."""
    b, t, d = seq.shape
    lengths = mask.sum(1).clamp(min=segments)  # (B,)
    pos = torch.arange(t)[None].float() / lengths[:, None]  # (B, T) in [0, 1) over valid steps
    bins = (pos * segments).long().clamp(max=segments - 1)  # (B, T)
    onehot = F.one_hot(bins, segments).float() * mask[..., None]  # (B, T, S)
    pooled = torch.einsum("bts,btd->bsd", onehot, seq) / onehot.sum(1)[..., None].clamp(min=1)  # (B, S, d)
    return F.normalize(pooled, dim=-1)


def train_compact_encoders(
    pairs: Sequence[Pair],
    out: str | Path,
    cfg: EncoderTrainConfig | None = None,
    *,
    use_video: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    load_progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train, save to `out` (safetensors + JSON + tokenizer) and return final training stats."""
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
    tokenizer = None
    text_cfg = None
    prior = None
    if has_text and cfg.text.prior:
        prior = load_prior(cfg.text.prior)
        tokenizer = prior.tokenizer()
        vocab, width = prior.table.shape
        text_cfg = TextNetConfig(**{**asdict(cfg.text), "vocab_size": vocab, "d_model": width,
                                    "prior_sha256": prior.sha256})  # fmt: skip
    elif has_text:
        tokenizer = train_tokenizer((t for c in clips for t in c.texts), cfg.text.vocab_size)
        text_cfg = TextNetConfig(**{**asdict(cfg.text), "vocab_size": tokenizer.get_vocab_size()})
    audio_cfg = AudioNetConfig(**{**asdict(cfg.audio), "max_seconds": cfg.max_seconds})
    model = CompactModel(audio_cfg, text_cfg, cfg.video if has_video else None, tokenizer).train()
    groups: list[dict] = [{"params": [p for n, p in model.named_parameters() if n != "text.tok.weight"]}]
    if prior is not None and model.text is not None:
        table = model.text.tok.weight
        with torch.no_grad():
            table.copy_(torch.from_numpy(prior.table))
        if text_cfg.prior_mode == "finetune":
            groups.append({"params": [table], "lr": cfg.lr * text_cfg.prior_lr_scale})
        else:
            table.requires_grad_(False)  # frozen and pooled keep the prior as it is
    elif model.text is not None:
        groups[0]["params"].append(model.text.tok.weight)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(clips) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    budget = {"total": total}  # shrinks once the time budget shows how many steps fit

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, budget["total"] - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))

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
            wave, lengths = _pad_waves(
                [c.wave.astype(np.float32) * g for c, g in zip(batch, gains, strict=True)], audio_cfg.n_fft
            )
            a_clip, a_seq, a_mask = model.audio(wave, lengths)
            loss = torch.zeros(())
            if has_text:
                with_text = [i for i, c in enumerate(batch) if c.texts]
                ids = model.tokenize([random.choice(batch[i].texts) for i in with_text])
                t_clip = model.text(ids)
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
        else:
            continue
        break
    stats.update(steps=step, clips=len(clips), seconds=time.monotonic() - start)
    model.eval().save(
        out,
        extra={"training": {**{k: v for k, v in asdict(cfg).items() if k not in ("audio", "text", "video")}, **stats}},
    )
    return stats
