"""The one interface every encoder family implements, and the fingerprint that ties an index to it."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Modality = Literal["audio", "text", "video"]


class EncoderLoadError(RuntimeError):
    """Weights or configuration for an encoder cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class EncoderFingerprint:
    """Identifies what produced a vector, so vectors from different models are never mixed."""

    family: str  # "clap" | "clip" | "compact"
    model_id: str  # hub id or the directory the weights came from (informational)
    weights_sha256: str  # hash of all parameters: the identity that matters
    modality: str
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderFingerprint:
        return cls(**data)

    @property
    def digest(self) -> str:
        """Changes when anything that affects the vectors changes; the model's location does not count."""
        payload = {k: v for k, v in self.to_dict().items() if k != "model_id"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def public_name(self) -> str:
        """A name to show users that reveals no server path: the hub id, or for weights loaded from a
        directory only the family; with the fingerprint."""
        local = self.model_id.startswith(("/", ".", "~")) or Path(self.model_id).exists()
        name = self.family if local else f"{self.family}:{self.model_id}"
        return f"{name} (fingerprint {self.digest})"

    @property
    def space(self) -> str:
        """Encoders of one trained model share a space: a text vector may search its audio vectors."""
        return f"{self.family}:{self.weights_sha256[:16]}"


class Encoder(ABC):
    """Maps a batch of inputs of one modality to L2-normalised float32 vectors of shape (N, dim)."""

    modality: Modality
    dim: int
    fingerprint: EncoderFingerprint
    keeps_time: bool = False  # True: `encode_with_segments` gives time spans (towers trained to align them)

    @abstractmethod
    def encode(self, batch: Sequence[Any]) -> np.ndarray: ...

    def encode_with_segments(self, batch: Sequence[Any], segments: int) -> tuple[np.ndarray, np.ndarray]:
        """The clip vectors (N, dim) and, from the same pass, each clip cut into `segments` equal spans of
        its own length, one unit vector per span (N, segments, dim), for encoders whose vectors keep
        time (`diffgap/models/segments.py`). Others raise NotImplementedError."""
        raise NotImplementedError(f"{self.fingerprint.family} {self.modality} vectors keep no time segments")


class AudioEncoder(Encoder):
    """Input: mono float32 waves at `sample_rate`, each at most `max_seconds` long."""

    modality: Modality = "audio"
    sample_rate: int
    max_seconds: float


class TextEncoder(Encoder):
    modality: Modality = "text"


class VideoEncoder(Encoder):
    """Input: uint8 (T, H, W, 3) frame stacks sampled at `fps`."""

    modality: Modality = "video"
    fps: float

    def encode_frames(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-frame (or per-segment) vectors of each clip, (T_i, dim); the clip vector pools these."""
        raise NotImplementedError


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def state_dict_sha256(module: Any) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes) in a stable order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (weights files and library files alike)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
