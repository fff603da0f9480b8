"""bench/recovery_table.py: the recovery table and figure of issue 18 from `refiner eval --json` files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffgap.training.evaluate import DIRECT, UPPER

SCRIPT = Path(__file__).parents[1] / "bench" / "recovery_table.py"


def ranks(r1: float) -> dict:
    return {
        "R@1": r1,
        "R@5": min(1.0, r1 + 0.2),
        "R@10": min(1.0, r1 + 0.3),
        "MRR@10": r1,
        "median_rank": 1.0,
        "n": 100,
    }


def write_eval(path: Path, direct: float, upper: float | None, mapper: float) -> None:
    """An eval JSON in the shape `refiner eval --json` writes: with an upper bound, every row carries
    its recovery in its notes."""
    rows = [(DIRECT, direct), (UPPER, upper), ("regression mapper (MLP)", mapper)]
    json_rows = []
    for name, r1 in rows:
        if r1 is None:
            continue
        gain = {} if upper is None else {"recovery_to_audio": (r1 - direct) / (upper - direct)}
        notes = gain | {k.replace("to_", "from_"): v for k, v in gain.items()}
        json_rows.append({"name": name, "to_audio": ranks(r1), "from_audio": ranks(r1), "notes": notes})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"modality": "video", "rows": json_rows}))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_table_between_markers_and_figure(tmp_path):
    work = tmp_path / "w0"
    write_eval(work / "protocol" / "eval-video.json", direct=0.4, upper=0.6, mapper=0.5)
    write_eval(work / "in-domain" / "eval-video.json", direct=0.6, upper=None, mapper=0.66)
    out = tmp_path / "B.md"
    out.write_text("# B\n\nbefore\n\n<!-- rc:begin -->\nold\n<!-- rc:end -->\n\nafter\n")
    res = run("--work", f"0={work}", "--out", str(out), "--marker", "rc")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "old" not in text and text.startswith("# B\n\nbefore") and text.rstrip().endswith("after")
    assert "| regression mapper | 0.500 (50%) | 0.660 (1.10x) |" in text, text
    assert "| direct | 0.400 (0%) | 0.600 (1.00x) |" in text, text


def test_figure(tmp_path):
    pytest.importorskip("matplotlib")  # the [bench] extra; CI's default install leaves it out
    work = tmp_path / "w0"
    write_eval(work / "protocol" / "eval-video.json", direct=0.4, upper=0.6, mapper=0.5)
    png = tmp_path / "r.png"
    res = run("--work", f"0={work}", "--png", str(png))
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_work_dirs_are_a_clear_error_and_leave_the_file_alone(tmp_path):
    out = tmp_path / "B.md"
    out.write_text("<!-- rc:begin -->\nkeep\n<!-- rc:end -->\n")
    res = run("--work", f"0={tmp_path / 'missing'}", "--out", str(out), "--marker", "rc")
    assert res.returncode == 2 and "no eval-text.json or eval-video.json" in res.stderr, res.stderr
    res = run("--work", str(tmp_path))
    assert res.returncode == 2 and "SEED=WORK_DIR" in res.stderr, res.stderr
    assert "keep" in out.read_text()
    text_only = tmp_path / "t"
    write_eval(text_only / "protocol" / "eval-text.json", direct=0.1, upper=0.5, mapper=0.2)
    res = run("--work", f"0={text_only}", "--png", str(tmp_path / "v.png"), "--modality", "video")
    assert res.returncode != 0 and "no protocol/eval-video.json" in res.stderr, res.stderr


def test_suffix_reads_a_second_eval_beside_the_first(tmp_path):
    work = tmp_path / "w0"
    write_eval(work / "protocol" / "eval-video.json", direct=0.4, upper=0.6, mapper=0.5)
    write_eval(work / "protocol" / "eval-video-rank.json", direct=0.4, upper=0.6, mapper=0.55)
    res = run("--work", f"0={work}", "--suffix=-rank")  # = : the value starts with a dash
    assert res.returncode == 0, res.stderr
    assert "| regression mapper | 0.550 (75%) |" in res.stdout, res.stdout
    res = run("--work", f"0={work}", "--suffix=-other")
    assert res.returncode == 2 and "no eval-text-other.json or eval-video-other.json" in res.stderr, res.stderr


def test_chart_labels_tell_the_two_mixes_apart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recovery_table_labels", SCRIPT)
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports write_benchmarks beside it
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    mix = "ensemble of refined, mapped and direct scores"
    one = f"{mix}, weights chosen on held-out pairs (0.25/0.75/0, 0.25/0.75/0)"
    assert module._short(one) == "ensemble, query side only"
    two = f"{one}, two-sided: the library mapped back, weight chosen on held-out pairs (0.5, 0.25)"
    assert module._short(two) == "ensemble, two-sided (shipped)"
    plain = f"{mix} with the plain regression mapper, weights chosen on held-out pairs"
    assert module._short(plain) == "ensemble over the plain mapper"
    assert module._short(f"{plain}, two-sided: the library mapped back") == "ensemble over the plain mapper, two-sided"
    # rows line up across runs whatever weights each run chose
    other = two.replace("0.25/0.75/0, 0.25/0.75/0", "0/0.5/0.5, 0.25/0.25/0.5").replace("(0.5, 0.25)", "(0, 1)")
    assert (
        module._family(two)
        == module._family(other)
        == f"{mix}, weights chosen on held-out pairs, two-sided: the library mapped back, weight chosen on held-out"
        " pairs"
    )
    assert module._family("refiner with BST (m=auto)") == "refiner with BST"
    assert module._short("mapper with a ranking loss (0.2), as the refiner ships it") == "MLP mapper + ranking loss"
