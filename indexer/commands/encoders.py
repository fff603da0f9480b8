"""`encoders train`: the compact audio/text/video encoders, trained contrastively on paired data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from diffgap.encoders.prior import DEFAULT_PRIOR, PRIOR_MODES, PRIORS, prior_kind
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL, SENTENCE_MODELS
from diffgap.pipeline import LIBRARY_TRAINING, PairsSource, train_encoders, train_encoders_from_index
from diffgap.training.encoders import EncoderTrainConfig
from indexer.common import EXIT_OK, CliError, progress_bars


def cmd_train(args: argparse.Namespace) -> int:
    given = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "lr", "seed", "max_minutes", "max_steps", "augment", "patience")
    }
    base = LIBRARY_TRAINING if args.from_index else {}  # names of a library: small-data defaults
    cfg = EncoderTrainConfig(**{**base, **{k: v for k, v in given.items() if v is not None}})
    if args.prior:
        mode = args.prior_mode or PRIOR_MODES[prior_kind(args.prior)][0]
        cfg.text = dataclasses.replace(cfg.text, prior=args.prior, prior_mode=mode)
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
    lib = LIBRARY_TRAINING
    p.add_argument(
        "--epochs", type=int, help=f"passes over the pairs (default {defaults.epochs}; --from-index {lib['epochs']})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"pairs per step (default {defaults.batch_size}; --from-index {lib['batch_size']})",
    )
    p.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr})")
    p.add_argument("--max-minutes", type=float, help="stop after this much training time")
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps (the learning rate decays over them); with a large --epochs, a compute "
        "budget that does not depend on how busy the machine is",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random crops, added noise and SpecAugment masks, for labels that describe whole clips such as file "
        "names (default off: on a real library it cost held-out R@10 at the same epochs; captions may also say "
        "when things happen, which a crop breaks)",
    )
    p.add_argument(
        "--patience",
        type=int,
        help=f"with --from-index: keep the epoch with the best held-out MRR@10 and stop after this many epochs "
        f"without a better one (default {lib['patience']}; 0: never stop early)",
    )
    p.add_argument("--no-video", action="store_true", help="ignore the video column")
    known = ", ".join([*SENTENCE_MODELS, *PRIORS])
    p.add_argument(
        "--prior",
        nargs="?",
        const=DEFAULT_SENTENCE_MODEL,
        metavar="NAME",
        help=f"start the text tower from a pretrained language prior: a sentence model ({DEFAULT_SENTENCE_MODEL}, "
        "the default when --prior is given alone; pip install 'diffgap[sentence]'; or a model directory) or "
        f"a token-embedding table ({DEFAULT_PRIOR}; pip install 'diffgap[prior]'). Known: {known}",
    )
    p.add_argument(
        "--prior-mode",
        choices=sorted({m for modes in PRIOR_MODES.values() for m in modes}),
        help="sentence model: beside (default: the corpus tower as without a prior, and a head over the sentence "
        "model's token states fitted afterwards, weighed more for queries with words the captions never used), "
        "tokens (trained layers over its frozen token states), residual, pooled (its sentence vector through a "
        "trained projection) or dual; table: frozen (default), finetune (the table at a tenth of the LR) or pooled",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=cmd_train, long_running=True)
