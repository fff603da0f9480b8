"""Commands on an index directory: build, update, info, verify, search."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from diffgap.diffusion.refiner import DEFAULT_STEPS, load_refiner
from diffgap.encoders.hub import DOWNLOAD_ENV
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL
from diffgap.index.ann import AUTO_FLAT_MAX_FLOATS
from diffgap.index.build import BuildReport
from diffgap.index.duplicates import NEAR_THRESHOLD, near_groups
from diffgap.index.meaning import AUTO
from diffgap.index.store import IndexStore
from diffgap.media.audio import AudioDecodeError
from diffgap.models.segments import SEGMENTS
from diffgap.pipeline import BuildOptions, build, update
from diffgap.retrieval.search import Query, RefineSpec, decode_query, open_searcher
from indexer.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, progress_bars, search_effort, step_count

log = logging.getLogger("diffgap.index")


def _options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        num_jobs=args.num_jobs,
        batch_size=args.batch_size,
        chunk_files=args.chunk_files,
        file_timeout=args.file_timeout or None,
        max_file_seconds=args.max_file_seconds or None,
        ray=args.ray,
        shard_dir=Path(args.shard_dir) if args.shard_dir else None,
    )


def _exit(report: BuildReport) -> int:
    log.info("%s", report.summary())
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.total_items == 0:
        log.error("nothing could be indexed")
        return EXIT_FAILED
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    if not args.manifest and not args.corpus:
        raise CliError("give a corpus folder or --manifest CSV")
    if args.download:
        os.environ[DOWNLOAD_ENV] = "1"
    report = build(
        args.index,
        args.encoder,
        corpus=args.corpus,
        manifest_csv=args.manifest,
        column=args.column,
        split=args.split,
        index_type=args.index_type,
        window_s=args.window,
        hop_s=args.hop,
        prune=args.prune,
        exclude=args.exclude or (),
        meaning=args.meaning or AUTO,
        segments=args.segments,
        options=_options(args),
        progress=progress_bars(args.quiet),
    )
    return _exit(report)


def cmd_update(args: argparse.Namespace) -> int:
    report = update(
        args.index,
        args.corpus,
        exclude=args.exclude,
        meaning=args.meaning,
        options=_options(args),
        progress=progress_bars(args.quiet),
    )
    return _exit(report)


INFO_KEYS = ("index", "encoder", "dim", "metric", "index_type", "faiss_type", "search", "window_s", "hop_s",
             "segments", "corpus_root", "exclude", "meaning", "items", "files_indexed", "files_skipped",
             "duplicate_groups")  # fmt: skip


def cmd_info(args: argparse.Namespace) -> int:
    with IndexStore.open(args.index, readonly=True) as store:
        m = store.manifest
        info = {
            "index": str(Path(args.index).resolve()),
            "encoder": m.encoder_spec,
            "fingerprint": m.fingerprint,
            "dim": m.dim,
            "metric": m.metric,
            "index_type": m.index_type,
            "faiss_type": m.current_type,
            "search": describe_tuning(m.tuning),
            "tuning": m.tuning,
            "window_s": m.window_s,
            "hop_s": m.hop_s,
            "segments": m.segments,
            "corpus_root": m.corpus_root,
            "exclude": m.exclude,
            "meaning": f"{m.meaning['name']} (sha256 {m.meaning['sha256'][:12]})" if m.meaning else "none",
            **store.counts(),
            "duplicate_groups": len(store.duplicate_groups()),
            "skipped": [list(s) for s in store.skipped()],
        }
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return EXIT_OK
    for key in INFO_KEYS:
        sys.stdout.write(f"{key:14s} {info[key]}\n")
    for path, reason in info["skipped"]:
        sys.stdout.write(f"skipped        {path}: {reason}\n")
    return EXIT_OK


def describe_tuning(tuning: dict) -> str:
    if not tuning:
        return "exact"
    knob, effort, recall, n = (tuning[k] for k in ("knob", "effort", "recall_at_10", "queries"))
    return f"{knob}={effort}, recall@10 {recall} on {n} sampled items"


def cmd_verify(args: argparse.Namespace) -> int:
    with IndexStore.open(args.index, readonly=True) as store:
        problems = store.verify()
        counts = store.counts()
    for problem in problems:
        log.error("%s", problem)
    if problems:
        return EXIT_FAILED
    log.info("ok: %d items in %d files, FAISS and SQLite agree", counts["items"], counts["files_indexed"])
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    searcher = open_searcher(args.index, need_text=args.text is not None)
    try:
        if args.refiner:  # an explicit refiner folder replaces the index's own
            searcher.refiners["text"] = load_refiner(args.refiner, searcher.encoders)
        spec = RefineSpec(steps=args.steps, mode=args.mode, rerank=args.rerank) if args.refine else None
        ranking = {
            "lexical": not args.no_lexical,
            "lexical_weight": args.lexical_weight,
            "meaning": not args.no_meaning,
            "collapse": not args.windows,
            "effort": args.effort,
        }
        if args.text is not None:
            query = Query("text", args.k, text=args.text, refine=spec, **ranking)
        else:
            try:
                wave = decode_query(args.audio, "audio", searcher.encoders)
            except AudioDecodeError as exc:
                raise CliError(f"{args.audio}: {exc}") from exc
            query = Query("audio", args.k, media=wave, collapse=not args.windows, effort=args.effort)
        result = searcher.search(query)
    finally:
        searcher.store.close()
    if args.refine and not result.refined:
        log.warning("this index has no text refiner: searched without refinement (train one with `refiner train`)")
    rows = [
        {
            "rank": r + 1,
            "id": h.item.id,
            "score": round(h.score, 4),
            "path": h.item.path,
            "start": h.item.start,
            "end": h.item.end,
            "description": h.item.description,
            "dense_rank": h.dense_rank,
            "lexical_rank": h.lexical_rank,
            "meaning_rank": h.meaning_rank,
            "duplicates": list(h.duplicates),
        }
        for r, h in enumerate(result.hits)
    ]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    for row in rows:
        sys.stdout.write(
            f"{row['rank']:3d}  {row['score']:+.4f}  {row['path']}  [{row['start']:.1f}-{row['end']:.1f}s]\n"
        )
    return EXIT_OK


def cmd_duplicates(args: argparse.Namespace) -> int:
    with IndexStore.open(args.index, readonly=True) as store:
        found = {"exact": store.duplicate_groups()}
        if args.near is not None:
            found["near"] = near_groups(store, args.near)
    if args.json:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return EXIT_OK
    for kind, groups in found.items():
        sys.stdout.write(f"{len(groups)} {kind} duplicate groups\n")
        for group in groups:
            sys.stdout.write("  " + "  =  ".join(group) + "\n")
    return EXIT_OK


def add_build_options(p: argparse.ArgumentParser) -> None:
    defaults = BuildOptions()
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave out paths matching this glob (relative to the corpus; repeatable; kept for later updates)",
    )
    p.add_argument(
        "--meaning",
        metavar="MODEL",
        help="sentence model that embeds each file's description, so text queries match words by meaning: "
        f"auto (build's default: {DEFAULT_SENTENCE_MODEL} when installed), off, a model name or a directory; "
        "update keeps the index's own",
    )
    p.add_argument("-j", "--num-jobs", type=int, default=defaults.num_jobs, help="decoding worker processes")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per encoder call")
    p.add_argument(
        "--chunk-files", type=int, default=defaults.chunk_files, help="files per committed chunk (resume granularity)"
    )
    p.add_argument(
        "--file-timeout", type=float, default=defaults.file_timeout, help="skip a file whose decoding takes longer (s)"
    )
    p.add_argument(
        "--max-file-seconds",
        type=float,
        default=defaults.max_file_seconds,
        help="index at most this much of one recording (s)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="decode and encode on Ray: 'local' starts one here, 'auto' or ray://HOST:10001 joins a cluster "
        "(-j = encoder actors; corpus and encoder must be at the same paths on every node)",
    )
    p.add_argument("--shard-dir", help="with --ray: where embedding shards go (default INDEX/shards)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="index a folder (or the audio named in a CSV); resumes if interrupted")
    p.add_argument("corpus", nargs="?", help="folder of audio/video files")
    p.add_argument("-o", "--index", required=True, help="index directory to create or resume")
    p.add_argument("--manifest", help="CSV whose --column names the files (relative to the CSV)")
    p.add_argument("--column", default="audio", help="CSV column with file paths (default: audio)")
    p.add_argument("--split", help="with --manifest: only rows whose 'split' column has this value")
    p.add_argument("--encoder", default="clap", help="clap[:ID|DIR] or compact:DIR (default: clap)")
    p.add_argument(
        "--index-type",
        help="auto (default for a new index: exact Flat while small, HNSW32 above "
        f"{AUTO_FLAT_MAX_FLOATS:,} floats, i.e. items x dim) or a faiss factory string: Flat, HNSW32, "
        "IVF1024,Flat, IVF1024,PQ32; a resumed index keeps its own",
    )
    p.add_argument("--window", type=float, help="window length in seconds for long files (new index: 10)")
    p.add_argument("--hop", type=float, help="hop between windows in seconds (new index: 5)")
    p.add_argument(
        "--segments",
        type=int,
        help="time spans kept per window for video queries' segment scores (new index; default "
        f"{SEGMENTS} with compact encoders, whose vectors keep time; 0: none)",
    )
    p.add_argument("--prune", action="store_true", help="also remove indexed files no longer in the corpus")
    p.add_argument(
        "--download",
        action="store_true",
        help=f"fetch encoder weights missing from the local Hugging Face cache from the hub ({DOWNLOAD_ENV}=1)",
    )
    add_build_options(p)
    p.set_defaults(func=cmd_build, long_running=True)

    p = sub.add_parser("update", help="add new or changed files, remove deleted ones")
    p.add_argument("index")
    p.add_argument("corpus", nargs="?", help="corpus folder (default: the one the index was built from)")
    add_build_options(p)
    p.set_defaults(func=cmd_update, long_running=True)

    p = sub.add_parser("info", help="describe an index")
    p.add_argument("index")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check that SQLite and FAISS agree and vectors are sane")
    p.add_argument("index")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("search", help="search an index with text or an example audio file")
    p.add_argument("index")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--audio")
    p.add_argument("-k", type=int, default=10)
    p.add_argument(
        "--refine", action="store_true", help="refine the text query (when the index has a refiner; else direct)"
    )
    p.add_argument("--refiner", help="refiner folder (default: INDEX/refiner-text)")
    p.add_argument("--steps", type=step_count, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    p.add_argument("--mode", default="sample", choices=["sample", "bridge"])
    p.add_argument(
        "--rerank",
        action="store_true",
        help="with --refine: reorder the top 50 by the refiner's denoising error, weighed as its held-out pairs "
        "picked (0: as ranked; BENCHMARKS.md run 20)",
    )
    p.add_argument("--no-lexical", action="store_true", help="rank by sound only (the files' words take no part)")
    p.add_argument("--no-meaning", action="store_true", help="match the files' words exactly only, not by meaning")
    p.add_argument("--lexical-weight", type=float, default=1.0, help="weight of the words against the sound")
    p.add_argument("--windows", action="store_true", help="every matching window (default: one hit per file)")
    p.add_argument(
        "--effort",
        type=search_effort,
        help="approximate indexes: candidates explored (HNSW efSearch, IVF nprobe; default: tuned at build time "
        "for recall@10 >= 0.95, see `info`); exact indexes ignore it",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("duplicates", help="list files with the same bytes, or (--near) almost the same sound")
    p.add_argument("index")
    p.add_argument(
        "--near",
        type=float,
        nargs="?",
        const=NEAR_THRESHOLD,
        help=f"also near duplicates: cosine of the files' mean vectors at least this (default {NEAR_THRESHOLD})",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_duplicates)
