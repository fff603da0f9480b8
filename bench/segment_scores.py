"""Does comparing time segments find the clip a video shows? Video <-> audio R@1 with segment scores.

    python bench/segment_scores.py --data runs/synthcaps-video-s0 --encoders runs/recovery-s0/protocol/encoders \
        [--upper-encoders runs/recovery-s0/in-domain/encoders] [--segments 4] [--work runs/segments-s0] \
        [--threads 1] [--no-refiner]

The compact towers train with GMS-CAVP's temporal alignment (2 and 4 segments per clip) but the index
keeps only the clip vector, the mean over all steps, which averages away *when* each sound happens;
SynthCaps' near-duplicate families (order swapped, one event moved) differ exactly there. Here a
clip's segment score against a query is the mean, over its `--segments` equal spans, of the cosine
of the video's span vector with the audio's same span (`encode_with_segments`). Rows, on the 1,000
test videos against the 1,000 test clips: direct search; the segment score alone; the two mixed,
(1 - a) x clip score + a x segment score, with a picked on the 10% of adapt clips that `refiner
train` holds out (MRR@10, `choose_score_weight`); the refiner as `refiner train` ships it on an
index that keeps spans (fit here on the adapt pairs with their spans: two-sided, and the segment
weight picked on the held-out pairs), scored with clip vectors only and with the spans (each query
span refined as the query is, `Refiner.scores`). With `--upper-encoders` (encoders trained on the
target domain too) the search rows for them give the upper bounds, and every row two recoveries:
the issue's, (R@1 - direct) / (in-domain direct - direct), and one with spans on both sides,
(R@1 - direct + segments) / (in-domain direct + segments - direct + segments). The reverse direction
(audio -> video) gets the search rows.
The plain MLP mapper (the baseline) gets the same two rows as the refiner, its spans mapped as its
queries are, and a third with the refiner's whole span machinery (`mapper_with_span_machinery`): the
row that says what the diffusion network adds, with the gap to the shipped refiner and its paired
bootstrap interval. The shipped refiner's row again with a requested rerank (its top 50 reordered by
the network's denoising error, at the weight its held-out pairs picked and at the old fixed 0.5).
Writes WORK/segment_scores[-NAME].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_efficiency import recovery  # noqa: E402
from rerank_synthcaps import r_at_1, shipped_rerank_rows, split_embeddings, start_run  # noqa: E402

from diffgap.diffusion.refiner import Refiner  # noqa: E402
from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.media.audio import decode_audio  # noqa: E402
from diffgap.media.video import decode_video  # noqa: E402
from diffgap.models.segments import segment_scores  # noqa: E402
from diffgap.training.embeddings import PairEmbeddings  # noqa: E402
from diffgap.training.mapper import MapperConfig, train_mapper  # noqa: E402
from diffgap.training.metrics import choose_score_weight, query_ranks  # noqa: E402
from diffgap.training.refiner import SPAN_GALLERIES, RefinerTrainConfig, fit_refiner, fit_segment_weight  # noqa: E402

log = logging.getLogger("segment_scores")


def split_segments(
    data: Path, encoders_dir: str, split: str, pairs: PairEmbeddings, segments: int, cache: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Segment vectors of a split's query videos (P, S, d) and clips (G, S, d), in the rows of `pairs`
    (matched by their clip vectors, which the same pass computes), cached."""
    where = hashlib.sha256(str(Path(encoders_dir).resolve()).encode()).hexdigest()[:12]
    out = cache / f"segments-{where}-{split}-{segments}.npz"
    if out.exists():
        z = np.load(out)
        return z["query"], z["audio"]
    spec = f"compact:{Path(encoders_dir).resolve()}"
    encoders = load_encoders(spec, spec)
    rows = [r for r in csv.DictReader((data / "captions.csv").open()) if r["split"] == split]

    def encode(files: list[str], read, encoder) -> tuple[np.ndarray, np.ndarray]:
        clips, segs = [], []
        for start in range(0, len(files), 32):
            c, s = encoder.encode_with_segments([read(data / f) for f in files[start : start + 32]], segments)
            clips.append(c)
            segs.append(s)
        return np.concatenate(clips), np.concatenate(segs)

    t = time.perf_counter()
    audio = encode(sorted({r["audio"] for r in rows}), lambda p: decode_audio(p, encoders.audio.sample_rate).wave,
                   encoders.audio)  # fmt: skip
    video = encode(sorted({r["video"] for r in rows}),
                   lambda p: decode_video(p, encoders.video.fps, size=encoders.video.size), encoders.video)  # fmt: skip
    log.info("%s segments of %s in %.0f s", split, encoders_dir, time.perf_counter() - t)

    def rows_of(xb: np.ndarray, clips: np.ndarray) -> np.ndarray:
        sim = xb @ clips.T  # each pair row's clip vector against the ones computed here
        assert (sim.max(1) > 0.999).all(), f"a pair row matches no clip here (best {sim.max(1).min():.4f})"
        return sim.argmax(1)

    query, clips = video[1][rows_of(pairs.query, video[0])], audio[1][rows_of(pairs.audio, audio[0])]
    np.savez(out, query=query, audio=clips)
    return query, clips


def paired_gap(a: np.ndarray, b: np.ndarray, groups: np.ndarray, draws: int = 2000) -> dict[str, float]:
    """R@1 of score matrix `a` minus `b` (Q, G) on the same queries, with a 95% interval from a paired
    bootstrap over the queries: how far apart two rows of one table really are."""
    hits = (query_ranks(a, groups) <= 1).astype(float) - (query_ranks(b, groups) <= 1)  # (Q,) in {-1, 0, 1}
    rng = np.random.default_rng(0)
    means = hits[rng.integers(0, len(hits), size=(draws, len(hits)))].mean(1)  # (draws,)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"gap": float(hits.mean()), "low": float(low), "high": float(high)}


def held_out(train: PairEmbeddings, seg_train: tuple, span_gallery: str) -> tuple[PairEmbeddings, PairEmbeddings]:
    """The 10% of clips `refiner train` holds out with their queries and spans, and the gallery it ranks
    them among while it picks the span weight (`--span-gallery`: those clips, or every clip)."""
    fit, held = dataclasses.replace(train, query_segments=seg_train[0], audio_segments=seg_train[1]).split(0.1, seed=0)
    return held, held.with_distractors(fit) if span_gallery == "library" else held


def mapper_rows(
    train: PairEmbeddings, test: PairEmbeddings, seg_train: tuple, seg_test: tuple, span_gallery: str
) -> tuple[dict, float]:
    """The plain MLP mapper (the baseline), alone and with each query span mapped as the query is,
    mixed by a weight picked on the held-out queries with a mapper that did not train on them."""
    gallery = held_out(train, seg_train, span_gallery)[1]
    fit = train.split(0.1, seed=0)[0]

    def spans_of(mapper, spans: np.ndarray) -> np.ndarray:
        return mapper.map(spans.reshape(-1, spans.shape[-1])).reshape(spans.shape)  # (B, S, d)

    part = train_mapper(fit, 0, MapperConfig())
    spans_g = segment_scores(spans_of(part, gallery.query_segments), gallery.audio_segments)
    w, _ = choose_score_weight(part.map(gallery.query) @ gallery.audio.T, spans_g, gallery.query_group)
    mapper = train_mapper(train, 0, MapperConfig())
    clip = mapper.map(test.query) @ test.audio.T  # (Q, G)
    spans = segment_scores(spans_of(mapper, seg_test[0]), seg_test[1])
    return {
        ("video -> audio", "MLP mapper, clip vectors only"): r_at_1(clip, test.query_group),
        ("video -> audio", "MLP mapper, with its spans mapped too"): r_at_1(
            (1 - w) * clip + w * spans, test.query_group
        ),
    }, w


def mapper_with_span_machinery(
    refiner: Refiner, with_spans: PairEmbeddings, span_gallery: str, seed: int = 0
) -> Refiner:
    """The plain MLP mapper given everything `refiner train` ships for spans: both span mappers with
    their ranking term, the query's spans mapped, the spans' library weight and the segment weight
    picked on the same held-out queries among the same gallery. Its clip score is the mapper's alone
    (the mix's whole weight), so the diffusion network takes no part: the baseline that says what the
    network adds once the spans are in (BENCHMARKS.md run 16's "fairer mapper"). `seed`: the refiner's
    training seed, which draws its held-out share."""
    fair = Refiner(copy.deepcopy(refiner.config), refiner.net)  # the network is shared, never trained here
    fit, held = with_spans.split(0.1, seed=seed)  # what fit_refiner holds out
    cfg = dataclasses.replace(MapperConfig(), iterations=RefinerTrainConfig().iterations // 2, seed=seed)
    fair.mapper, fair.mapper_back = train_mapper(fit, 0, cfg), None
    fair.config.mix, fair.config.library_weight = {"refined": 0.0, "mapped": 1.0, "direct": 0.0}, 0.0
    gallery = held.with_distractors(fit) if span_gallery == "library" else held
    fit_segment_weight(fair, fit, gallery, cfg, {}, span_maps=("mapped",))
    return fair


def search_rows(
    train: PairEmbeddings, test: PairEmbeddings, seg_train: tuple, seg_test: tuple, prefix: str, span_gallery: str
) -> tuple[dict, dict]:
    """Direct, segments alone and the two mixed (weight on the held-out queries; video -> audio among
    the span gallery, audio -> video among the held-out videos), both directions."""
    base, seg = test.query @ test.audio.T, segment_scores(*seg_test)  # (Q, G)
    rows, weights = {}, {}
    for direction, name, held in zip(
        (0, 1), ("video -> audio", "audio -> video"), held_out(train, seg_train, span_gallery)[::-1], strict=True
    ):
        flip = (lambda m: m) if direction == 0 else (lambda m: m.T)
        base_h, seg_h = held.query @ held.audio.T, segment_scores(held.query_segments, held.audio_segments)
        w, _ = choose_score_weight(flip(base_h), flip(seg_h), held.query_group, direction)
        weights[f"{prefix}{name}"] = w
        rows[(name, f"{prefix}direct")] = r_at_1(flip(base), test.query_group, direction)
        rows[(name, f"{prefix}segments alone")] = r_at_1(flip(seg), test.query_group, direction)
        rows[(name, f"{prefix}direct + segments")] = r_at_1(flip((1 - w) * base + w * seg), test.query_group, direction)
    return rows, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a SynthCaps folder with videos")
    parser.add_argument("--encoders", required=True, help="compact encoders (the protocol's: pretrain only)")
    parser.add_argument("--upper-encoders", help="compact encoders trained on the target domain too")
    parser.add_argument("--segments", type=int, default=4, help="equal time spans per clip")
    parser.add_argument("--work", default="runs/segment_scores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-refiner", action="store_true", help="skip fitting the refiner (search and mapper rows)")
    parser.add_argument("--name", default="", help="suffix of the result file (segment_scores-NAME.json)")
    parser.add_argument("--span-gallery", default="library", choices=SPAN_GALLERIES, help="as refiner train")
    args = parser.parse_args()
    args.modality = "video"
    work, train, test = start_run(args)
    data, cache = Path(args.data), work / "cache"
    seg = {split: split_segments(data, args.encoders, split, pairs, args.segments, cache)
           for split, pairs in (("adapt", train), ("test", test))}  # fmt: skip
    rows, weights = search_rows(train, test, seg["adapt"], seg["test"], "", args.span_gallery)
    mapped, weights["mapper"] = mapper_rows(train, test, seg["adapt"], seg["test"], args.span_gallery)
    rows.update(mapped)
    gaps = {}
    if not args.no_refiner:  # what `refiner train` does on an index that keeps 4 spans a window
        with_spans = dataclasses.replace(train, query_segments=seg["adapt"][0], audio_segments=seg["adapt"][1])
        refiner, _ = fit_refiner(with_spans, load_encoders(f"compact:{Path(args.encoders).resolve()}"),
                                 work / "refiner", checkpoint_every=0, span_gallery=args.span_gallery)  # fmt: skip
        weights["shipped"] = refiner.config.segment_weight
        weights["shipped span map"] = refiner.config.span_map
        weights["shipped span library"] = refiner.config.span_library_weight
        rows[("video -> audio", "refiner as shipped, clip vectors only")] = r_at_1(
            refiner.scores(test.query, test.audio), test.query_group
        )
        shipped = refiner.scores(test.query, test.audio, segments=seg["test"])
        label = "refiner as shipped, with spans"
        for method, value in shipped_rerank_rows(
            refiner, test.query, test.audio, shipped, test.query_group, label
        ).items():  # that row, and with a requested rerank
            rows[("video -> audio", method)] = value
        weights["shipped rerank"] = refiner.config.rerank_weight
        fair = mapper_with_span_machinery(refiner, with_spans, args.span_gallery)
        weights["mapper with the span machinery"] = fair.config.segment_weight
        weights["mapper with the span machinery, span library"] = fair.config.span_library_weight
        baseline = fair.scores(test.query, test.audio, segments=seg["test"])
        rows[("video -> audio", "MLP mapper with the refiner's span machinery")] = r_at_1(baseline, test.query_group)
        gaps["refiner as shipped, with spans - MLP mapper with the refiner's span machinery"] = paired_gap(
            shipped, baseline, test.query_group
        )
    if args.upper_encoders:
        up_train, up_test = split_embeddings(data, args.upper_encoders, "video", cache)
        up_seg = {split: split_segments(data, args.upper_encoders, split, pairs, args.segments, cache)
                  for split, pairs in (("adapt", up_train), ("test", up_test))}  # fmt: skip
        up_rows, up_weights = search_rows(
            up_train, up_test, up_seg["adapt"], up_seg["test"], "in-domain ", args.span_gallery
        )
        rows.update(up_rows)
        weights.update(up_weights)
    result = {"data": args.data, "encoders": args.encoders, "upper_encoders": args.upper_encoders,
              "segments": args.segments, "test_queries": len(test.query), "weights": weights,
              "span_gallery": args.span_gallery, "gaps": gaps,
              "rows": [{"direction": d, "method": m, "R@1": v} for (d, m), v in rows.items()]}  # fmt: skip
    (work / f"segment_scores{'-' + args.name if args.name else ''}.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    """Markdown: R@1 per row, with recovery against the in-domain direct search and against the
    in-domain direct search with segment scores, where the in-domain rows exist."""
    lines = []
    for direction in ("video -> audio", "audio -> video"):
        r = {row["method"]: row["R@1"] for row in result["rows"] if row["direction"] == direction}
        bases = ((r["direct"], r.get("in-domain direct")),
                 (r["direct + segments"], r.get("in-domain direct + segments")))  # fmt: skip
        lines += ["", f"**{direction}**", "", "| method | R@1 | recovery (issue's: of in-domain direct) | "
                  "recovery with spans on both sides |", "|---|---|---|---|"]  # fmt: skip
        for method, value in r.items():
            cells = [f"{value:.3f}"]
            for low, top in bases:
                rec = None if method.startswith("in-domain") else recovery(value, low, top)
                cells.append("" if rec is None else f"{rec:.0%}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    among = "every clip" if result.get("span_gallery", "held-out") == "library" else "the held-out clips"
    lines += ["", f"Weights of the segment score, picked on held-out queries ranked among {among} "
              "(audio -> video: the held-out clips ranking their videos): "
              + ", ".join(f"{k} {v}" for k, v in result["weights"].items())]  # fmt: skip
    for name, gap in result.get("gaps", {}).items():
        lines.append(f"- {name}: {gap['gap']:+.3f} R@1 (95% paired bootstrap {gap['low']:+.3f} to {gap['high']:+.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
