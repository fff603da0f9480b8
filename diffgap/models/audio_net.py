"""Compact audio encoder: log-mel front end, a small CNN, and a temporal transformer.

The CNN folds frequency away and keeps time at 1/4 of the mel frame rate, so the transformer can
tell "beep then buzz" from "buzz then beep"; `forward` returns both the pooled clip vector and
the per-step sequence (used by segment-level alignment with video).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AudioNetConfig:
    sample_rate: int = 16000  # all input is resampled to this on decode
    n_fft: int = 512  # 32 ms analysis window at 16 kHz: enough resolution for pitch registers
    hop: int = 320  # 20 ms hop: onsets resolved well enough for "at the start/end", half the cost of 10 ms
    n_mels: int = 64  # the usual CLAP/AudioSet resolution, small enough for a 2-core CPU
    f_min: float = 20.0
    f_max: float = 8000.0  # Nyquist at 16 kHz
    channels: tuple[int, ...] = (16, 32, 64, 128)  # CNN widths; each block halves frequency (2 CPU cores)
    time_pool: tuple[int, ...] = (2, 2, 1, 1)  # per-block time pooling: 4x overall -> 80 ms steps
    # The first block downsamples with a strided conv instead of pooling after two full-resolution
    # convs: ~10x cheaper forward+backward on CPU (measured 0.46 -> 0.04 s for a batch of 64 4-s clips).
    # Checkpoints saved before this field load with False, their architecture.
    strided_stem: bool = True
    d_model: int = 128  # transformer width
    n_layers: int = 2  # two layers suffice to model order of a handful of events
    n_heads: int = 4
    max_steps: int = 256  # 256 x 80 ms = 20 s of positions; windows are at most 10 s
    dim: int = 256  # output embedding size shared with the text and video towers
    max_seconds: float = 10.0  # longest window the encoder accepts


def mel_filterbank(cfg: AudioNetConfig) -> np.ndarray:
    """Triangular filters on the HTK mel scale, (n_mels, n_fft // 2 + 1)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(cfg.f_min)), hz_to_mel(np.array(cfg.f_max)), cfg.n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def mask_bands(x: torch.Tensor, frames: torch.Tensor, n: int) -> torch.Tensor:
    """SpecAugment (Park et al. 2019): in each clip of x (B, M, T), n random mel bands of up to M/8
    bins and n random time spans of up to 1/8 of the clip's own frames set to 0 (the normalised mean)."""
    b, m, t = x.shape
    keep = torch.ones_like(x)
    for i in range(b):
        real = int(min(frames[i], t))
        for _ in range(n):
            width = int(torch.randint(0, max(1, m // 8) + 1, ()))
            start = int(torch.randint(0, m - width + 1, ()))
            keep[i, start : start + width, :] = 0
            span = int(torch.randint(0, max(1, real // 8) + 1, ()))
            begin = int(torch.randint(0, max(1, real - span + 1), ()))
            keep[i, :, begin : begin + span] = 0
    return x * keep


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_pool: int, strided: bool = False) -> None:
        super().__init__()
        stride = (2, time_pool) if strided else 1  # strided: downsample before the convs, not after
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pool: nn.Module = nn.Identity() if strided else nn.AvgPool2d((2, time_pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, T) -> (B, C', F/2, T/p)
        x = F.gelu(self.bn1(self.conv1(x)))
        x = F.gelu(self.bn2(self.conv2(x)))
        return self.pool(x)


class AudioNet(nn.Module):
    def __init__(self, cfg: AudioNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(cfg)), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        widths = (1, *cfg.channels)
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, p, strided=cfg.strided_stem and i == 0)
            for i, (a, b, p) in enumerate(zip(widths[:-1], widths[1:], cfg.time_pool, strict=False))
        )
        self.to_model = nn.Linear(cfg.channels[-1], cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.max_steps, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, 4 * cfg.d_model, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.temporal = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.dim)

    @property
    def time_stride(self) -> int:
        return self.cfg.hop * math.prod(self.cfg.time_pool)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, n_mels, frames)
        spec = torch.stft(wave, self.cfg.n_fft, self.cfg.hop, window=self.window, return_complex=True)
        power = spec.abs().pow(2)  # (B, n_fft/2+1, frames)
        return torch.log(self.mel @ power + 1e-6)

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor, spec_masks: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wave (B, S) zero-padded, lengths (B,) in samples -> (clip (B, dim), steps (B, T, dim), mask (B, T)).
        `spec_masks` > 0 (training only) zeroes that many random mel bands and time spans per clip."""
        x = self.log_mel(wave)  # (B, M, frames)
        # Normalise each clip over its own frames only, then zero the padding: a clip encodes the same
        # alone or next to longer ones in a batch (zeros are what the convolutions pad with anyway).
        frames = x.shape[-1]
        real = torch.arange(frames, device=x.device)[None] <= lengths[:, None] // self.cfg.hop  # (B, frames)
        w = real[:, None, :].float()  # (B, 1, frames)
        count = w.sum(dim=2, keepdim=True) * x.shape[1]  # (B, 1, 1)
        mean = (x * w).sum(dim=(1, 2), keepdim=True) / count
        std = (((x - mean) ** 2 * w).sum(dim=(1, 2), keepdim=True) / count).sqrt()
        x = (x - mean) / (std + 1e-5) * w  # gain invariance; padding -> 0
        if spec_masks:
            x = mask_bands(x, lengths // self.cfg.hop + 1, spec_masks)
        x = x.unsqueeze(1)  # (B, 1, M, frames)
        for block in self.blocks:
            x = block(x)
        x = x.mean(dim=2).transpose(1, 2)  # (B, T, C): frequency folded away
        steps = x.shape[1]
        valid = (lengths // self.time_stride).clamp(min=1, max=steps)  # (B,)
        mask = torch.arange(steps, device=x.device)[None] < valid[:, None]  # (B, T) True = real audio
        h = self.to_model(x) + self.pos[:steps]  # (B, T, D)
        h = self.norm(self.temporal(h, src_key_padding_mask=~mask))  # (B, T, D)
        seq = self.proj(h)  # (B, T, dim)
        w = mask.unsqueeze(-1).float()
        clip = (seq * w).sum(1) / w.sum(1)  # masked mean, (B, dim)
        return F.normalize(clip, dim=-1), seq, mask
