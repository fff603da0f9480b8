"""The refiner as a generative model: score candidates by how well it denoises them given the query.

A conditional diffusion model eps_theta(z_n, n, F^c) models p(audio | query). Li et al. 2023 ("Your
diffusion model is secretly a zero-shot classifier") rank classes by the conditional denoising
error, an estimate of the ELBO of each class; here the classes are the top-K candidates of a search
and the condition is the query. For each candidate audio embedding x_0 and noise level n in
`levels`:

    z_n   = sqrt(abar_n) * x_0 + sqrt(1 - abar_n) * eps      (eps shared by every candidate and query)
    error = || eps_theta(z_n, n, F^c) - eps ||^2             (averaged over the levels)

Lower error = more likely under the query. Sharing the noise across candidates makes the comparison
paired (the same eps for all), which is what lets a few levels separate them. `rerank` only
reorders the candidates it is given: nothing leaves or joins the top-K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffgap.diffusion.refiner import Refiner


@dataclass(frozen=True)
class ScoreSpec:
    """How a refiner rescores candidates."""

    depth: int = 50  # candidates rescored per query: the top of the dense ranking
    levels: int = 8  # noise levels, evenly spread over the schedule (centres of `levels` equal bins)
    seed: int = 0  # the shared noise: a query's scores never depend on its batch neighbours
    # 1: order by denoising error alone; below 1, by (1 - weight) * z(dense score) + weight * z(-error),
    # each standardised over the query's candidates, so neither scale dominates
    weight: float = 1.0

    def steps(self, num_train_timesteps: int) -> list[int]:
        return [int((i + 0.5) * num_train_timesteps / self.levels) for i in range(self.levels)]


@torch.inference_mode()
def denoising_errors(refiner: Refiner, xq: np.ndarray, candidates: np.ndarray, spec: ScoreSpec) -> np.ndarray:
    """Mean conditional eps-error (B, K) of each query's candidates: xq (B, c) unit query vectors,
    candidates (B, K, d) unit audio vectors. Direction 0 (query -> audio) only."""
    target_dim, cond_dim = refiner.dims(0)
    b, k, d = candidates.shape
    assert d == target_dim and xq.shape == (b, cond_dim), f"queries {xq.shape}, candidates {candidates.shape}"
    steps = spec.steps(refiner.schedule.num_train_timesteps)
    generator = torch.Generator().manual_seed(spec.seed)
    eps = torch.randn(len(steps), d, generator=generator)  # (L, d): one draw per level, shared by all
    x0 = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32)) * math.sqrt(d)  # (B, K, d)
    cond = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)) * math.sqrt(cond_dim)  # (B, c)
    n = torch.tensor(steps, dtype=torch.long)  # (L,)
    abar = refiner.schedule.alphas_cumprod[n].float()  # (L,)
    # every (query, candidate, level) as one row of one network call
    signal, noise = abar.sqrt()[None, None, :, None], (1 - abar).sqrt()[None, None, :, None]  # (1, 1, L, 1)
    z = signal * x0[:, :, None, :] + noise * eps  # (B, K, L, d)
    rows = z.reshape(-1, d)  # (B*K*L, d)
    n_rows = n.repeat(b * k)  # (B*K*L,)
    cond_rows = cond[:, None, None, :].expand(b, k, len(steps), cond_dim).reshape(-1, cond_dim)  # (B*K*L, c)
    out = refiner.predict(rows, n_rows, cond_rows)  # (B*K*L, d)
    eps_hat, _ = refiner.schedule.to_eps_and_z0(out, rows, n_rows, refiner.config.prediction_type)
    err = ((eps_hat.reshape(b, k, len(steps), d) - eps[None, None]) ** 2).mean(-1)  # (B, K, L)
    return err.mean(-1).numpy()  # (B, K)


def _standardised(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """x (B, K) centred and scaled per row over its valid entries."""
    masked = np.where(valid, x, np.nan)
    mean = np.nanmean(masked, axis=1, keepdims=True)
    std = np.nanstd(masked, axis=1, keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0)


def rerank(
    refiner: Refiner,
    xq: np.ndarray,
    candidate_ids: np.ndarray,
    vectors: np.ndarray,
    spec: ScoreSpec,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Reorder each row of candidate_ids (B, K), best first; vectors (B, K, d) are the candidates'
    audio vectors, `scores` (B, K) their dense scores (needed when spec.weight < 1). Ids of -1
    (fewer results than K) stay at the end."""
    valid = candidate_ids >= 0
    errors = denoising_errors(refiner, xq, vectors, spec)  # (B, K)
    if spec.weight < 1:
        assert scores is not None, "a fused rerank needs the dense scores"
        fused = (1 - spec.weight) * _standardised(scores, valid) + spec.weight * _standardised(-errors, valid)
    else:
        fused = -errors
    fused = np.where(valid, fused, -np.inf)
    order = np.argsort(-fused, axis=1, kind="stable")  # (B, K)
    return np.take_along_axis(candidate_ids, order, axis=1)
