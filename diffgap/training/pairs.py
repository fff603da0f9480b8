"""Paired data for training and evaluation: (audio, text and/or video) rows from common layouts.

- generic CSV: columns `audio` and `text` (or `caption`) and/or `video`; paths relative to the CSV;
  an optional `split` column can be filtered on. Several rows may share one audio file (several
  captions); `group` ties them to one retrieval target.
- AudioCaps: `audiocap_id,youtube_id,start_time,caption` with audio files named by audiocap_id,
  by youtube_id, or `{youtube_id}_{start_time}` (the common download-script layouts).
- Clotho: `file_name,caption_1..caption_5` with audio files named `file_name` in an audio folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffgap.media.audio import AUDIO_EXTENSIONS


@dataclass(frozen=True)
class Pair:
    audio: Path
    text: str | None = None
    video: Path | None = None
    group: str = ""  # rows with the same group share one audio target

    @property
    def key(self) -> str:
        return self.group or str(self.audio)


class PairsError(ValueError):
    """A paired manifest cannot be read; the message names the file and the problem."""


def read_pairs(
    path: str | Path, *, layout: str = "auto", split: str | None = None, audio_dir: str | Path | None = None
) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if layout == "auto":
        if "audiocap_id" in columns or ("youtube_id" in columns and "caption" in columns):
            layout = "audiocaps"
        elif "file_name" in columns and any(c.startswith("caption_") for c in columns):
            layout = "clotho"
        else:
            layout = "csv"
    if layout == "csv":
        pairs = _generic(path, columns, rows, split)
    elif layout == "audiocaps":
        pairs = _audiocaps(path, rows, Path(audio_dir) if audio_dir else path.parent)
    elif layout == "clotho":
        pairs = _clotho(path, rows, Path(audio_dir) if audio_dir else path.parent)
    else:
        raise PairsError(f"unknown layout {layout!r}; expected auto, csv, audiocaps or clotho")
    if not pairs:
        raise PairsError(f"{path}: no usable rows" + (f" in split {split!r}" if split else ""))
    return pairs


def _generic(path: Path, columns: Sequence[str], rows: list[dict[str, str]], split: str | None) -> list[Pair]:
    text_col = "text" if "text" in columns else "caption" if "caption" in columns else None
    if "audio" not in columns:
        raise PairsError(f"{path}: needs an 'audio' column (columns: {', '.join(columns)})")
    if text_col is None and "video" not in columns:
        raise PairsError(f"{path}: needs a 'text' (or 'caption') and/or a 'video' column")
    if split is not None and "split" not in columns:
        raise PairsError(f"{path}: --split given but the file has no 'split' column")
    root = path.parent
    splits = None if split is None else {s.strip() for s in split.split(",")}  # "pretrain,adapt" takes both
    pairs = []
    for row in rows:
        if splits is not None and row.get("split") not in splits:
            continue
        if not row.get("audio"):
            continue
        text = row.get(text_col) if text_col else None
        video = root / row["video"] if row.get("video") else None
        if not text and video is None:
            continue
        pairs.append(Pair(root / row["audio"], text or None, video, group=row.get("id") or row["audio"]))
    return pairs


def _find_audio(audio_dir: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for ext in sorted(AUDIO_EXTENSIONS):
            candidate = audio_dir / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _audiocaps(path: Path, rows: list[dict[str, str]], audio_dir: Path) -> list[Pair]:
    pairs, missing = [], 0
    for row in rows:
        yt, start = row.get("youtube_id", ""), row.get("start_time", "")
        stems = [row.get("audiocap_id", ""), f"{yt}_{start}", f"{yt}_{start}.000", f"Y{yt}", yt]
        audio = _find_audio(audio_dir, [s for s in stems if s and s != "_"])
        if audio is None:
            missing += 1
            continue
        if row.get("caption"):
            pairs.append(Pair(audio, row["caption"], None, group=audio.stem))
    if missing and not pairs:
        raise PairsError(f"{path}: none of the {missing} AudioCaps clips were found in {audio_dir}")
    return pairs


def _clotho(path: Path, rows: list[dict[str, str]], audio_dir: Path) -> list[Pair]:
    pairs = []
    for row in rows:
        audio = audio_dir / row["file_name"]
        if not audio.is_file():
            continue
        for key in sorted(k for k in row if k.startswith("caption_")):
            if row[key]:
                pairs.append(Pair(audio, row[key], None, group=row["file_name"]))
    return pairs
