"""Embedding paired data once with frozen encoders, cached on disk by content and encoder."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from diffgap.atomic import atomic_write
from diffgap.encoders import EncoderSet
from diffgap.encoders.base import Encoder
from diffgap.index.build import is_excluded
from diffgap.index.store import IndexStore
from diffgap.media.audio import AudioDecodeError, decode_audio
from diffgap.media.video import VideoDecodeError, decode_video
from diffgap.training.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class PairEmbeddings:
    """Queries (text or video) and their audio targets; several queries may share one target."""

    audio: np.ndarray  # (G, d) one row per distinct audio target
    query: np.ndarray  # (P, c) one row per query
    query_group: np.ndarray  # (P,) int index into `audio`
    audio_keys: list[str]  # group key of each audio row
    modality: str  # "text" | "video"
    # each query row's text (text queries), for what reads the words themselves (a refiner's text
    # adapter); None where they were not kept (video, or an embedding cache written before this field)
    texts: list[str] | None = None
    # each row cut into equal time spans, one unit vector per span (`encode_with_segments`): video
    # queries (P, S, c) and their clips (G, S, d), where the pairs were embedded with segments
    query_segments: np.ndarray | None = None
    audio_segments: np.ndarray | None = None

    def subset_groups(self, groups: np.ndarray) -> PairEmbeddings:
        """The queries whose targets are in `groups`, with targets renumbered."""
        groups = np.asarray(sorted(set(int(g) for g in groups)), dtype=np.int64)
        remap = -np.ones(len(self.audio), dtype=np.int64)
        remap[groups] = np.arange(len(groups))
        keep = remap[self.query_group] >= 0
        return PairEmbeddings(
            self.audio[groups],
            self.query[keep],
            remap[self.query_group[keep]],
            [self.audio_keys[g] for g in groups],
            self.modality,
            None if self.texts is None else [t for t, k in zip(self.texts, keep, strict=True) if k],
            None if self.query_segments is None else self.query_segments[keep],
            None if self.audio_segments is None else self.audio_segments[groups],
        )

    def with_distractors(self, other: PairEmbeddings) -> PairEmbeddings:
        """These queries against their own targets and `other`'s targets as well (appended, so each
        query's group is unchanged): a gallery the size of a library, whose near neighbours of a target
        are there to be confused with it."""
        assert other.audio.shape[1:] == self.audio.shape[1:], "distractors from another audio space"
        segments = None
        if self.audio_segments is not None and other.audio_segments is not None:
            segments = np.concatenate([self.audio_segments, other.audio_segments])  # (G + G', S, d)
        return replace(
            self,
            audio=np.concatenate([self.audio, other.audio]),  # (G + G', d)
            audio_keys=[*self.audio_keys, *other.audio_keys],
            audio_segments=segments,
            query_segments=self.query_segments if segments is not None else None,
        )

    def span_pairs(self) -> PairEmbeddings:
        """One pair per time span: each query's span s paired with its clip's span s (P * S queries,
        G * S targets), for a map trained on spans themselves."""
        assert self.query_segments is not None and self.audio_segments is not None, "pairs without spans"
        p, s, c = self.query_segments.shape
        groups = (self.query_group[:, None] * s + np.arange(s)[None, :]).reshape(-1)  # (P * S,)
        return PairEmbeddings(
            self.audio_segments.reshape(len(self.audio) * s, -1),  # (G * S, d)
            self.query_segments.reshape(p * s, c),  # (P * S, c)
            groups,
            [f"{key}#{span}" for key in self.audio_keys for span in range(s)],
            self.modality,
        )

    def split(self, val_fraction: float, seed: int = 0) -> tuple[PairEmbeddings, PairEmbeddings]:
        """Hold out a share of the audio targets (with all their queries) for validation."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.audio))
        n_val = int(round(len(order) * val_fraction))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(order) - 1)
        return self.subset_groups(order[n_val:]), self.subset_groups(order[:n_val])


def _cache_key(pairs: Sequence[Pair], modality: str, encoders: Sequence[Encoder], segments: int = 0) -> str:
    digest = hashlib.sha256(modality.encode() + (f"\0segments {segments}".encode() if segments else b""))
    for enc in encoders:
        digest.update(enc.fingerprint.digest.encode())
    for p in pairs:
        item = p.text if modality == "text" else str(p.video)
        digest.update(f"{p.audio}\0{p.key}\0{item}\n".encode())
    return digest.hexdigest()[:24]


def embed_pairs(
    pairs: Sequence[Pair],
    encoders: EncoderSet,
    modality: str = "text",
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    segments: int = 0,
) -> PairEmbeddings:
    """Encode each distinct audio once and each query once. Pairs whose files fail to decode are dropped.
    `segments` > 0 (video pairs, encoders that keep time): also each clip and video cut into that many
    time spans, from the same pass."""
    query_encoder = encoders.for_modality(modality)
    assert not segments or modality == "video", "time segments are for video queries"
    usable = [p for p in pairs if (p.text if modality == "text" else p.video)]
    if modality == "video":  # caption rows repeat the same clip's video: one query per video
        usable = list({(p.key, p.video): p for p in usable}.values())
    if not usable:
        raise ValueError(f"no pairs have a {modality} side")
    cache: Path | None = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"pairs-{_cache_key(usable, modality, [encoders.audio, query_encoder], segments)}.npz"
        if cache.exists():
            data = np.load(cache, allow_pickle=False)
            log.info("loaded cached embeddings %s", cache)
            texts = [str(t) for t in data["texts"]] if "texts" in data else None
            if texts is None and modality == "text" and len(usable) == len(data["query"]):
                texts = [str(p.text) for p in usable]  # an older cache; no pair was dropped, so rows are `usable`
            return PairEmbeddings(
                data["audio"], data["query"], data["query_group"], list(data["audio_keys"]), modality, texts,
                data["query_segments"] if segments else None, data["audio_segments"] if segments else None,
            )  # fmt: skip
    keys: dict[str, int] = {}
    audio_paths: list[Path] = []
    for p in usable:
        if p.key not in keys:
            keys[p.key] = len(keys)
            audio_paths.append(p.audio)
    audio = np.zeros((len(audio_paths), encoders.audio.dim), np.float32)
    audio_segments = np.zeros((len(audio_paths), segments, encoders.audio.dim), np.float32)
    ok = np.zeros(len(audio_paths), bool)
    for start in range(0, len(audio_paths), batch_size):
        waves, rows = [], []
        for j, path in enumerate(audio_paths[start : start + batch_size], start):
            try:
                waves.append(
                    decode_audio(path, encoders.audio.sample_rate, max_seconds=encoders.audio.max_seconds).wave
                )
                rows.append(j)
            except AudioDecodeError as exc:
                log.warning("dropping pairs of %s: %s", path, exc)
        if waves:
            if segments:
                audio[rows], audio_segments[rows] = encoders.audio.encode_with_segments(waves, segments)
            else:
                audio[rows] = encoders.audio.encode(waves)
            ok[rows] = True
        if progress:
            progress(len(audio_paths[start : start + batch_size]))
    kept = [p for p in usable if ok[keys[p.key]]]
    queries = np.zeros((len(kept), query_encoder.dim), np.float32)
    query_segments = np.zeros((len(kept), segments, query_encoder.dim), np.float32)
    qok = np.ones(len(kept), bool)
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        if modality == "text":
            queries[start : start + len(chunk)] = query_encoder.encode([p.text for p in chunk])
        else:
            clips, rows = [], []
            for j, p in enumerate(chunk, start):
                try:
                    clips.append(decode_video(p.video, query_encoder.fps, size=getattr(query_encoder, "size", None)))
                    rows.append(j)
                except VideoDecodeError as exc:
                    log.warning("dropping pair with video %s: %s", p.video, exc)
                    qok[j] = False
            if clips:
                if segments:
                    queries[rows], query_segments[rows] = query_encoder.encode_with_segments(clips, segments)
                else:
                    queries[rows] = query_encoder.encode(clips)
        if progress:
            progress(len(chunk))
    kept = [p for p, good in zip(kept, qok, strict=True) if good]
    queries, query_segments = queries[qok], query_segments[qok]
    # renumber targets to the ones that survived
    live = sorted({keys[p.key] for p in kept})
    remap = {old: new for new, old in enumerate(live)}
    result = PairEmbeddings(
        audio[live],
        queries,
        np.array([remap[keys[p.key]] for p in kept], dtype=np.int64),
        [list(keys)[i] for i in live],
        modality,
        [p.text for p in kept] if modality == "text" else None,
        query_segments if segments else None,
        audio_segments[live] if segments else None,
    )
    if cache is not None:
        arrays = {
            "audio": result.audio,
            "query": result.query,
            "query_group": result.query_group,
            "audio_keys": np.array(result.audio_keys),
            **({"texts": np.array(result.texts)} if result.texts is not None else {}),
            **({"query_segments": query_segments, "audio_segments": result.audio_segments} if segments else {}),
        }
        atomic_write(cache, lambda fh: np.savez(fh, **arrays))
    return result


def embed_index_pairs(
    store: IndexStore, encoders: EncoderSet, batch_size: int = 64, exclude: Sequence[str] = ()
) -> PairEmbeddings:
    """(description, audio) pairs from an index itself: one per described file.

    The audio target is the normalised mean of the file's window vectors already in the index, so
    no audio is decoded again; the description is embedded with the text encoder.
    """
    text_encoder = encoders.for_modality("text")
    rows = [r for r in store.described_items() if not is_excluded(r[1], exclude)]
    if not rows:
        raise ValueError(f"{store.root} has no item descriptions (tags or descriptive file names) to learn from")
    by_file: dict[str, list[int]] = {}
    descriptions: dict[str, str] = {}
    for item_id, path, description in rows:
        by_file.setdefault(path, []).append(item_id)
        descriptions[path] = description
    paths = sorted(by_file)
    audio = np.zeros((len(paths), store.manifest.dim), np.float32)
    for g, path in enumerate(paths):
        _, xb = store.vectors(np.asarray(by_file[path], dtype=np.int64))
        mean = xb.mean(axis=0)
        audio[g] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    texts = [descriptions[p] for p in paths]
    query = np.concatenate([text_encoder.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
    return PairEmbeddings(audio, query.astype(np.float32), np.arange(len(paths), dtype=np.int64), paths, "text", texts)
