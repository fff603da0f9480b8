"""The DiffGAP denoiser eps_theta(z_n, n, F^c, direction) over embeddings.

One network serves both directions of bidirectional split training: direction 0 denoises the
audio embedding given the query embedding (text or video), direction 1 the query embedding given
audio. Each direction has its own thin input/output projections (the two spaces may differ in
size); the trunk of residual MLP blocks with adaptive LayerNorm (scale, shift, gate from the
timestep + condition + direction embedding, as in DiT's adaLN-Zero) is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RefinerNetConfig:
    audio_dim: int = 512  # target size for direction 0 (CLAP: 512, compact: 256)
    query_dim: int = 512  # text or video embedding size (the other side)
    hidden: int = 192  # trunk width; with 3 blocks: 5.6 MB at 512-d (CLAP), near the paper's 5.4 MB
    n_blocks: int = 3  # depth of the trunk
    mlp_ratio: int = 2  # MLP expansion inside each block
    time_freqs: int = 64  # sinusoidal features of the step n
    dropout: float = 0.0  # embeddings are few and clean; the diffusion noise already regularises
    cond_in_trunk: bool = True  # add the condition to the trunk input too: adaLN alone only modulates
    query_skip: bool = True  # a path condition -> output (a gain, 1 at init, when sizes match)


def timestep_features(n: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer steps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=n.device, dtype=torch.float32) / half)
    angles = n.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNBlock(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * hidden, hidden)
        )
        self.modulation = nn.Linear(hidden, 3 * hidden)
        nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, H), (B, H) -> (B, H)
        scale, shift, gate = self.modulation(emb).chunk(3, dim=-1)  # 3 x (B, H)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class _Gain(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return x * self.weight


class _ZeroLinear(nn.Linear):
    def __init__(self, c: int, d: int) -> None:
        super().__init__(c, d, bias=False)
        nn.init.zeros_(self.weight)


class RefinerNet(nn.Module):
    def __init__(self, cfg: RefinerNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = (cfg.audio_dim, cfg.query_dim)  # target size per direction
        conds = (cfg.query_dim, cfg.audio_dim)  # condition size per direction
        h = cfg.hidden
        self.z_in = nn.ModuleList(nn.Linear(d, h) for d in dims)
        self.cond_in = nn.ModuleList(nn.Linear(c, h) for c in conds)
        self.null_cond = nn.Parameter(torch.zeros(2, h))  # "no condition", for classifier-free guidance
        self.direction = nn.Embedding(2, h)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_freqs, h), nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(AdaLNBlock(h, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_blocks))
        self.out_norm = nn.LayerNorm(h)
        self.z_out = nn.ModuleList(nn.Linear(h, d) for d in dims)
        if cfg.cond_in_trunk:
            self.cond_trunk = nn.ModuleList(nn.Linear(c, h) for c in conds)
        if cfg.query_skip:
            # At high noise the best z_0 guess is a map of the condition. Aligned encoders put query
            # and audio in one space, so a per-coordinate gain (1 at init) carries the condition to
            # the output for free and the trunk learns the correction; spaces of different sizes get
            # a zero-initialised linear map instead. Cheap: 2*d weights, not d*d.
            self.skip = nn.ModuleList(
                _Gain(d) if d == c else _ZeroLinear(c, d) for d, c in zip(dims, conds, strict=True)
            )

    def forward(
        self,
        z_n: torch.Tensor,
        n: torch.Tensor,
        cond: torch.Tensor,
        direction: int,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_n (B, d_dir), n (B,), cond (B, c_dir); cond_mask (B,) False = drop the condition -> (B, d_dir)."""
        c = self.cond_in[direction](cond)  # (B, H)
        if cond_mask is not None:
            c = torch.where(cond_mask[:, None], c, self.null_cond[direction].expand_as(c))
        emb = self.time_mlp(timestep_features(n, self.cfg.time_freqs)) + c + self.direction.weight[direction]
        emb = F.silu(emb)  # (B, H)
        # a dropped condition (classifier-free guidance) must not leak in through the other paths
        cond_kept = cond if cond_mask is None else cond * cond_mask[:, None].to(cond.dtype)  # (B, c_dir)
        h = self.z_in[direction](z_n)  # (B, H)
        if self.cfg.cond_in_trunk:
            h = h + self.cond_trunk[direction](cond_kept)
        for block in self.blocks:
            h = block(h, emb)
        out = self.z_out[direction](self.out_norm(h))  # (B, d_dir)
        if self.cfg.query_skip:
            out = out + self.skip[direction](cond_kept)  # (B, d_dir)
        return out

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
