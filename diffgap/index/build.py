"""Corpus scanning and the resumable, incremental build of an index directory.

Work moves in chunks of files: worker processes hash and decode one chunk while the main process
encodes the previous one; each finished chunk is committed to SQLite in one transaction. A crash or
Ctrl-C therefore loses only uncommitted chunks, and a rerun picks up every file whose content hash
is not yet recorded, so nothing is indexed twice and nothing is dropped.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.encoders.base import AudioEncoder, file_sha256
from diffgap.index.faiss_sync import sync_faiss
from diffgap.index.store import FileRecord, IndexStore
from diffgap.media.audio import (
    AUDIO_EXTENSIONS,
    UNDECODABLE_AUDIO,
    VIDEO_EXTENSIONS,
    AudioDecodeError,
    cut_window,
    decode_audio,
    window_bounds,
)
from diffgap.media.tags import describe, read_tags

log = logging.getLogger(__name__)

INDEXABLE_EXTENSIONS = AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
# What a scan picks up: every file we can index, and sound files we cannot (skipped with a reason).
SCANNED_EXTENSIONS = INDEXABLE_EXTENSIONS | frozenset(UNDECODABLE_AUDIO)


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute
    rel: str  # relative to the corpus root, '/'-separated: the key in the index
    size: int
    mtime: float


def scan_folder(
    root: str | Path, extensions: frozenset[str] = SCANNED_EXTENSIONS, exclude: Sequence[str] = ()
) -> list[SourceFile]:
    """Every file under `root` with a media extension, sorted; hidden files and folders, and paths
    matching an `exclude` glob (relative to the root, e.g. 'music/*' or '*_desc*.ogg'), are left out."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist")
    found: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if is_excluded(rel, exclude):
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # vanished or a broken symlink
            found.append(SourceFile(path, rel, st.st_size, st.st_mtime))
    return found


def is_excluded(rel: str, patterns: Sequence[str]) -> bool:
    """fnmatch globs against the '/'-separated relative path ('*' crosses folders); a pattern also
    excludes everything below a folder it names ('music' or 'music/')."""
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel, p.rstrip("/") + "/*") for p in patterns)


def scan_list(csv_path: str | Path, column: str = "audio", split: str | None = None) -> tuple[Path, list[SourceFile]]:
    """Files named in a CSV column (paths relative to the CSV), optionally only rows of one `split`.

    Returns the root the paths are relative to, and the files."""
    csv_path = Path(csv_path).resolve()
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{csv_path}: no {column!r} column (columns: {reader.fieldnames})")
        if split is not None and "split" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: a split was asked for but there is no 'split' column")
        rels = sorted(
            {
                row[column].strip()
                for row in reader
                if row.get(column, "").strip() and (split is None or row.get("split") == split)
            }
        )
    found = []
    for rel in rels:
        path = (root / rel).resolve()
        st = path.stat() if path.is_file() else None
        found.append(SourceFile(path, Path(rel).as_posix(), st.st_size if st else 0, st.st_mtime if st else 0.0))
    return root, found


def content_hash(path: Path) -> str:
    """What identifies a file's content in the index (equal hashes: duplicates)."""
    return file_sha256(path, 1 << 20)


@dataclass(frozen=True)
class PrepareTask:
    source: SourceFile
    known_hash: str | None  # skip decoding when the content is unchanged
    sample_rate: int
    window_s: float
    hop_s: float
    max_seconds: float | None = None  # longer recordings are indexed up to here (memory stays bounded)


@dataclass
class Prepared:
    record: FileRecord
    waves: list[np.ndarray] = field(default_factory=list)  # one per window
    unchanged: bool = False


def prepare_file(task: PrepareTask) -> Prepared:
    """Hash, decode and cut one file (runs in a worker process). Never raises for bad media."""
    src = task.source
    try:
        digest = content_hash(src.path)
    except OSError as exc:
        return Prepared(FileRecord(src.rel, "", src.size, src.mtime, "skipped", f"unreadable: {exc.strerror}"))
    if digest == task.known_hash:
        return Prepared(FileRecord(src.rel, digest, src.size, src.mtime, "unchanged"), unchanged=True)
    record = FileRecord(src.rel, digest, src.size, src.mtime, "skipped")
    suffix = src.path.suffix.lower()
    if suffix not in INDEXABLE_EXTENSIONS:
        record.reason = UNDECODABLE_AUDIO.get(suffix, f"unsupported extension {src.path.suffix!r}")
        return Prepared(record)
    try:
        audio = decode_audio(src.path, task.sample_rate, max_seconds=task.max_seconds)
    except AudioDecodeError as exc:
        record.reason = str(exc)
        return Prepared(record)
    except Exception as exc:  # a decoder bug on one file must not end the build
        record.reason = f"decoder error: {exc.__class__.__name__}: {exc}"
        return Prepared(record)
    record.status = "indexed"
    record.duration = round(audio.duration, 6)
    record.sample_rate = audio.source_rate
    record.channels = audio.source_channels
    record.tags = read_tags(src.path)
    if task.max_seconds is not None and audio.duration >= task.max_seconds - 1e-3:
        record.tags["diffgap_truncated_at_s"] = f"{task.max_seconds:g}"
    record.description = describe(src.rel, record.tags)
    record.windows = window_bounds(audio.duration, task.window_s, task.hop_s)
    waves = [cut_window(audio.wave, audio.sample_rate, s, e) for s, e in record.windows]
    return Prepared(record, waves)


@dataclass
class BuildReport:
    files_seen: int = 0
    files_indexed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    items_added: int = 0
    items_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    total_items: int = 0

    def summary(self) -> str:
        lines = [
            f"indexed {self.files_indexed} files ({self.items_added} items), unchanged {self.files_unchanged}, "
            f"removed {self.files_removed} ({self.items_removed} items), skipped {len(self.skipped)}; "
            f"index now holds {self.total_items} items; {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        if self.interrupted:
            lines.append("interrupted: committed work is kept; run the same command again to resume")
        return "\n".join(lines)


ProgressFn = Callable[[int], None]


def build_index(
    store: IndexStore,
    encoder: AudioEncoder,
    files: Sequence[SourceFile],
    *,
    num_jobs: int = 1,
    batch_size: int = 32,
    chunk_files: int = 32,
    remove_missing: bool = False,
    progress: ProgressFn | None = None,
    file_timeout: float | None = 120.0,
    max_file_seconds: float | None = 4 * 3600.0,
) -> BuildReport:
    """Bring `store` in line with `files`: add new and changed files, optionally drop vanished ones."""
    t0 = time.perf_counter()
    report = BuildReport(files_seen=len(files))
    state = store.file_state()
    if remove_missing:
        present = {f.rel for f in files}
        gone = [p for p in state if p not in present]
        if gone:
            report.items_removed += store.remove_files(gone)
            report.files_removed = len(gone)
            log.info("removed %d files no longer in the corpus", len(gone))
    window_s = min(store.manifest.window_s, encoder.max_seconds)
    hop_s = min(store.manifest.hop_s, window_s)
    tasks = [
        PrepareTask(
            f, state[f.rel][0] if f.rel in state else None, encoder.sample_rate, window_s, hop_s, max_file_seconds
        )
        for f in files
    ]
    try:
        for chunk in _prepared_chunks(tasks, num_jobs, chunk_files, file_timeout):
            records = []
            for prepared in chunk:
                if prepared.unchanged:
                    report.files_unchanged += 1
                    continue
                records.append(prepared)
                if prepared.record.status == "skipped":
                    report.skipped.append((prepared.record.path, prepared.record.reason or "unknown"))
                    log.warning("skipped %s: %s", prepared.record.path, prepared.record.reason)
            encode_records(encoder, records, batch_size, store.manifest.segments)
            report.items_added += store.commit_files(p.record for p in records)
            report.files_indexed += sum(p.record.status == "indexed" for p in records)
            if progress:
                progress(len(chunk))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        sync_faiss(store)
        report.total_items = store.count_items()
        report.seconds = time.perf_counter() - t0
    return report


def encode_records(encoder: AudioEncoder, records: list[Prepared], batch_size: int, segments: int = 0) -> None:
    """Each record's window vectors and, with `segments` > 0, each window's time spans from the same pass."""
    waves = [(i, w) for i, p in enumerate(records) for w in p.waves]
    if not waves:
        return
    # Similar lengths side by side waste less padding.
    order = sorted(range(len(waves)), key=lambda j: len(waves[j][1]))
    vectors = np.zeros((len(waves), encoder.dim), np.float32)
    spans = np.zeros((len(waves), segments, encoder.dim), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [waves[j][1] for j in idx]
        if segments:
            vectors[idx], spans[idx] = encoder.encode_with_segments(batch, segments)
        else:
            vectors[idx] = encoder.encode(batch)
    offset = 0
    for p in records:
        n = len(p.waves)
        if n:
            p.record.vectors = vectors[offset : offset + n]
            p.record.segments = spans[offset : offset + n] if segments else None
        offset += n
        p.waves = []  # free the audio as soon as it is encoded


def _prepared_chunks(
    tasks: list[PrepareTask], num_jobs: int, chunk_files: int, file_timeout: float | None = None
) -> Iterator[list[Prepared]]:
    """Decode chunk i+1 in workers while the caller encodes chunk i; a file that takes longer than
    `file_timeout` seconds (a hung decoder, a FIFO, a dead network mount) is skipped and its
    worker pool replaced, and the chunk's unfinished files are retried on the new pool."""
    chunks = [tasks[i : i + chunk_files] for i in range(0, len(tasks), chunk_files)]
    if num_jobs <= 1 and not file_timeout:
        for chunk in chunks:
            yield [prepare_file(t) for t in chunk]
        return
    workers = _Workers(max(1, num_jobs))
    try:
        submitted = workers.submit(chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            current = submitted
            submitted = workers.submit(chunks[i + 1]) if i + 1 < len(chunks) else None
            results, restarted = workers.collect(chunk, current, file_timeout)
            if restarted and submitted is not None:
                submitted = workers.submit(chunks[i + 1])  # the prefetched work died with the old pool
            yield results
    finally:
        workers.close()


class _Workers:
    """A fork pool that can be thrown away when one of its workers hangs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.generation = 0
        self.pool = mp.get_context("fork").Pool(n)  # fork: cheap start; workers touch PyAV and numpy only

    def submit(self, chunk: list[PrepareTask]) -> tuple[int, list[Any]]:
        return self.generation, [self.pool.apply_async(prepare_file, (t,)) for t in chunk]

    def restart(self) -> None:
        self.pool.terminate()
        self.pool.join()
        self.pool = mp.get_context("fork").Pool(self.n)
        self.generation += 1

    def collect(
        self, chunk: list[PrepareTask], submitted: tuple[int, list[Any]] | None, timeout: float | None
    ) -> tuple[list[Prepared], bool]:
        results: list[Prepared | None] = [None] * len(chunk)
        restarted = False
        todo = list(range(len(chunk)))
        handles = dict(enumerate(submitted[1])) if submitted and submitted[0] == self.generation else {}
        while todo:
            handles = handles or {i: self.pool.apply_async(prepare_file, (chunk[i],)) for i in todo}
            hung = None
            for i in todo:
                try:
                    results[i] = handles[i].get(timeout)
                except mp.TimeoutError:
                    hung = i
                    break
            if hung is None:
                break
            src = chunk[hung].source
            log.warning("%s: gave up after %.0f s", src.rel, timeout)
            results[hung] = Prepared(
                FileRecord(src.rel, "", src.size, src.mtime, "skipped", f"timed out after {timeout:.0f} s")
            )
            for j in todo:  # keep what finished meanwhile
                if results[j] is None and handles[j].ready():
                    results[j] = handles[j].get()
            self.restart()
            restarted = True
            todo = [j for j in todo if results[j] is None]
            handles = {}
        return [r for r in results if r is not None], restarted

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
