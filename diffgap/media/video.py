"""Video decoding to RGB frames sampled at a fixed rate (PyAV), and a small writer for tests and demos."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from diffgap.media.audio import unreadable


class VideoDecodeError(ValueError):
    """A file could not be turned into frames; the message says why in plain words."""


MAX_SOURCE_FPS = 240.0  # more source frames per second than any real camera records: the decode budget


def decode_video(
    path: str | Path | BinaryIO,
    fps: float,
    *,
    size: int | None = None,
    max_seconds: float | None = None,
    max_frames: int = 4096,
    max_source_fps: float = MAX_SOURCE_FPS,
) -> np.ndarray:
    """Frames of the first video stream at `fps`, as uint8 (T, H, W, 3).

    Sampling takes the latest decoded frame at each tick of the target clock, so clips recorded
    at any rate give the same number of frames per second. `size` resizes to a square. With
    `max_seconds`, at most `max_seconds * max_source_fps` source frames are decoded: a stream whose
    timestamps do not advance (hundreds of thousands of frames at t=0) costs a bounded amount of CPU.
    """
    assert fps > 0, f"fps must be positive, got {fps}"
    try:
        container = av.open(str(path) if isinstance(path, str | Path) else path, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise VideoDecodeError(f"cannot open: {unreadable(exc)}") from exc
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        frame_period = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
        next_tick, last_t = 0.0, 0.0
        budget = None if max_seconds is None else max(1, int(max_seconds * max_source_fps))
        try:
            for decoded, frame in enumerate(container.decode(stream), 1):
                if budget is not None and decoded > budget:
                    break
                t = float(frame.time) if frame.time is not None else next_tick
                last_t = t
                if max_seconds is not None and t >= max_seconds:
                    break
                if t + 1e-6 < next_tick:
                    continue
                rgb = (
                    frame.to_ndarray(format="rgb24", width=size, height=size)
                    if size
                    else frame.to_ndarray(format="rgb24")
                )
                while next_tick <= t + 1e-6:  # a slow source repeats frames to keep the clock
                    frames.append(rgb)
                    next_tick += 1.0 / fps
                if len(frames) >= max_frames:
                    break
        except (av.FFmpegError, ValueError) as exc:
            if not frames:
                raise VideoDecodeError(f"corrupt video: {unreadable(exc)}") from exc
        # The last source frame lasts one period: ticks inside it still see it.
        while (
            frames
            and next_tick < last_t + frame_period - 1e-6
            and len(frames) < max_frames
            and (max_seconds is None or next_tick < max_seconds)
        ):
            frames.append(frames[-1])
            next_tick += 1.0 / fps
    if not frames:
        raise VideoDecodeError("empty: no video frames")
    return np.stack(frames[:max_frames])


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> None:
    """Encode uint8 (T, H, W, 3) frames (H.264 when available, else MPEG-4) with an optional mono track."""
    with av.open(str(path), "w") as container:
        try:
            vstream = container.add_stream("libx264", rate=fps)
        except (av.FFmpegError, ValueError):  # builds without x264 still write MPEG-4 part 2
            vstream = container.add_stream("mpeg4", rate=fps)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for i, rgb in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            for packet in vstream.encode(vf):
                container.mux(packet)
        for packet in vstream.encode(None):
            container.mux(packet)
        if astream is not None and audio is not None:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
            step = 1024
            for offset in range(0, len(audio), step):
                af = av.AudioFrame.from_ndarray(
                    np.clip(audio[None, offset : offset + step], -1, 1).astype(np.float32), format="flt", layout="mono"
                )
                af.sample_rate = sample_rate
                af.pts = offset
                for converted in resampler.resample(af):
                    for packet in astream.encode(converted):
                        container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)
