"""An item's source file, found safely for playback: inside the corpus, and the very file that was
indexed.

A path that leaves the corpus root (by `..` or a symlink) is refused, and so is a file whose content
no longer matches the hash recorded when it was indexed: an indexed file replaced by a hard link to
a file elsewhere (the link resolves inside the corpus, so only its content can tell) is not served.
Hashes are checked once per (device, inode, size, mtime) and remembered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from diffgap.index.build import content_hash
from diffgap.index.store import IndexStore, Item


class SourceError(Exception):
    """Why an item's source cannot be served; `kind` is outside, missing or changed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SourceFiles:
    def __init__(self, corpus_root: Path, store: IndexStore, remember: int = 4096) -> None:
        self.root = corpus_root.resolve()
        self.store = store
        self.remember = remember
        self._checked: OrderedDict[tuple, bool] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, item: Item) -> Path:
        path = (self.root / item.path).resolve()
        if not path.is_relative_to(self.root):
            raise SourceError("outside", "the item's file lies outside the corpus")
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not path.is_file():
            raise SourceError("missing", "the item's file is no longer in the corpus")
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_nlink)
        with self._lock:
            known = self._checked.get(key)
        if known is None:
            known = self._matches_index(item.path, path)
            with self._lock:
                self._checked[key] = known
                while len(self._checked) > self.remember:
                    self._checked.popitem(last=False)
        if not known:
            raise SourceError("changed", "the item's file has changed since it was indexed; run `diffgap-index update`")
        return path

    def _matches_index(self, rel: str, path: Path) -> bool:
        expected = self.store.content_hash_of(rel)
        try:
            return expected is not None and content_hash(path) == expected
        except OSError:
            return False
