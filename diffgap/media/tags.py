"""The words a library file carries: its embedded tags (`read_tags`) and short text descriptions made
from those tags and its file/folder names (`describe`).

Sound libraries rarely have captions, but they do have words: UCS-style names such as
`DOORWood_Creak_Slow_01.wav`, folders like `Weather/Rain`, and tags (Vorbis comments, ID3, RIFF
INFO / BWF description, MP4 atoms). These become descriptions like "door wood creak slow", which
are enough to teach the refiner the library's own vocabulary.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import av

# Muxer bookkeeping, not words about the sound.
TECHNICAL_TAGS = frozenset(
    {
        "encoder",
        "major_brand",
        "minor_version",
        "compatible_brands",
        "handler_name",
        "language",
        "vendor_id",
        "creation_time",
        "encoded_by",
        "duration",
    }
)


def read_tags(path: Path) -> dict[str, str]:
    """Container and stream metadata (Vorbis comments, ID3, RIFF INFO, MP4 atoms) as lower-case keys."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            tags = dict(container.metadata)
            if container.streams.audio:
                tags.update(container.streams.audio[0].metadata)
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return {}
    return {k.lower(): str(v).strip() for k, v in tags.items() if str(v).strip() and k.lower() not in TECHNICAL_TAGS}


# Tag keys that describe the sound (as PyAV reports them, lower-cased), most specific first.
DESCRIPTIVE_TAGS = (
    "description",
    "comment",
    "title",
    "subject",
    "keywords",
    "icmt",
    "inam",
    "isbj",
    "ikey",
    "bext_description",
    "genre",
    "category",
    "subcategory",
)

# Words that say nothing about the sound: versions, takes, formats, library bookkeeping.
NOISE_TOKENS = frozenset(
    [
        "take",
        "takes",
        "tk",
        "version",
        "ver",
        "v",
        "final",
        "finals",
        "edit",
        "edited",
        "edits",
        "mix",
        "mixed",
        "master",
        "mastered",
        "copy",
        "new",
        "old",
        "untitled",
        "audio",
        "sound",
        "sounds",
        "sfx",
        "fx",
        "sample",
        "samples",
        "clip",
        "track",
        "file",
        "rec",
        "recording",
        "wav",
        "wave",
        "flac",
        "ogg",
        "mp3",
        "m4a",
        "aiff",
        "aif",
        "opus",
        "mono",
        "stereo",
        "ms",
        "lr",
        "bit",
        "bits",
        "khz",
        "hz",
        "kbps",
        "k",
        "bwf",
        "ixml",
        "alt",
        "alternate",
        "var",
        "variation",
        "sel",
        "select",
        "selects",
        "the",
        "and",
        "of",
        "processed",
        "raw",
        "orig",
        "original",
    ]
)

# Tag values that say nothing: what tools write when a field is left empty.
PLACEHOLDER_VALUES = frozenset(
    ["untitled", "unknown", "no title", "none", "n/a", "na", "null", "default", "title", "audio file", "new recording"]
)

# Where joined words ("mineimpact", "justyouwait") are split: a plain word list, one word a line.
# Debian's `wamerican` installs one at /usr/share/dict/words (.ci/run and the image install it);
# DIFFGAP_WORDS names another; with none, joined words stay joined.
WORD_LIST_ENV = "DIFFGAP_WORDS"
DEFAULT_WORD_LIST = Path("/usr/share/dict/words")
SHORT_WORDS = frozenset(["on", "in", "up", "of", "to", "at", "by", "no", "go", "it", "is", "an", "or", "oh", "ow"])
MIN_JOINED = 6  # shorter unknown words are left alone: more often abbreviations than joins


@functools.lru_cache(maxsize=1)
def word_list() -> frozenset[str]:
    path = Path(os.environ.get(WORD_LIST_ENV) or DEFAULT_WORD_LIST)
    try:
        lines = path.read_text(encoding="utf-8", errors="ignore").split()
    except OSError:
        return frozenset()
    return frozenset(w.lower() for w in lines if w.isalpha() and w.isascii())


def split_joined(word: str, words: frozenset[str] | None = None) -> list[str]:
    """'mineimpact' -> ['mine', 'impact']: an unknown word that is a run of known ones, in the fewest
    pieces (each at least 3 letters, or a common 2-letter word); anything else comes back whole."""
    words = word_list() if words is None else words
    if len(word) < MIN_JOINED or not words or word in words or not word.isalpha():
        return [word]
    n = len(word)
    best: list[list[str] | None] = [None] * (n + 1)  # best[i]: fewest pieces covering word[:i]
    best[0] = []
    for end in range(1, n + 1):
        for start in range(max(0, end - 20), end):
            piece, head = word[start:end], best[start]
            if head is None or (len(piece) < 3 and piece not in SHORT_WORDS) or piece not in words:
                continue
            if best[end] is None or len(head) + 1 < len(best[end]):
                best[end] = [*head, piece]
    found = best[n]
    return found if found and len(found) > 1 else [word]


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[\s_\-.,;:+&/\\()\[\]{}#@!?'\"]+")
_NUMERIC = re.compile(r"^(\d+|\d+[a-z]{0,3}|[a-z]\d+|\d+k\d*|\d+(bit|khz|hz|ch)?)$")


def words_of(text: str) -> list[str]:
    """Split names like 'DOORWood_Creak-Slow01' into ['door', 'wood', 'creak', 'slow']."""
    out: list[str] = []
    for chunk in _SPLIT.split(text):
        chunk = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", chunk)  # Slow01 -> Slow 01
        for part in chunk.split():
            for word in _CAMEL.split(part):
                w = word.lower()
                if not w or _NUMERIC.match(w) or w in NOISE_TOKENS or len(w) == 1:
                    continue
                out.extend(split_joined(w))
    return out


def name_tokens(stem: str) -> list[str]:
    """Tokens of a name that has no words but still says something: '5G' -> ['5g'] (not pure numbers)."""
    return [t.lower() for t in _SPLIT.split(stem) if re.search(r"[A-Za-z]", t) and re.search(r"\d", t)]


def describe_name(rel_path: str, *, max_folders: int = 2) -> str:
    """Words from the file name and its nearest folders (the folder words go first: they are broader)."""
    p = PurePosixPath(rel_path)
    folders = [f for f in p.parent.parts if f not in ("", ".", "/")][-max_folders:]
    stem = words_of(p.stem) or name_tokens(p.stem)
    # Folder words the name repeats ("Rain/Rain_Heavy") go; repeats inside the name stay: they carry
    # meaning in names that describe several events ("..._Loud_Start_Then_..._Loud_End").
    folder = [w for w in _dedupe([w for f in folders for w in words_of(f)]) if w not in set(stem)]
    return " ".join(folder + stem)


def describe_tags(tags: Mapping[str, str]) -> str:
    phrases = []
    for key in DESCRIPTIVE_TAGS:
        value = str(tags.get(key, "")).strip()
        if value.lower() in PLACEHOLDER_VALUES:
            continue
        if value and value.lower() not in (p.lower() for p in phrases):
            phrases.append(value)
    return "; ".join(phrases)


def search_fields(rel_path: str, tags: Mapping[str, str]) -> tuple[str, str, str]:
    """(name, tags, folders) words of a file for full-text search: every folder, not only the nearest."""
    p = PurePosixPath(rel_path)
    name = words_of(p.stem) or name_tokens(p.stem)
    folders = _dedupe([w for f in p.parent.parts if f not in ("", ".", "/") for w in words_of(f)])
    return " ".join(name), " ".join(words_of(describe_tags(tags))), " ".join(folders)


def describe(rel_path: str, tags: Mapping[str, str], *, max_words: int = 32) -> str:
    """Tags when they say something, plus the name's words they do not already contain."""
    from_tags = describe_tags(tags)
    tag_words = set(words_of(from_tags))
    extra = [w for w in describe_name(rel_path).split() if w not in tag_words]
    text = "; ".join(t for t in (from_tags, " ".join(extra)) if t)
    words = text.split()
    return " ".join(words[:max_words])


def _dedupe(words: list[str]) -> list[str]:
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]
