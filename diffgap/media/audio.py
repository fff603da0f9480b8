"""Audio decoding (PyAV, no system ffmpeg) and windowing of long recordings.

Every encoder wants mono float32 at its own rate, so decoding always resamples on the way in;
the original rate and channel count are kept as metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

# What PyAV's FFmpeg decodes (checked against av.formats_available / codecs_available).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".spx", ".mp3", ".mp2", ".m4a", ".aac", ".aif", ".aiff", ".aifc",
     ".wma", ".mka", ".caf", ".au", ".snd", ".w64", ".wv", ".ape", ".tta", ".ac3", ".amr", ".voc", ".weba"}
)  # fmt: skip
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi"})
# Sound files that carry no decodable waveform here: listed as skipped with this reason, not dropped.
UNDECODABLE_AUDIO = {
    ".mid": "MIDI holds notes, not sound",
    ".midi": "MIDI holds notes, not sound",
    ".mod": "tracker module: no decoder in this build",
    ".xm": "tracker module: no decoder in this build",
    ".it": "tracker module: no decoder in this build",
    ".s3m": "tracker module: no decoder in this build",
    ".mpc": "Musepack: no decoder in this build",
    ".ra": "RealAudio: not supported",
    ".rm": "RealMedia: not supported",
    ".sid": "SID music: no decoder in this build",
}

# Peak amplitude under which a file is treated as silent (about -100 dBFS).
SILENCE_PEAK = 1e-5


class AudioDecodeError(ValueError):
    """A file could not be turned into usable audio; the message says why in plain words, for the skip
    report and for users (the decoder's own text stays in `__cause__`)."""


def unreadable(exc: BaseException) -> str:
    """What a decoder's failure means to a person: file-system errors by name, anything else plainly."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError) and exc.strerror:
        return exc.strerror.lower()
    return "the data is damaged, or in a format that cannot be decoded"


@dataclass(frozen=True)
class DecodedAudio:
    wave: np.ndarray  # (num_samples,) float32 mono at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.wave) / self.sample_rate


def decode_audio(
    path: str | Path | BinaryIO,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    allow_silent: bool = False,
) -> DecodedAudio:
    """Decode the first audio stream of `path` (an audio file or a video's soundtrack).

    Raises AudioDecodeError for unreadable, audio-less, empty or (unless `allow_silent`) silent input.
    """
    try:
        container = av.open(str(path) if isinstance(path, str | Path) else path, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise AudioDecodeError(f"cannot open: {unreadable(exc)}") from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError("no audio stream")
        stream = container.streams.audio[0]
        source_rate = int(stream.codec_context.sample_rate or 0)
        source_channels = int(stream.codec_context.channels or 0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        max_samples = None if max_seconds is None else int(max_seconds * sample_rate)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if max_samples is not None and total >= max_samples:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
        except (av.FFmpegError, ValueError) as exc:
            # A stream that breaks part-way still yields what decoded cleanly before the damage.
            if not chunks:
                raise AudioDecodeError(f"corrupt audio: {unreadable(exc)}") from exc
    if not chunks:
        raise AudioDecodeError("empty: no audio samples")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    if max_samples is not None:
        wave = wave[:max_samples]
    if wave.size == 0:
        raise AudioDecodeError("empty: no audio samples")
    if not np.isfinite(wave).all():
        raise AudioDecodeError("corrupt audio: non-finite samples")
    if not allow_silent and float(np.abs(wave).max()) < SILENCE_PEAK:
        raise AudioDecodeError("silent")
    return DecodedAudio(wave, sample_rate, source_rate or sample_rate, source_channels or 1)


def window_bounds(duration: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """Cut [0, duration] into windows of `window_s` every `hop_s`; the last one ends at `duration`.

    A recording no longer than one window stays whole, so short clips are single items.
    """
    assert window_s > 0 and 0 < hop_s <= window_s, f"bad window {window_s} / hop {hop_s}"
    if duration <= window_s:
        return [(0.0, duration)]
    n = math.ceil((duration - window_s) / hop_s) + 1
    bounds = [(i * hop_s, i * hop_s + window_s) for i in range(n - 1)]
    bounds.append((duration - window_s, duration))  # align the tail so no sound is lost
    return [(round(s, 6), round(e, 6)) for s, e in bounds]


def cut_window(wave: np.ndarray, sample_rate: int, start: float, end: float) -> np.ndarray:
    return wave[int(round(start * sample_rate)) : int(round(end * sample_rate))]


def write_audio(
    path: str | Path,
    wave: np.ndarray,
    sample_rate: int,
    *,
    codec: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Encode float audio in [-1, 1], (samples,) or (samples, channels), to a container chosen by extension."""
    path = Path(path)
    ext = path.suffix.lower()
    codec = (
        codec
        or {
            ".wav": "pcm_s16le",
            ".flac": "flac",
            ".ogg": "libopus",  # this FFmpeg build has no usable Vorbis encoder; Ogg Opus is still .ogg
            ".oga": "libopus",
            ".opus": "libopus",
            ".mp3": "libmp3lame",
            ".m4a": "aac",
        }[ext]
    )
    pcm = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    pcm = pcm[:, None] if pcm.ndim == 1 else pcm  # (samples, channels)
    channels = pcm.shape[1]
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
    rate = 48000 if codec == "libopus" else sample_rate
    if rate != sample_rate:
        pcm = np.stack([_resample(pcm[:, c], sample_rate, rate) for c in range(channels)], axis=1)
    container_format = {".m4a": "mp4", ".opus": "ogg", ".ogg": "ogg", ".oga": "ogg"}.get(ext)
    with av.open(str(path), "w", format=container_format) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame_size = stream.codec_context.frame_size or 1024
        converter = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for offset in range(0, len(pcm), frame_size):
            block = np.ascontiguousarray(pcm[offset : offset + frame_size]).reshape(1, -1)  # packed (1, n*ch)
            frame = av.AudioFrame.from_ndarray(block, format="flt", layout=layout)
            frame.sample_rate = rate
            frame.pts = offset
            for converted in converter.resample(frame):
                for packet in stream.encode(converted):
                    container.mux(packet)
        for converted in converter.resample(None):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _resample(wave: np.ndarray, src: int, dst: int) -> np.ndarray:
    positions = np.arange(int(len(wave) * dst / src)) * (src / dst)
    return np.interp(positions, np.arange(len(wave)), wave).astype(np.float32)
