"""The catalogue of an index directory: SQLite rows for files and items (the source of truth), with
their lifecycle (create, open, migrate, close) and `verify`.

Each committed chunk of work (files, their items and vectors) is one SQLite transaction, so a crash
loses at most the chunk in flight and never leaves half a file. The FAISS file is derived state,
brought in line by `diffgap.index.faiss_sync.sync_faiss`; a reader that finds the two out of step
(a crash between them) sees `verify` report it, and the next build or update repairs it. What the
directory holds, by name, is in `diffgap.index.layout`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.atomic import remove_stale_temps
from diffgap.encoders.base import EncoderFingerprint
from diffgap.index.ann import resolve_index_type
from diffgap.index.layout import (
    DEFAULT_HOP_S,
    DEFAULT_INDEX_TYPE,
    DEFAULT_WINDOW_S,
    FAISS_FILE,
    FTS_SCHEMA,
    FTS_TABLE,
    FTS_WEIGHTS,
    MANIFEST,
    MEANING_SCHEMA,
    MEANING_TABLE,
    OLD_FTS_TABLES,
    SCHEMA,
    SEGMENTS_SCHEMA,
    SEGMENTS_TABLE,
    SQLITE,
    IndexStoreError,
    Manifest,
)
from diffgap.index.vectors import VectorIndex, new_faiss_index, read_faiss
from diffgap.media.tags import search_fields


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
    content_hash: str = ""  # files with equal hashes hold the same bytes: duplicates


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
            remove_stale_temps(root)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
            if "description" not in columns:  # indexes made before descriptions existed
                self.db.execute("ALTER TABLE files ADD COLUMN description TEXT NOT NULL DEFAULT ''")
            self._migrate_fts()
            self.db.executescript(MEANING_SCHEMA)
            self.db.executescript(SEGMENTS_SCHEMA)  # indexes made before time spans get the (empty) table
        self._vectors: VectorIndex | None = None
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(files)")}
        # Indexes from before descriptions existed still open read-only (a writer adds the column).
        self._description_sql = "f.description" if "description" in columns else "''"
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.has_lexical = FTS_TABLE in tables  # indexes from before full-text search open without it
        self.has_meaning = MEANING_TABLE in tables and self.manifest.meaning is not None
        self.has_segments = SEGMENTS_TABLE in tables and self.manifest.segments > 0

    def _migrate_fts(self) -> None:
        """Create the full-text table, and fill it for indexes made before it existed."""
        with self.db:
            for old in OLD_FTS_TABLES:
                self.db.execute(f"DROP TABLE IF EXISTS {old}")
            self.db.executescript(FTS_SCHEMA)
            if self.db.execute(f"SELECT COUNT(*) FROM {FTS_TABLE}").fetchone()[0]:
                return
            rows = self.db.execute("SELECT rowid, path, tags FROM files WHERE status = 'indexed'").fetchall()
            for rowid, path, tags in rows:
                self._index_words(rowid, path, json.loads(tags))

    def _index_words(self, rowid: int, path: str, tags: dict[str, Any]) -> None:
        self.db.execute(f"INSERT INTO {FTS_TABLE}(rowid, path, name, tags, folders) VALUES (?,?,?,?,?)",
                        (rowid, path, *search_fields(path, tags)))  # fmt: skip

    def _delete_file(self, path: str) -> None:
        """The file's row (its items cascade) and its words, by key."""
        row = self.db.execute("SELECT rowid FROM files WHERE path = ?", (path,)).fetchone()
        if row is not None:
            self.db.execute(f"DELETE FROM {FTS_TABLE} WHERE rowid = ?", row)
            self.db.execute(f"DELETE FROM {MEANING_TABLE} WHERE file_rowid = ?", row)
            self.db.execute("DELETE FROM files WHERE rowid = ?", row)

    # ---- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        encoder_spec: str,
        fingerprint: EncoderFingerprint,
        dim: int,
        index_type: str | None = None,
        window_s: float | None = None,
        hop_s: float | None = None,
        corpus_root: str | None = None,
        segments: int = 0,
    ) -> IndexStore:
        """Create a new index, or reopen an existing one (a build resumes) after checking it was made by
        the same encoder. Settings left None take the defaults for a new index and the index's own
        for an existing one; one given that differs from the existing index's is refused. `segments`:
        time spans to keep per window (a new index only; an existing one keeps what it has)."""
        root = Path(root)
        if (root / MANIFEST).exists():
            store = cls.open(root)
            try:
                store.check_fingerprint(fingerprint)
                store._check_settings(index_type=index_type, window_s=window_s, hop_s=hop_s)
            except IndexStoreError:
                store.close()
                raise
            return store
        index_type = index_type or DEFAULT_INDEX_TYPE
        root.mkdir(parents=True, exist_ok=True)
        new_faiss_index(dim, resolve_index_type(index_type, 0, dim))  # a bad factory string fails before encoding
        manifest = Manifest(
            encoder_spec=encoder_spec,
            fingerprint=fingerprint.to_dict(),
            dim=dim,
            index_type=index_type,
            window_s=DEFAULT_WINDOW_S if window_s is None else window_s,
            hop_s=DEFAULT_HOP_S if hop_s is None else hop_s,
            corpus_root=corpus_root,
            segments=segments,
        )
        store = cls(root, manifest)
        manifest.save(root / MANIFEST)
        return store

    def _check_settings(self, **given: Any) -> None:
        m = self.manifest
        have = {"index_type": m.index_type, "window_s": m.window_s, "hop_s": m.hop_s}
        differ = [f"{k} {v!r} (the index has {have[k]!r})" for k, v in given.items() if v is not None and v != have[k]]
        if differ:
            raise IndexStoreError(
                f"{self.root} already exists with other settings: {', '.join(differ)}. Resume it without "
                "those options, or build the new settings into another directory."
            )

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

    def content_hash_of(self, path: str) -> str | None:
        """The sha256 recorded for an indexed file (None when it is not indexed)."""
        sql = "SELECT content_hash FROM files WHERE path = ? AND status = 'indexed'"
        row = self.db.execute(sql, (path,)).fetchone()
        return row[0] if row else None

    def file_stats(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, content_hash): lets an update skip re-hashing unchanged files."""
        return {p: (s, m, h) for p, s, m, h in self.db.execute("SELECT path, size, mtime, content_hash FROM files")}

    def commit_files(self, records: Iterable[FileRecord]) -> int:
        """Write files with their items and vectors in one transaction; returns the number of items added."""
        added = 0
        with self.db:  # one transaction: all of these files land, or none
            for rec in records:
                self._delete_file(rec.path)  # a changed file: its old items and words go
                cursor = self.db.execute(
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
                if rec.status == "indexed":
                    self._index_words(cursor.lastrowid, rec.path, rec.tags)
                if rec.vectors is not None:
                    assert rec.vectors.shape == (len(rec.windows), self.manifest.dim), (
                        f"{rec.path}: vectors {rec.vectors.shape} for {len(rec.windows)} windows of dim "
                        f"{self.manifest.dim}"
                    )
                    xb = np.ascontiguousarray(rec.vectors, dtype="<f4")
                    if rec.segments is not None and self.has_segments:
                        want = (len(rec.windows), self.manifest.segments, self.manifest.dim)
                        assert rec.segments.shape == want, f"{rec.path}: spans {rec.segments.shape}, not {want}"
                        spans = np.ascontiguousarray(rec.segments, dtype="<f2")
                        for i, (s, e) in enumerate(rec.windows):  # one at a time: each span row needs its item's id
                            row = self.db.execute(
                                "INSERT INTO items(path, start, end, vector) VALUES (?,?,?,?)",
                                (rec.path, s, e, xb[i].tobytes()),
                            )
                            self.db.execute(
                                f"INSERT INTO {SEGMENTS_TABLE}(id, spans) VALUES (?,?)",
                                (row.lastrowid, spans[i].tobytes()),
                            )
                    else:
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
            for path in paths:
                self._delete_file(path)
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
            f"{self._description_sql}, f.content_hash FROM items i JOIN files f ON f.path = i.path "
            f"WHERE i.id IN ({marks})",
            ids,
        )
        return {r[0]: Item(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7] or "", r[8]) for r in rows}

    def item_ids_of(self, paths: Iterable[str]) -> dict[str, list[int]]:
        """path -> ids of its items (windows), for the given files."""
        paths = list(paths)
        out: dict[str, list[int]] = {}
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for path, item_id in self.db.execute(
                f"SELECT path, id FROM items WHERE path IN ({marks}) ORDER BY id", chunk
            ):
                out.setdefault(path, []).append(item_id)
        return out

    def lexical_search(self, match: str, limit: int = 200) -> list[tuple[str, float]]:
        """(path, bm25 score: higher is better) of the files whose words match an FTS5 query."""
        if not self.has_lexical or not match:
            return []
        rows = self.db.execute(
            f"SELECT path, bm25({FTS_TABLE}, {', '.join(map(str, FTS_WEIGHTS))}) AS r FROM {FTS_TABLE} "
            f"WHERE {FTS_TABLE} MATCH ? ORDER BY r LIMIT ?",
            (match, limit),
        ).fetchall()
        return [(path, -float(r)) for path, r in rows]  # sqlite's bm25 is lower-is-better

    # ---- what the files' words mean (diffgap/index/meaning.py) ------------------------------------------
    def files_without_meaning(self) -> list[tuple[int, str]]:
        """(file rowid, description) of the indexed files that have no meaning vector yet."""
        return self.db.execute(
            f"SELECT f.rowid, f.description FROM files f LEFT JOIN {MEANING_TABLE} m ON m.file_rowid = f.rowid "
            "WHERE f.status = 'indexed' AND m.file_rowid IS NULL ORDER BY f.rowid"
        ).fetchall()

    def put_meaning(self, rowids: Sequence[int], xb: np.ndarray) -> None:
        """Store meaning vectors (N, D) for files by rowid, in one transaction."""
        assert len(rowids) == len(xb), f"{len(rowids)} files for {len(xb)} vectors"
        xb = np.ascontiguousarray(xb, dtype="<f4")
        with self.db:
            self.db.executemany(
                f"INSERT OR REPLACE INTO {MEANING_TABLE}(file_rowid, vector) VALUES (?,?)",
                [(int(r), xb[i].tobytes()) for i, r in enumerate(rowids)],
            )

    def set_meaning_model(self, ref: dict[str, Any] | None) -> None:
        """Record the sentence model behind the meaning vectors; a different one drops the old vectors."""
        if ref != self.manifest.meaning:
            with self.db:
                self.db.execute(f"DELETE FROM {MEANING_TABLE}")
            self.manifest.meaning = ref
            self.manifest.save(self.root / MANIFEST)
        self.has_meaning = ref is not None

    def meaning_vectors(self) -> tuple[list[str], np.ndarray]:
        """(paths, (N, D) float32) of every indexed file with a meaning vector, in rowid order."""
        if not self.has_meaning:
            return [], np.zeros((0, 0), np.float32)
        rows = self.db.execute(
            f"SELECT f.path, m.vector FROM {MEANING_TABLE} m JOIN files f ON f.rowid = m.file_rowid "
            "WHERE f.status = 'indexed' ORDER BY m.file_rowid"
        ).fetchall()
        dim = int(self.manifest.meaning["dim"])  # type: ignore[index]
        xb = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
        return [r[0] for r in rows], xb.astype(np.float32)

    def duplicate_groups(self) -> list[list[str]]:
        """Paths of indexed files that share a content hash (the same bytes), in groups of two or more."""
        rows = self.db.execute(
            "SELECT content_hash, path FROM files WHERE status = 'indexed' AND content_hash IN "
            "(SELECT content_hash FROM files WHERE status = 'indexed' GROUP BY content_hash HAVING COUNT(*) > 1) "
            "ORDER BY content_hash, path"
        ).fetchall()
        groups: dict[str, list[str]] = {}
        for digest, path in rows:
            groups.setdefault(digest, []).append(path)
        return list(groups.values())

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

    def segment_vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """The time spans (K, manifest.segments, dim) of the windows `ids` (K,), in that order; None when
        the index keeps none or any of them has none (a window written by a build that kept none)."""
        if not self.has_segments or not len(ids):
            return None
        chunk = [int(i) for i in ids]
        marks = ",".join("?" * len(chunk))
        rows = dict(self.db.execute(f"SELECT id, spans FROM {SEGMENTS_TABLE} WHERE id IN ({marks})", chunk).fetchall())
        blobs = [rows.get(i) for i in chunk]
        if any(b is None for b in blobs):
            return None
        shape = (len(chunk), self.manifest.segments, self.manifest.dim)
        return np.frombuffer(b"".join(blobs), dtype="<f2").reshape(shape).astype(np.float32)

    # ---- the searchable vectors (FAISS), opened once --------------------------------------------
    def vector_index(self, *, mmap: bool = False) -> VectorIndex:
        """The FAISS index and, for Flat, its aligned flat view; `mmap` applies to the first open."""
        if self._vectors is None:
            m = self.manifest
            effort = m.tuning.get("effort") if m.tuning else None
            self._vectors = VectorIndex.open(self.root, m.dim, m.current_type, mmap=mmap, default_effort=effort)
        return self._vectors

    def use_vectors(self, vectors: VectorIndex) -> None:
        """What a writer has just synced becomes what this store searches."""
        self._vectors = vectors

    @property
    def ntotal(self) -> int:
        return self.vector_index().ntotal

    def search(self, xq: np.ndarray, k: int, effort: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row; ids are -1 where fewer than k items exist."""
        return self.vector_index().search(xq, k, effort)

    def verify(self) -> list[str]:
        """Problems found (empty when healthy): SQLite integrity, FAISS vs SQLite ids, vector sanity."""
        problems: list[str] = []
        if self.db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("SQLite integrity check failed")
        try:
            faiss_path = self.root / FAISS_FILE
            have = VectorIndex(read_faiss(faiss_path)).ids() if faiss_path.exists() else None
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
    segments: np.ndarray | None = None  # (windows, spans, dim) where the index keeps time spans


def _unpack(rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    xb = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
    return ids, xb.astype(np.float32)
