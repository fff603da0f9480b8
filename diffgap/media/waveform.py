"""Waveform thumbnails: a whole file's amplitude envelope as a small PNG, with one window highlighted,
and a cache of them keyed by content, so each picture is drawn once.

Drawn with Pillow from min/max per pixel column of the decoded file (at a low rate: the shape of a
sound at thumbnail size needs no more), the window [start, end) in the accent colour over a grey file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffgap.atomic import atomic_write_bytes
from diffgap.media.audio import decode_audio

RATE = 8000  # Hz: sounds up to 4 kHz show; plenty for an envelope a few hundred pixels wide
MAX_SECONDS = 3600.0  # a longer file is drawn up to here
BACKGROUND = (255, 255, 255)
FILE_COLOUR = (170, 170, 170)
WINDOW_COLOUR = (37, 99, 235)
WINDOW_SHADE = (219, 234, 254)


class WindowOutsideFile(ValueError):
    """The window to highlight does not overlap the file."""


def envelope(wave: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of each of `width` equal slices of the wave, (width,) each; silence past the end."""
    low, high = np.zeros(width, np.float32), np.zeros(width, np.float32)
    edges = np.linspace(0, len(wave), width + 1).astype(int)
    for i in range(width):
        part = wave[edges[i] : max(edges[i + 1], edges[i] + 1)]
        if len(part):
            low[i], high[i] = float(part.min()), float(part.max())
    return low, high


def render_waveform(path: str | Path, start: float, end: float, *, width: int = 480, height: int = 64) -> bytes:
    """A PNG of the whole file with [start, end) (seconds) highlighted."""
    audio = decode_audio(path, RATE, max_seconds=MAX_SECONDS, allow_silent=True)
    duration = max(audio.duration, 1e-6)
    if start >= duration or end <= start or start < 0:
        raise WindowOutsideFile(f"the window {start:.2f}-{end:.2f} s lies outside the file ({duration:.2f} s)")
    low, high = envelope(audio.wave, width)
    peak = max(float(np.abs(audio.wave).max(initial=0.0)), 1e-3)  # loudest sample fills the height
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    x0, x1 = (
        int(start / duration * width),
        max(int(min(end, duration) / duration * width), int(start / duration * width) + 1),
    )
    draw.rectangle([x0, 0, x1 - 1, height - 1], fill=WINDOW_SHADE)
    mid = (height - 1) / 2
    for x in range(width):
        colour = WINDOW_COLOUR if x0 <= x < x1 else FILE_COLOUR
        top, bottom = mid - high[x] / peak * mid, mid - low[x] / peak * mid
        draw.line([(x, top), (x, max(bottom, top + 1))], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class WaveformCache:
    """PNGs on disk under `root`, named by what they show (content hash, window, size)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, content_hash: str, start: float, end: float, width: int, height: int) -> Path:
        key = hashlib.sha256(f"{content_hash}:{start:.3f}:{end:.3f}:{width}x{height}".encode()).hexdigest()[:32]
        return self.root / key[:2] / f"{key}.png"

    def get(
        self, source: Path, content_hash: str, start: float, end: float, width: int, height: int
    ) -> tuple[bytes, bool]:
        """(PNG, whether it came from the cache)."""
        cached = self.path_for(content_hash, start, end, width, height)
        if cached.is_file():
            return cached.read_bytes(), True
        png = render_waveform(source, start, end, width=width, height=height)
        with contextlib.suppress(OSError):  # a read-only cache still serves, drawing each time
            atomic_write_bytes(cached, png)
        return png, False
