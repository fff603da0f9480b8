"""`diffgap-index`: build, update, inspect and search index directories; train encoders and refiners."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffgap.audio import AudioDecodeError, decode_audio
from diffgap.encoders import EncoderLoadError, load_encoders
from diffgap.indexing import build_index, scan_folder, scan_list
from diffgap.pairs import PairsError
from diffgap.refiner import Refiner, RefinerError
from diffgap.search import Searcher
from diffgap.store import IndexStore, IndexStoreError
from indexer import demo, train

log = logging.getLogger("diffgap.index")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(RuntimeError):
    """Reported as one line on stderr with a non-zero exit, never as a traceback."""


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- build / update ----------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    if args.manifest:
        root, files = scan_list(args.manifest, column=args.column, split=args.split)
    elif args.corpus:
        root, files = Path(args.corpus).resolve(), scan_folder(args.corpus)
    else:
        raise CliError("give a corpus folder or --manifest CSV")
    encoders = load_encoders(args.encoder, need_text=False)
    store = IndexStore.create(
        args.index,
        encoder_spec=args.encoder,
        fingerprint=encoders.audio.fingerprint,
        dim=encoders.audio.dim,
        index_type=args.index_type,
        window_s=args.window,
        hop_s=args.hop,
        corpus_root=str(root),
    )
    log.info("indexing %d files from %s into %s (%s)", len(files), root, args.index, args.encoder)
    return _run_build(store, encoders.audio, files, args, remove_missing=args.prune, encoder_spec=args.encoder)


def cmd_update(args: argparse.Namespace) -> int:
    store = IndexStore.open(args.index)
    root = Path(args.corpus or store.manifest.corpus_root or "").resolve()
    if not root.is_dir():
        raise CliError(f"corpus folder {root} does not exist; pass it as the second argument")
    encoders = load_encoders(store.manifest.encoder_spec, need_text=False)
    store.check_fingerprint(encoders.audio.fingerprint)
    if args.corpus:
        store.manifest.corpus_root = str(root)
    files = scan_folder(root)
    log.info("updating %s from %s (%d files found)", args.index, root, len(files))
    return _run_build(store, encoders.audio, files, args, remove_missing=True, encoder_spec=store.manifest.encoder_spec)


def _run_build(
    store: IndexStore, audio_encoder, files, args: argparse.Namespace, *, remove_missing: bool, encoder_spec: str
) -> int:
    if args.ray:
        from diffgap.distributed import build_index_ray

        log.info("decoding and encoding on Ray (%s), %d actors", args.ray, args.num_jobs)
        report = build_index_ray(
            store,
            encoder_spec,
            files,
            args.shard_dir or store.root / "shards",
            num_actors=args.num_jobs,
            remove_missing=remove_missing,
            max_file_seconds=args.max_file_seconds or None,
            address=None if args.ray == "local" else args.ray,
        )
        log.info("%s", report.summary())
        store.close()
        return EXIT_OK if report.total_items else EXIT_FAILED
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(files), unit="file", disable=args.quiet or None, dynamic_ncols=True) as bar,
    ):
        report = build_index(
            store,
            audio_encoder,
            files,
            num_jobs=args.num_jobs,
            batch_size=args.batch_size,
            chunk_files=args.chunk_files,
            remove_missing=remove_missing,
            progress=bar.update,
            file_timeout=args.file_timeout or None,
            max_file_seconds=args.max_file_seconds or None,
        )
    log.info("%s", report.summary())
    store.close()
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.total_items == 0:
        log.error("nothing could be indexed")
        return EXIT_FAILED
    return EXIT_OK


# ---- info / verify / search ------------------------------------------------------------------------
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
            "window_s": m.window_s,
            "hop_s": m.hop_s,
            "corpus_root": m.corpus_root,
            **store.counts(),
            "skipped": [list(s) for s in store.skipped()],
        }
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        for key in (
            "index",
            "encoder",
            "dim",
            "metric",
            "index_type",
            "window_s",
            "hop_s",
            "corpus_root",
            "items",
            "files_indexed",
            "files_skipped",
        ):
            sys.stdout.write(f"{key:14s} {info[key]}\n")
        for path, reason in info["skipped"]:
            sys.stdout.write(f"skipped        {path}: {reason}\n")
    return EXIT_OK


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
    store = IndexStore.open(args.index, readonly=True)
    encoders = load_encoders(store.manifest.encoder_spec, need_text=args.text is not None)
    store.check_fingerprint(encoders.audio.fingerprint)
    refiner = None
    if args.refine:
        refiner_dir = Path(args.refiner or Path(args.index) / "refiner-text")
        refiner = Refiner.load(refiner_dir)
        refiner.check_encoders(encoders.audio.fingerprint, encoders.text.fingerprint if encoders.text else None)
    searcher = Searcher(store, encoders, {"text": refiner} if refiner else None)
    if args.text is not None:
        result = searcher.search_text(
            [args.text], args.k, refine=args.refine, refine_options={"steps": args.steps, "mode": args.mode}
        )
    else:
        try:
            wave = decode_audio(args.audio, encoders.audio.sample_rate, max_seconds=encoders.audio.max_seconds).wave
        except AudioDecodeError as exc:
            raise CliError(f"{args.audio}: {exc}") from exc
        result = searcher.search_vectors(encoders.audio.encode([wave]), args.k, modality="audio")
    rows = [
        {
            "rank": r + 1,
            "id": h.item.id,
            "score": round(h.score, 4),
            "path": h.item.path,
            "start": h.item.start,
            "end": h.item.end,
        }
        for r, h in enumerate(result.hits[0])
    ]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        for row in rows:
            sys.stdout.write(
                f"{row['rank']:3d}  {row['score']:+.4f}  {row['path']}  [{row['start']:.1f}-{row['end']:.1f}s]\n"
            )
    return EXIT_OK


# ---- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffgap-index", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the command name
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs):  # every command takes -v/-q, before or after its arguments
        return original_add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    def add_build_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-j", "--num-jobs", type=int, default=1, help="decoding worker processes")
        p.add_argument("--batch-size", type=int, default=32, help="windows per encoder call")
        p.add_argument("--chunk-files", type=int, default=32, help="files per committed chunk (resume granularity)")
        p.add_argument("--file-timeout", type=float, default=120.0, help="skip a file whose decoding takes longer (s)")
        p.add_argument(
            "--max-file-seconds", type=float, default=4 * 3600.0, help="index at most this much of one recording (s)"
        )
        p.add_argument(
            "--ray",
            metavar="ADDRESS",
            help="decode and encode on Ray: 'local' starts one here, 'auto' or ray://HOST:10001 joins a cluster "
            "(-j = encoder actors; corpus and encoder must be at the same paths on every node)",
        )
        p.add_argument("--shard-dir", help="with --ray: where embedding shards go (default INDEX/shards)")

    p = sub.add_parser("build", help="index a folder (or the audio named in a CSV); resumes if interrupted")
    p.add_argument("corpus", nargs="?", help="folder of audio/video files")
    p.add_argument("-o", "--index", required=True, help="index directory to create or resume")
    p.add_argument("--manifest", help="CSV whose --column names the files (relative to the CSV)")
    p.add_argument("--column", default="audio", help="CSV column with file paths (default: audio)")
    p.add_argument("--split", help="with --manifest: only rows whose 'split' column has this value")
    p.add_argument("--encoder", default="clap", help="clap[:ID|DIR] or compact:DIR (default: clap)")
    p.add_argument(
        "--index-type", default="Flat", help="faiss factory string: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32"
    )
    p.add_argument("--window", type=float, default=10.0, help="window length in seconds for long files")
    p.add_argument("--hop", type=float, default=5.0, help="hop between windows in seconds")
    p.add_argument("--prune", action="store_true", help="also remove indexed files no longer in the corpus")
    add_build_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("update", help="add new or changed files, remove deleted ones")
    p.add_argument("index")
    p.add_argument("corpus", nargs="?", help="corpus folder (default: the one the index was built from)")
    add_build_options(p)
    p.set_defaults(func=cmd_update)

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
    p.add_argument("--refine", action="store_true", help="refine the text query with the index's refiner")
    p.add_argument("--refiner", help="refiner folder (default: INDEX/refiner-text)")
    p.add_argument("--steps", type=int, default=5, help="refinement sampling steps")
    p.add_argument("--mode", default="sample", choices=["sample", "bridge"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    train.register(sub)
    train.register_encoders(sub)
    demo.register(sub)
    return parser


def cap_threads() -> None:
    """Inside a CPU-limited container torch would otherwise start one thread per host core."""
    import torch

    from diffgap.resources import available_cpus

    torch.set_num_threads(min(torch.get_num_threads(), available_cpus()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    cap_threads()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except (
        CliError,
        EncoderLoadError,
        IndexStoreError,
        PairsError,
        RefinerError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        log.error("%s", exc)
        return EXIT_USAGE if isinstance(exc, CliError) else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
