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

The weight of the error against the dense score is the refiner's own (`rerank_spec`): train-refiner
picks it on held-out pairs against the final ranking (`config.rerank_weight`). A fixed 0.5 lifted
SynthCaps text a little (BENCHMARKS.md run 6) and cost video queries ranked with time spans 0.024 /
0.023 R@1 (run 20), where the held-out pairs pick 0 or a small weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


# The rerank a search may ask for: top 50, 8 noise levels (5.6 ms a query on 2 cores, BENCHMARKS.md
# run 6), the error weighted as the refiner's held-out pairs chose; 0.5 for refiners trained before
# that weight was picked (what every rerank used until run 20).
RERANK = ScoreSpec(depth=50, levels=8, weight=0.5)


def rerank_spec(refiner: Refiner) -> ScoreSpec:
    """The rerank `refiner` serves: RERANK with the weight train-refiner picked for it, where it did."""
    weight = refiner.config.rerank_weight
    return RERANK if weight is None else replace(RERANK, weight=weight)


@torch.inference_mode()
def paired_errors(
    refiner: Refiner,
    x0: np.ndarray,
    cond: np.ndarray,
    spec: ScoreSpec,
    direction: int = 0,
    unconditional: bool = False,
) -> np.ndarray:
    """Eps-errors (B, K, L) of denoising unit rows x0 (B, K, d) given unit conditions cond (B, K, c)
    with the network of `direction`, at each of spec's L levels, with one noise draw per level shared
    by every row. `unconditional` drops the condition (the branch `--cond-dropout` trains)."""
    target_dim, cond_dim = refiner.dims(direction)
    b, k, d = x0.shape
    assert d == target_dim and cond.shape == (b, k, cond_dim), f"rows {x0.shape}, conditions {cond.shape}"
    steps = spec.steps(refiner.schedule.num_train_timesteps)
    generator = torch.Generator().manual_seed(spec.seed)
    eps = torch.randn(len(steps), d, generator=generator)  # (L, d): one draw per level, shared by all
    x = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32)) * math.sqrt(d)  # (B, K, d)
    c = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32)) * math.sqrt(cond_dim)  # (B, K, c)
    n = torch.tensor(steps, dtype=torch.long)  # (L,)
    abar = refiner.schedule.alphas_cumprod[n].float()  # (L,)
    # every (query, candidate, level) as one row of one network call
    signal, noise = abar.sqrt()[None, None, :, None], (1 - abar).sqrt()[None, None, :, None]  # (1, 1, L, 1)
    z = signal * x[:, :, None, :] + noise * eps  # (B, K, L, d)
    rows = z.reshape(-1, d)  # (B*K*L, d)
    n_rows = n.repeat(b * k)  # (B*K*L,)
    cond_rows = c[:, :, None, :].expand(b, k, len(steps), cond_dim).reshape(-1, cond_dim)  # (B*K*L, c)
    if unconditional:
        dropped = torch.zeros(len(rows), dtype=torch.bool)
        out = refiner.net(rows, n_rows, cond_rows, direction, cond_mask=dropped)  # (B*K*L, d)
    else:
        out = refiner.predict(rows, n_rows, cond_rows, direction)  # (B*K*L, d)
    eps_hat, _ = refiner.schedule.to_eps_and_z0(out, rows, n_rows, refiner.config.prediction_type)
    return ((eps_hat.reshape(b, k, len(steps), d) - eps[None, None]) ** 2).mean(-1).numpy()  # (B, K, L)


def denoising_errors(refiner: Refiner, xq: np.ndarray, candidates: np.ndarray, spec: ScoreSpec) -> np.ndarray:
    """Mean conditional eps-error (B, K) of each query's candidates, over spec's levels: xq (B, c) unit
    query vectors, candidates (B, K, d) unit audio vectors. Direction 0 (query -> audio)."""
    b, k, _ = candidates.shape
    assert xq.shape[0] == b, f"queries {xq.shape}, candidates {candidates.shape}"
    cond = np.broadcast_to(xq[:, None, :], (b, k, xq.shape[1]))  # (B, K, c): each query for its candidates
    return paired_errors(refiner, candidates, cond, spec).mean(-1)  # (B, K)


def _standardised(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """x (B, K) centred and scaled per row over its valid entries."""
    masked = np.where(valid, x, np.nan)
    mean = np.nanmean(masked, axis=1, keepdims=True)
    std = np.nanstd(masked, axis=1, keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0)


def fused_scores(errors: np.ndarray, scores: np.ndarray | None, valid: np.ndarray, weight: float) -> np.ndarray:
    """What a rerank orders by (B, K), higher first: -errors at weight 1, else (1 - weight) *
    z(dense score) + weight * z(-error), each standardised over the query's valid candidates."""
    if weight >= 1:
        return -errors
    assert scores is not None, "a fused rerank needs the dense scores"
    return (1 - weight) * _standardised(scores, valid) + weight * _standardised(-errors, valid)


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
    fused = fused_scores(denoising_errors(refiner, xq, vectors, spec), scores, valid, spec.weight)  # (B, K)
    fused = np.where(valid, fused, -np.inf)
    order = np.argsort(-fused, axis=1, kind="stable")  # (B, K)
    return np.take_along_axis(candidate_ids, order, axis=1)


def top_errors(
    refiner: Refiner, xq: np.ndarray, xb: np.ndarray, scores: np.ndarray, spec: ScoreSpec, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top spec.depth rows of xb by `scores` (B, N) as indices (B, K), and their denoising
    errors (B, K) given the queries xq (B, c): `chunk` queries x K x levels rows per network call."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, : spec.depth]  # (B, K)
    errors = [
        denoising_errors(refiner, xq[i : i + chunk], xb[top[i : i + chunk]], spec) for i in range(0, len(top), chunk)
    ]
    return top, np.concatenate(errors) if errors else np.zeros(top.shape, np.float32)


def reranked_scores(scores: np.ndarray, top: np.ndarray, errors: np.ndarray, weight: float) -> np.ndarray:
    """Scores (B, N) that rank as a rerank does: each row's candidates `top` (B, K, indices into N)
    ordered by `fused_scores` above every other item, which keeps its dense order. `errors` (B, K):
    the candidates' denoising errors. For scoring many weights on held-out queries at one error pass."""
    dense = np.take_along_axis(scores, top, axis=1)  # (B, K)
    fused = fused_scores(errors, dense, np.ones_like(top, dtype=bool), weight)
    fused = fused - fused.min(axis=1, keepdims=True)  # >= 0
    out = scores - scores.max(axis=1, keepdims=True) - 1.0  # every item below -1
    np.put_along_axis(out, top, fused, axis=1)
    return out
