"""The refiner as a scorer (issue 18): rerank the top-K of a search by conditional denoising error.

    python bench/rerank_synthcaps.py --data runs/synthcaps-data --encoders runs/prior/encoders-pretrain+adapt-none \
        --work runs/rerank [--modality text] [--iterations 6000] [--depth 50] [--levels 8] [--threads 2]

Pairs: SynthCaps `adapt` (training) and `test` (scored: each test query against all test clips).
One BST refiner and one MLP mapper are trained on the adapt embeddings with the project's defaults;
every row is scored on the same test embeddings, in one process. Reranking reorders each query's
top `depth` of the row's own ranking by the refiner's denoising error (diffgap/diffusion/scoring.py),
conditioned on the raw query; items below the top keep their rank. Also timed: one query's rerank
(median of 50 calls) at the chosen depth and levels. Writes WORK/rerank-MODALITY.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from diffgap.diffusion.refiner import Refiner  # noqa: E402
from diffgap.diffusion.scoring import RERANK, ScoreSpec, rerank, reranked_scores, top_errors  # noqa: E402
from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.resources import set_compute_threads  # noqa: E402
from diffgap.training.adapter import AdapterTrainConfig, wanted  # noqa: E402
from diffgap.training.embeddings import PairEmbeddings, embed_pairs  # noqa: E402
from diffgap.training.mapper import MapperConfig, train_mapper  # noqa: E402
from diffgap.training.metrics import (  # noqa: E402
    audio_ranks,
    metrics,
    query_ranks,
    ranks_after_rerank,
    ranks_query_to_audio,
)
from diffgap.training.pairs import read_pairs  # noqa: E402
from diffgap.training.refiner import RefinerTrainConfig, fit_refiner, train_refiner  # noqa: E402

log = logging.getLogger("rerank")

# Classifier-free guidance scales measured (`--cond-dropout`): 0 is the unconditional branch alone, 1 none.
GUIDANCE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)


def start_run(args: argparse.Namespace) -> tuple[Path, PairEmbeddings, PairEmbeddings]:
    """Logging, threads, the work folder and the (adapt, test) embeddings: what every SynthCaps
    refiner bench starts with (args: data, encoders, modality, work, threads)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    set_compute_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train, test = split_embeddings(Path(args.data), args.encoders, args.modality, work / "cache")
    return work, train, test


def r_at_1(scores: np.ndarray, groups: np.ndarray, direction: int = 0) -> float:
    """R@1 of a score matrix: (Q, G) queries against clips, or (direction 1) (G, Q) clips against queries."""
    ranks = query_ranks(scores, groups) if direction == 0 else audio_ranks(scores, groups)
    return float(metrics(ranks)["R@1"])


def guided(refiner: Refiner, guidance: float) -> Refiner:
    """A view of `refiner` whose every refinement (and so `scores`) uses classifier-free guidance at
    `guidance`, the weights as picked; the refiner itself is left as it is."""
    view = copy.copy(refiner)
    view.refine = functools.partial(Refiner.refine, view, guidance=guidance)
    return view


def shipped_rerank_rows(
    refiner: Refiner, xq: np.ndarray, xb: np.ndarray, scores: np.ndarray, groups: np.ndarray, label: str
) -> dict[str, float]:
    """R@1 of a ranking as `refiner train` ships it (`scores` (Q, G) of queries xq against xb), then
    with a requested rerank: at the weight train-refiner picked on its held-out pairs, and at the fixed
    0.5 every rerank used before (BENCHMARKS.md run 20)."""
    top, errors = top_errors(refiner, xq, xb, scores, RERANK)  # (Q, K), (Q, K)
    picked = refiner.config.rerank_weight
    return {
        label: r_at_1(scores, groups),
        f"{label}, top {RERANK.depth} reranked at the weight picked on held-out pairs ({picked})": r_at_1(
            reranked_scores(scores, top, errors, picked), groups
        ),
        f"{label}, top {RERANK.depth} reranked at the fixed weight 0.5 (before run 20)": r_at_1(
            reranked_scores(scores, top, errors, 0.5), groups
        ),
    }


def split_embeddings(
    data: Path, encoders_dir: str, modality: str, cache: Path
) -> tuple[PairEmbeddings, PairEmbeddings]:
    """(adapt, test) pair embeddings of a SynthCaps folder under compact encoders, cached."""
    spec = f"compact:{Path(encoders_dir).resolve()}"
    encoders = load_encoders(spec, spec if modality == "video" else None)
    csv = data / "captions.csv"
    train = embed_pairs(read_pairs(csv, split="adapt"), encoders, modality, cache_dir=cache)
    test = embed_pairs(read_pairs(csv, split="test"), encoders, modality, cache_dir=cache)
    log.info("%d training pairs, %d test queries over %d clips", len(train.query), len(test.query), len(test.audio))
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/synthcaps-data")
    parser.add_argument("--encoders", required=True, help="compact encoder folder")
    parser.add_argument("--work", default="runs/rerank")
    parser.add_argument("--modality", default="text", choices=["text", "video"])
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="only the refiner as `refiner train` ships it (the mix, the library side, a text adapter where the "
        "tower reads a sentence model), unreranked and reranked at the picked and at the old fixed weight",
    )
    parser.add_argument(
        "--cond-dropout",
        type=float,
        default=0.0,
        help="with --shipped: as refiner train --cond-dropout; > 0 adds rows for classifier-free guidance scales",
    )
    args = parser.parse_args()
    work, train, test = start_run(args)
    if args.shipped:
        shipped(args, work, train, test)
        return

    t = time.perf_counter()
    refiner, _ = train_refiner(train, cfg=RefinerTrainConfig(iterations=args.iterations))
    log.info("refiner trained in %.0f s", time.perf_counter() - t)
    mapper = train_mapper(train, 0, MapperConfig(ranking_weight=0.0))  # the plain regression baseline
    spec = ScoreSpec(depth=args.depth, levels=args.levels)

    def reorder_with(weight: float):  # noqa: ANN202
        fused = ScoreSpec(depth=args.depth, levels=args.levels, weight=weight)

        def reorder(rows: np.ndarray, top: np.ndarray, scores: np.ndarray) -> np.ndarray:
            out = np.empty_like(top)
            for start in range(0, len(rows), 64):  # 64 queries x depth x levels rows per network call
                sl = slice(start, start + 64)
                out[sl] = rerank(refiner, test.query[rows[sl]], top[sl], test.audio[top[sl]], fused, scores[sl])
            return out

        return reorder

    same_space = test.query.shape[1] == test.audio.shape[1]
    maps = {"mapper (MLP)": mapper.map}
    if same_space:
        maps = {"direct": lambda x: x, **maps}
    for steps in (1, 5):
        maps[f"refiner, {steps} step{'s' if steps > 1 else ''}"] = lambda x, s=steps: refiner.refine(
            x, steps=s, blend=0.0
        )
    rows = {}
    for name, fn in maps.items():
        mapped = fn(test.query)
        rows[name] = metrics(ranks_query_to_audio(mapped, test.audio, test.query_group))
        for weight in (1.0, 0.5):
            how = "by denoising error" if weight == 1 else f"fused with the dense score, weight {weight}"
            label = f"{name}, top {spec.depth} reranked {how}"
            ranks = ranks_after_rerank(mapped, test.audio, test.query_group, reorder_with(weight), spec.depth)
            rows[label] = metrics(ranks)
            log.info("%s: R@1 %.3f", label, rows[label]["R@1"])

    one = test.query[:1]
    cand = np.arange(spec.depth)[None]
    timings = {}
    for depth, levels in ((spec.depth, spec.levels), (20, 4)):
        s = ScoreSpec(depth=depth, levels=levels)
        ids, vecs = cand[:, :depth], test.audio[None, :depth]
        rerank(refiner, one, ids, vecs, s)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            rerank(refiner, one, ids, vecs, s)
            times.append(time.perf_counter() - t)
        timings[f"depth {depth}, {levels} levels"] = round(float(np.median(times)) * 1e3, 3)
    result = {"modality": args.modality, "encoders": str(args.encoders), "iterations": args.iterations,
              "depth": spec.depth, "levels": spec.levels, "threads": args.threads, "rows": rows,
              "rerank_ms_one_query": timings}  # fmt: skip
    (work / f"rerank-{args.modality}.json").write_text(json.dumps(result, indent=2))
    print(f"| {args.modality} -> audio | R@1 | R@5 | R@10 | MRR@10 |")
    print("|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['MRR@10']:.3f} |")
    print(f"rerank cost, one query, ms: {timings}")


def shipped(args: argparse.Namespace, work: Path, train: PairEmbeddings, test: PairEmbeddings) -> None:
    """`--shipped`: fit as `refiner train` does (held-out tenth, every weight picked there) and score
    its ranking of the test queries with and without a requested rerank (and, with `--cond-dropout`, at each
    guidance scale); WORK/rerank-shipped-MODALITY-dD.json."""
    spec = f"compact:{Path(args.encoders).resolve()}"
    encoders = load_encoders(spec, spec if args.modality == "video" else None)
    adapter = AdapterTrainConfig() if args.modality == "text" and wanted(encoders, AdapterTrainConfig()) else None
    t = time.perf_counter()
    cfg = RefinerTrainConfig(iterations=args.iterations, cond_dropout=args.cond_dropout)
    out = work / f"shipped-{args.modality}-d{args.cond_dropout}"
    refiner, report = fit_refiner(train, encoders, out, cfg=cfg, adapter=adapter, checkpoint_every=0)
    log.info("fitted as refiner train ships it in %.0f s", time.perf_counter() - t)
    adapted = refiner.adapt(test.texts) if refiner.reads_text and test.texts is not None else None
    scores = refiner.scores(test.query, test.audio, adapted=adapted)  # (Q, G)
    rows = {}
    if test.query.shape[1] == test.audio.shape[1]:
        rows[f"direct ({args.modality} -> audio)"] = r_at_1(test.query @ test.audio.T, test.query_group)
    rows.update(shipped_rerank_rows(refiner, test.query, test.audio, scores, test.query_group, "as shipped"))
    if args.cond_dropout > 0:  # classifier-free guidance at sampling, every weight as picked at g = 1
        for g in GUIDANCE:
            view = guided(refiner, g)
            alone = view.refine(test.query, blend=0.0) @ test.audio.T  # (Q, G)
            rows[f"refined alone, guidance {g}"] = r_at_1(alone, test.query_group)
            rows[f"as shipped, guidance {g}"] = r_at_1(view.scores(test.query, test.audio, adapted), test.query_group)
    picks = {k: report.get(k) for k in ("mix", "library_weight", "rerank_weight", "val_MRR@10_by_rerank_weight")}
    result = {"modality": args.modality, "encoders": str(args.encoders), "cond_dropout": args.cond_dropout,
              "rows": rows, "picks": picks}  # fmt: skip
    (work / f"rerank-shipped-{args.modality}-d{args.cond_dropout}.json").write_text(json.dumps(result, indent=2))
    print(f"| {args.modality} -> audio | R@1 |")
    print("|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} |")
    print(f"picks: {picks}")


if __name__ == "__main__":
    main()
