"""What every command of `diffgap-index` shares: exit codes, the one-line error, progress bars that
step aside for logs, and argument types."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffgap.pipeline import ProgressFactory, Step

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(RuntimeError):
    """Reported as one line on stderr with a non-zero exit, never as a traceback."""


def progress_bars(quiet: bool) -> ProgressFactory:
    """tqdm bars (none with -q, or when stderr is not a terminal), with log lines printed above them."""

    @contextlib.contextmanager
    def factory(total: int | None, unit: str, desc: str) -> Iterator[Step]:
        with (
            logging_redirect_tqdm(),
            tqdm(total=total, unit=unit, desc=desc, disable=quiet or None, dynamic_ncols=True) as bar,
        ):
            yield bar.update

    return factory


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def step_counts(text: str) -> tuple[int, ...]:
    """argparse type: DDIM step counts, one ("5") or several ("5,20,50"), each 1 to 1000."""
    try:
        counts = tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected step counts like 5 or 5,20,50, got {text!r}") from exc
    if not counts or any(not 1 <= c <= 1000 for c in counts):
        raise argparse.ArgumentTypeError(f"step counts must be 1 to 1000, got {text!r}")
    return counts


def step_count(text: str) -> int:
    """argparse type: one DDIM step count, validated as `step_counts` is."""
    counts = step_counts(text)
    if len(counts) != 1:
        raise argparse.ArgumentTypeError(f"this command takes one step count, got {text!r}")
    return counts[0]
