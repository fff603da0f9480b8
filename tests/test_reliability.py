"""Schema fuzzing and sustained concurrent load against a real server (marked slow; .ci/run runs them).

Sizes can be raised for a longer soak: DIFFGAP_FUZZ_EXAMPLES (per operation and phase, default 150)
and DIFFGAP_LOAD_SECONDS (default 180).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, Server

pytestmark = pytest.mark.slow
FUZZ_EXAMPLES = int(os.environ.get("DIFFGAP_FUZZ_EXAMPLES", "150"))
LOAD_SECONDS = float(os.environ.get("DIFFGAP_LOAD_SECONDS", "180"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_schema_fuzzing_finds_no_server_errors(served_index, tmp_path):
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    srv = Server(served_index, {"DIFFGAP_MAX_UPLOAD_BYTES": str(1024 * 1024)})

    def fuzz(workers: int) -> tuple[int, str]:
        proc = subprocess.run(
            [exe, "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error", "-n", str(FUZZ_EXAMPLES),
             "--request-timeout", "30", "--seed", "7", "--workers", str(workers)],
            cwd=tmp_path, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr

    try:
        returncode, out = fuzz(workers=2)
        if returncode != 0 and "AST constructor recursion depth mismatch" in out and "Failures:" not in out:
            # A CPython 3.11 bug inside hypothesis's own bookkeeping (ast.parse deep in recursion, seen
            # with 2 worker threads), not a failed check against the server: run again single-threaded.
            returncode, out = fuzz(workers=1)
        assert returncode == 0, out[-4000:]
        generated = int(re.search(r"(\d+) generated", out).group(1))
        assert generated >= 1000, out[-2000:]
        (REPO / ".fuzz-last.txt").write_text(f"{generated} requests, exit {returncode}\n")
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
    finally:
        srv.stop()


def test_sustained_load_with_index_swaps(served_index):
    srv = Server(served_index, {"DIFFGAP_ALLOW_OPEN_ADMIN": "1"})
    clients, latencies, errors, poison = 32, [], [], []
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS
    texts = ["a high beep twice at the start", "a low buzz at the end", "knocking", "a whistle then a chirp"]

    def client(n: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            i = 0
            while time.monotonic() < stop:
                poisoned = (n * 37 + i) % 100 == 0  # 1% of queries: text no tokenizer can read
                text = "a lone surrogate \ud800 here" if poisoned else texts[(n + i) % len(texts)]
                body = json.dumps({"text": text, "k": 10, "refine": (n + i) % 3 != 0})  # \ud800 escaped
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
                    if poisoned:
                        ok = r.status_code == 422
                        with lock:
                            poison.append(r.status_code)
                    else:
                        ok = r.status_code == 200 and len(r.json()["results"]) == 10
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if not ok:
                        errors.append(repr(r))
                i += 1

    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:  # warm up before the memory baseline
            for t in texts:
                c.post("/v1/search", json={"text": t})
        rss_start = rss_mb(srv.proc.pid)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        swaps = []
        with httpx.Client(base_url=srv.url, timeout=60) as admin:
            for _ in range(3):  # swap the index in three times under full load
                time.sleep(LOAD_SECONDS / 4)
                swaps.append(admin.post("/v1/admin/reload").status_code)
        for t in threads:
            t.join()
        rss_end = rss_mb(srv.proc.pid)
    finally:
        srv.stop()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    report = (
        f"{len(latencies)} requests from {clients} clients in {LOAD_SECONDS:.0f} s, {len(errors)} errors, "
        f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, mean {statistics.mean(latencies) * 1e3:.0f} ms, "
        f"RSS {rss_start:.0f} -> {rss_end:.0f} MB, swaps {swaps}, {len(poison)} poisoned queries answered 422"
    )
    (REPO / ".load-last.txt").write_text(report + "\n")
    assert not errors, errors[:5]
    assert poison and set(poison) == {422}
    assert swaps == [200, 200, 200]
    assert p99 < 5.0, report
    assert rss_end - rss_start < 150, report  # flat: no growth with the number of requests
