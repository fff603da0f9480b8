"""Is training a refiner worth it with few captions? R@1 against the number of training pairs.

    python bench/data_efficiency.py --data runs/synthcaps-data --encoders runs/prior/encoders-pretrain+adapt-none \
        --work runs/data_efficiency [--sizes 100,300,1000,0] [--modality text] [--threads 2] \
        [--upper-encoders DIR] [--name NAME] [--segments 4]

For each size (0: all pairs) a random subset of SynthCaps `adapt` pairs (seed 0) trains an MLP mapper
(the plain regression baseline, on all of the subset) and a refiner exactly as `refiner train` ships
it (`fit_refiner`: BST refiner on 90%, blend and the refined/mapped/direct score weights picked on the
10% of the clips held out; the same iterations at every size). Each is scored on the `test` queries
against the test clips, beside direct search: the refiner unblended, with its picked blend, and as
shipped (the ensemble). With `--upper-encoders` (compact encoders trained on the target domain too,
the in-domain run of `bench/synthcaps.sh`), their direct search is drawn as the upper bound and every
row gets a recovery: (R@1 - direct R@1) / (upper R@1 - direct R@1), as in `refiner eval --upper-index`.
Writes WORK/data_efficiency-NAME.json and docs/data-efficiency-NAME.png (NAME: the modality unless
given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank_synthcaps import split_embeddings, start_run  # noqa: E402

from diffgap.diffusion.refiner import DEFAULT_STEPS, Refiner  # noqa: E402
from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.models.segments import segment_scores  # noqa: E402
from diffgap.training.adapter import AdapterTrainConfig, fit_adapter, sentence_model_for  # noqa: E402
from diffgap.training.embeddings import PairEmbeddings  # noqa: E402
from diffgap.training.mapper import MapperConfig, train_mapper  # noqa: E402
from diffgap.training.metrics import metrics, query_ranks, ranks_query_to_audio  # noqa: E402
from diffgap.training.refiner import SPAN_GALLERIES, fit_refiner  # noqa: E402

log = logging.getLogger("data_efficiency")

SERIES = (  # key, legend label, matplotlib style
    ("direct", "direct search", "k--"),
    ("mapper", "MLP mapper", "s-"),
    ("refiner", f"refiner alone, unblended ({DEFAULT_STEPS} step)", "o:"),
    ("shipped", "refiner as `refiner train` ships it (weights picked on held-out pairs)", "o-"),
    ("adapter", "text adapter alone (--adapter)", "^:"),
    ("adapter_fixed", "text adapter alone, all its steps (no held-out stopping)", "v:"),
)


def first_pairs(data: PairEmbeddings, n: int, seed: int = 0) -> PairEmbeddings:
    """n pairs drawn at random (all when n is 0 or too large); unused audio rows are harmless."""
    if not n or n >= len(data.query):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data.query), n, replace=False))
    return dataclasses.replace(
        data,
        query=data.query[idx],
        query_group=data.query_group[idx],
        texts=None if data.texts is None else [data.texts[i] for i in idx],
        query_segments=None if data.query_segments is None else data.query_segments[idx],
    )


def r_at_1(xq: np.ndarray, test: PairEmbeddings) -> float:
    """Query -> audio R@1 of (already mapped) test queries against the test clips."""
    return float(metrics(ranks_query_to_audio(xq, test.audio, test.query_group))["R@1"])


def r_at_1_scores(scores: np.ndarray, test: PairEmbeddings) -> float:
    """Query -> audio R@1 of a score matrix (Q, G) of the test queries against the test clips."""
    return float(metrics(query_ranks(scores, test.query_group))["R@1"])


def shipped_r_at_1(refiner: Refiner, test: PairEmbeddings, adapted: np.ndarray | None) -> float:
    """Query -> audio R@1 of the refiner as a search that names no blend ranks (two-sided where it is,
    with time spans where the test queries have them)."""
    spans = None if test.query_segments is None else (test.query_segments, test.audio_segments)
    return r_at_1_scores(refiner.scores(test.query, test.audio, adapted, spans), test)


def recovery(value: float, direct: float | None, upper: float | None) -> float | None:
    """Share of the gap between direct search and the in-domain upper bound that `value` closes."""
    if direct is None or upper is None or upper <= direct:
        return None
    return (value - direct) / (upper - direct)


def draw(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9.6, 3.8), dpi=120)  # room for the legend beside the axes
    if result.get("upper") is not None:
        ax.axhline(result["upper"], color="tab:purple", ls="-.", label="upper bound: encoders trained in-domain")
    if result.get("upper_segments_alone") is not None:
        ax.axhline(result["upper_segments_alone"], color="tab:purple", ls=":",
                   label="encoders trained in-domain, time spans alone")  # fmt: skip
    if result.get("segments_alone") is not None:
        ax.axhline(result["segments_alone"], color="tab:gray", ls=":", label="time spans alone (no pairs)")
    for key, label, style in SERIES:
        points = [(r["pairs"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training pairs (SynthCaps adapt, random subset)")
    ax.set_ylabel(f"{result['modality']} -> audio R@1 ({result['test_queries']} test queries)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it hides no line
    ax.set_title(f"Data efficiency, {result['modality']} queries, {result['encoders_label']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")  # the legend sits outside the axes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/synthcaps-data")
    parser.add_argument("--encoders", required=True)
    parser.add_argument("--encoders-label", default="in-domain compact encoders")
    parser.add_argument("--upper-encoders", help="encoders trained on the target domain: the upper bound")
    parser.add_argument("--work", default="runs/data_efficiency")
    parser.add_argument("--name", help="suffix of the result files (default: the modality)")
    parser.add_argument("--modality", default="text", choices=["text", "video"])
    parser.add_argument("--sizes", default="100,300,1000,0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--segments", type=int, default=0, help="video: time spans per clip, as a compact index keeps")
    parser.add_argument("--span-gallery", default="library", choices=SPAN_GALLERIES, help="as refiner train")
    parser.add_argument(
        "--adapter", action="store_true", help="text: ship the refiner with its text adapter (refiner train's default)"
    )
    parser.add_argument(
        "--adapter-fixed", action="store_true", help="also fit the adapter for all its steps, no held-out stopping"
    )
    args = parser.parse_args()
    name = args.name or args.modality
    work, train_all, test = start_run(args)
    lines: dict[str, float] = {}  # horizontal lines beside the upper bound: the segment score alone
    if args.segments:  # as on an index that keeps time spans: pairs embedded with theirs
        from segment_scores import split_segments

        assert args.modality == "video", "time spans are for video queries"
        spans = {split: split_segments(Path(args.data), args.encoders, split, pairs, args.segments, work / "cache")
                 for split, pairs in (("adapt", train_all), ("test", test))}  # fmt: skip
        train_all = dataclasses.replace(train_all, query_segments=spans["adapt"][0], audio_segments=spans["adapt"][1])
        test = dataclasses.replace(test, query_segments=spans["test"][0], audio_segments=spans["test"][1])
        lines["segments_alone"] = r_at_1_scores(segment_scores(*spans["test"]), test)
    one_space = test.query.shape[1] == test.audio.shape[1]
    direct = r_at_1(test.query, test) if one_space else None
    upper = None
    if args.upper_encoders:
        upper_test = split_embeddings(Path(args.data), args.upper_encoders, args.modality, work / "cache")[1]
        upper = r_at_1(upper_test.query, upper_test)
        log.info("upper bound (direct search, in-domain encoders): R@1 %.3f", upper)
        if args.segments:
            from segment_scores import split_segments

            up = split_segments(Path(args.data), args.upper_encoders, "test", upper_test, args.segments, work / "cache")
            lines["upper_segments_alone"] = r_at_1_scores(segment_scores(*up), upper_test)
    spec = f"compact:{Path(args.encoders).resolve()}"
    encoders = load_encoders(spec, spec if args.modality == "video" else None)
    adapter = None
    if args.adapter:
        assert args.modality == "text" and test.texts is not None, "the text adapter reads text queries"
        adapter = AdapterTrainConfig()
        adapter.sentence_model = sentence_model_for(encoders, adapter)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        train = first_pairs(train_all, n)
        t = time.perf_counter()
        mapper = train_mapper(train, 0, MapperConfig(ranking_weight=0.0))  # the plain regression baseline
        # what `refiner train` does, checkpoints off: the saved refiner is only read back here
        refiner, report = fit_refiner(train, encoders, work / f"refiner-{name}-{len(train.query)}", checkpoint_every=0,
                                      adapter=adapter, span_gallery=args.span_gallery)  # fmt: skip
        train_s = round(time.perf_counter() - t, 1)  # what `refiner train` took (the mapper as well)
        adapted = refiner.adapt(test.texts) if adapter is not None and refiner.adapter is not None else None
        if adapter is not None and adapted is None:  # the mix gave it no weight: fit it again to score it alone
            adapted = fit_adapter(*train.split(0.1, seed=0), adapter.sentence_model, adapter)[0].encode(test.texts)
        fixed = None
        if args.adapter_fixed:  # the same fit without held-out checks: every step, the last weights kept
            cfg = dataclasses.replace(adapter, check_every=0)
            fixed = fit_adapter(train.split(0.1, seed=0)[0], adapter.sentence_model, cfg)[0].encode(test.texts)
        row = {
            "pairs": len(train.query),
            "direct": direct,
            "mapper": r_at_1(mapper.map(test.query), test),
            "refiner": r_at_1(refiner.refine(test.query, blend=0.0), test),
            "blended": r_at_1(refiner.refine(test.query, blend=refiner.config.blend), test),
            "shipped": shipped_r_at_1(refiner, test, adapted if refiner.adapter else None),
            "adapter": r_at_1(adapted, test) if adapted is not None else None,
            "adapter_fixed": r_at_1(fixed, test) if fixed is not None else None,
            "adapter_fit": report.get("adapter_fit"),
            "blend": refiner.config.blend,
            "mix": refiner.config.mix,
            "library_weight": refiner.config.library_weight,
            "segment_weight": refiner.config.segment_weight,
            "span_map": refiner.config.span_map,
            "span_library_weight": refiner.config.span_library_weight,
            "train_s": train_s,
        }
        for key in ("mapper", "refiner", "shipped", "adapter", "adapter_fixed"):
            row[f"{key}_recovery"] = recovery(row[key], direct, upper) if row[key] is not None else None
        rows.append(row)
        log.info("%s", row)
        # written after every size, so that a run stopped early keeps what it measured
        result = {"modality": args.modality, "encoders": args.encoders, "encoders_label": args.encoders_label,
                  "upper_encoders": args.upper_encoders, "upper": upper, "test_queries": len(test.query),
                  "span_gallery": args.span_gallery,
                  **lines, "rows": rows}  # fmt: skip
        (work / f"data_efficiency-{name}.json").write_text(json.dumps(result, indent=2))
        draw(result, ROOT / "docs" / f"data-efficiency-{name}.png")
    print(table(result))


def table(result: dict) -> str:
    """The markdown table BENCHMARKS.md quotes (recovery in brackets when there is an upper bound)."""

    def cell(row: dict, key: str) -> str:
        rec = row.get(f"{key}_recovery")
        if row.get(key) is None:
            return "n/a"
        return f"{row[key]:.3f}" + (f" ({rec:.0%})" if rec is not None else "")

    adapter = any(r.get("adapter") is not None for r in result["rows"])
    fixed = any(r.get("adapter_fixed") is not None for r in result["rows"])

    lines = [
        "| training pairs | direct R@1 | MLP mapper R@1 | refiner unblended | refiner, blend picked | "
        "as shipped (ensemble weights) | train s |"
        + (" text adapter alone |" if adapter else "")
        + (" adapter, all steps |" if fixed else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if adapter else "") + ("---|" if fixed else ""),
    ]
    for r in result["rows"]:
        direct = "n/a" if r["direct"] is None else f"{r['direct']:.3f}"
        mix = "/".join(f"{w:g}" for w in (r["mix"] or {}).values()) or "none"
        if r.get("library_weight"):  # two-sided: the library side's weight against that mix
            mix += f", w {r['library_weight']:g}"
        if r.get("segment_weight"):  # time spans: their weight against all the rest
            mix += f", spans {r['segment_weight']:g}"
            if r.get("span_map"):  # how the query's spans were taken to audio space
                mix += f" {r['span_map']}"
            if r.get("span_library_weight"):  # and the weight of the spans' library side
                mix += f", span library {r['span_library_weight']:g}"
        lines.append(
            f"| {r['pairs']:,} | {direct} | {cell(r, 'mapper')} | {cell(r, 'refiner')} | {r['blended']:.3f} "
            f"({r['blend']}) | {cell(r, 'shipped')} ({mix}) | {r['train_s']} |"
            + (f" {cell(r, 'adapter')} |" if adapter else "")
            + (f" {cell(r, 'adapter_fixed')} |" if fixed else "")
        )
    if result.get("upper") is not None:
        lines.append(f"\nUpper bound (direct search with in-domain encoders): R@1 {result['upper']:.3f}.")
    if result.get("segments_alone") is not None:
        upper = result.get("upper_segments_alone")
        lines.append(f"Segment score alone (no pairs): R@1 {result['segments_alone']:.3f}"
                     + (f"; with in-domain encoders {upper:.3f}." if upper is not None else "."))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
