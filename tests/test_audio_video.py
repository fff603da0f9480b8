from __future__ import annotations

import numpy as np
import pytest
from conftest import MIXED, tone

from diffgap.media.audio import AudioDecodeError, decode_audio, window_bounds, write_audio
from diffgap.media.video import VideoDecodeError, decode_video, write_video


@pytest.mark.parametrize(("rel", "freq", "seconds", "sr", "channels"), MIXED)
def test_every_format_decodes_to_mono_at_the_requested_rate(mixed_corpus, rel, freq, seconds, sr, channels):
    audio = decode_audio(mixed_corpus / rel, 16000)
    assert audio.wave.dtype == np.float32 and audio.wave.ndim == 1
    assert audio.sample_rate == 16000
    assert audio.source_channels == channels
    assert abs(audio.duration - seconds) < 0.08  # codecs pad a frame at most
    # the dominant frequency survives decoding and resampling
    spectrum = np.abs(np.fft.rfft(audio.wave[: 16000 // 2]))
    peak_hz = np.argmax(spectrum) * 16000 / (16000 // 2)
    assert abs(peak_hz - freq) < 15


def test_source_rate_is_reported(mixed_corpus):
    assert decode_audio(mixed_corpus / "a/tone_350.flac", 16000).source_rate == 44100


def test_video_soundtrack_decodes(mixed_corpus):
    assert abs(decode_audio(mixed_corpus / "clip.mp4", 16000).duration - 2.0) < 0.1


@pytest.mark.parametrize(
    ("name", "reason"), [("corrupt.wav", "cannot open"), ("silent.wav", "silent"), ("notes.txt", "cannot open")]
)
def test_bad_files_raise_with_a_reason(mixed_corpus, name, reason):
    with pytest.raises(AudioDecodeError, match=reason):
        decode_audio(mixed_corpus / name, 16000)


def test_empty_file_and_truncated_file(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    with pytest.raises(AudioDecodeError):
        decode_audio(tmp_path / "empty.mp3", 16000)
    write_audio(tmp_path / "full.flac", tone(440, 2.0, 16000), 16000)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    cut = decode_audio(tmp_path / "cut.flac", 16000)  # what decoded cleanly is kept
    assert 0.3 < cut.duration < 2.0


def test_max_seconds_limits_decoding(mixed_corpus):
    assert decode_audio(mixed_corpus / "tone_1200.m4a", 16000, max_seconds=1.0).duration == pytest.approx(1.0)


def test_window_bounds_cover_the_whole_file():
    assert window_bounds(4.0, 10, 5) == [(0.0, 4.0)]
    assert window_bounds(10.0, 10, 5) == [(0.0, 10.0)]
    bounds = window_bounds(23.0, 10, 5)
    assert bounds == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (13.0, 23.0)]
    with pytest.raises(AssertionError):
        window_bounds(5.0, 10, 0)


def test_video_frames_are_resampled_to_the_requested_fps(tmp_path):
    frames = np.zeros((30, 48, 48, 3), np.uint8)
    for i in range(30):
        frames[i, :, :, 0] = i * 8
    write_video(tmp_path / "v.mp4", frames, 10)
    out = decode_video(tmp_path / "v.mp4", 5, size=24)
    assert out.shape == (15, 24, 24, 3)
    # every second source frame is kept: red ramps twice as fast
    assert out[1, 12, 12, 0] > out[0, 12, 12, 0]
    assert decode_video(tmp_path / "v.mp4", 20).shape[0] == 60  # a slow source repeats frames


def test_video_errors(tmp_path, mixed_corpus):
    with pytest.raises(VideoDecodeError, match="no video stream"):
        decode_video(mixed_corpus / "a/tone_200.wav", 4)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(VideoDecodeError):
        decode_video(tmp_path / "bad.mp4", 4)
