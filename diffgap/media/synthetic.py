"""Synthetic corpora made from scratch: a small captioned demo corpus of synthetic sounds with silent
videos, and an uncaptioned library described only by its file names.

Each clip holds one or two events (a sound source, a pitch, a position in the clip and how many
times it sounds) over light noise; its caption says so in words drawn from a few phrasings, and
its video shows a coloured shape per source while it sounds. Files are written in several
containers (wav, flac, ogg, mp3, m4a) so the demo exercises real decoding.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffgap.atomic import atomic_write_text
from diffgap.media.audio import write_audio
from diffgap.media.video import write_video

SR = 16000
SECONDS = 4.0
FPS = 8
SOURCES = {  # name: (caption words, RGB of its shape)
    "beep": (["beep", "electronic beep", "bleep"], (60, 220, 230)),
    "buzz": (["buzz", "buzzing", "harsh buzz"], (230, 60, 60)),
    "chirp": (["chirp", "rising chirp", "upward sweep"], (70, 200, 80)),
    "knock": (["knock", "knocking", "wooden knock"], (240, 150, 40)),
    "whistle": (["whistle", "whistling tone", "pure whistle"], (230, 230, 80)),
    "noise": (["noise burst", "hiss burst", "burst of static"], (200, 200, 200)),
}
PITCH_HZ = {"low": 220.0, "high": 1320.0}
POSITIONS = {"start": 0.2, "end": 2.4}
COUNTS = {"once": 1, "twice": 2, "three times": 3}
FORMATS = (".wav", ".flac", ".ogg", ".mp3", ".m4a")


@dataclass(frozen=True)
class Event:
    source: str
    pitch: str
    position: str
    count: str


def _render_event(ev: Event, rng: np.random.Generator) -> np.ndarray:
    n = int(SR * SECONDS)
    out = np.zeros(n, np.float32)
    f0 = PITCH_HZ[ev.pitch] * rng.uniform(0.95, 1.05)
    unit = 0.22
    for k in range(COUNTS[ev.count]):
        start = POSITIONS[ev.position] + k * 0.4
        t = np.arange(int(unit * SR)) / SR
        if ev.source == "beep":
            s = np.sin(2 * np.pi * f0 * t)
        elif ev.source == "buzz":
            s = 2 * ((f0 / 2 * t) % 1.0) - 1
        elif ev.source == "chirp":
            s = np.sin(2 * np.pi * f0 * (t + 2.0 * t**2))
        elif ev.source == "knock":
            s = np.sin(2 * np.pi * f0 / 2 * t) * np.exp(-t * 40)
        elif ev.source == "whistle":
            s = np.sin(2 * np.pi * f0 * 1.5 * t + 3 * np.sin(2 * np.pi * 6 * t))
        else:
            s = rng.standard_normal(len(t)) * (0.5 if ev.pitch == "low" else 1.0)
            if ev.pitch == "low":
                s = np.convolve(s, np.ones(8) / 8, mode="same")
        env = np.minimum(1.0, np.minimum(t, unit - t) / 0.01)
        a = int(start * SR)
        out[a : a + len(t)] += (0.4 * s * env).astype(np.float32)[: n - a]
    return out


def _caption(events: list[Event], rng: np.random.Generator) -> str:
    parts = []
    for ev in sorted(events, key=lambda e: POSITIONS[e.position]):
        words = SOURCES[ev.source][0]
        name = words[rng.integers(len(words))]
        where = {
            "start": ["at the start", "early on", "at the beginning"],
            "end": ["at the end", "near the end", "late in the clip"],
        }[ev.position]
        parts.append(f"a {ev.pitch} {name} {ev.count} {where[rng.integers(3)]}")
    joiner = [", then ", " followed by ", " and later "][rng.integers(3)]
    text = joiner.join(parts)
    return text[0].upper() + text[1:]


def _frames(events: list[Event]) -> np.ndarray:
    frames = np.zeros((int(SECONDS * FPS), 32, 32, 3), np.uint8)
    for slot, ev in enumerate(events):
        colour = SOURCES[ev.source][1]
        y = 4 if ev.pitch == "high" else 18
        x = 4 + 14 * slot
        for k in range(COUNTS[ev.count]):
            first = int((POSITIONS[ev.position] + k * 0.4) * FPS)
            frames[first : first + 2, y : y + 10, x : x + 10] = colour
    return frames


def generate_demo_corpus(out: str | Path, n_clips: int = 240, *, seed: int = 0, test_share: float = 0.2) -> Path:
    """Write audio/, video/ and captions.csv (id, split, audio, video, caption) under `out`."""
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "video").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(SOURCES)
    rows = []
    for i in range(n_clips):
        n_events = 1 + int(rng.random() < 0.5)
        positions = ["start", "end"] if n_events == 2 else [list(POSITIONS)[rng.integers(2)]]
        events = [
            Event(names[rng.integers(len(names))], list(PITCH_HZ)[rng.integers(2)], pos, list(COUNTS)[rng.integers(3)])
            for pos in positions
        ]
        wave = sum(_render_event(ev, rng) for ev in events) + 0.003 * rng.standard_normal(int(SR * SECONDS))
        clip_id = f"demo_{i:04d}"
        audio_rel = f"audio/{clip_id}{FORMATS[i % len(FORMATS)]}"
        write_audio(out / audio_rel, np.clip(wave, -1, 1).astype(np.float32), SR)
        video_rel = f"video/{clip_id}.mp4"
        write_video(out / video_rel, _frames(events), FPS)
        split = "test" if rng.random() < test_share else "train"
        for _ in range(2 if split == "train" else 1):
            rows.append(
                {
                    "id": clip_id,
                    "split": split,
                    "audio": audio_rel,
                    "video": video_rel,
                    "caption": _caption(events, rng),
                }
            )
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["id", "split", "audio", "video", "caption"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "captions.csv", text.getvalue())  # last: its presence marks a complete corpus
    return out


def generate_named_library(out: str | Path, n_files: int = 120, *, seed: int = 0) -> Path:
    """An uncaptioned 'sound library': one event per file, described only by a UCS-style file name
    such as `BEEPHigh_Twice_Start_07.flac` (a stand-in for a real tagged library)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(SOURCES)
    for i in range(n_files):
        ev = Event(
            names[rng.integers(len(names))],
            list(PITCH_HZ)[rng.integers(2)],
            list(POSITIONS)[rng.integers(2)],
            list(COUNTS)[rng.integers(3)],
        )
        wave = _render_event(ev, rng) + 0.003 * rng.standard_normal(int(SR * SECONDS))
        count = ev.count.title().replace(" ", "")
        name = f"{ev.source.upper()}{ev.pitch.title()}_{count}_{ev.position.title()}_{i:02d}{FORMATS[i % len(FORMATS)]}"
        write_audio(out / name, np.clip(wave, -1, 1).astype(np.float32), SR)
    return out
