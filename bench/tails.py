"""Where a slow request's time goes: sequential searches from one or more clients, each request's latency
split into the stages the server times itself (encode, refine, words, search) and the rest (HTTP, JSON,
the hand-off to the batcher thread and waiting there for the batch before it).

    .venv/bin/python bench/tails.py [--items 10000] [--requests 2000] [--clients 1] [--threads 1] [--pin]
        [--kinds 0,1,2,3] [--wrk SECONDS] [--out runs/tails.json]

Builds the same synthetic index as bench/query_load.py, starts a real `diffgap-serve` on 127.0.0.1
and sends `--requests` searches per query kind, split over `--clients` client threads, each sending
its share one after another over its own keep-alive connection (http.client). A request is slow when it
takes more than 3x the median of its kind; for the slow ones the table says how much of the excess over
the median each part explains. The server runs through `bench/gc_probe.py`, which logs every garbage-
collector pause, so that slow requests can be matched with the pauses that happened while they ran.
`--pin` puts the client on the last CPU and the server on the others, so they do not take turns on
one core. `--wrk SECONDS` drives the server with wrk instead (C: a load generator that takes little
CPU; `--clients` connections, two runs of SECONDS per kind after a 2 s warm-up); wrk reports only the
latency percentiles, not the per-stage split.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from query_load import QUERIES, build_index, free_port, make_compact, run_wrk  # noqa: E402

KINDS = {
    "sound only, refine off": {"refine": False, "lexical": False},
    "sound only, refine 1 step": {"refine": True, "steps": 1, "lexical": False},
    "sound only, refine 5 steps": {"refine": True, "steps": 5, "lexical": False},
    "default (words + sound, refine 1 step)": {},
}


def start_server(index: Path, threads: int, cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(index / "serve.log", "w")  # noqa: SIM115
    cmd = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "bench" / "gc_probe.py"),
           "--index", str(index), "--port", str(port), "--threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "DIFFGAP_LOG_LEVEL": "WARNING", "GC_LOG": str(index / "gc.jsonl")},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server did not become ready; see {index / 'serve.log'}")


def run_kind(port: int, options: dict, n: int, clients: int = 1) -> list[dict]:
    """`n` requests of one kind from `clients` concurrent clients, each on its own connection."""
    if clients == 1:
        return run_client(port, options, n)
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda c: run_client(port, options, n // clients, offset=c), range(clients)))
    return sorted((row for part in parts for row in part), key=lambda r: r["t"])


def run_client(port: int, options: dict, n: int, offset: int = 0) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    rows = []
    for i in range(offset, offset + n + 50):  # the first 50 warm up and are dropped
        body = json.dumps({"text": QUERIES[i % len(QUERIES)], "k": 10, **options})
        t0 = time.perf_counter()
        conn.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        wall_ms = (time.perf_counter() - t0) * 1e3
        assert response.status == 200, payload[:200]
        if i >= offset + 50:
            stages = json.loads(payload)["timings_ms"]
            rows.append({"t": time.time(), "ms": wall_ms, **{k: float(v) for k, v in stages.items()}})
    conn.close()
    return rows


def wrk_kind(port: int, options: dict, clients: int, seconds: int, tmp: Path) -> list[dict]:
    """Two wrk runs of one kind after a warm-up; each run's p50, p99 and their ratio."""
    # the request's fields after "text" and "k" (wrk's script needs one: the default kind repeats "k")
    body = json.dumps(options)[1:-1] or '"k": 10'
    run_wrk(port, clients, 2, body, tmp)
    runs = [run_wrk(port, clients, seconds, body, tmp) for _ in range(2)]
    return [{**r, "p99_over_p50": round(r["p99_ms"] / r["p50_ms"], 2)} for r in runs]


def gc_pauses(path: Path, start: float, end: float) -> list[dict]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if start <= e["t"] <= end]


def summarise(kind: str, rows: list[dict], gcs: list[dict]) -> dict:
    wall = [r["ms"] for r in rows]
    p50 = statistics.median(wall)
    p99 = sorted(wall)[int(0.99 * (len(wall) - 1))]
    stages = [k for k in rows[0] if k not in ("t", "ms")]
    medians = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in stages}
    rest_median = statistics.median(r["ms"] - sum(r.get(k, 0.0) for k in stages) for r in rows)
    slow = [r for r in rows if r["ms"] > 3 * p50]
    excess = {k: 0.0 for k in [*stages, "rest"]}
    during_gc = 0
    for r in slow:
        for k in stages:
            excess[k] += r.get(k, 0.0) - medians[k]
        excess["rest"] += r["ms"] - sum(r.get(k, 0.0) for k in stages) - rest_median
        t_end, t_start = r["t"], r["t"] - r["ms"] / 1e3
        during_gc += any(t_start - 0.001 <= g["t"] <= t_end for g in gcs if g["ms"] > 1.0)
    total_excess = sum(excess.values()) or 1.0
    return {
        "kind": kind, "n": len(rows), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
        "p99_over_p50": round(p99 / p50, 2), "slow": len(slow),
        "stage_medians_ms": {k: round(v, 3) for k, v in medians.items()}, "rest_median_ms": round(rest_median, 3),
        "slow_excess_share": {k: round(v / total_excess, 2) for k, v in excess.items()},
        "slow_during_gc_over_1ms": during_gc,
        "gc_over_1ms": sum(g["ms"] > 1.0 for g in gcs), "gc_max_ms": round(max((g["ms"] for g in gcs), default=0), 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=1, help="concurrent clients, one connection each")
    ap.add_argument("--kinds", default=",".join(str(i) for i in range(len(KINDS))), help="which query kinds (0-based)")
    ap.add_argument("--wrk", type=int, metavar="SECONDS", help="drive the server with wrk for SECONDS per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", action="store_true", help="client on the last CPU, server on the rest")
    ap.add_argument("--out", default="runs/tails.json")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = set(cpus[:-1]) if args.pin and len(cpus) > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, {cpus[-1]})
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        spec = make_compact(tmp / "compact")
        build_index(tmp / "index", spec, args.items)
        proc, port = start_server(tmp / "index", args.threads, server_cpus)
        try:
            chosen = [list(KINDS.items())[int(i)] for i in args.kinds.split(",")]
            for kind, options in chosen:
                start = time.time()
                if args.wrk:
                    runs = wrk_kind(port, options, args.clients, args.wrk, tmp)
                    results.append({"kind": kind, "clients": args.clients, "runs": runs})
                    print(json.dumps(results[-1]), flush=True)
                    continue
                rows = run_kind(port, options, args.requests, args.clients)
                summary = summarise(kind, rows, gc_pauses(tmp / "index" / "gc.jsonl", start, time.time()))
                results.append(summary)
                print(json.dumps(summary), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"items": args.items, "requests": args.requests, "clients": args.clients, "threads": args.threads,
            "pinned": bool(server_cpus)}  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
