"""The regression mapper: a deterministic MLP from one embedding space to the other.

The honest baseline every refiner result is measured against, and one of the three scores a
shipped refiner may mix (refined, mapped, direct; `diffgap/diffusion/refiner.py`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Mapper(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual and in_dim == out_dim  # q -> normalize(q + f(q)) when both sides share a size
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_dim),
        )
        self._exact: tuple[nn.Module, ...] = ()  # float64 copy for `map`, made on first use (a tuple: not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c) -> (B, d) unit vectors
        y = self.net(x)  # (B, d)
        return F.normalize(x + y if self.residual else y, dim=-1)

    @torch.inference_mode()
    def map(self, x: np.ndarray) -> np.ndarray:
        """Unit vectors (B, d) for rows (B, c), each row the same whatever its batch: a float64 copy
        of the weights computes them, so BLAS's batch-size-dependent summation order stays far below
        float32's resolution (a query must rank alike alone and in the service's micro-batches)."""
        if not self._exact:
            self._exact = (copy.deepcopy(self.net).double().eval(),)
        y = self._exact[0](torch.from_numpy(np.asarray(x, dtype=np.float64)))  # (B, d)
        if self.residual:
            y = y + torch.from_numpy(np.asarray(x, dtype=np.float64))
        return F.normalize(y, dim=-1).numpy().astype(np.float32)

    def train(self, mode: bool = True) -> Mapper:
        self._exact = ()  # the weights may change: copy them again at the next map()
        return super().train(mode)
