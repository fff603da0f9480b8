"""Vector search speed and memory: exact search routes, approximate indexes, memory-mapping, and
where `--index-type auto` switches from exact to HNSW.

    .venv/bin/python bench/search_bench.py [--sizes 10000,100000,1000000] [--out runs/search.json]
    .venv/bin/python bench/search_bench.py --sections auto --sizes 10000,25000,50000,100000,200000 \
        --dims 256,512 --threads 1 --out runs/auto.json

Data: unit vectors in 256-d on a smooth 24-dimensional manifold plus noise (`embedding_like`), a
stand-in for real embeddings: uniform random vectors have no neighbourhoods at all, and separated
clusters make every IVF look perfect. Queries are fresh draws from the same distribution.
Every timing is the median of repeated calls in this one process, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffgap.encoders.base import EncoderFingerprint  # noqa: E402
from diffgap.index.ann import APPROXIMATE, resolve_index_type  # noqa: E402
from diffgap.index.faiss_sync import save_npy_atomic, sync_faiss, write_faiss_atomic  # noqa: E402
from diffgap.index.store import FileRecord, IndexStore  # noqa: E402
from diffgap.index.vectors import FlatView, new_faiss_index  # noqa: E402


def embedding_like(n: int, dim: int, seed: int, latent: int = 24) -> np.ndarray:
    """Unit vectors on a smooth low-dimensional manifold: a 24-d Gaussian through a fixed random
    linear map into `dim`, plus 10% isotropic noise. Neighbourhoods are continuous, as in real
    embedding sets, rather than separated clusters that make any IVF look perfect."""
    mix = np.random.default_rng(12345).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, latent)).astype(np.float32) @ mix
        x += 0.1 * rng.standard_normal((m, dim)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def exact_routes(xb: np.ndarray, xq: np.ndarray, threads: int) -> list[dict]:
    n = len(xb)
    index = new_faiss_index(xb.shape[1], "Flat")
    index.add_with_ids(xb, np.arange(n, dtype=np.int64))
    view = FlatView(index)
    tb = torch.from_numpy(xb)
    repeat = 30 if n <= 100_000 else 8
    rows = []
    for nq in (1, 32):
        q = np.ascontiguousarray(xq[:nq])
        timings: dict[str, float] = {}
        for omp in sorted({1, threads}):
            faiss.omp_set_num_threads(omp)
            timings[f"faiss IndexFlatIP, {omp} OpenMP thread(s)"] = median_ms(lambda q=q: index.search(q, 10), repeat)
        faiss.omp_set_num_threads(threads)
        timings["torch matmul + topk"] = median_ms(lambda q=q: torch.topk(torch.from_numpy(q) @ tb.T, 10), repeat)
        timings["diffgap FlatView (what the service uses)"] = median_ms(lambda q=q: view.search(q, 10), repeat)
        assert np.array_equal(view.search(q, 10)[1], index.search(q, 10)[1]), "routes disagree"
        rows += [{"n": n, "nq": nq, "route": r, "median_ms": round(ms, 3)} for r, ms in timings.items()]
    return rows


def approximate(xb: np.ndarray, xq: np.ndarray, tmp: Path) -> list[dict]:
    n, dim = xb.shape
    truth = FlatView(_flat(xb)).search(xq, 10)[1]
    nlist = int(4 * np.sqrt(n)) // 256 * 256 or 256
    rows = []
    configs = [
        (f"IVF{nlist},Flat", "nprobe", (16, 64, 128, 256, 512)),
        ("HNSW32", "efSearch", (16, 32, 64, 128, 256)),
        (f"IVF{nlist},PQ32x8", "nprobe", (16, 64)),
        (f"IVF{nlist},PQ32x8,RFlat", "nprobe", (16, 32, 64)),
    ]
    sample = xb[np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)]
    for factory, knob, values in configs:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        index.train(sample)
        index.add(xb)
        build_s = time.perf_counter() - t
        write_faiss_atomic(index, tmp / "approx.faiss")
        size_mb = (tmp / "approx.faiss").stat().st_size / 2**20
        for value in values:
            params = faiss.ParameterSpace()
            if factory.endswith("RFlat"):
                faiss.downcast_index(index).k_factor = 16  # re-rank 160 PQ candidates exactly
            params.set_index_parameter(index, knob, value)
            found = index.search(xq, 10)[1]
            rows.append(
                {
                    "n": n,
                    "index": factory,
                    knob: value,
                    "recall@10": round(recall_at(found, truth), 4),
                    "median_ms_1_query": round(median_ms(lambda index=index: index.search(xq[:1], 10), 30), 3),
                    "build_s": round(build_s, 1),
                    "file_mb": round(size_mb, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def auto_crossover(xb: np.ndarray, xq: np.ndarray, tmp: Path) -> dict:
    """One size and dim: exact search against the HNSW32 index the index store builds and tunes
    (a real store: SQLite, sync_faiss, the held-out recall measurement), queried with fresh vectors."""
    n, dim = xb.shape
    view = FlatView.from_arrays(np.arange(1, n + 1, dtype=np.int64), xb)  # store ids start at 1
    truth = view.search(xq, 10)[1]
    fingerprint = EncoderFingerprint("compact", "bench", "00" * 32, "audio", {})
    root = tmp / f"auto-{n}-{dim}"
    with IndexStore.create(root, encoder_spec="compact:bench", fingerprint=fingerprint, dim=dim,
                           index_type=APPROXIMATE) as store:  # fmt: skip
        for start in range(0, n, 10_000):  # one window per file, in chunks
            store.commit_files(
                [
                    FileRecord(f"{i}.wav", str(i), 1, 0.0, "indexed", windows=[(0.0, 1.0)], vectors=xb[i : i + 1])
                    for i in range(start, min(n, start + 10_000))
                ]  # fmt: skip
            )
        t = time.perf_counter()
        sync_faiss(store)
        sync_s = time.perf_counter() - t
        tuning = store.manifest.tuning
        index = store.vector_index()
        found = index.search(xq, 10)[1]
        row = {
            "n": n,
            "dim": dim,
            "flat_ms": round(median_ms(lambda: view.search(xq[:1], 10), 50), 3),
            "hnsw_sync_s": round(sync_s, 1),
            "effort": tuning["effort"],
            "recall_held_out": tuning["recall_at_10"],
            "recall_fresh_queries": round(recall_at(found, truth), 4),
            "hnsw_ms": round(median_ms(lambda: index.search(xq[:1], 10), 50), 3),
            "auto_picks": resolve_index_type("auto", n, dim),
        }
    shutil.rmtree(root)
    print(row, flush=True)
    return row


def _flat(xb: np.ndarray) -> faiss.Index:
    index = new_faiss_index(xb.shape[1], "Flat")
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    return index


def mmap_memory(xb: np.ndarray, tmp: Path) -> list[dict]:
    """A fresh process opens the index (mapped or read into memory) and runs 20 queries; its open
    time and its memory split into anonymous (private, unevictable without swap) and file-backed
    (page cache: shared by every process mapping the file, reclaimable) from /proc/self/status."""
    path = tmp / "flat.faiss"
    flat = _flat(xb)
    write_faiss_atomic(flat, path)
    save_npy_atomic(xb, tmp / "vectors.npy")  # what the index store writes beside a Flat index
    save_npy_atomic(FlatView(flat).ids, tmp / "ids.npy")
    rows = []
    for mmap in (False, True):
        code = (
            "import faiss, numpy as np, sys, time;"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
            "from diffgap.index.vectors import FlatView;"
            "t = time.perf_counter();"
            + (
                f"v = FlatView.from_arrays(np.load({str(tmp / 'ids.npy')!r}), "
                f"np.load({str(tmp / 'vectors.npy')!r}, mmap_mode='r'));"
                if mmap
                else f"v = FlatView(faiss.read_index({str(path)!r}));"
            )
            + "t = time.perf_counter() - t;"
            "q = np.random.default_rng(0).standard_normal((1, v.xb.shape[1])).astype('float32');"
            "[v.search(q, 10) for _ in range(20)];"
            "st = dict(l.split(':', 1) for l in open('/proc/self/status'));"
            "print(t, *(int(st[k].split()[0]) for k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM')))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        open_s, rss, anon, file_backed, hwm = out.split()[-5:]
        rows.append(
            {
                "n": len(xb),
                "mmap": mmap,
                "open_ms": round(float(open_s) * 1e3, 1),
                "rss_mb": round(int(rss) / 1024, 1),
                "anon_mb": round(int(anon) / 1024, 1),
                "file_backed_mb": round(int(file_backed) / 1024, 1),
                "peak_rss_mb": round(int(hwm) / 1024, 1),
                "file_mb": round(path.stat().st_size / 2**20, 1),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dims", default="256,512", help="the auto section's dimensions (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/search.json")
    ap.add_argument("--sections", default="exact,approximate,mmap", help="which parts to run (comma-separated)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    xq = embedding_like(200, args.dim, seed=1)
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"faiss {faiss.__version__}, torch {torch.__version__}",
        "exact": [],
    }
    if "auto" in sections:
        result["auto"], result["threads"] = [], args.threads
        with tempfile.TemporaryDirectory() as tmp_name:
            for dim in (int(d) for d in args.dims.split(",")):
                for n in sizes:
                    xb, xq = embedding_like(n, dim, seed=0), embedding_like(200, dim, seed=1)
                    result["auto"].append(auto_crossover(xb, xq, Path(tmp_name)))
        sections.discard("auto")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in sizes if sections & {"exact", "approximate", "mmap"} else []:
            xb = embedding_like(n, args.dim, seed=0)
            if "exact" in sections:
                result["exact"] += exact_routes(xb, xq, args.threads)
                print(json.dumps(result["exact"][-8:]), flush=True)
        if "approximate" in sections:
            result["approximate"] = approximate(xb, xq, tmp)
        if "mmap" in sections:
            result["mmap"] = mmap_memory(xb, tmp)
            print(json.dumps(result["mmap"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
