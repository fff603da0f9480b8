"""What an index directory holds, by name: the one place that spells its file and folder names.

manifest.json        format version, encoder spec + fingerprint, dim, metric, index type, window,
                     hop, counts (`Manifest`)
meta.sqlite          files (one row per source file, indexed or skipped) and items (one per window);
                     the files' words (full text) and what they mean (one sentence vector per file)
index.faiss          IndexIDMap2 over the index type (`auto`: Flat or HNSW by size); ids == items.id
vectors.npy ids.npy  Flat indexes only: the same vectors and ids, 64-byte aligned for memory-mapped BLAS
refiner-MODALITY/    a trained refiner for text or video queries (`refiner_dir`)
cache/               embeddings of paired data, by content and encoder
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffgap.atomic import atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE = "meta.sqlite"
FAISS_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
CACHE_DIR = "cache"
REFINER_MODALITIES = ("text", "video")

AUTO_INDEX_TYPE = "auto"  # Flat while exact search is cheap, HNSW above (diffgap/index/ann.py)
FLAT_INDEX_TYPE = "Flat"
DEFAULT_INDEX_TYPE = AUTO_INDEX_TYPE
DEFAULT_WINDOW_S = 10.0
DEFAULT_HOP_S = 5.0

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

# Full-text search over each indexed file's words, kept in step with `files` by the writer (one
# transaction). Its rowid is the file's rowid in `files`, so a file's words are found and deleted
# by key, not by scanning. Columns are weighted name > tags > folders when ranked (bm25); porter
# stems English.
FTS_TABLE = "file_words"
OLD_FTS_TABLES = ("files_fts",)  # an earlier layout (rows keyed by path): dropped and rebuilt
FTS_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(
    path UNINDEXED, name, tags, folders, tokenize = 'porter unicode61'
);
"""
FTS_WEIGHTS = (3.0, 2.0, 1.0)  # name, tags, folders

# What each indexed file's words mean: one sentence vector of its description per file, keyed by the
# file's rowid like the full-text rows (diffgap/index/meaning.py). Derived state, like index.faiss:
# build and update fill the rows that are missing, so a crash in between only delays them.
MEANING_TABLE = "file_meaning"
MEANING_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {MEANING_TABLE} (
    file_rowid INTEGER PRIMARY KEY,  -- files.rowid
    vector BLOB NOT NULL             -- float32 little-endian, manifest.meaning["dim"] values
);
"""


# Each window's time spans (manifest.segments of them) where the index keeps them: a table of its own,
# so that the items' rows stay small for the lookups every query makes (spans are read only for the
# candidates of a video query a refiner rescores). Rows go with their item.
SEGMENTS_TABLE = "item_segments"
SEGMENTS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {SEGMENTS_TABLE} (
    id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
    spans BLOB NOT NULL             -- float16 little-endian, manifest.segments x dim values
);
"""


class IndexStoreError(RuntimeError):
    """The index directory is missing, corrupt or made for another encoder; the message says which."""


def refiner_dir(index_root: str | Path, modality: str) -> Path:
    """Where `train-refiner` puts, and the service and CLI look for, the refiner of one query modality."""
    assert modality in REFINER_MODALITIES, f"refiners exist for {REFINER_MODALITIES}, not {modality!r}"
    return Path(index_root) / f"refiner-{modality}"


def is_index_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Manifest:
    encoder_spec: str  # how to load the encoders again, e.g. "clap:laion/clap-htsat-unfused"
    fingerprint: dict[str, Any]  # of the audio encoder whose vectors fill the index
    dim: int
    metric: str = "ip"  # inner product over unit vectors == cosine
    index_type: str = DEFAULT_INDEX_TYPE  # what was asked for: "auto" or a faiss factory string
    window_s: float = DEFAULT_WINDOW_S
    hop_s: float = DEFAULT_HOP_S
    format_version: int = FORMAT_VERSION
    counts: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    corpus_root: str | None = None
    exclude: list[str] = field(default_factory=list)  # globs (relative paths) that builds and updates leave out
    faiss_type: str = ""  # the factory string index.faiss was built with ("" before the first sync)
    tuning: dict[str, Any] = field(default_factory=dict)  # an approximate index's search effort + recall (ann.py)
    meaning: dict[str, Any] | None = None  # the sentence model (name, sha256, dim) behind file_meaning, if any
    # time spans kept per window beside its vector (encoders that keep time; diffgap/models/segments.py),
    # for video queries' segment scores; 0: none (other encoders, and indexes made before spans existed)
    segments: int = 0

    @property
    def current_type(self) -> str:
        """The factory string of index.faiss as it stands (an empty "auto" index is Flat)."""
        return self.faiss_type or (FLAT_INDEX_TYPE if self.index_type == AUTO_INDEX_TYPE else self.index_type)

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
        atomic_write_json(path, self.__dict__)
