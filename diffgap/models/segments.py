"""Time segments of a tower's per-step sequence: the temporal scales of GMS-CAVP (seeds/003).

The compact audio and video towers train with an alignment loss on these segments (each audio
segment must pick its own video segment, `diffgap/training/encoders.py`), so a segment vector holds
*when* something sounds or shows, which the clip vector (the mean over all steps) averages away.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Spans per window an index keeps by default. The towers train on 2 and 4 (`EncoderTrainConfig.
# segment_scales`), yet finer spans tell near-duplicates apart better still: on SynthCaps video -> audio
# (4 s clips) what `refiner train` ships gets 0.817 / 0.796 R@1 with 4, 0.853 / 0.843 with 8 and 0.871 /
# 0.873 with 16 (seeds 0 / 1, BENCHMARKS.md run 21). 16 costs a video query +2.0-2.1 ms in process at 100k
# windows, past the 2 ms a query's refinement may add, and 8 KB a window on disk and in memory; 8 costs
# +1.3 ms and 4 KB. `build --segments 16` is there for a library that can pay.
SEGMENTS = 8


def segment_pool(seq: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """(B, T, d) masked sequence -> (B, segments, d) unit vectors, each the mean of its time span.

    Spans split each sequence's own valid length, so the audio and the video of one clip, whose towers
    step at different rates, put the same second in the same span. A sequence with fewer valid steps
    than spans leaves some spans with no step of their own; each of those takes the step its middle
    falls in, so no span is empty and every span still stands for its own stretch of time."""
    b, t, d = seq.shape
    lengths = mask.sum(1).clamp(min=1).float()  # (B,) valid steps; the mask is a prefix
    steps = torch.arange(t, dtype=torch.float32)  # (T,)
    bins = (steps[None] / lengths[:, None] * segments).long().clamp(max=segments - 1)  # (B, T)
    onehot = F.one_hot(bins, segments).float() * mask[..., None]  # (B, T, S)
    middles = ((torch.arange(segments) + 0.5)[None] * lengths[:, None] / segments).floor().long()  # (B, S)
    empty = onehot.sum(1) == 0  # (B, S): spans shorter than one step
    onehot = onehot + F.one_hot(middles, t).float().transpose(1, 2) * empty[:, None, :]  # (B, T, S)
    pooled = torch.einsum("bts,btd->bsd", onehot, seq) / onehot.sum(1)[..., None]  # (B, S, d)
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
