#!/usr/bin/env python3
"""Check a running diffgap deployment from outside: `smoke.py BASE_URL [API_CONTAINER_ID]`.

Searches by text through the published port (refined and direct), fetches a hit's audio, and with
a container id also checks the container's hardening: a non-root user, a read-only root and index
mount. Standard library only, so it runs without the project's virtual environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request


def call(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        raise SystemExit(1)


def main(base: str, container: str | None) -> None:
    status, body = call(f"{base}/readyz")
    check(status == 200, f"/readyz: {body.decode()[:200]}")
    for refine in (True, False):
        status, body = call(f"{base}/v1/search", {"text": "a high beep twice at the start", "k": 5, "refine": refine})
        hits = json.loads(body)["results"]
        check(status == 200 and len(hits) == 5, f"search refine={refine}: top hit {hits[0]['path'] if hits else None}")
    status, audio = call(f"{base}{hits[0]['audio_url']}")
    check(status == 200 and audio[:4] == b"RIFF", f"audio of the top hit: {len(audio)} bytes of WAV")
    if container:

        def run(*cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(["docker", "exec", container, *cmd], capture_output=True, text=True, check=False)

        uid = run("id", "-u").stdout.strip()
        check(uid not in ("", "0"), f"the API runs as uid {uid}, not root")
        for path in ("/data/index/probe", "/probe"):
            denied = run("touch", path)
            check(denied.returncode != 0, f"cannot write {path}: {denied.stderr.strip()}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    main(sys.argv[1].rstrip("/"), sys.argv[2] if len(sys.argv) == 3 else None)
