"""Time segments of a tower's per-step sequence: the temporal scales of GMS-CAVP (seeds/003).

The compact audio and video towers train with an alignment loss on these segments (each audio
segment must pick its own video segment, `diffgap/training/encoders.py`), so a segment vector holds
*when* something sounds or shows, which the clip vector (the mean over all steps) averages away.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Spans per window an index keeps by default: the finer of the two scales the towers train with
# (`EncoderTrainConfig.segment_scales`). On SynthCaps video -> audio it scored above 2 spans on both
# seeds, alone and mixed (BENCHMARKS.md run 13).
SEGMENTS = 4


def segment_pool(seq: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """(B, T, d) masked sequence -> (B, segments, d) unit vectors, each the mean of its time span."""
    b, t, d = seq.shape
    lengths = mask.sum(1).clamp(min=segments)  # (B,)
    pos = torch.arange(t)[None].float() / lengths[:, None]  # (B, T) in [0, 1) over valid steps
    bins = (pos * segments).long().clamp(max=segments - 1)  # (B, T)
    onehot = F.one_hot(bins, segments).float() * mask[..., None]  # (B, T, S)
    pooled = torch.einsum("bts,btd->bsd", onehot, seq) / onehot.sum(1)[..., None].clamp(min=1)  # (B, S, d)
    return F.normalize(pooled, dim=-1)


def segment_scores(xq_segments: np.ndarray, xb_segments: np.ndarray) -> np.ndarray:
    """Queries' spans (Q, S, c) against candidates' spans (N, S, c): the mean over spans of each span's
    cosine with the candidate's same span (Q, N). Time-aligned: span s meets span s only."""
    assert xq_segments.shape[1:] == xb_segments.shape[1:], f"spans {xq_segments.shape} vs {xb_segments.shape}"
    return np.einsum("qsc,nsc->qn", xq_segments, xb_segments) / xq_segments.shape[1]  # (Q, N)


def two_sided_segment_scores(
    query_side: np.ndarray, raw_segments: np.ndarray, mapped_segments: np.ndarray, weight: float
) -> np.ndarray:
    """(1 - weight) * query_side + weight * `segment_scores`(raw, mapped): the span score of the
    queries' spans taken to audio space (Q, N), mixed with the queries' spans as encoded (Q, S, c)
    against the candidates' spans mapped into the query space (N, S, c), the spans' library side."""
    if weight == 0:
        return query_side
    return with_segment_scores(query_side, segment_scores(raw_segments, mapped_segments), weight)  # (Q, N)


def with_segment_scores(scores: np.ndarray, span_scores: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * scores (Q, N) + weight * the span scores of the same queries and candidates (Q, N)."""
    if weight == 0:
        return scores
    return (1 - weight) * scores + weight * span_scores  # (Q, N)
