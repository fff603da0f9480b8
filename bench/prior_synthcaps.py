"""Does a language prior help the compact text tower read phrasings it never saw? SynthCaps, direct
search only (no refiner): compact encoders trained for the same steps with and without the prior,
then text -> audio R@k of the 1000 test captions against the 1000 test clips, for the training
style (B) and for a style nothing was trained on (bench/styles/everyday_c.json).

    python bench/prior_synthcaps.py --data runs/synthcaps-data --work runs/prior [--epochs 6]
        [--splits pretrain,adapt] [--modes none,frozen,minilm-l6:tokens,minilm-l6:pooled]

A mode is `none` (the corpus tokenizer), a mode of the wordllama table (frozen, finetune, pooled), or
PRIOR:MODE for another prior (the sentence model: minilm-l6:tokens, :residual, :pooled or :dual).

The data folder must be generated with `--caption-templates bench/styles/everyday_c.json`.
Writes WORK/prior-SPLITS.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.encoders.prior import DEFAULT_PRIOR  # noqa: E402
from diffgap.training.embeddings import embed_pairs  # noqa: E402
from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders  # noqa: E402
from diffgap.training.metrics import metrics, ranks_query_to_audio  # noqa: E402
from diffgap.training.pairs import read_pairs  # noqa: E402

log = logging.getLogger("prior")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/synthcaps-data")
    parser.add_argument("--work", default="runs/prior")
    parser.add_argument("--epochs", type=int, default=6, help="encoder epochs per variant (the same steps for each)")
    parser.add_argument("--splits", default="pretrain,adapt", help="splits the encoders train on")
    parser.add_argument("--modes", default="none,frozen", help="none (the corpus tokenizer) and [PRIOR:]MODE")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="cap on each variant's training time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    unseen = sorted(data.glob("captions_style_*.csv"))  # written by --caption-templates
    assert unseen, f"{data} has no captions_style_*.csv: generate it with --caption-templates"
    styles = {"B (trained style)": data / "captions.csv", "C (unseen style)": unseen[0]}
    train_pairs = read_pairs(data / "captions.csv", split=args.splits)
    results = {}
    for mode in args.modes.split(","):
        out = work / f"encoders-{args.splits.replace(',', '+')}-{mode.replace(':', '-')}"
        if not (out / "config.json").exists():
            cfg = EncoderTrainConfig(epochs=args.epochs, max_minutes=args.max_minutes)
            if mode != "none":
                prior, _, prior_mode = mode.rpartition(":")
                cfg.text = dataclasses.replace(cfg.text, prior=prior or DEFAULT_PRIOR, prior_mode=prior_mode)
            t0 = time.time()
            stats = train_compact_encoders(train_pairs, out, cfg, use_video=False)
            log.info("%s: trained in %.1f min (%s steps)", mode, (time.time() - t0) / 60, stats["steps"])
        encoders = load_encoders(f"compact:{out}")
        row = {}
        for name, csv_path in styles.items():
            test = embed_pairs(read_pairs(csv_path, split="test"), encoders, "text", cache_dir=work / "cache")
            row[name] = metrics(ranks_query_to_audio(test.query, test.audio, test.query_group))
            log.info("%s, style %s: R@1 %.3f R@10 %.3f", mode, name, row[name]["R@1"], row[name]["R@10"])
        results[mode] = row
    summary = {"splits": args.splits, "epochs": args.epochs, "rows": results}
    (work / f"prior-{args.splits.replace(',', '+')}.json").write_text(json.dumps(summary, indent=2))
    print("| text tower | style B R@1 | R@10 | unseen style C R@1 | R@10 |")
    print("|---|---|---|---|---|")
    for mode, row in results.items():
        b, c = row["B (trained style)"], row["C (unseen style)"]
        print(f"| {mode} | {b['R@1']:.3f} | {b['R@10']:.3f} | {c['R@1']:.3f} | {c['R@10']:.3f} |")


if __name__ == "__main__":
    main()
