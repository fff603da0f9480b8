"""`diffgap-index demo`: the whole offline pipeline on a generated corpus, resumable step by step.

corpus -> encoders (LAION CLAP if its weights are here, else compact ones trained on the corpus)
-> index -> refiners (text, and video with compact encoders) -> a few example searches.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffgap.demo import generate_demo_corpus
from diffgap.encoders import EncoderLoadError, load_encoders

log = logging.getLogger("diffgap.demo")


def pick_encoder(workdir: Path, corpus: Path, args: argparse.Namespace) -> tuple[str, str | None]:
    if not args.compact:
        try:
            load_encoders("clap", need_text=False)
            log.info("LAION CLAP weights found: using them")
            return "clap", None
        except EncoderLoadError:
            log.info("no CLAP weights available offline: training compact encoders on the demo corpus")
    encoders = workdir / "encoders"
    if not (encoders / "config.json").exists():
        from indexer.cli import main

        rc = main(
            [
                "-q" if args.quiet else "-v",
                "train-encoders",
                "--pairs",
                str(corpus / "captions.csv"),
                "--split",
                "train",
                "--out",
                str(encoders),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                "32",
            ]
        )
        if rc:
            raise SystemExit(rc)
    return f"compact:{encoders}", f"compact:{encoders}"


def cmd_demo(args: argparse.Namespace) -> int:
    from indexer.cli import main

    workdir = Path(args.workdir).resolve()
    corpus = workdir / "corpus"
    if not (corpus / "captions.csv").exists():
        log.info("generating %d demo clips in %s", args.clips, corpus)
        generate_demo_corpus(corpus, args.clips, seed=args.seed)
    spec, video_spec = pick_encoder(workdir, corpus, args)
    index = workdir / "index"
    quiet = ["-q"] if args.quiet else []
    refine = ["train-refiner", "--pairs", str(corpus / "captions.csv"), "--split", "train", "--index", str(index),
              "--iterations", str(args.refiner_iterations)]  # fmt: skip
    steps = [["build", str(corpus / "audio"), "-o", str(index), "--encoder", spec, "-j", str(args.num_jobs)], refine]
    if video_spec:
        steps.append([*refine, "--modality", "video", "--video-encoder", video_spec])
    for step in steps:
        if step[0] == "train-refiner" and (index / f"refiner-{'video' if 'video' in step else 'text'}").exists():
            continue
        rc = main([*quiet, *step])
        if rc:
            return rc
    for query in ("a high beep twice at the start", "a low buzz at the end"):
        log.info("example search: %r", query)
        main([*quiet, "search", str(index), "--text", query, "-k", "3", "--refine"])
    log.info("demo index ready: %s  (serve it with: diffgap-serve --index %s)", index, index)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a demo corpus, train what is needed, build and refine an index")
    p.add_argument("--workdir", default="demo", help="where the corpus, encoders and index go")
    p.add_argument("--clips", type=int, default=240)
    p.add_argument("--epochs", type=int, default=12, help="compact encoder epochs (about 2 minutes on 2 cores)")
    p.add_argument("--refiner-iterations", type=int, default=1500)
    p.add_argument("--compact", action="store_true", help="use compact encoders even if CLAP weights exist")
    p.add_argument("-j", "--num-jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
