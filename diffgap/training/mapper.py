"""The honest baseline: a deterministic MLP regression from one embedding space to the other.

Trained on the same pairs as the refiner, with a cosine loss; if the refiner cannot beat this,
diffusion is not earning its keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffgap.models.mapper_net import Mapper
from diffgap.training.embeddings import PairEmbeddings


@dataclass
class MapperConfig:
    hidden: int = 512  # about as many weights as the refiner's trunk
    iterations: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    residual: bool = True  # map q -> normalize(q + f(q)) when both sides share a size
    seed: int = 0


def train_mapper(data: PairEmbeddings, direction: int = 0, cfg: MapperConfig | None = None) -> Mapper:
    """direction 0: query -> audio; direction 1: audio -> query."""
    cfg = cfg or MapperConfig()
    torch.manual_seed(cfg.seed)
    src = data.query if direction == 0 else data.audio[data.query_group]
    dst = data.audio[data.query_group] if direction == 0 else data.query
    x, y = torch.from_numpy(src), torch.from_numpy(dst)
    model = Mapper(x.shape[1], y.shape[1], cfg.hidden, cfg.residual).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.iterations):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=generator)
        loss = (1 - (model(x[idx]) * y[idx]).sum(-1)).mean()  # cosine distance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
