"""`encoders train`: the compact audio/text/video encoders, trained contrastively on paired data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from diffgap.encoders.prior import DEFAULT_PRIOR, PRIORS
from diffgap.pipeline import PairsSource, train_encoders, train_encoders_from_index
from diffgap.training.encoders import EncoderTrainConfig
from indexer.common import EXIT_OK, CliError, progress_bars


def cmd_train(args: argparse.Namespace) -> int:
    cfg = EncoderTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes
    )
    if args.prior:
        cfg.text = dataclasses.replace(cfg.text, prior=args.prior, prior_mode=args.prior_mode)
    if args.from_index:
        stats = train_encoders_from_index(
            args.from_index,
            args.out,
            cfg,
            val_fraction=args.val_fraction,
            exclude=args.exclude or (),
            progress=progress_bars(args.quiet),
        )
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return EXIT_OK
    if not args.pairs:
        raise CliError("give --pairs CSV or --from-index INDEX")
    source = PairsSource(args.pairs, layout=args.layout, split=args.split, audio_dir=args.audio_dir)
    train_encoders(source, args.out, cfg, use_video=not args.no_video, progress=progress_bars(args.quiet))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    noun = sub.add_parser("encoders", help="train the compact encoders")
    verbs = noun.add_subparsers(dest="verb", required=True, metavar="VERB")
    register_train(verbs.add_parser("train", help="train the compact audio/text/video encoders contrastively"))


def register_train(p: argparse.ArgumentParser) -> None:
    defaults = EncoderTrainConfig()
    p.add_argument("--pairs", help="paired CSV with audio and text and/or video")
    p.add_argument(
        "--from-index",
        metavar="INDEX",
        help="learn from an index's own file descriptions (tags and names) instead of --pairs; then rebuild "
        "the library with --encoder compact:OUT",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="with --from-index: share of files held out")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="with --from-index: files not to learn from")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "audiocaps", "clotho"])
    p.add_argument("--split", help="only rows of this split")
    p.add_argument("--audio-dir", help="audio folder for AudioCaps/Clotho layouts")
    p.add_argument("--out", required=True, help="output folder (use it as --encoder compact:OUT)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this much training time")
    p.add_argument("--no-video", action="store_true", help="ignore the video column")
    p.add_argument(
        "--prior",
        nargs="?",
        const=DEFAULT_PRIOR,
        choices=sorted(PRIORS),
        help=f"start the text tower from a pretrained token-embedding table (default {DEFAULT_PRIOR}, from the "
        "wordllama package: pip install 'diffgap[prior]')",
    )
    p.add_argument(
        "--prior-mode",
        default="frozen",
        choices=["frozen", "finetune", "pooled"],
        help="frozen table + trained layers; the table fine-tuned at a tenth of the LR; or its pooled vectors "
        "through a trained projection",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=cmd_train)
