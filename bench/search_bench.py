"""Vector search speed and memory: exact search routes, approximate indexes, memory-mapping.

    .venv/bin/python bench/search_bench.py [--sizes 10000,100000,1000000] [--out runs/search.json]

Data: unit vectors in 256-d drawn around 2000 random centres (cosine to the centre ~0.7), a
stand-in for real embeddings, which cluster by sound type; random uniform vectors would make
approximate search look worse than it is on real data. Queries are fresh draws from the same mix.
Every timing is the median of repeated calls in this one process, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffgap.flat_search import FlatView  # noqa: E402
from diffgap.store import new_faiss_index, write_faiss_atomic  # noqa: E402


def clustered(n: int, dim: int, seed: int, centres: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(12345)
    mu = rng.standard_normal((centres, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = mu[rng.integers(0, centres, m)] + rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
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
        (f"IVF{nlist},Flat", "nprobe", (8, 16, 32, 64, 128)),
        ("HNSW32", "efSearch", (16, 32, 64, 128)),
        (f"IVF{nlist},PQ32x8", "nprobe", (16, 64)),
        (f"IVF{nlist},PQ64x8,RFlat", "nprobe", (16, 32, 64)),
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
                faiss.downcast_index(index).k_factor = 4
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


def _flat(xb: np.ndarray) -> faiss.Index:
    index = new_faiss_index(xb.shape[1], "Flat")
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    return index


def mmap_memory(xb: np.ndarray, tmp: Path) -> list[dict]:
    """Peak RSS of a fresh process that opens the index and runs 20 queries, mapped or loaded."""
    path = tmp / "flat.faiss"
    write_faiss_atomic(_flat(xb), path)
    rows = []
    for mmap in (False, True):
        code = (
            "import faiss, numpy as np, resource, sys;"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
            "from diffgap.flat_search import FlatView;"
            f"flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if {mmap} else 0;"
            f"index = faiss.read_index({str(path)!r}, flags);"
            "v = FlatView(index); q = np.random.default_rng(0).standard_normal((1, index.d)).astype('float32');"
            "[v.search(q, 10) for _ in range(20)];"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows.append(
            {
                "n": len(xb),
                "mmap": mmap,
                "peak_rss_mb": round(int(out.strip().splitlines()[-1]) / 1024, 1),
                "file_mb": round(path.stat().st_size / 2**20, 1),
            }
        )
        del before
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/search.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    xq = clustered(200, args.dim, seed=1)
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"faiss {faiss.__version__}, torch {torch.__version__}",
        "exact": [],
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in sizes:
            xb = clustered(n, args.dim, seed=0)
            result["exact"] += exact_routes(xb, xq, args.threads)
            print(json.dumps(result["exact"][-8:]), flush=True)
        result["approximate"] = approximate(xb, xq, tmp)
        result["mmap"] = mmap_memory(xb, tmp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["mmap"]))


if __name__ == "__main__":
    main()
