"""An index directory: manifest.json + FAISS index (stable int64 ids) + SQLite metadata and vectors.

SQLite is the source of truth. Each committed chunk of work (files, their items and vectors) is one
SQLite transaction, so a crash loses at most the chunk in flight and never leaves half a file. The
FAISS file is derived state: `sync_faiss` brings it in line with SQLite (adds missing ids, removes
stale ones, or rebuilds) and replaces it atomically. A reader that finds them out of step (a crash
between the two) sees `verify` report it, and the next build or update repairs it.

Layout:
    manifest.json   format version, encoder spec + fingerprint, dim, metric, index type, counts
    meta.sqlite     files (one row per source file, indexed or skipped) and items (one per window)
    index.faiss     IndexIDMap2 over the configured index type; ids == items.id
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from diffgap.encoders.base import EncoderFingerprint
from diffgap.flat_search import FlatView, is_flat

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE = "meta.sqlite"
FAISS_FILE = "index.faiss"
# Flat indexes only: the same vectors and ids as index.faiss, 64-byte aligned for memory-mapped BLAS
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,          -- relative to the corpus root, '/'-separated
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    status TEXT NOT NULL,           -- 'indexed' | 'skipped'
    reason TEXT,                    -- why it was skipped
    duration REAL,
    sample_rate INTEGER,
    channels INTEGER,
    tags TEXT NOT NULL DEFAULT '{}', -- JSON object
    description TEXT NOT NULL DEFAULT '' -- words from tags and file/folder names
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so ids stay stable across updates
    path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
    start REAL NOT NULL,
    end REAL NOT NULL,
    vector BLOB NOT NULL            -- float32 little-endian, dim values
);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
"""


class IndexStoreError(RuntimeError):
    """The index directory is missing, corrupt or made for another encoder; the message says which."""


@dataclass
class Manifest:
    encoder_spec: str  # how to load the encoders again, e.g. "clap:laion/clap-htsat-unfused"
    fingerprint: dict[str, Any]  # of the audio encoder whose vectors fill the index
    dim: int
    metric: str = "ip"  # inner product over unit vectors == cosine
    index_type: str = "Flat"  # faiss factory string
    window_s: float = 10.0
    hop_s: float = 5.0
    format_version: int = FORMAT_VERSION
    counts: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    corpus_root: str | None = None

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexStoreError(f"cannot read {path}: {exc}") from exc
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexStoreError(f"{path}: format version {data.get('format_version')} is not {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(self.__dict__, indent=2, sort_keys=True).encode())


@dataclass(frozen=True)
class Item:
    id: int
    path: str
    start: float
    end: float
    duration: float | None
    sample_rate: int | None
    tags: dict[str, Any]
    description: str = ""


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a temp file beside `path`, fsync, then os.replace: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def write_faiss_atomic(index: faiss.Index, path: Path) -> None:
    _atomic(path, lambda fh: faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write)))


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    # .npy pads its header, so the data starts 64-byte aligned: what memory-mapped BLAS needs
    _atomic(path, lambda fh: np.save(fh, np.ascontiguousarray(array)))


def new_faiss_index(dim: int, index_type: str) -> faiss.Index:
    """An empty IndexIDMap2 over `index_type` (a faiss factory string: Flat, HNSW32, IVF256,Flat, ...)."""
    base = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIDMap2(base)


class IndexStore:
    """Open with `IndexStore.create(...)` for a new index or `IndexStore.open(dir)` for an existing one."""

    def __init__(self, root: Path, manifest: Manifest, *, readonly: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.readonly = readonly
        uri = f"file:{root / SQLITE}?mode=ro" if readonly else f"file:{root / SQLITE}"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
            for stale in root.glob(".*.tmp"):  # left by a writer killed mid-write; the real file is intact
                stale.unlink(missing_ok=True)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
            if "description" not in columns:  # indexes made before descriptions existed
                self.db.execute("ALTER TABLE files ADD COLUMN description TEXT NOT NULL DEFAULT ''")
        self._faiss: faiss.Index | None = None
        self._flat_view: FlatView | None = None
        self._flat_of: faiss.Index | None = None
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
        # Indexes from before descriptions existed still open read-only (a writer adds the column).
        self._description_sql = "f.description" if "description" in columns else "''"

    # ---- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        encoder_spec: str,
        fingerprint: EncoderFingerprint,
        dim: int,
        index_type: str = "Flat",
        window_s: float = 10.0,
        hop_s: float = 5.0,
        corpus_root: str | None = None,
    ) -> IndexStore:
        """Create a new index, or reopen an existing one after checking it was made by the same encoder."""
        root = Path(root)
        if (root / MANIFEST).exists():
            store = cls.open(root)
            store.check_fingerprint(fingerprint)
            return store
        root.mkdir(parents=True, exist_ok=True)
        new_faiss_index(dim, index_type)  # fail now on a bad factory string, not after encoding
        manifest = Manifest(
            encoder_spec=encoder_spec,
            fingerprint=fingerprint.to_dict(),
            dim=dim,
            index_type=index_type,
            window_s=window_s,
            hop_s=hop_s,
            corpus_root=corpus_root,
        )
        store = cls(root, manifest)
        manifest.save(root / MANIFEST)
        return store

    @classmethod
    def open(cls, root: str | Path, *, readonly: bool = False) -> IndexStore:
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise IndexStoreError(f"{root} is not an index directory (no {MANIFEST})")
        if not (root / SQLITE).is_file():
            raise IndexStoreError(f"{root}: {SQLITE} is missing")
        return cls(root, Manifest.load(root / MANIFEST), readonly=readonly)

    def close(self) -> None:
        if not self.readonly:
            # Leave a self-contained file at rest: a WAL database cannot be read from a read-only
            # mount unless its -shm file exists. Another open connection keeps WAL on; that is fine.
            with contextlib.suppress(sqlite3.OperationalError):
                self.db.execute("PRAGMA journal_mode = DELETE")
        self.db.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_fingerprint(self, fingerprint: EncoderFingerprint) -> None:
        have = EncoderFingerprint.from_dict(self.manifest.fingerprint)
        if have.digest != fingerprint.digest:
            raise IndexStoreError(
                f"{self.root} was built with encoder {have.family}:{have.model_id} (fingerprint {have.digest}); "
                f"the encoder given is {fingerprint.family}:{fingerprint.model_id} (fingerprint "
                f"{fingerprint.digest}). Vectors from different encoders cannot be mixed: use the original "
                "encoder, or build a new index in another directory."
            )

    # ---- files and items -------------------------------------------------------------------------
    def file_state(self) -> dict[str, tuple[str, str]]:
        """path -> (content_hash, status) for every file seen so far."""
        rows = self.db.execute("SELECT path, content_hash, status FROM files")
        return {p: (h, s) for p, h, s in rows}

    def file_stats(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, content_hash): lets an update skip re-hashing unchanged files."""
        return {p: (s, m, h) for p, s, m, h in self.db.execute("SELECT path, size, mtime, content_hash FROM files")}

    def commit_files(self, records: Iterable[FileRecord]) -> int:
        """Write files with their items and vectors in one transaction; returns the number of items added."""
        added = 0
        with self.db:  # one transaction: all of these files land, or none
            for rec in records:
                self.db.execute("DELETE FROM files WHERE path = ?", (rec.path,))  # cascades to old items
                self.db.execute(
                    "INSERT INTO files(path, content_hash, size, mtime, status, reason, duration, sample_rate,"
                    " channels, tags, description) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        rec.path,
                        rec.content_hash,
                        rec.size,
                        rec.mtime,
                        rec.status,
                        rec.reason,
                        rec.duration,
                        rec.sample_rate,
                        rec.channels,
                        json.dumps(rec.tags, sort_keys=True),
                        rec.description,
                    ),
                )
                if rec.vectors is not None:
                    assert rec.vectors.shape == (len(rec.windows), self.manifest.dim), (
                        f"{rec.path}: vectors {rec.vectors.shape} for {len(rec.windows)} windows of dim "
                        f"{self.manifest.dim}"
                    )
                    xb = np.ascontiguousarray(rec.vectors, dtype="<f4")
                    self.db.executemany(
                        "INSERT INTO items(path, start, end, vector) VALUES (?,?,?,?)",
                        [(rec.path, s, e, xb[i].tobytes()) for i, (s, e) in enumerate(rec.windows)],
                    )
                    added += len(rec.windows)
        return added

    def remove_files(self, paths: Iterable[str]) -> int:
        paths = list(paths)
        with self.db:
            before = self.count_items()
            self.db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])
            return before - self.count_items()

    def count_items(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def counts(self) -> dict[str, int]:
        rows = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        return {
            "items": self.count_items(),
            "files_indexed": int(rows.get("indexed", 0)),
            "files_skipped": int(rows.get("skipped", 0)),
        }

    def skipped(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT path, reason FROM files WHERE status='skipped' ORDER BY path").fetchall()

    def items(self, ids: Iterable[int]) -> dict[int, Item]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            "SELECT i.id, i.path, i.start, i.end, f.duration, f.sample_rate, f.tags, "
            f"{self._description_sql} FROM items i JOIN files f ON f.path = i.path WHERE i.id IN ({marks})",
            ids,
        )
        return {r[0]: Item(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7] or "") for r in rows}

    def described_items(self) -> list[tuple[int, str, str]]:
        """(item id, file path, description) of every item whose file has a description."""
        return self.db.execute(
            f"SELECT i.id, i.path, {self._description_sql} AS d FROM items i JOIN files f ON f.path = i.path "
            "WHERE d != '' ORDER BY i.id"
        ).fetchall()

    def item_ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.db.execute("SELECT id FROM items ORDER BY id")), dtype=np.int64)

    def iter_vectors(self, batch: int = 8192, ids: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, xb) in batches, so memory stays flat however large the index is."""
        dim = self.manifest.dim
        if ids is None:
            last = -1
            while True:
                rows = self.db.execute(
                    "SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
                if not rows:
                    return
                last = rows[-1][0]
                yield _unpack(rows, dim)
        else:
            for start in range(0, len(ids), batch):
                chunk = [int(i) for i in ids[start : start + batch]]
                marks = ",".join("?" * len(chunk))
                rows = self.db.execute(
                    f"SELECT id, vector FROM items WHERE id IN ({marks}) ORDER BY id", chunk
                ).fetchall()
                yield _unpack(rows, dim)

    def vectors(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors(ids=ids))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.manifest.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ---- FAISS -----------------------------------------------------------------------------------
    @property
    def faiss_path(self) -> Path:
        return self.root / FAISS_FILE

    def load_faiss(self, *, mmap: bool = False) -> faiss.Index:
        if self._faiss is None:
            if not self.faiss_path.exists():
                self._faiss = new_faiss_index(self.manifest.dim, self.manifest.index_type)
            else:
                # IO_FLAG_MMAP_IFC maps a flat index's vectors (IO_FLAG_MMAP alone still reads them in)
                flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
                try:
                    self._faiss = faiss.read_index(str(self.faiss_path), flags)
                except RuntimeError as exc:
                    raise IndexStoreError(f"{self.faiss_path} is corrupt: {exc}") from exc
        return self._faiss

    def faiss_ids(self) -> np.ndarray:
        index = self.load_faiss()
        return faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, np.int64)

    def sync_faiss(self) -> dict[str, int]:
        """Make index.faiss hold exactly the items in SQLite, then write it atomically."""
        assert not self.readonly, "read-only store"
        try:
            index = self.load_faiss()
            have = self.faiss_ids()
        except IndexStoreError:
            index, have = None, None  # a corrupt file is rebuilt from SQLite
        want = self.item_ids()
        if index is None or have is None or not index.is_trained or len(np.unique(have)) != len(have):
            index, added, removed = self._rebuild(want), len(want), 0
        else:
            stale = np.setdiff1d(have, want)
            missing = np.setdiff1d(want, have)
            removed = len(stale)
            if len(stale):
                try:
                    index.remove_ids(faiss.IDSelectorBatch(stale))
                except RuntimeError:  # HNSW and friends cannot remove: rebuild instead
                    index = self._rebuild(want)
                    missing = np.zeros(0, np.int64)
            for xids, xb in self.iter_vectors(ids=missing):
                index.add_with_ids(xb, xids)
            added = len(missing)
        assert index.ntotal == len(want), f"faiss has {index.ntotal} vectors, SQLite {len(want)} items"
        if is_flat(index):  # written first: a reader trusts them only if their ids match index.faiss
            view = FlatView(index)
            save_npy_atomic(view.xb, self.root / VECTORS_FILE)
            save_npy_atomic(view.ids, self.root / IDS_FILE)
        else:
            for stale in (VECTORS_FILE, IDS_FILE):
                (self.root / stale).unlink(missing_ok=True)
        write_faiss_atomic(index, self.faiss_path)
        self._faiss = index
        self.manifest.counts = self.counts()
        self.manifest.updated_at = time.time()
        self.manifest.save(self.root / MANIFEST)
        return {"added": added, "removed": removed, "total": int(index.ntotal)}

    def _rebuild(self, ids: np.ndarray) -> faiss.Index:
        index = new_faiss_index(self.manifest.dim, self.manifest.index_type)
        if not index.is_trained:
            index.train(self._training_sample(ids))
        for xids, xb in self.iter_vectors(ids=ids):
            index.add_with_ids(xb, xids)
        return index

    def _training_sample(self, ids: np.ndarray, max_n: int = 100_000, seed: int = 0) -> np.ndarray:
        assert len(ids) > 0, f"index type {self.manifest.index_type} needs training vectors, and there are none"
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(ids, size=min(max_n, len(ids)), replace=False))
        return self.vectors(sample)[1]

    def verify(self) -> list[str]:
        """Problems found (empty when healthy): SQLite integrity, FAISS vs SQLite ids, vector sanity."""
        problems: list[str] = []
        if self.db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("SQLite integrity check failed")
        try:
            have = self.faiss_ids() if self.faiss_path.exists() else None
        except IndexStoreError as exc:
            problems.append(str(exc))
            have = None
        want = self.item_ids()
        if have is None and len(want):
            problems.append(f"{FAISS_FILE} is missing or unreadable but SQLite has {len(want)} items")
        elif have is not None:
            if len(np.unique(have)) != len(have):
                problems.append(f"{FAISS_FILE} has duplicate ids")
            if not np.array_equal(np.sort(have), want):
                problems.append(
                    f"{FAISS_FILE} holds {len(have)} ids, SQLite {len(want)} items: out of step "
                    "(run `diffgap-index update` to repair)"
                )
        for _, xb in self.iter_vectors():
            norms = np.linalg.norm(xb, axis=1)
            if not np.isfinite(xb).all() or np.abs(norms - 1).max(initial=0) > 1e-3:
                problems.append("some stored vectors are not finite unit vectors")
                break
        orphans = self.db.execute(
            "SELECT COUNT(*) FROM items i LEFT JOIN files f ON f.path = i.path WHERE f.path IS NULL"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} items have no file row")
        return problems

    def _open_flat_view(self, index: faiss.Index) -> FlatView:
        """The aligned, memory-mapped vectors.npy when it matches index.faiss, else a view into FAISS."""
        view = FlatView(index)
        try:
            ids = np.load(self.root / IDS_FILE, mmap_mode="r")
            xb = np.load(self.root / VECTORS_FILE, mmap_mode="r")
        except (OSError, ValueError):
            return view
        if xb.shape == view.xb.shape and xb.dtype == np.float32 and np.array_equal(ids, view.ids):
            return FlatView.from_arrays(np.asarray(ids), xb)
        return view  # stale (a writer died between the two files): FAISS is the truth

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row; ids are -1 where fewer than k items exist."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        assert xq.ndim == 2 and xq.shape[1] == self.manifest.dim, f"query shape {xq.shape}, dim {self.manifest.dim}"
        index = self.load_faiss()
        if is_flat(index):  # by matmul + top-k: diffgap/flat_search.py says why
            view = self._flat_view
            if view is None or view.ntotal != index.ntotal or self._flat_of is not index:
                view, self._flat_of = self._open_flat_view(index), index
                self._flat_view = view
            return view.search(xq, k)
        return index.search(xq, k)


@dataclass
class FileRecord:
    """Everything the indexer learned about one source file, ready to commit."""

    path: str
    content_hash: str
    size: int
    mtime: float
    status: str
    reason: str | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    windows: list[tuple[float, float]] = field(default_factory=list)
    vectors: np.ndarray | None = None


def _unpack(rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    xb = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
    return ids, xb.astype(np.float32)
