from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from tiny_models import make_tiny_clap, make_tiny_clip_vision  # noqa: E402

from diffgap.audio import write_audio  # noqa: E402
from diffgap.video import write_video  # noqa: E402


def tone(freq: float, seconds: float, sr: int, *, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    wave = amp * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([wave * (0.8 + 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else wave


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clap(tmp_path_factory.mktemp("models") / "clap")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip_vision(tmp_path_factory.mktemp("models") / "clip")


MIXED = [  # (relative path, freq, seconds, rate, channels)
    ("a/tone_200.wav", 200, 1.5, 16000, 1),
    ("a/tone_350.flac", 350, 2.5, 44100, 2),
    ("b/tone_500.ogg", 500, 1.2, 48000, 1),
    ("b/deep/tone_800.mp3", 800, 3.0, 22050, 2),
    ("tone_1200.m4a", 1200, 5.0, 32000, 1),
    ("c/tone_1900.opus", 1900, 1.0, 48000, 2),
]


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real files of every accepted format, rate and channel layout, plus a corrupt and a silent one."""
    root = tmp_path_factory.mktemp("corpus")
    for rel, freq, seconds, sr, ch in MIXED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(root / rel, tone(freq, seconds, sr, channels=ch), sr)
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(300))
    write_audio(root / "silent.wav", np.zeros(16000), 16000)
    (root / "notes.txt").write_text("not audio")
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    frames[:, 8:24, 8:24] = 200
    write_video(root / "clip.mp4", frames, 8, audio=tone(600, 2.0, 16000), sample_rate=16000)
    return root
