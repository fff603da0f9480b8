"""How far can the parts of the shipped video ranking go? Weights chosen on the test queries themselves.

    python bench/part_oracle.py --data runs/synthcaps-video-s0 --encoders runs/recovery-s0/protocol/encoders \
        --work runs/segments-s0 [--refiner runs/segments-s0/refiner] [--steps 8] [--threads 1]

A refiner fit by `refiner train` on video pairs with spans (segment_scores.py saves one in
WORK/refiner) ranks by a weighted sum of eight parts: the network's refined query, the mapped query
and the query as encoded against the clips; the query against the clips mapped back (the library
side); and the same four at span level (the spans refined by the network, mapped by the span mapper,
as encoded, and against the spans mapped back). Each part is standardised per query; every weighting
on the simplex in `--steps` steps is then scored on the 1,000 test queries, and the best is kept: an
oracle no user has (weights picked on the very queries they are scored on), so a ceiling on any
weighting of these parts, not a method. The same with the two network parts left out says the most
the network can add to the regressions beside it (fairly only where `refiner train` kept the span
mapper, i.e. picked the mapped spans). Also: the share of queries that at least one part ranks right
(a ceiling on fusions that choose a part per query). Writes WORK/part_oracle.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank_synthcaps import r_at_1, start_run  # noqa: E402
from segment_scores import split_segments  # noqa: E402

from diffgap.diffusion.refiner import Refiner  # noqa: E402
from diffgap.encoders.base import l2_normalize  # noqa: E402
from diffgap.models.segments import segment_scores  # noqa: E402
from diffgap.training.metrics import query_ranks  # noqa: E402

NETWORK_PARTS = ("refined", "spans refined")


def parts_of(refiner: Refiner, xq: np.ndarray, xb: np.ndarray, qs: np.ndarray, bs: np.ndarray) -> dict[str, np.ndarray]:
    """The score matrices (Q, G) a refiner with spans mixes (eight; seven where it kept no span
    mapper): queries xq (Q, c) with spans qs (Q, S, c) against clips xb (G, d) with spans bs (G, S, d)."""
    b, s, c = qs.shape
    # a named blend of 0: the network's own output, none of the mix
    refined = l2_normalize(refiner.refine(np.concatenate([xq, qs.reshape(b * s, c)]), blend=0.0))  # (Q + Q*S, d)
    parts = {
        "refined": refined[:b] @ xb.T,
        "mapped": l2_normalize(refiner.mapper.map(xq)) @ xb.T,
        "direct": xq @ xb.T,
        "library side": xq @ l2_normalize(refiner.map_library(xb)).T,
        "spans refined": segment_scores(refined[b:].reshape(b, s, -1), bs),
        "spans direct": segment_scores(qs, bs),
        "spans library side": segment_scores(qs, l2_normalize(refiner.map_library_spans(bs))),
    }
    if refiner.mapper_spans is not None:  # kept where `refiner train` picked it over the refined spans
        mapped_spans = l2_normalize(refiner.mapper_spans.map(qs.reshape(b * s, c))).reshape(b, s, -1)  # (Q, S, d)
        parts["spans mapped"] = segment_scores(mapped_spans, bs)
    return parts


def simplex(n: int, steps: int):
    """Every weight vector of n non-negative multiples of 1/steps that sum to 1 (stars and bars)."""
    for bars in itertools.combinations(range(steps + n - 1), n - 1):
        yield (np.diff((-1, *bars, steps + n - 1)) - 1) / steps


def oracle(z: dict[str, np.ndarray], names: list[str], groups: np.ndarray, steps: int) -> tuple[float, dict]:
    """The best test R@1 of any weighting of the standardised parts `names`, and its weights."""
    best, weights = -1.0, {}
    for w in simplex(len(names), steps):
        value = r_at_1(sum(wi * z[k] for wi, k in zip(w, names, strict=True) if wi), groups)
        if value > best:
            best, weights = value, dict(zip(names, w.tolist(), strict=True))
    return best, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a SynthCaps folder with videos")
    parser.add_argument("--encoders", required=True, help="the compact encoders the refiner was fit on")
    parser.add_argument("--work", required=True, help="segment_scores.py's work folder (its caches)")
    parser.add_argument("--refiner", help="a refiner fit with spans (default WORK/refiner)")
    parser.add_argument("--steps", type=int, default=8, help="weights in multiples of 1/steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.modality = "video"
    work, _, test = start_run(args)
    refiner = Refiner.load(args.refiner or work / "refiner")
    qs, bs = split_segments(Path(args.data), args.encoders, "test", test, refiner.config.segments, work / "cache")
    groups = test.query_group
    parts = parts_of(refiner, test.query, test.audio, qs, bs)
    z = {k: (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True) for k, v in parts.items()}  # per query
    firsts = np.stack([query_ranks(v, groups) <= 1 for v in parts.values()])  # (parts, Q)
    names = list(parts)
    result = {
        "refiner": str(args.refiner or work / "refiner"),
        "segments": refiner.config.segments,
        "shipped": r_at_1(refiner.scores(test.query, test.audio, segments=(qs, bs)), groups),
        "alone": {k: r_at_1(v, groups) for k, v in parts.items()},
        "oracle, every part": oracle(z, names, groups, args.steps),
        "oracle, without the network": oracle(z, [k for k in names if k not in NETWORK_PARTS], groups, args.steps),
        "some part ranks it first": float(firsts.any(0).mean()),
        "some part but the network's ranks it first": float(
            firsts[[k not in NETWORK_PARTS for k in names]].any(0).mean()
        ),
    }
    (work / "part_oracle.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
