"""Noise schedule and DDIM sampler, kept apart from the network (the diffusers split).

Notation (DiffGAP Sec. III, DDPM/DDIM papers):
    z_0            clean target embedding, rescaled by sqrt(dim) so each coordinate has variance ~1
    z_n            noised embedding at step n:  z_n = sqrt(abar_n) z_0 + sqrt(1 - abar_n) eps
    abar_n         `alphas_cumprod[n]` = prod_{i<=n} (1 - beta_i)
    eps_theta(z_n, n, F^c)   the network's noise estimate given the condition embedding F^c
DDIM with eta = 0 is deterministic given its starting point, which retrieval needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000  # N in the paper; the usual DDPM value
    beta_schedule: str = "cosine"  # "cosine" (Nichol & Dhariwal) keeps signal at mid steps; or "linear"
    beta_start: float = 1e-4  # linear schedule only (DDPM values)
    beta_end: float = 0.02


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    if cfg.beta_schedule == "cosine":
        s = 0.008
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {cfg.beta_schedule!r}")


class NoiseSchedule:
    """The forward process q(z_n | z_0) and what samplers need from it."""

    def __init__(self, cfg: ScheduleConfig | None = None) -> None:
        self.cfg = cfg or ScheduleConfig()
        self.betas = make_betas(self.cfg)  # (N,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_n, (N,)

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """z_n = sqrt(abar_n) z_0 + sqrt(1 - abar_n) eps, for a batch of steps n (B,)."""
        abar = self.alphas_cumprod.to(z0.device)[n].to(z0.dtype).unsqueeze(-1)  # (B, 1)
        return abar.sqrt() * z0 + (1 - abar).sqrt() * eps

    def to_eps_and_z0(
        self, model_out: torch.Tensor, z_n: torch.Tensor, n: torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both the noise and the clean estimate from whichever of them the network predicts."""
        abar = self.alphas_cumprod.to(z_n.device)[n].to(z_n.dtype).unsqueeze(-1)  # (B, 1)
        if prediction_type == "epsilon":
            eps = model_out
            z0 = (z_n - (1 - abar).sqrt() * eps) / abar.sqrt()
        elif prediction_type == "sample":
            z0 = model_out
            eps = (z_n - abar.sqrt() * z0) / (1 - abar).sqrt()
        else:
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        return eps, z0


class DDIMSampler:
    """Deterministic (eta = 0) DDIM over a subset of the training steps.

    Usage:  sampler.set_timesteps(5[, start_step]);  for n in sampler.timesteps: z = sampler.step(out, n, z)
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timesteps = torch.zeros(0, dtype=torch.long)

    def set_timesteps(self, num_inference_steps: int, start_step: int | None = None) -> torch.Tensor:
        """Evenly spaced steps from `start_step` (default: the last, N-1) down to 0, descending."""
        n_train = self.schedule.num_train_timesteps
        start = n_train - 1 if start_step is None else int(start_step)
        assert 0 <= start < n_train, f"start_step {start} outside [0, {n_train})"
        assert num_inference_steps >= 1, "need at least one step"
        steps = torch.linspace(start, 0, min(num_inference_steps, start + 1)).round().long()
        self.timesteps = torch.unique_consecutive(steps)
        return self.timesteps

    def prev_timestep(self, n: int) -> int:
        later = self.timesteps[self.timesteps < n]
        return int(later[0]) if len(later) else -1

    def step(self, model_out: torch.Tensor, n: int, z_n: torch.Tensor) -> torch.Tensor:
        """z_{n'} = sqrt(abar_{n'}) z0_hat + sqrt(1 - abar_{n'}) eps_hat, n' the next step (abar_{-1} = 1)."""
        batch_n = torch.full((z_n.shape[0],), n, dtype=torch.long, device=z_n.device)
        eps, z0 = self.schedule.to_eps_and_z0(model_out, z_n, batch_n, self.prediction_type)
        prev = self.prev_timestep(n)
        if prev < 0:
            return z0
        abar_prev = self.schedule.alphas_cumprod[prev].to(z_n.dtype)
        return abar_prev.sqrt() * z0 + (1 - abar_prev).sqrt() * eps
