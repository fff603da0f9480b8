"""Indexing throughput: files per second, where the time goes, -j scaling, memory as the corpus grows.

    .venv/bin/python bench/index_bench.py [--files 400] [--clap-files 24] [--out runs/index.json]

Corpus: generated 30-second stereo FLAC files at 44.1 kHz (tones over noise), so every file needs
decoding, down-mixing and resampling, and is cut into 5 windows (10 s, hop 5 s). Stages are timed
in one process over the whole corpus (hash, decode at the source rate, decode + resample to the
encoder's rate, encode, commit to SQLite + FAISS); end-to-end runs are real `diffgap-index build`
processes with -j 1 and 2, whose main process's peak RSS (VmHWM) is read from the kernel. Encoders have random weights
(the cost of trained ones): the compact encoder, and a full-size CLAP (transformers' default
ClapConfig, ~150M parameters) on a smaller corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from query_load import make_compact, make_full_clap  # noqa: E402

from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.index.build import content_hash, scan_folder  # noqa: E402
from diffgap.index.faiss_sync import sync_faiss  # noqa: E402
from diffgap.index.store import FileRecord, IndexStore  # noqa: E402
from diffgap.media.audio import cut_window, decode_audio, window_bounds, write_audio  # noqa: E402


def make_corpus(root: Path, n: int, seconds: float = 30.0, rate: int = 44100) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"{i // 100:02d}" / f"take_{i:05d}.flac"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        f = rng.uniform(100, 4000)
        tone = 0.3 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * rng.uniform(0.1, 2) * t) > 0)
        left = tone + 0.02 * rng.standard_normal(len(t))
        right = 0.8 * tone + 0.02 * rng.standard_normal(len(t))
        write_audio(path, np.stack([left, right], axis=1).astype(np.float32), rate)


def stage_times(corpus: Path, spec: str, index: Path) -> dict[str, float]:
    encoders = load_encoders(spec, need_text=False)
    enc = encoders.audio
    files = scan_folder(corpus)
    totals = dict.fromkeys(("hash", "decode (source rate)", "decode + resample", "encode", "commit + faiss"), 0.0)
    records = []
    for f in files:
        t = time.perf_counter()
        digest = content_hash(f.path)
        totals["hash"] += time.perf_counter() - t
        t = time.perf_counter()
        native = decode_audio(f.path, 44100)
        totals["decode (source rate)"] += time.perf_counter() - t
        del native
        t = time.perf_counter()
        audio = decode_audio(f.path, enc.sample_rate)
        totals["decode + resample"] += time.perf_counter() - t
        windows = window_bounds(audio.duration, min(10.0, enc.max_seconds), 5.0)
        waves = [cut_window(audio.wave, audio.sample_rate, s, e) for s, e in windows]
        t = time.perf_counter()
        vectors = enc.encode(waves)
        totals["encode"] += time.perf_counter() - t
        records.append(FileRecord(f.rel, digest, f.size, f.mtime, "indexed", duration=audio.duration,
                                  sample_rate=44100, channels=2, windows=windows, vectors=vectors))  # fmt: skip
    t = time.perf_counter()
    store = IndexStore.create(index, encoder_spec=spec, fingerprint=enc.fingerprint, dim=enc.dim)
    for start in range(0, len(records), 32):
        store.commit_files(records[start : start + 32])
    sync_faiss(store)
    store.close()
    totals["commit + faiss"] += time.perf_counter() - t
    counts = {"files": len(files), "windows": sum(len(r.windows) for r in records)}
    return {k: round(v, 2) for k, v in totals.items()} | counts


def end_to_end(corpus: Path, spec: str, index: Path, jobs: int) -> dict[str, float]:
    code = (
        "import sys, time;"
        f"sys.argv = ['diffgap-index', '-q', 'build', {str(corpus)!r}, '-o', {str(index)!r}, '--encoder', {spec!r},"
        f" '-j', '{jobs}'];"
        "from indexer.cli import main; t = time.perf_counter(); rc = main(sys.argv[1:]);"
        # VmHWM, not ru_maxrss: after exec, ru_maxrss still carries the (large) parent's size
        "st = dict(l.split(':', 1) for l in open('/proc/self/status'));"
        "print(time.perf_counter() - t, rc, int(st['VmHWM'].split()[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    seconds, rc, rss = out.split()[-3:]
    assert rc == "0", out
    return {"jobs": jobs, "seconds": round(float(seconds), 2), "peak_rss_mb": round(int(rss) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--clap-files", type=int, default=24)
    ap.add_argument("--out", default="runs/index.json")
    args = ap.parse_args()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small, large = tmp / "corpus-small", tmp / "corpus-large"
        make_corpus(small, args.files // 4)
        make_corpus(large, args.files)
        clap_corpus = tmp / "corpus-clap"
        make_corpus(clap_corpus, args.clap_files)
        compact = make_compact(tmp / "compact")
        clap = make_full_clap(tmp / "clap")
        result["stages_compact"] = stage_times(small, compact, tmp / "i0")
        print(result["stages_compact"], flush=True)
        result["stages_clap"] = stage_times(clap_corpus, clap, tmp / "i1")
        print(result["stages_clap"], flush=True)
        result["end_to_end"] = []
        plans = (("compact", compact, small), ("compact", compact, large), ("CLAP full size", clap, clap_corpus))
        for name, spec, corpus in plans:
            n = len(scan_folder(corpus))
            for jobs in (1, 2):
                row = {"encoder": name, "files": n, **end_to_end(corpus, spec, tmp / f"e-{name[:4]}-{n}-{jobs}", jobs)}
                row["files_per_s"] = round(n / row["seconds"], 2)
                result["end_to_end"].append(row)
                print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
