#!/usr/bin/env python3
"""Kill one API replica under load and count what the clients saw: `failover.py BASE_URL CONTAINER...`.

Eight clients search through the load balancer for 24 s. After 8 s the first container named is
killed (SIGKILL: no goodbye, connections cut mid-request). Every request must still answer 200: the
balancer resends a request the dead replica dropped and stops choosing it once its health checks
fail. Standard library only, like smoke.py; prints ok/FAIL lines and exits 1 on a failure.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from smoke import check

CLIENTS, SECONDS, KILL_AT = 8, 24.0, 8.0


def search(base: str, i: int) -> tuple[int, str]:
    body = json.dumps({"text": f"a high beep twice at the start {i}", "k": 5}).encode()
    request = urllib.request.Request(f"{base}/v1/search", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, response.headers.get("X-Served-By", "?")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Served-By", "?")
    except OSError as exc:
        return 0, type(exc).__name__


def main(base: str, containers: list[str]) -> None:
    check(len(containers) >= 2, f"{len(containers)} API replicas running")
    t0 = time.monotonic()
    lock = threading.Lock()
    served = {"before": collections.Counter(), "after": collections.Counter()}
    failures: list[tuple[float, int, str]] = []
    killed_at: list[float] = []

    def client(n: int) -> None:
        i = 0
        while (now := time.monotonic() - t0) < SECONDS:
            status, server = search(base, n * 100_000 + i)
            i += 1
            with lock:
                if status != 200:
                    failures.append((round(now, 2), status, server))
                else:
                    served["after" if killed_at and now > killed_at[0] else "before"][server] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(KILL_AT)
    subprocess.run(["docker", "kill", containers[0]], check=True, capture_output=True)
    killed_at.append(time.monotonic() - t0)
    for t in threads:
        t.join()
    before, after = served["before"], served["after"]
    print(f"     answered before the kill: {dict(before)}; after: {dict(after)}")
    check(len(before) >= 2, f"load spread over {len(before)} replicas before the kill")
    check(sum(after.values()) > 0, f"{sum(after.values())} searches answered after the kill")
    total = sum(before.values()) + sum(after.values()) + len(failures)
    check(not failures, f"failover: {total} requests, {len(failures)} failed {failures[:5]}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1].rstrip("/"), sys.argv[2:])
