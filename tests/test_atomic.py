"""The one atomic-write helper: whole files or none, synced before and after the rename."""

from __future__ import annotations

import os

import pytest

from diffgap.atomic import atomic_write, atomic_write_bytes, atomic_write_json, remove_stale_temps


def test_replaces_whole_files_and_syncs_file_and_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert synced[-1] == str(tmp_path / "sub")  # the directory, after the rename
    assert any(p.startswith(str(tmp_path / "sub" / ".data.json.")) for p in synced)  # the data, before it
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["data.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "vectors.bin"
    atomic_write_bytes(target, b"old")

    def half_then_fail(fh) -> None:  # noqa: ANN001
        fh.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.bin"]


def test_stale_temps_of_killed_writers_are_removed(tmp_path):
    (tmp_path / ".index.faiss.abc123.tmp").write_bytes(b"half")
    (tmp_path / "index.faiss").write_bytes(b"whole")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]
