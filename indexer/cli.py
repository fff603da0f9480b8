"""diffgap-index: build, update, inspect and search index directories; train encoders and refiners.

Commands act on the index (build, update, info, verify, search) or on another noun with its verbs
(`encoders train`, `refiner train`, `refiner eval`), plus `demo`. Each is a few lines over the
library (`diffgap.pipeline` and below); this module only parses, configures logging once and turns
errors into one line and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from diffgap.diffusion.refiner import RefinerError
from diffgap.encoders import EncoderLoadError
from diffgap.index.layout import IndexStoreError
from diffgap.training.pairs import PairsError
from indexer.commands import demo, encoders, index, refiner
from indexer.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CliError, set_threads, setup_logging

log = logging.getLogger("diffgap.index")

# Spellings of earlier releases, still accepted: old command -> its words today.
RENAMED = {"train-refiner": ("refiner", "train"), "train-encoders": ("encoders", "train"), "eval": ("refiner", "eval")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffgap-index", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the CPUs not busy with other work; 1 on a loaded machine)",
    )
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the command name
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def with_common_flags(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
        """Every (sub)command takes -v/-q, before or after its arguments."""
        original_add = sub.add_parser

        def add_parser(name: str, **kwargs):  # noqa: ANN202 - argparse's own signature
            p = original_add(name, parents=[common], **kwargs)
            original_sub = p.add_subparsers
            p.add_subparsers = lambda **kw: with_common_flags(original_sub(**kw))  # type: ignore[method-assign]
            return p

        sub.add_parser = add_parser  # type: ignore[method-assign]
        return sub

    sub = with_common_flags(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    index.register(sub)
    encoders.register(sub)
    refiner.register(sub)
    demo.register(sub)
    return parser


def renamed(argv: list[str]) -> tuple[list[str], str | None]:
    """argv with an old command spelling replaced by today's, and the notice to log (or None)."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue  # -v / -q before the command
        if arg in RENAMED:
            new = RENAMED[arg]
            return [*argv[:i], *new, *argv[i + 1 :]], f"`{arg}` is now `{' '.join(new)}`; the old spelling still works"
        break
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    argv, notice = renamed(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    if notice:
        log.warning("%s", notice)
    threads = set_threads(args.threads, long_running=getattr(args, "long_running", False))
    log.debug("torch threads: %d", threads)
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
