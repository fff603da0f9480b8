"""Encoder families and the one function that loads them from a spec string.

Specs:  clap[:HUB_ID_OR_DIR]   text + audio (LAION CLAP via transformers)
        clip[:HUB_ID_OR_DIR]   video (CLIP vision tower over frames)
        compact:DIR            the project's own audio + text (+ video) encoders
"""

from __future__ import annotations

from dataclasses import dataclass

from diffgap.encoders.base import (
    AudioEncoder,
    Encoder,
    EncoderFingerprint,
    EncoderLoadError,
    TextEncoder,
    VideoEncoder,
)

__all__ = [
    "AudioEncoder",
    "Encoder",
    "EncoderFingerprint",
    "EncoderLoadError",
    "EncoderSet",
    "NoEncoderError",
    "TextEncoder",
    "VideoEncoder",
    "load_encoders",
    "parse_spec",
]

FAMILIES = ("clap", "clip", "compact")


def parse_spec(spec: str) -> tuple[str, str | None]:
    family, _, target = spec.partition(":")
    if family not in FAMILIES:
        raise EncoderLoadError(f"unknown encoder family {family!r} in {spec!r}; expected one of {FAMILIES}")
    if family == "compact" and not target:
        raise EncoderLoadError("compact encoders need a directory: compact:DIR")
    return family, target or None


class NoEncoderError(ValueError):
    """A query or pair of a modality that no loaded encoder reads."""


@dataclass
class EncoderSet:
    """The encoders one index and its queries need; absent modalities are None."""

    audio: AudioEncoder
    text: TextEncoder | None = None
    video: VideoEncoder | None = None

    def get(self, modality: str) -> Encoder | None:
        """The encoder that turns inputs of `modality` into vectors, or None: the one rule for which serves which."""
        return {"audio": self.audio, "text": self.text, "video": self.video}.get(modality)

    def for_modality(self, modality: str) -> Encoder:
        """`get`, with a clear error when no encoder of that modality is loaded."""
        encoder = self.get(modality)
        if encoder is None:
            raise NoEncoderError(f"no {modality} encoder is loaded for this index")
        return encoder


def load_encoders(spec: str, video_spec: str | None = None, *, need_text: bool = True) -> EncoderSet:
    """Load the audio (+ text) encoders named by `spec` and, optionally, a video encoder."""
    family, target = parse_spec(spec)
    if family == "clap":
        from diffgap.encoders.clap import DEFAULT_CLAP, ClapAudioEncoder, ClapBundle, ClapTextEncoder

        bundle = ClapBundle(target or DEFAULT_CLAP)
        encoders = EncoderSet(ClapAudioEncoder(bundle), ClapTextEncoder(bundle) if need_text else None)
    elif family == "compact":
        from diffgap.encoders.compact import (
            CompactAudioEncoder,
            CompactBundle,
            CompactTextEncoder,
            CompactVideoEncoder,
        )

        bundle = CompactBundle(target)  # type: ignore[arg-type]
        encoders = EncoderSet(
            CompactAudioEncoder(bundle),
            CompactTextEncoder(bundle) if need_text and bundle.model.text is not None else None,
            CompactVideoEncoder(bundle) if bundle.model.video is not None else None,
        )
    else:
        raise EncoderLoadError(f"{spec!r} has no audio encoder; use clap or compact for the index")
    if video_spec:
        vfamily, vtarget = parse_spec(video_spec)
        if vfamily == "clip":
            from diffgap.encoders.clip import DEFAULT_CLIP, ClipVideoEncoder

            encoders.video = ClipVideoEncoder(vtarget or DEFAULT_CLIP)
        elif vfamily == "compact":
            encoders.video = load_encoders(video_spec, need_text=False).video
        else:
            raise EncoderLoadError(f"{video_spec!r} has no video encoder")
    return encoders
