"""A deterministic MLP from one embedding space to the other: the honest baseline, and a part of the mix.

Trained on the same pairs as the refiner, with a cosine loss: the plain regression every refiner
result is measured against (if the refiner cannot beat this, diffusion is not earning its keep), and
the mapper a refiner ships in its mix; `MapperConfig.ranking_weight` adds a ranking term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffgap.models.mapper_net import Mapper
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.losses import group_mask, ranking_loss


@dataclass
class MapperConfig:
    hidden: int = 512  # about as many weights as the refiner's trunk
    iterations: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    residual: bool = True  # map q -> normalize(q + f(q)) when both sides share a size
    # > 0: InfoNCE of each mapped query among the batch's targets (CLIP's symmetric form) beside the
    # cosine loss, which alone pulls every output toward the mean of its plausible targets. 0.2 (the
    # refiner's contrastive weight and temperature, untuned) made the mapper alone better on both
    # SynthCaps seeds, but the shipped mix of refined, mapped and direct scores no better: +0.008 /
    # -0.014 video R@1 under the protocol, seeds 0 / 1 (BENCHMARKS.md run 10). So the default stays
    # the plain regression, the eval's baseline; `refiner train/eval --mapper-ranking-weight` sets it.
    ranking_weight: float = 0.0
    ranking_temperature: float = 0.05
    seed: int = 0


def train_mapper(data: PairEmbeddings, direction: int = 0, cfg: MapperConfig | None = None) -> Mapper:
    """direction 0: query -> audio; direction 1: audio -> query."""
    cfg = cfg or MapperConfig()
    torch.manual_seed(cfg.seed)
    src = data.query if direction == 0 else data.audio[data.query_group]
    dst = data.audio[data.query_group] if direction == 0 else data.query
    x, y = torch.from_numpy(src), torch.from_numpy(dst)
    groups = torch.from_numpy(data.query_group)
    model = Mapper(x.shape[1], y.shape[1], cfg.hidden, cfg.residual).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.iterations):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=generator)
        out = model(x[idx])  # (B, d) unit vectors
        loss = (1 - (out * y[idx]).sum(-1)).mean()  # cosine distance
        if cfg.ranking_weight > 0:
            # rows of one clip (its captions, or one clip drawn twice) are not each other's negatives
            ranked = ranking_loss(out, y[idx], cfg.ranking_temperature, group_mask(groups[idx]), symmetric=True)
            loss = loss + cfg.ranking_weight * ranked
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
