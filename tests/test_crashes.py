"""SIGKILL at random points: reruns end exactly where an uninterrupted run does (marked slow)."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tone
from safetensors.numpy import load_file

from diffgap.index.store import IndexStore
from diffgap.media.audio import write_audio
from indexer.cli import main

pytestmark = pytest.mark.slow
TRIALS = 12


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> bool:
    """Run `cmd`, SIGKILL it as soon as ready() holds; False if it finished first."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return True
            time.sleep(0.003)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as con:
            return int(con.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-corpus")
    for i in range(80):
        write_audio(root / f"f{i:03d}.flac", tone(120 + 31 * i, 2.5, 16000), 16000)
    (root / "zz_broken.wav").write_bytes(b"RIFF\x00\x00")
    return root


def _snapshot(index: Path) -> tuple[list[tuple[str, float, float]], np.ndarray]:
    with IndexStore.open(index, readonly=True) as store:
        ids, xb = store.vectors()
        items = store.items(ids)
        order = np.argsort([f"{items[i].path}:{items[i].start}" for i in ids])
        keys = [(items[ids[j]].path, items[ids[j]].start, items[ids[j]].end) for j in order]
        return keys, xb[order]


def test_indexer_survives_random_sigkills(corpus, tiny_clap, tmp_path):
    ref = tmp_path / "ref"
    assert main(["build", str(corpus), "-o", str(ref), "--encoder", f"clap:{tiny_clap}", "-q"]) == 0
    want_keys, want_xb = _snapshot(ref)
    index = tmp_path / "idx"
    cmd = [
        sys.executable,
        "-m",
        "indexer.cli",
        "-q",
        "build",
        str(corpus),
        "-o",
        str(index),
        "--encoder",
        f"clap:{tiny_clap}",
        "--chunk-files",
        "3",
        "-j",
        "2",
    ]
    rng = random.Random(0)
    kills = 0
    for _ in range(TRIALS):
        threshold = rng.randint(1, 78)
        kills += _kill_when(cmd, lambda t=threshold: _count(index / "meta.sqlite", "SELECT COUNT(*) FROM files") >= t)
        # whatever state the kill left, it opens, and SQLite has no duplicates
        if (index / "manifest.json").exists():
            with IndexStore.open(index, readonly=True) as store:
                ids = store.item_ids()
                assert len(ids) == len(set(ids))
    assert kills >= TRIALS // 2, f"only {kills} of {TRIALS} runs were killed before finishing"
    assert subprocess.run(cmd, cwd=REPO, timeout=300).returncode == 0
    keys, xb = _snapshot(index)
    assert keys == want_keys
    np.testing.assert_allclose(xb, want_xb, atol=1e-5)
    assert main(["verify", str(index)]) == 0
    assert not list(index.glob(".*.tmp"))


def test_refiner_training_survives_random_sigkills(tmp_path, tiny_clap):
    root = tmp_path / "pairs"
    root.mkdir()
    rows = ["audio,text"]
    for i in range(12):
        write_audio(root / f"{i}.wav", tone(200 + 150 * i, 1.0, 16000), 16000)
        rows += [f"{i}.wav,tone number {i}", f"{i}.wav,sound {i} of the set"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    base = [
        sys.executable,
        "-m",
        "indexer.cli",
        "-q",
        "refiner",
        "train",
        "--pairs",
        str(root / "pairs.csv"),
        "--encoder",
        f"clap:{tiny_clap}",
        "--iterations",
        "400",
        "--checkpoint-every",
        "25",
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert subprocess.run([*base, "--out", str(tmp_path / "ref")], cwd=REPO, timeout=600).returncode == 0
    out = tmp_path / "killed"
    meta = tmp_path / ".killed.checkpoint" / "checkpoint.json"

    def iteration() -> int:
        try:
            return json.loads(meta.read_text())["iteration"]
        except (OSError, ValueError, KeyError):
            return 0

    kills = 0
    for threshold in (25, 100, 175, 250, 325):
        kills += _kill_when([*base, "--out", str(out)], lambda t=threshold: iteration() >= t)
    assert kills >= 3
    assert subprocess.run([*base, "--out", str(out)], cwd=REPO, timeout=600).returncode == 0
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bit-identical
    assert not (tmp_path / ".killed.checkpoint").exists()
