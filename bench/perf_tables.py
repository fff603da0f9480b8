"""Render the JSON of search_bench.py, query_load.py and index_bench.py as BENCHMARKS.md tables
(runs/search*.json, runs/auto*.json, runs/clap_text*.json, runs/query_load*.json, runs/index*.json).

    .venv/bin/python bench/perf_tables.py [--runs runs] [--out BENCHMARKS.md]

Each table goes between its own marker lines, so rerunning replaces only the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffgap.atomic import atomic_write_text


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def search_tables(data: dict) -> str:
    parts = [f"Machine: {data['machine']}."]
    if data.get("exact"):
        routes = list(dict.fromkeys(r["route"] for r in data["exact"]))
        keys = sorted({(r["n"], r["nq"]) for r in data["exact"]})
        by = {(r["n"], r["nq"], r["route"]): r["median_ms"] for r in data["exact"]}
        rows = [[f"{n:,}", nq, *(f"{by[(n, nq, route)]:.2f}" for route in routes)] for n, nq in keys]
        parts += ["", "Exact top-10, median ms per call:", "", table(["items", "queries", *routes], rows)]
    if data.get("approximate"):
        rows = []
        for r in data["approximate"]:
            knob = "nprobe" if "nprobe" in r else "efSearch"
            rows.append([r["index"], f"{knob}={r[knob]}", r["recall@10"], r["median_ms_1_query"], r["build_s"],
                         r["file_mb"]])  # fmt: skip
        n = data["approximate"][0]["n"]
        parts += ["", f"Approximate indexes at {n:,} items (recall@10 against exact search, 200 queries):", "",
                  table(["index", "setting", "recall@10", "ms / query", "build s", "file MB"], rows)]  # fmt: skip
    if data.get("mmap"):
        rows = [[("memory-mapped" if r["mmap"] else "read into memory"), r["open_ms"], r["rss_mb"], r["anon_mb"],
                 r["file_backed_mb"]] for r in data["mmap"]]  # fmt: skip
        n = data["mmap"][0]["n"]
        parts += ["", f"Opening a {n:,}-item Flat index ({data['mmap'][0]['file_mb']} MB) and running 20 queries:", "",
                  table(["open", "open ms", "RSS MB", "anonymous MB", "file-backed MB"], rows)]  # fmt: skip
    return "\n".join(parts)


def load_tables(data: dict) -> str:
    rows = [[r["encoder"], f"{r['items']:,}", r["query"], r.get("threads", 1), r["clients"], r["p50_ms"], r["p99_ms"],
             round(r["p99_ms"] / r["p50_ms"], 1), r["req_per_s"], r["errors"], r["rss_mb"]]
            for r in data["rows"]]  # fmt: skip
    head = ["encoder", "items", "query", "threads", "clients", "p50 ms", "p99 ms", "p99/p50", "req/s", "errors",
            "server RSS MB"]  # fmt: skip
    text = f"Machine: {data['machine']}; {data['seconds_per_run']} s per row.\n\n" + table(head, rows)
    if "in_process_100k" in data:
        stages = [[k, v] for k, v in data["in_process_100k"].items()]
        text += "\n\nOne query in process (no HTTP), compact encoder, 100k items, median ms:\n\n"
        text += table(["stage", "ms"], stages)
    return text


def index_tables(data: dict) -> str:
    parts = [f"Machine: {data['machine']}."]
    for key, name in (("stages_compact", "compact encoder"), ("stages_clap", "full-size CLAP")):
        st = data[key]
        stages = [k for k in st if k not in ("files", "windows")]
        total = sum(st[k] for k in stages if k != "decode (source rate)")
        rows = [[k, st[k], f"{st[k] / st['files'] * 1e3:.1f}"] for k in stages]
        parts += ["", f"Where the time goes, {name}: {st['files']} files, {st['windows']} windows, one process "
                  f"(total without the source-rate decode, which is only there to split decode from resample: "
                  f"{total:.1f} s):", "", table(["stage", "seconds", "ms per file"], rows)]  # fmt: skip
    rows = [[r["encoder"], r["files"], r["jobs"], r["seconds"], r["files_per_s"], r["peak_rss_mb"]]
            for r in data["end_to_end"]]  # fmt: skip
    head = ["encoder", "files", "-j", "seconds", "files/s", "main process peak RSS MB"]
    parts += ["", "End to end, `diffgap-index build`:", "", table(head, rows)]
    return "\n".join(parts)


def auto_tables(data: dict) -> str:
    rows = [[f"{r['n']:,}", r["dim"], r["flat_ms"], r["hnsw_ms"], f"efSearch={r['effort']}", r["recall_held_out"],
             r["recall_fresh_queries"], r["hnsw_sync_s"], r["auto_picks"]] for r in data["auto"]]  # fmt: skip
    head = ["items", "dim", "Flat ms / query", "HNSW32 ms / query", "tuned effort", "recall@10 held out (info)",
            "recall@10 fresh queries", "HNSW build + tune s", "auto picks"]  # fmt: skip
    return (f"Machine: {data['machine']}; {data['threads']} thread(s); medians of 50 single-query calls.\n\n"
            + table(head, rows))  # fmt: skip


def clap_text_tables(data: dict) -> str:
    rows = [[r["threads"], r["batch"], r["ms_per_call"], r["ms_per_sentence"], r["sentences_per_s"]]
            for r in data["rows"]]  # fmt: skip
    return (f"Machine: {data['machine']}; queries of {data['mean_tokens']} tokens on average, padded to the "
            "batch's longest; median of 7 calls.\n\n"
            + table(["threads", "batch", "ms per call", "ms per sentence", "sentences / s"], rows))  # fmt: skip


def insert(text: str, name: str, block: str) -> str:
    begin, end = f"<!-- perf:{name}:begin -->", f"<!-- perf:{name}:end -->"
    body = f"{begin}\n\n{block}\n\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + body + text[text.index(end) + len(end) :]
    return text.rstrip() + "\n\n" + body + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    text = out.read_text()
    renderers = (("search", search_tables), ("query_load", load_tables), ("index", index_tables), ("auto", auto_tables),
                 ("clap_text", clap_text_tables))  # fmt: skip
    for name, render in renderers:
        parts = [json.loads(p.read_text()) for p in sorted(runs.glob(f"{name}*.json"))]  # name_a, name_b: runs
        if parts:
            data = parts[0]
            if name == "query_load":  # several load runs: one table, sorted by encoder, size, query
                rows = [r for p in parts for r in p["rows"]]
                labels = ["refine off", "refine 5 steps", "refine 20 steps", "refine 50 steps"]
                order = {q: i for i, q in enumerate(labels)}
                rows.sort(key=lambda r: (r["encoder"] != "compact", r["items"], order.get(r["query"], 9),
                                         r.get("threads", 1), r["clients"]))  # fmt: skip
                data = {**data, "rows": rows}
            text = insert(text, name, render(data))
    atomic_write_text(out, text)


if __name__ == "__main__":
    main()
