"""SynthCaps as an uncaptioned 'sound library': the test clips under UCS-style names made from their
style-A facts (e.g. `BEEP_High_Loud_Twice_Slow_Start_Then_BUZZ_Low_End_0042.wav`), adapted with
`refiner train --from-index`, then searched with the style-B test captions.

    python bench/synthcaps_library.py --synthcaps DIR --encoders compact:ENC_DIR --work WORK_DIR

Prints and writes WORK_DIR/library.json: held-out (description) R@k from `refiner train`, and
style-B caption -> audio R@k over all test clips, direct and refined.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

from diffgap.diffusion.refiner import Refiner
from diffgap.encoders import load_encoders
from diffgap.index.store import IndexStore
from diffgap.pipeline import BuildOptions, RefinerJob, build, train_refiner_job
from diffgap.training.metrics import metrics, ranks_query_to_audio
from diffgap.training.refiner import RefinerTrainConfig


def camel(text: str) -> str:
    return "".join(w.capitalize() for w in str(text).split())


def library_name(meta: dict, i: int) -> str:
    parts = []
    for k, ev in enumerate(sorted(meta["events"], key=lambda e: e["onset"])):
        attrs = [ev.get(k) for k in ("pitch", "loudness", "repetitions", "rate", "duration_class", "position")]
        words = [camel(ev["class"].replace("-", " "))] + [camel(w) for w in attrs if w]
        parts.append(("Then_" if k else "") + "_".join(words))
    if meta.get("background_notable"):
        parts.append(f"Bg_{camel(meta['background']['type'])}_{camel(meta['background']['level'])}")
    return "_".join(parts) + f"_{i:04d}.wav"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthcaps", required=True)
    ap.add_argument("--encoders", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--iterations", type=int, default=6000)
    args = ap.parse_args()
    data, work = Path(args.synthcaps), Path(args.work)
    library = work / "library"
    library.mkdir(parents=True, exist_ok=True)
    metas = [json.loads(line) for line in (data / "meta.jsonl").read_text().splitlines() if line.strip()]
    test = [m for m in metas if m["split"] == "test"]
    names: dict[str, str] = {}
    for i, meta in enumerate(test):
        names[meta["id"]] = library_name(meta, i)
        target = library / names[meta["id"]]
        if not target.exists():
            os.link(data / "audio" / "test" / f"{meta['id']}.wav", target)  # same bytes, a library name
    index = work / "index"
    assert build(index, args.encoders, corpus=library, options=BuildOptions(num_jobs=2)).total_items > 0
    job = RefinerJob(index=index, from_index=True, train=RefinerTrainConfig(iterations=args.iterations))
    _, held_out, _ = train_refiner_job(job)
    (work / "from_index.json").write_text(json.dumps(held_out, indent=2))
    # style-B captions of the test clips against all 1000 library files
    with open(data / "captions.csv", newline="") as fh:
        captions = {r["id"]: r["caption"] for r in csv.DictReader(fh) if r["split"] == "test"}
    encoders = load_encoders(args.encoders)
    with IndexStore.open(index, readonly=True) as store:
        ids, xb = store.vectors()
        paths = [store.items([i])[i].path for i in ids]
    row_of = {p: r for r, p in enumerate(paths)}
    order = [m["id"] for m in test]
    xq = encoders.text.encode([captions[c] for c in order])
    target = np.array([row_of[names[c]] for c in order])
    refiner = Refiner.load(index / "refiner-text")
    result = {
        "held_out_descriptions": {k: held_out[k] for k in ("val_direct", "val_refined", "pairs_train", "pairs_val")},
        "style_b_captions_direct": metrics(ranks_query_to_audio(xq, xb, target)),
        "style_b_captions_refined_5_steps": metrics(ranks_query_to_audio(refiner.refine(xq, steps=5), xb, target)),
    }
    (work / "library.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
