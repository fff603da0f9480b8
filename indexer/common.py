"""What every command of `diffgap-index` shares: exit codes, the one-line error, progress bars that
step aside for logs, and argument types."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffgap.index.vectors import MAX_EFFORT
from diffgap.pipeline import ProgressFactory, Step

log = logging.getLogger("diffgap.progress")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(RuntimeError):
    """Reported as one line on stderr with a non-zero exit, never as a traceback."""


PROGRESS_EVERY_S = 30.0  # a progress line at most this often when stderr is not a terminal


def progress_bars(quiet: bool) -> ProgressFactory:
    """tqdm bars on a terminal, with log lines printed above them; elsewhere (a log file, CI, a
    container) a progress line every PROGRESS_EVERY_S seconds; nothing with -q."""

    @contextlib.contextmanager
    def factory(total: int | None, unit: str, desc: str) -> Iterator[Step]:
        if quiet or not sys.stderr.isatty():
            yield progress_lines(total, unit, desc) if not quiet else (lambda n: None)
            return
        with logging_redirect_tqdm(), tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True) as bar:
            yield bar.update

    return factory


def progress_lines(total: int | None, unit: str, desc: str, every_s: float = PROGRESS_EVERY_S) -> Step:
    """A `step(n)` that logs '<desc>: done/total unit (rate)' at most every `every_s` seconds."""
    start = last = time.monotonic()
    done = 0

    def step(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= every_s or (total is not None and done == total and done > n):
            last = now
            rate = done / max(now - start, 1e-9)
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s (%.1f %s/s)", desc, done, of, unit, rate, unit)

    return step


def set_threads(threads: int | None, long_running: bool = False) -> int:
    """Compute threads: as asked, else the CPUs not busy with other work (`free_cpus`, measured now for
    a command that trains or encodes a corpus, from the load average for one that answers at once)."""
    from diffgap.resources import available_cpus, free_cpus, set_compute_threads

    n = max(1, min(threads, available_cpus()) if threads else free_cpus(sample=long_running))
    set_compute_threads(n)
    return n


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


def search_effort(text: str) -> int:
    """argparse type: an approximate index's search effort, 1 to MAX_EFFORT."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if not 1 <= value <= MAX_EFFORT:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_EFFORT}, got {text}")
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
