from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from tiny_models import make_tiny_clap, make_tiny_clip_vision  # noqa: E402

from diffgap.media.audio import write_audio  # noqa: E402
from diffgap.media.video import write_video  # noqa: E402


def noise_bytes(n: int, seed: int = 0) -> bytes:
    """`n` bytes of seeded noise: a hostile file that is the same file on every run.

    os.urandom made these flaky: now and then a random buffer probes as a decodable stream.
    """
    return np.random.default_rng(seed).bytes(n)


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


def train_tiny_towers(folder: Path, **text: object) -> dict:
    """Tiny audio + text towers (text config overridden by `text`) trained 3 steps on `captioned_tones`,
    saved to folder/enc; returns the training stats."""
    from diffgap.models.audio_net import AudioNetConfig
    from diffgap.models.text_net import TextNetConfig
    from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders

    cfg = EncoderTrainConfig(
        epochs=3,
        batch_size=6,
        warmup_steps=1,
        audio=AudioNetConfig(channels=(8, 8, 16, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
        text=TextNetConfig(**{"n_layers": 1, "n_heads": 2, "dim": 32, **text}),
    )
    return train_compact_encoders(captioned_tones(folder), folder / "enc", cfg, use_video=False)


def captioned_tones(folder: Path) -> list:
    """Six one-second tones with a caption each, as text pairs: enough for a tiny tower to train on."""
    from diffgap.training.pairs import Pair

    captions = [(300, "a low hum"), (900, "a dog barks"), (1500, "a bird chirps"), (2400, "a high whistle"),
                (600, "an engine idles"), (1200, "rain falls")]  # fmt: skip
    pairs = []
    for i, (freq, text) in enumerate(captions):
        write_audio(folder / f"c{i}.wav", tone(freq, 1.0, 16000), 16000)
        pairs.append(Pair(folder / f"c{i}.wav", text=text))
    return pairs


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
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + noise_bytes(300, seed=1))
    write_audio(root / "silent.wav", np.zeros(16000), 16000)
    (root / "notes.txt").write_text("not audio")
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    frames[:, 8:24, 8:24] = 200
    write_video(root / "clip.mp4", frames, 8, audio=tone(600, 2.0, 16000), sample_rate=16000)
    return root


# ---- a served index and a real uvicorn server ---------------------------------------------------------
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def served_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo corpus indexed with compact encoders trained for a few real steps, with both refiners."""
    from diffgap.media.synthetic import generate_demo_corpus
    from diffgap.models.audio_net import AudioNetConfig
    from diffgap.models.text_net import TextNetConfig
    from diffgap.models.video_net import VideoNetConfig
    from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders
    from diffgap.training.pairs import read_pairs

    work = tmp_path_factory.mktemp("served")
    corpus = generate_demo_corpus(work / "corpus", 30, seed=2)
    cfg = EncoderTrainConfig(
        epochs=2,
        batch_size=10,
        warmup_steps=2,
        audio=AudioNetConfig(channels=(8, 8, 16, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
        text=TextNetConfig(vocab_size=200, d_model=32, n_layers=1, n_heads=2, dim=32),
        video=VideoNetConfig(channels=(8, 16), d_model=32, n_layers=1, n_heads=2, dim=32),
    )
    train_compact_encoders(read_pairs(corpus / "captions.csv"), work / "enc", cfg)
    spec = f"compact:{work / 'enc'}"
    index = work / "index"
    build_and_refine(corpus, index, spec)
    return index


def build_and_refine(corpus: Path, index: Path, spec: str, iterations: int = 30) -> None:
    """Index corpus/audio with `spec` and train the text and video refiners for a few real steps."""
    from indexer.cli import main

    assert main(["build", str(corpus / "audio"), "-o", str(index), "--encoder", spec, "-q"]) == 0
    for modality in ("text", "video"):
        args = ["refiner", "train", "-q", "--pairs", str(corpus / "captions.csv"), "--index", str(index),
                "--modality", modality, "--video-encoder", spec, "--iterations", str(iterations),
                "--adapter-steps", "40"]  # fmt: skip
        assert main(args) == 0
        assert (index / f"refiner-{modality}" / "refiner.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, index: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "DIFFGAP_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.app",
                "--index",
                str(index),
                "--port",
                str(self.port),
                "--log-level",
                os.environ.get("DIFFGAP_TEST_LOG_LEVEL", "warning"),  # info: every request and worker event
            ],
            cwd=REPO,
            env=full_env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited during start-up"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(served_index: Path):
    srv = Server(served_index, {"DIFFGAP_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024), "DIFFGAP_MAX_K": "50"})
    yield srv
    srv.stop()
