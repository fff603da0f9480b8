"""`diffgap-serve --workers N` for real: two server processes on one port over one memory-mapped index,
reloads that reach both, /metrics that adds both up, and a killed worker replaced."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx

from tests.conftest import Server


def is_gone(pid: int) -> bool:
    """The process has exited and let go of its files (its listening socket among them). A killed
    process's main thread shows as a zombie while its other threads (torch's, the batcher's) are still
    exiting, and the files are released by the last of them: until then the kernel kept handing new
    connections to the dying worker's socket, and they were reset (1 run in 4 here)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text() and len(os.listdir(f"/proc/{pid}/task")) == 1
    except FileNotFoundError:
        return True


def worker_states(url: str, want: int, until=lambda states: True, timeout: float = 180) -> dict[int, int]:  # noqa: ANN001
    """{worker pid: generation} from /readyz on fresh connections (the kernel hands each to either
    worker) until `want` ready workers are seen and `until(states)` holds. The deadline is generous: a
    worker loads the index and its encoders before it is ready, which took over 60 s on a loaded machine."""
    deadline = time.monotonic() + timeout
    states: dict[int, int] = {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)  # a new connection each time
        except httpx.HTTPError:
            continue
        body = r.json()
        if r.status_code == 200:
            states[body["worker_pid"]] = body["generation"]
        live = {pid: g for pid, g in states.items() if Path(f"/proc/{pid}").exists()}
        if len(live) >= want and until(live):
            return live
        time.sleep(0.02)
    raise AssertionError(f"saw {states} from /readyz, wanted {want} workers meeting the condition")


def search_count(metrics_text: str) -> float:
    pattern = r'^diffgap_requests_total\{method="POST",route="/v1/search",status="200"\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics_text, flags=re.M))


def test_two_workers_share_the_index_reload_together_and_add_up_their_metrics(served_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(served_index, copy)
    srv = Server(copy, {"DIFFGAP_WORKERS": "2", "DIFFGAP_ALLOW_OPEN_ADMIN": "1"})
    try:
        states = worker_states(srv.url, 2)
        assert srv.proc.pid not in states  # the supervisor serves nothing itself
        # one copy of the vectors: every worker maps the index's vectors.npy file (page cache, shared)
        vectors = str((copy / "vectors.npy").resolve())
        for pid in states:
            assert vectors in Path(f"/proc/{pid}/maps").read_text(), f"worker {pid} does not map {vectors}"

        # /metrics adds up both workers, whichever of them answers it
        for i in range(30):
            r = httpx.post(f"{srv.url}/v1/search", json={"text": f"a beep {i}", "k": 3}, timeout=30)
            assert r.status_code == 200, r.text
        counts = {search_count(httpx.get(f"{srv.url}/metrics", timeout=5).text) for _ in range(10)}
        assert counts == {30.0}

        # SIGHUP to the supervisor: every worker swaps in the index again, none restarts
        before = dict(states)
        os.kill(srv.proc.pid, signal.SIGHUP)
        states = worker_states(srv.url, 2, lambda s: s.keys() == before.keys() and all(s[p] > before[p] for p in s))

        # an admin reload lands on one worker; the other follows
        before = dict(states)
        r = httpx.post(f"{srv.url}/v1/admin/reload", timeout=60)
        assert r.status_code == 200, r.text
        states = worker_states(srv.url, 2, lambda s: s.keys() == before.keys() and all(s[p] > before[p] for p in s))

        # a worker that dies is replaced; the other kept answering meanwhile
        victim = next(iter(states))
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel queued on the victim's own socket die with it (a balancer retries
        # those); the ones made once it is gone must all reach the other worker.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not is_gone(victim):
            time.sleep(0.01)
        for i in range(10):
            r = httpx.post(f"{srv.url}/v1/search", json={"text": f"a tone {i}", "k": 3}, timeout=30)
            assert r.status_code == 200, r.text
        states = worker_states(srv.url, 2, lambda s: victim not in s)
        assert len(states) == 2
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    for pid in states:  # the supervisor took its workers with it
        assert is_gone(pid)


def test_out_of_bounds_settings_are_a_message_and_exit_2(served_index, monkeypatch, caplog):
    from service.app import main

    assert main(["--index", str(served_index), "--workers", "0"]) == 2
    assert "setting workers: Input should be greater than or equal to 1" in caplog.text
    monkeypatch.setenv("DIFFGAP_THREADS", "-3")
    assert main(["--index", str(served_index)]) == 2
    assert "setting threads:" in caplog.text
