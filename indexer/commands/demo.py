"""`demo`: the whole offline pipeline on a generated corpus, resumable step by step."""

from __future__ import annotations

import argparse

from diffgap.pipeline import DemoConfig, run_demo
from indexer.common import EXIT_OK, progress_bars


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        clips=args.clips,
        epochs=args.epochs,
        refiner_iterations=args.refiner_iterations,
        compact=args.compact,
        num_jobs=args.num_jobs,
        seed=args.seed,
    )
    run_demo(args.workdir, cfg, progress_bars(args.quiet))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    p = sub.add_parser("demo", help="generate a demo corpus, train what is needed, build and refine an index")
    p.add_argument("--workdir", default="demo", help="where the corpus, encoders and index go")
    p.add_argument("--clips", type=int, default=defaults.clips)
    p.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="compact encoder epochs (see README for the time)"
    )
    p.add_argument("--refiner-iterations", type=int, default=defaults.refiner_iterations)
    p.add_argument("--compact", action="store_true", help="use compact encoders even if CLAP weights exist")
    p.add_argument("-j", "--num-jobs", type=int, default=defaults.num_jobs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=cmd_demo, long_running=True)
