"""`diffgap-serve` with every garbage-collector pause logged: `gc_probe.py SERVE-ARGS...`, log file in
$GC_LOG (one JSON line per collection: wall time at its end, its generation, its length in ms).
bench/tails.py runs the server through it to tell GC pauses from the other causes of slow requests."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115  # line-buffered, open for the process's life
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - started[0]) * 1e3
            out.write(json.dumps({"t": time.time(), "gen": info["generation"], "ms": round(ms, 3)}) + "\n")

    gc.callbacks.append(callback)


if __name__ == "__main__":
    if os.environ.get("GC_LOG"):
        install(os.environ["GC_LOG"])
    from service.app import main

    sys.exit(main(sys.argv[1:]))
