from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED, noise_bytes, tone

from diffgap.index.store import IndexStore
from diffgap.media.audio import write_audio
from indexer.cli import main


def _items(index: Path) -> list[tuple[str, float, float]]:
    with IndexStore.open(index, readonly=True) as store:
        ids, xb = store.vectors()
        items = store.items(ids)
        return sorted((items[i].path, items[i].start, items[i].end) for i in ids)


def test_build_info_search_over_mixed_formats(mixed_corpus, tiny_clap, tmp_path, capsys, caplog):
    index = tmp_path / "idx"
    assert main(["build", str(mixed_corpus), "-o", str(index), "--encoder", f"clap:{tiny_clap}", "-j", "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files_indexed"] == len(MIXED) + 1  # every format plus the video's soundtrack
    assert info["files_skipped"] == 2
    assert {p for p, _ in info["skipped"]} == {"corrupt.wav", "silent.wav"}
    assert info["dim"] == 16 and info["index_type"] == "auto" and info["faiss_type"] == "Flat"
    assert info["search"] == "exact" and info["tuning"] == {}
    assert info["segments"] == 0  # CLAP's audio vectors keep no time spans
    for bad, why in (("4", "keep no time spans"), ("-1", "a count >= 0")):  # a clear message, nothing built
        assert main(["build", str(mixed_corpus), "-o", str(tmp_path / "spans"), "--encoder", f"clap:{tiny_clap}",
                     "--segments", bad, "-q"]) == 1  # fmt: skip
        assert why in caplog.text and not (tmp_path / "spans").exists()
    # long files become several windows of at most the encoder's 2 s
    items = _items(index)
    assert sum(p == "tone_1200.m4a" for p, _, _ in items) >= 3
    assert all(e - s <= 2.0 + 1e-6 for _, s, e in items)
    # query by example: each file's own audio ranks one of its windows first
    for rel, _freq, _seconds, _sr, _ch in MIXED:
        assert main(["search", str(index), "--audio", str(mixed_corpus / rel), "-k", "3", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert hits[0]["path"] == rel and hits[0]["score"] > 0.99
    assert main(["search", str(index), "--text", "a bell rings", "-k", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert main(["verify", str(index)]) == 0


def test_update_adds_changes_and_removes(tmp_path, tiny_clap):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in (300, 600, 900):
        write_audio(corpus / f"t{f}.wav", tone(f, 1.0, 16000), 16000)
    index = tmp_path / "idx"
    assert main(["build", str(corpus), "-o", str(index), "--encoder", f"clap:{tiny_clap}", "-q"]) == 0
    old_ids = {p: i for i, p in _ids(index).items()}
    (corpus / "t300.wav").unlink()
    write_audio(corpus / "t600.wav", tone(650, 1.0, 16000), 16000)  # changed content
    write_audio(corpus / "t1500.flac", tone(1500, 1.0, 16000), 16000)  # new
    assert main(["update", str(index), "-q"]) == 0
    new_ids = {p: i for i, p in _ids(index).items()}
    assert set(new_ids) == {"t600.wav", "t900.wav", "t1500.flac"}
    assert new_ids["t900.wav"] == old_ids["t900.wav"]  # untouched file keeps its id
    assert new_ids["t600.wav"] != old_ids["t600.wav"]
    assert main(["verify", str(index)]) == 0


def _ids(index: Path) -> dict[int, str]:
    with IndexStore.open(index, readonly=True) as store:
        return {i: it.path for i, it in store.items(store.item_ids()).items()}


def test_refuses_other_encoder_and_reports_nothing_indexed(tmp_path, tiny_clap, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "junk.wav").write_bytes(b"not audio at all")
    assert main(["build", str(corpus), "-o", str(tmp_path / "idx"), "--encoder", f"clap:{tiny_clap}", "-q"]) == 1
    from tiny_models import make_tiny_clap

    other = make_tiny_clap(tmp_path / "other", seed=3)
    assert main(["build", str(corpus), "-o", str(tmp_path / "idx"), "--encoder", f"clap:{other}", "-q"]) == 1
    assert "cannot be mixed" in caplog.text
    assert main(["build", str(tmp_path / "nope"), "-o", str(tmp_path / "i2"), "--encoder", f"clap:{tiny_clap}"]) == 1
    assert main(["info", str(tmp_path / "nowhere")]) == 1


def test_build_from_a_manifest(tmp_path, tiny_clap):
    (tmp_path / "audio").mkdir()
    for f in (300, 700):
        write_audio(tmp_path / "audio" / f"{f}.flac", tone(f, 1.0, 16000), 16000)
    (tmp_path / "pairs.csv").write_text(
        "audio,text\naudio/300.flac,low hum\naudio/700.flac,mid tone\naudio/300.flac,another caption\n"
    )
    index = tmp_path / "idx"
    assert (
        main(
            [
                "build",
                "--manifest",
                str(tmp_path / "pairs.csv"),
                "-o",
                str(index),
                "--encoder",
                f"clap:{tiny_clap}",
                "-q",
            ]
        )
        == 0
    )
    assert [p for p, _, _ in _items(index)] == ["audio/300.flac", "audio/700.flac"]


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("many")
    for i in range(60):
        write_audio(corpus / f"f{i:03d}.wav", tone(150 + 37 * i, 3.0, 16000), 16000)
    (corpus / "f999_bad.wav").write_bytes(b"RIFF" + noise_bytes(64, seed=5))
    return corpus


def test_killed_build_resumes_to_the_same_items(many_files, tiny_clap, tmp_path):
    reference = tmp_path / "ref"
    assert main(["build", str(many_files), "-o", str(reference), "--encoder", f"clap:{tiny_clap}", "-q"]) == 0
    want = _items(reference)
    cmd = [
        sys.executable,
        "-m",
        "indexer.cli",
        "-q",
        "build",
        str(many_files),
        "-o",
        str(tmp_path / "idx"),
        "--encoder",
        f"clap:{tiny_clap}",
        "--chunk-files",
        "2",
    ]
    killed_at = []
    for threshold in (4, 20, 40):  # three crashes at different depths
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent)
        db = tmp_path / "idx" / "meta.sqlite"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
                        n = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
                except sqlite3.Error:
                    n = 0
                if n >= threshold:
                    proc.send_signal(signal.SIGKILL)
                    killed_at.append(n)
                    break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert killed_at and all(n < 61 for n in killed_at), "the build finished before it could be killed"
    assert main(["verify", str(tmp_path / "idx")]) in (0, 1)  # may be out of step right after a kill
    proc = subprocess.run(cmd, cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == 0
    assert _items(tmp_path / "idx") == want
    assert main(["verify", str(tmp_path / "idx")]) == 0
    with IndexStore.open(reference, readonly=True) as a, IndexStore.open(tmp_path / "idx", readonly=True) as b:
        np.testing.assert_allclose(a.vectors()[1], b.vectors()[1], atol=1e-5)


def test_interrupt_keeps_committed_work(many_files, tiny_clap, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "indexer.cli",
        "build",
        str(many_files),
        "-o",
        str(tmp_path / "idx"),
        "--encoder",
        f"clap:{tiny_clap}",
        "--chunk-files",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent)
    db = tmp_path / "idx" / "meta.sqlite"
    deadline = time.monotonic() + 120
    while not db.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    assert rc in (0, 130)
    assert main(["verify", str(tmp_path / "idx")]) == 0  # Ctrl-C still syncs FAISS with what was committed


def test_old_command_spellings_still_work_and_name_the_new_one(caplog):
    from indexer.cli import build_parser, renamed
    from indexer.commands import encoders, refiner

    for old, new, func in (
        (["-q", "train-refiner", "--pairs", "p.csv"], ["-q", "refiner", "train", "--pairs", "p.csv"],
         refiner.cmd_train),
        (["train-encoders", "--pairs", "p.csv", "--out", "o"], ["encoders", "train", "--pairs", "p.csv", "--out", "o"],
         encoders.cmd_train),
        (["eval", "--pairs", "p.csv"], ["refiner", "eval", "--pairs", "p.csv"], refiner.cmd_eval),
    ):  # fmt: skip
        argv, notice = renamed(old)
        assert argv == new
        assert notice is not None and "old spelling still works" in notice
        assert build_parser().parse_args(argv).func is func
    assert renamed(["build", "corpus", "-o", "eval"]) == (["build", "corpus", "-o", "eval"], None)
    # through main: the notice is logged and the command runs (here: fails cleanly on a missing file)
    assert main(["train-refiner", "--pairs", "/nonexistent/pairs.csv", "--encoder", "compact:/nonexistent"]) == 1
    assert "`train-refiner` is now `refiner train`" in caplog.text


def test_threads_and_progress_lines_off_a_terminal(caplog):
    import logging

    import torch

    from diffgap.resources import available_cpus, free_cpus
    from indexer.cli import build_parser
    from indexer.common import progress_lines, set_threads

    assert 1 <= free_cpus() <= available_cpus()
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert build_parser().parse_args(["refiner", "train", "--threads", "1", "--pairs", "p.csv"]).threads == 1
    assert build_parser().parse_args(["--threads", "2", "info", "x"]).threads == 2
    # only commands that train or encode a corpus wait 0.2 s to measure what other work uses
    assert build_parser().parse_args(["refiner", "train", "--pairs", "p.csv"]).long_running is True
    assert not hasattr(build_parser().parse_args(["info", "x"]), "long_running")
    caplog.set_level(logging.INFO, logger="diffgap.progress")
    step = progress_lines(100, "it", "training", every_s=0.0)
    for _ in range(3):
        step(10)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffgap.progress"]
    assert lines[-1].startswith("training: 30/100 it")
