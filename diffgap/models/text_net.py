"""Compact text encoder: a corpus-trained WordPiece vocabulary and a small transformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextNetConfig:
    vocab_size: int = 4000  # a captioned sound library rarely needs more distinct word pieces
    max_tokens: int = 64  # longer captions are truncated; typical captions use 10-30
    d_model: int = 192  # wider than the audio side: captions carry many attribute words
    n_layers: int = 3  # word order ("A then B") needs context, not just a bag of words
    n_heads: int = 4
    dim: int = 256  # shared embedding size
    pad_id: int = 0


class TextNet(nn.Module):
    def __init__(self, cfg: TextNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, 4 * cfg.d_model, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) token ids -> (B, dim) unit vectors
        ids = ids[:, : self.cfg.max_tokens]
        mask = ids != self.cfg.pad_id  # (B, L)
        h = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))  # (B, L, D)
        w = mask.unsqueeze(-1).float()
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
        return F.normalize(self.proj(pooled), dim=-1)
