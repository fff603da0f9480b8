"""Losses shared by the trained maps (the refiner's denoised estimate, the regression mapper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_loss(
    estimate: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    same_group: torch.Tensor | None,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE of estimates (B, d) against their targets (B, d) among the batch's targets; other
    captions of the same clip (`same_group`, (B, B)) are not negatives. `symmetric` averages in the
    other way round too, each target among the batch's estimates (CLIP's loss)."""
    b = estimate.shape[0]
    logits = F.normalize(estimate, dim=-1) @ F.normalize(target, dim=-1).T / temperature  # (B, B)
    if same_group is not None:
        logits = logits.masked_fill(same_group & ~torch.eye(b, dtype=torch.bool), float("-inf"))
    labels = torch.arange(b)
    loss = F.cross_entropy(logits, labels)
    return (loss + F.cross_entropy(logits.T, labels)) / 2 if symmetric else loss


def group_mask(groups: torch.Tensor) -> torch.Tensor:
    """(B,) target ids -> (B, B) True where two rows of a batch share a target."""
    return groups[:, None] == groups[None, :]
