"""A real sound library from Debian packages, searched by words and by sound.

Reproducible from package names: each package is fetched with `apt-get download` and unpacked with
`dpkg-deb -x` (never installed); versions and sha256 are recorded. The library keeps every sound
file of the packages (one folder per package, the package's own folders below), except:
- tuxpaint-stamps-default: a stamp's NAME.ogg is its sound effect and the first line of NAME.txt its
  English description; NAME_xx.ogg (languages) and NAME_desc*.ogg (speech) are left out;
- music over 30 s is left out (by decoded duration).

Then, with no captions and no CLAP weights, as a user of such a library would: compact encoders are
trained on the (description, audio) pairs of 80% of the files (split by file), the index holds all
files, a refiner is trained `--from-index` with the held-out files excluded. Queried two ways:
(a) each held-out file's description (every file with the same description is relevant):
    R@1, R@10, MRR@10 over files;
(b) 30 natural queries (bench/reallib_queries.json, written before measuring, with a keyword rule
    for relevance): hits@5, the relevant files among the top 5 (at most 5 a query, fewer where fewer
    are relevant).
Rows: lexical only (the files' words, FTS5 bm25), meaning only (the sentence model), dense direct,
dense refined, hybrid (refined and direct; and exact words + sound without the sentence model).
Writes WORK/reallib.json (WORK/reallib-VARIANT.json with --library-training or --prior) and prints the
table.

    python bench/reallib.py --work runs/reallib [--epochs 30] [--iterations 3000] [--library-training]
        [--prior minilm-l6 [--prior-mode beside]] [--packages PKG ...] [--queries QUERIES.json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffgap.encoders.base import file_sha256  # noqa: E402
from diffgap.encoders.prior import DEFAULT_PRIOR, PRIOR_MODES, prior_kind  # noqa: E402
from diffgap.index.build import SCANNED_EXTENSIONS  # noqa: E402
from diffgap.index.store import IndexStore  # noqa: E402
from diffgap.media.tags import describe, read_tags, words_of  # noqa: E402
from diffgap.pipeline import LIBRARY_TRAINING, BuildOptions, RefinerJob, build, train_refiner_job  # noqa: E402
from diffgap.retrieval.search import Query, RefineSpec, match_expression, open_searcher  # noqa: E402
from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders  # noqa: E402
from diffgap.training.pairs import read_pairs  # noqa: E402
from diffgap.training.refiner import RefinerTrainConfig  # noqa: E402

log = logging.getLogger("reallib")
PACKAGES = ("wesnoth-1.16-data", "hedgewars-data", "supertux-data", "sound-theme-freedesktop",
            "tuxpaint-stamps-default")  # fmt: skip
SHORT = {"wesnoth-1.16-data": "wesnoth", "hedgewars-data": "hedgewars", "supertux-data": "supertux",
         "sound-theme-freedesktop": "freedesktop", "tuxpaint-stamps-default": "tuxpaint"}  # fmt: skip
MAX_MUSIC_S = 30.0
HELD_OUT = 0.2


def fetch(packages: tuple[str, ...], work: Path) -> dict[str, dict[str, str]]:
    debs, unpacked = work / "debs", work / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    record = {}
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        deb = found[-1]
        target = unpacked / SHORT.get(pkg, pkg)
        if not target.exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
        record[pkg] = {"deb": deb.name, "version": version.stdout.strip(), "sha256": file_sha256(deb)}
    return record


def duration_s(path: Path) -> float | None:
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if c.duration:
                return c.duration / 1e6
            stream = c.streams.audio[0]
            return float(stream.duration * stream.time_base) if stream.duration else None
    except (av.FFmpegError, IndexError, OSError):
        return None


def assemble(work: Path) -> list[dict]:
    """Hard links into WORK/library/<package>/...; returns one record per file kept or left out."""
    library = work / "library"
    files = []
    for short_dir in sorted((work / "unpacked").iterdir()):
        base = short_dir / "usr" / "share"
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in SCANNED_EXTENSIONS:
                continue
            rel = f"{short_dir.name}/{path.relative_to(base).as_posix()}"
            entry = {"path": rel, "package": short_dir.name}
            if short_dir.name == "tuxpaint":
                txt = path.with_suffix(".txt")
                if "_desc" in path.stem or not txt.exists():
                    continue  # language variants and spoken descriptions
                first = txt.read_text(encoding="utf-8", errors="ignore").strip().splitlines()
                entry["description"] = first[0].strip() if first else ""
            seconds = duration_s(path)
            if seconds is not None and seconds > MAX_MUSIC_S:
                entry["left_out"] = f"over {MAX_MUSIC_S:.0f} s ({seconds:.0f} s)"
            else:
                target = library / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.link(path, target)
            entry["seconds"] = seconds
            files.append(entry)
    return files


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", " ".join(re.split(r"(?<=[a-z])(?=[A-Z])", text)).lower())


def relevant(entry: dict, keywords: list[str]) -> bool:
    haystack = words(entry["path"]) + words(entry.get("description", ""))
    return any(w.startswith(k) for k in keywords for w in haystack)


def metrics(ranks: list[int | None]) -> dict[str, float]:
    r = np.array([x if x is not None else 10**9 for x in ranks], dtype=float)
    return {
        "R@1": float(np.mean(r <= 1)),
        "R@10": float(np.mean(r <= 10)),
        "MRR@10": float(np.mean(np.where(r <= 10, 1.0 / r, 0.0))),
        "n": len(ranks),
    }


def plot_natural(results: dict[str, dict], ceiling: int, out: Path) -> None:
    """hits@5 of each natural query for the word rows and the hybrid (a PNG; skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shown = [n for n in ("lexical only", "meaning only", "dense refined", "hybrid refined") if n in results]
    queries = [q["query"] for q in results[shown[0]]["natural"]]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(shown)
    for j, name in enumerate(shown):
        hits = [q["hits@5"] for q in results[name]["natural"]]
        label = f"{name} ({results[name]['natural_hits@5']} of {ceiling})"
        ax.bar(np.arange(len(queries)) + (j - (len(shown) - 1) / 2) * width, hits, width, label=label)
    ax.set_xticks(np.arange(len(queries)), queries, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relevant files in the top 5")
    ax.set_title("Natural queries over a real library: what each ranking puts in the top 5")
    ax.set_ylim(0, 6.2)  # room for the legend above the bars
    ax.legend(fontsize=8, ncols=len(shown), loc="upper center")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/reallib")
    parser.add_argument("--epochs", type=int, default=30, help="compact encoder epochs")
    parser.add_argument("--iterations", type=int, default=3000, help="refiner iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--packages", nargs="+", default=list(PACKAGES), help="Debian packages to build the library from"
    )
    parser.add_argument(
        "--queries", default=str(ROOT / "bench" / "reallib_queries.json"), help="natural queries + rule"
    )
    parser.add_argument(
        "--prior", help=f"start the text tower from this language prior (e.g. minilm-l6, {DEFAULT_PRIOR})"
    )
    parser.add_argument("--prior-mode", help="the prior's mode (default: its first, diffgap/encoders/prior.py)")
    parser.add_argument(
        "--library-training",
        action="store_true",
        help="train the encoders as `encoders train --from-index` does: augmented, the best epoch on 10%% of the "
        "training files kept (the benchmark's own held-out files stay unseen)",
    )
    parser.add_argument("--no-augment", action="store_true", help="with --library-training: no augmentation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    t0 = time.time()
    packages = fetch(tuple(args.packages), work)
    files = assemble(work)
    kept = [f for f in files if "left_out" not in f]
    log.info("%d sound files, %d kept, %d left out (music over %.0f s)", len(files), len(kept),
             len(files) - len(kept), MAX_MUSIC_S)  # fmt: skip
    for f in kept:  # the words a user's library carries: the indexer's description, or the stamp's text
        f.setdefault("description", describe(f["path"], read_tags(work / "library" / f["path"])))
    rng = np.random.default_rng(args.seed)
    held = {f["path"] for f in kept if rng.random() < HELD_OUT}
    pairs = work / "pairs.csv"
    with open(pairs, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["audio", "text"])
        for f in kept:
            if f["path"] not in held and f["description"]:
                writer.writerow([f"library/{f['path']}", f["description"]])
    mode = (args.prior_mode or PRIOR_MODES[prior_kind(args.prior)][0]) if args.prior else None
    variant = ("-lib" if args.library_training else "") + ("-noaug" if args.no_augment else "")
    variant += f"-prior-{args.prior}-{mode}" if args.prior else ""
    encoders = work / f"encoders{variant}"
    if not (encoders / "config.json").exists():
        base = LIBRARY_TRAINING if args.library_training else {"batch_size": 32}
        cfg = EncoderTrainConfig(**{**base, "epochs": args.epochs, "seed": args.seed, "max_seconds": 10.0})
        cfg.augment = cfg.augment and not args.no_augment
        if args.prior:
            cfg.text = dataclasses.replace(cfg.text, prior=args.prior, prior_mode=mode)
        train_pairs = read_pairs(pairs)
        val: list = []
        if args.library_training:  # 10% of the training files choose the epoch, as --from-index does
            pick = np.random.default_rng(args.seed + 1).random(len(train_pairs)) < 0.1
            val = [p for p, v in zip(train_pairs, pick, strict=True) if v]
            train_pairs = [p for p, v in zip(train_pairs, pick, strict=True) if not v]
        stats = train_compact_encoders(train_pairs, encoders, cfg, use_video=False, val_pairs=val)
        log.info("encoders: %s", {k: v for k, v in stats.items() if not isinstance(v, dict)})
    spec = f"compact:{encoders}"
    index = work / f"index{variant}"
    report = build(index, spec, corpus=work / "library", options=BuildOptions(num_jobs=2))
    log.info("%s", report.summary().splitlines()[0])
    escape = re.compile(r"([*?\[])")
    exclude = tuple(escape.sub(r"[\1]", p) for p in sorted(held))
    if not (index / "refiner-text").exists():
        job = RefinerJob(index=index, from_index=True, exclude=exclude,
                         train=RefinerTrainConfig(iterations=args.iterations, seed=args.seed))  # fmt: skip
        train_refiner_job(job)
    with IndexStore.open(index, readonly=True) as store:
        indexed = {p for p, (_, status) in store.file_state().items() if status == "indexed"}
        skipped = store.skipped()
        duplicates = store.duplicate_groups()
    by_path = {f["path"]: f for f in kept}
    queries = json.loads(Path(args.queries).read_text())["queries"]
    held_queries = [(by_path[p]["description"], p) for p in sorted(held) if p in indexed and by_path[p]["description"]]
    searcher = open_searcher(index)
    rows = {
        "lexical only": "exact",
        "meaning only": "meaning",
        "dense direct": {"lexical": False, "refine": None},
        "dense refined": {"lexical": False, "refine": RefineSpec()},
        "hybrid, exact words + sound, refined": {"lexical": True, "meaning": False, "refine": RefineSpec()},
        "hybrid direct": {"lexical": True, "refine": None},
        "hybrid refined": {"lexical": True, "refine": RefineSpec()},
    }
    if searcher.meaning is None:  # no sentence model installed: the rows that need one are left out
        rows = {k: v for k, v in rows.items() if v != "meaning" and not (isinstance(v, dict) and "meaning" in v)}

    def ranked(text: str, row: dict | str, k: int) -> list[str]:
        if row == "exact":  # the full-text ranking alone
            return [p for p, _ in searcher.store.lexical_search(match_expression(text), limit=k)]
        if row == "meaning":  # the descriptions' meaning alone
            return [p for p, _ in searcher.meaning.nearest(searcher.meaning.scores([text])[0], k)]
        query = Query("text", k, text=text, **row)
        hits = searcher.search(query).hits
        return [h.item.path for h in hits] + [d for h in hits for d in h.duplicates]

    # The most hits@5 any ranking can get: a query with fewer than 5 relevant files gets at most that many.
    ceiling = sum(min(5, sum(relevant(by_path[p], q["keywords"]) for p in indexed)) for q in queries)
    results: dict[str, dict] = {}
    for name, row in rows.items():
        ranks, stamp_ranks = [], []
        for text, path in held_queries:
            same = {p for p in indexed if by_path.get(p, {}).get("description") == text}
            order = ranked(text, row, 10)
            ranks.append(next((i + 1 for i, p in enumerate(order) if p in same), None))
            if by_path[path]["package"] == "tuxpaint":  # a written sentence, not words of the file's name
                stamp_ranks.append(ranks[-1])
        natural = []
        for q in queries:
            top = ranked(q["query"], row, 5)[:5]
            natural.append({"query": q["query"], "hits@5": sum(relevant(by_path[p], q["keywords"]) for p in top),
                            "top5": top})  # fmt: skip
        results[name] = {"held_out": metrics(ranks), "held_out_stamps": metrics(stamp_ranks) if stamp_ranks else None,
                         "natural_hits@5": sum(n["hits@5"] for n in natural), "natural": natural}  # fmt: skip
        shown = {k: round(v, 3) for k, v in results[name]["held_out"].items()}
        log.info("%-15s held-out %s; natural hits@5 %d/%d", name, shown, results[name]["natural_hits@5"], ceiling)
    searcher.store.close()
    out = {
        "packages": packages,
        "files": {
            "sound_files": len(files),
            "kept": len(kept),
            "indexed": len(indexed),
            "skipped": skipped,
            "left_out": [(f["path"], f["left_out"]) for f in files if "left_out" in f],
            "held_out": len(held),
            "duplicate_groups": len(duplicates),
        },  # fmt: skip
        "natural_ceiling": ceiling,
        "rows": results,
        "seconds": round(time.time() - t0, 1),
        "words_of_example": words_of("justyouwait mineimpact"),
    }
    (work / f"reallib{variant}.json").write_text(json.dumps(out, indent=2))
    plot_natural(results, ceiling, work / f"reallib{variant}-natural.png")
    print(f"| row | held-out R@1 | R@10 | MRR@10 | stamps only R@1 | R@10 | MRR@10 | natural hits@5 (of {ceiling}) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        h, t = (
            r["held_out"],
            r["held_out_stamps"] or {"R@1": float("nan"), "R@10": float("nan"), "MRR@10": float("nan")},
        )
        print(f"| {name} | {h['R@1']:.3f} | {h['R@10']:.3f} | {h['MRR@10']:.3f} | {t['R@1']:.3f} | {t['R@10']:.3f} "
              f"| {t['MRR@10']:.3f} | {r['natural_hits@5']} |")  # fmt: skip


if __name__ == "__main__":
    main()
