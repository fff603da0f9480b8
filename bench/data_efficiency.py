"""Is training a refiner worth it with few captions? R@1 against the number of training pairs.

    python bench/data_efficiency.py --data runs/synthcaps-data --encoders runs/prior/encoders-pretrain+adapt-none \
        --work runs/data_efficiency [--sizes 100,300,1000,0] [--modality text] [--threads 2]

For each size (0: all pairs) a random subset of SynthCaps `adapt` pairs (seed 0) trains an MLP mapper
and a BST refiner as `refiner train` does (project defaults, the same iterations at every size; 10% of
the clips held out to pick the blend weight with direct search); each is scored on the 1000 `test`
queries against the 1000 test clips, beside direct search: the refiner unblended and as shipped.
Writes WORK/data_efficiency-MODALITY.json and docs/data-efficiency-MODALITY.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rerank_synthcaps import start_run  # noqa: E402

from diffgap.diffusion.refiner import DEFAULT_STEPS  # noqa: E402
from diffgap.training.embeddings import PairEmbeddings  # noqa: E402
from diffgap.training.mapper import train_mapper  # noqa: E402
from diffgap.training.metrics import choose_blend, metrics, ranks_query_to_audio  # noqa: E402
from diffgap.training.refiner import RefinerTrainConfig, train_refiner  # noqa: E402

log = logging.getLogger("data_efficiency")


def first_pairs(data: PairEmbeddings, n: int, seed: int = 0) -> PairEmbeddings:
    """n pairs drawn at random (all when n is 0 or too large); unused audio rows are harmless."""
    if not n or n >= len(data.query):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data.query), n, replace=False))
    return PairEmbeddings(data.audio, data.query[idx], data.query_group[idx], data.audio_keys, data.modality)


def draw(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["pairs"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for key, label, style in (("direct", "direct search", "k--"), ("mapper", "MLP mapper", "s-"),
                              ("refiner", f"refiner, unblended ({DEFAULT_STEPS} steps)", "o:"),
                              ("shipped", "refiner as shipped (blend picked on held-out pairs)", "o-")):  # fmt: skip
        ax.plot(sizes, [r[key] for r in result["rows"]], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training pairs (SynthCaps adapt, random subset)")
    ax.set_ylabel(f"{result['modality']} -> audio R@1 (1000 test queries)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Data efficiency, {result['modality']} queries, {result['encoders_label']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/synthcaps-data")
    parser.add_argument("--encoders", required=True)
    parser.add_argument("--encoders-label", default="in-domain compact encoders")
    parser.add_argument("--work", default="runs/data_efficiency")
    parser.add_argument("--modality", default="text", choices=["text", "video"])
    parser.add_argument("--sizes", default="100,300,1000,0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work, train_all, test = start_run(args)
    direct = None
    if test.query.shape[1] == test.audio.shape[1]:
        direct = metrics(ranks_query_to_audio(test.query, test.audio, test.query_group))["R@1"]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        train = first_pairs(train_all, n)
        t = time.perf_counter()
        mapper = train_mapper(train, 0)
        fit, held_out = train.split(0.1, seed=0)  # as fit_refiner: train on 90%, pick the blend on 10%
        refiner, _ = train_refiner(fit, cfg=RefinerTrainConfig())
        blend, _ = choose_blend(refiner, held_out)

        def r_at_1(mapped: np.ndarray) -> float:
            return metrics(ranks_query_to_audio(mapped, test.audio, test.query_group))["R@1"]

        row = {
            "pairs": len(train.query),
            "direct": direct,
            "mapper": r_at_1(mapper.map(test.query)),
            "refiner": r_at_1(refiner.refine(test.query, blend=0.0)),
            "shipped": r_at_1(refiner.refine(test.query, blend=blend)),
            "blend": blend,
            "train_s": round(time.perf_counter() - t, 1),
        }
        rows.append(row)
        log.info("%s", row)
    result = {"modality": args.modality, "encoders": args.encoders, "encoders_label": args.encoders_label,
              "rows": rows}  # fmt: skip
    (work / f"data_efficiency-{args.modality}.json").write_text(json.dumps(result, indent=2))
    draw(result, ROOT / "docs" / f"data-efficiency-{args.modality}.png")
    print("| training pairs | direct R@1 | mapper R@1 | refiner unblended R@1 | refiner as shipped R@1 (blend) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']} | {r['direct']} | {r['mapper']:.3f} | {r['refiner']:.3f} | {r['shipped']:.3f} "
              f"({r['blend']}) |")  # fmt: skip


if __name__ == "__main__":
    main()
