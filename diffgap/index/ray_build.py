"""Index building on Ray: decode + encode spread over a cluster, embedding shards, then the index.

The expensive part of indexing (decoding and encoding audio) is embarrassingly parallel; the cheap
part (committing rows, building FAISS) is best done once, in one place. So:

1. `ray.data` takes the list of files to (re)index and runs `EncodeFiles` actors over it, each
   loading the encoder once and doing what the local indexer does per file (hash, decode, cut into
   windows, encode); bad files come back as skipped rows with their reason, never as crashes.
2. The rows are written as Parquet shards into `shard_dir` (one row per file, vectors as float32
   bytes): the portable product of the cluster's work, readable by anything.
3. The driver commits the shards into the index store (SQLite, one transaction per shard: a killed
   driver resumes where it stopped), then `sync_faiss` builds the FAISS index - for IVF/PQ types
   trained on a sample of the vectors, then filled with all of them.

Locally, `address=None` starts a Ray instance on this machine with the same code path; on a
cluster, pass its address ("auto" on a cluster node, or "ray://head:10001") and make the corpus
and the encoder directory visible to every node at the same paths (a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.index.build import BuildReport, PrepareTask, SourceFile, encode_records, prepare_file
from diffgap.index.faiss_sync import sync_faiss
from diffgap.index.store import FileRecord, IndexStore

log = logging.getLogger(__name__)


class EncodeFiles:
    """A Ray Data callable class: one encoder per actor, a batch of files per call."""

    def __init__(self, encoder_spec: str, window_s: float, hop_s: float, max_seconds: float | None, batch: int):
        from diffgap.encoders import load_encoders

        self.encoder = load_encoders(encoder_spec, need_text=False).audio
        self.window_s, self.hop_s, self.max_seconds, self.batch = window_s, hop_s, max_seconds, batch

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        prepared = []
        for path, rel, size, mtime, known in zip(
            rows["path"], rows["rel"], rows["size"], rows["mtime"], rows["known_hash"], strict=True
        ):
            source = SourceFile(Path(str(path)), str(rel), int(size), float(mtime))
            task = PrepareTask(
                source,
                str(known) or None,
                self.encoder.sample_rate,
                min(self.window_s, self.encoder.max_seconds),
                min(self.hop_s, self.window_s, self.encoder.max_seconds),
                self.max_seconds,
            )
            prepared.append(prepare_file(task))
        encode_records(self.encoder, [p for p in prepared if not p.unchanged], self.batch)
        return _to_columns([p.record for p in prepared if not p.unchanged])


_COLUMNS = ("path", "content_hash", "size", "mtime", "status", "reason", "duration", "sample_rate", "channels",
            "tags", "description", "windows", "vectors")  # fmt: skip


def _to_columns(records: Sequence[FileRecord]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
    for r in records:
        out["path"].append(r.path)
        out["content_hash"].append(r.content_hash)
        out["size"].append(r.size)
        out["mtime"].append(r.mtime)
        out["status"].append(r.status)
        out["reason"].append(r.reason or "")
        out["duration"].append(r.duration if r.duration is not None else float("nan"))
        out["sample_rate"].append(r.sample_rate or 0)
        out["channels"].append(r.channels or 0)
        out["tags"].append(json.dumps(r.tags, sort_keys=True))
        out["description"].append(r.description)
        out["windows"].append(json.dumps(r.windows))
        out["vectors"].append(b"" if r.vectors is None else np.ascontiguousarray(r.vectors, "<f4").tobytes())
    return out


def _from_row(row: dict[str, Any], dim: int) -> FileRecord:
    windows = [tuple(w) for w in json.loads(row["windows"])]
    vectors = np.frombuffer(row["vectors"], "<f4").reshape(-1, dim).astype(np.float32) if row["vectors"] else None
    assert vectors is None or len(vectors) == len(windows), f"{row['path']}: {len(windows)} windows, vectors differ"
    duration = row["duration"]
    return FileRecord(
        path=row["path"],
        content_hash=row["content_hash"],
        size=int(row["size"]),
        mtime=float(row["mtime"]),
        status=row["status"],
        reason=row["reason"] or None,
        duration=None if duration != duration else float(duration),  # NaN marks "unknown"
        sample_rate=int(row["sample_rate"]) or None,
        channels=int(row["channels"]) or None,
        tags=json.loads(row["tags"]),
        description=row["description"],
        windows=windows,  # type: ignore[arg-type]
        vectors=vectors,
    )


def encode_to_shards(
    files: Sequence[SourceFile],
    known_hashes: dict[str, str],
    shard_dir: Path,
    encoder_spec: str,
    *,
    window_s: float,
    hop_s: float,
    max_file_seconds: float | None,
    num_actors: int = 2,
    files_per_batch: int = 16,
    encode_batch: int = 32,
    address: str | None = None,
) -> list[Path]:
    """Steps 1-2: run the actors over `files` and write Parquet shards; returns the shard paths."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ValueError("the Ray path needs Ray: pip install 'diffgap[ray]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
    items = [
        {"path": str(f.path), "rel": f.rel, "size": f.size, "mtime": f.mtime, "known_hash": known_hashes.get(f.rel, "")}
        for f in files
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * num_actors)))
    ds = ds.map_batches(
        EncodeFiles,
        fn_constructor_kwargs={
            "encoder_spec": encoder_spec,
            "window_s": window_s,
            "hop_s": hop_s,
            "max_seconds": max_file_seconds,
            "batch": encode_batch,
        },
        batch_size=files_per_batch,
        concurrency=num_actors,
        num_cpus=1,
    )
    shard_dir.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(shard_dir))
    return sorted(shard_dir.glob("*.parquet"))


def commit_shards(store: IndexStore, shards: Sequence[Path]) -> BuildReport:
    """Step 3: shards -> SQLite (a transaction per shard), then the FAISS index from all vectors."""
    import pyarrow.parquet as pq

    report = BuildReport()
    for shard in shards:
        table = pq.read_table(shard)
        records = [_from_row(row, store.manifest.dim) for row in table.to_pylist()]
        report.items_added += store.commit_files(records)
        report.files_seen += len(records)
        report.files_indexed += sum(r.status == "indexed" for r in records)
        report.skipped += [(r.path, r.reason or "unknown") for r in records if r.status == "skipped"]
    sync_faiss(store)
    report.total_items = store.count_items()
    return report


def build_index_ray(
    store: IndexStore,
    encoder_spec: str,
    files: Sequence[SourceFile],
    shard_dir: str | Path,
    *,
    num_actors: int = 2,
    remove_missing: bool = False,
    max_file_seconds: float | None = 4 * 3600.0,
    address: str | None = None,
) -> BuildReport:
    """The whole Ray path; the result matches `indexing.build_index` on the same files."""
    t0 = time.perf_counter()
    shard_dir = Path(shard_dir)
    for old in shard_dir.glob("*.parquet"):  # shards of an earlier run were committed or are stale
        old.unlink()
    state = store.file_state()
    removed_files = removed_items = 0
    if remove_missing:
        present = {f.rel for f in files}
        gone = [p for p in state if p not in present]
        removed_items, removed_files = (store.remove_files(gone), len(gone)) if gone else (0, 0)
    known = {path: digest for path, (digest, _) in state.items()}
    shards = encode_to_shards(
        files,
        known,
        shard_dir,
        encoder_spec,
        window_s=store.manifest.window_s,
        hop_s=store.manifest.hop_s,
        max_file_seconds=max_file_seconds,
        num_actors=num_actors,
        address=address,
    )
    log.info("%d embedding shards in %s; committing", len(shards), shard_dir)
    report = commit_shards(store, shards)
    report.files_unchanged = len(files) - report.files_seen
    report.files_seen = len(files)
    report.files_removed, report.items_removed = removed_files, removed_items
    report.seconds = time.perf_counter() - t0
    return report
