"""The refiner as a generative model on video queries with time spans: three likelihood scores and guidance.

    python bench/generative_scores.py --data runs/synthcaps-video-s0 --encoders runs/recovery-s0/protocol/encoders \
        --work runs/segments-s0 [--cond-dropout 0.1] [--depth 50] [--levels 8] [--threads 1] [--name NAME]

`refiner train`'s fit on the adapt pairs with 4 spans a clip (the shipped recipe, with `--cond-dropout`
as the one change), then each test query's top `--depth` of the shipped ranking, and of the MLP mapper
given the same span machinery (segment_scores.py), rescored by the network as a generative model with
noise shared by every candidate (diffgap/diffusion/scoring.py), over `--levels` noise levels:

- "audio given the query": the error of denoising each candidate's audio given the query (what ships as the
  rerank), an estimate of -log p(audio | query) up to a constant;
- "the query given the audio": the error of denoising the query given each candidate, with BST's other direction:
  the diffusion classifier of Li et al. 2023 proper (the data fixed, the classes as conditions);
- "PMI" (with `--cond-dropout` > 0): "audio given the query" minus the unconditional error of the same audio,
  log p(audio | query) - log p(audio), which takes away how easy a clip is to denoise whatever the query.

Each alone (the top ordered by it), and fused with the dense score, (1 - w) z(score) + w z(-error),
with w picked by MRR@10 on the held-out tenth `refiner train` holds out, ranked among every clip. Each
also over the lower and the upper half of the levels. With `--cond-dropout` > 0, classifier-free
guidance at sampling too: the refined clip vectors alone and the shipped ranking against the guidance
scale g (the weights picked at g = 1). Writes WORK/generative_scores[-NAME].json, prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank_synthcaps import GUIDANCE, guided, r_at_1, start_run  # noqa: E402
from segment_scores import mapper_with_span_machinery, split_segments  # noqa: E402

from diffgap.diffusion.refiner import Refiner  # noqa: E402
from diffgap.diffusion.scoring import ScoreSpec, paired_errors, reranked_scores  # noqa: E402
from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.training.metrics import metrics, query_ranks  # noqa: E402
from diffgap.training.refiner import RefinerTrainConfig, fit_refiner  # noqa: E402

FUSE_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def likelihood_errors(
    refiner: Refiner, xq: np.ndarray, xa: np.ndarray, top: np.ndarray, levels: int, pmi: bool
) -> dict[str, np.ndarray]:
    """Each scorer's errors (Q, K, L) for the candidates `top` (Q, K) of queries xq among clips xa;
    `pmi` where the network was trained with condition dropout (else its unconditional branch is untrained)."""
    candidates = xa[top]  # (Q, K, d)
    queries = np.broadcast_to(xq[:, None], (*top.shape, xq.shape[1]))  # (Q, K, c)
    spec = ScoreSpec(depth=top.shape[1], levels=levels)
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(top), 50):  # 50 queries x K x L rows per network call
        part = slice(start, start + 50)
        scored = {"audio given the query": paired_errors(refiner, candidates[part], queries[part], spec)}
        scored["the query given the audio"] = paired_errors(refiner, queries[part], candidates[part], spec, 1)
        if pmi:
            unconditional = paired_errors(refiner, candidates[part], queries[part], spec, unconditional=True)
            scored["PMI"] = scored["audio given the query"] - unconditional
        for name, errors in scored.items():
            out.setdefault(name, []).append(errors)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a SynthCaps folder with videos")
    parser.add_argument("--encoders", required=True, help="compact encoders (the protocol's: pretrain only)")
    parser.add_argument("--work", default="runs/generative_scores")
    parser.add_argument("--cond-dropout", type=float, default=0.0, help="as refiner train --cond-dropout")
    parser.add_argument("--depth", type=int, default=50, help="candidates rescored per query")
    parser.add_argument("--levels", type=int, default=8, help="noise levels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="", help="suffix of the result file")
    args = parser.parse_args()
    args.modality = "video"
    work, train, test = start_run(args)
    data, cache = Path(args.data), work / "cache"
    seg = {split: split_segments(data, args.encoders, split, pairs, 4, cache)
           for split, pairs in (("adapt", train), ("test", test))}  # fmt: skip
    with_spans = dataclasses.replace(train, query_segments=seg["adapt"][0], audio_segments=seg["adapt"][1])
    cfg = RefinerTrainConfig(cond_dropout=args.cond_dropout)
    t = time.perf_counter()
    encoders = load_encoders(f"compact:{Path(args.encoders).resolve()}")
    out = work / f"generative-{args.name or args.cond_dropout}"
    refiner, _ = fit_refiner(with_spans, encoders, out, cfg=cfg, checkpoint_every=0)
    fit_s = time.perf_counter() - t
    fit, held = with_spans.split(0.1, seed=cfg.seed)  # what fit_refiner held out
    gallery = held.with_distractors(fit)  # ranked among every clip, as the span weights were picked
    fair = mapper_with_span_machinery(refiner, with_spans, "library", seed=cfg.seed)
    halves = {"all": slice(None), "lower half": slice(0, args.levels // 2), "upper half": slice(args.levels // 2, None)}
    result: dict = {"cond_dropout": args.cond_dropout, "depth": args.depth, "levels": args.levels,
                    "fit_s": round(fit_s), "first": {}}  # fmt: skip
    for first, model in (("refiner as shipped, with spans", refiner), ("MLP mapper with the span machinery", fair)):
        held_scores = model.scores(held.query, gallery.audio, segments=(held.query_segments, gallery.audio_segments))
        test_scores = model.scores(test.query, test.audio, segments=seg["test"])
        top_h = np.argsort(-held_scores, 1)[:, : args.depth]
        top_t = np.argsort(-test_scores, 1)[:, : args.depth]
        pmi = args.cond_dropout > 0
        err_h = likelihood_errors(refiner, held.query, gallery.audio, top_h, args.levels, pmi)
        err_t = likelihood_errors(refiner, test.query, test.audio, top_t, args.levels, pmi)
        rows = {"as ranked": r_at_1(test_scores, test.query_group)}
        for scorer in err_h:
            for half, levels in halves.items():
                eh, et = err_h[scorer][..., levels].mean(-1), err_t[scorer][..., levels].mean(-1)
                held_mrr = {
                    w: metrics(query_ranks(reranked_scores(held_scores, top_h, eh, w), held.query_group))["MRR@10"]
                    for w in FUSE_GRID
                }
                w = max(FUSE_GRID, key=lambda v: (held_mrr[v], -v))
                rows[f"{scorer}, {half}"] = {
                    "alone": r_at_1(reranked_scores(test_scores, top_t, et, 1.0), test.query_group),
                    "picked w": w,
                    "fused, w picked": r_at_1(reranked_scores(test_scores, top_t, et, w), test.query_group),
                    "fused by w (test)": {
                        v: r_at_1(reranked_scores(test_scores, top_t, et, v), test.query_group) for v in FUSE_GRID
                    },
                }
        result["first"][first] = rows
    if args.cond_dropout > 0:  # classifier-free guidance at sampling, the weights as picked at g = 1
        result["guidance"] = {}
        for g in GUIDANCE:
            view = guided(refiner, g)
            alone_h = view.refine(held.query, blend=0.0) @ gallery.audio.T  # (P, G')
            result["guidance"][g] = {
                "refined alone, held-out MRR@10": metrics(query_ranks(alone_h, held.query_group))["MRR@10"],
                "refined alone": r_at_1(view.refine(test.query, blend=0.0) @ test.audio.T, test.query_group),
                "as shipped, with spans": r_at_1(
                    view.scores(test.query, test.audio, segments=seg["test"]), test.query_group
                ),
            }
    (work / f"generative_scores{'-' + args.name if args.name else ''}.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"cond dropout {result['cond_dropout']}, top {result['depth']}, {result['levels']} levels", "",
             "| first ranking | scorer | levels | R@1 as ranked | error alone | w picked | fused, w picked |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for first, rows in result["first"].items():
        for name, row in rows.items():
            if name == "as ranked":
                continue
            scorer, half = name.split(", ")
            lines.append(f"| {first} | {scorer} | {half} | {rows['as ranked']:.3f} | {row['alone']:.3f} | "
                         f"{row['picked w']} | {row['fused, w picked']:.3f} |")  # fmt: skip
    for g, row in result.get("guidance", {}).items():
        lines.append(f"- guidance {g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
