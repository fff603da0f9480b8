"""Query path under load: `/v1/search` latency and throughput over loopback, measured with wrk.

    .venv/bin/python bench/query_load.py [--sizes 10000,100000,1000000] [--seconds 10] [--out runs/query_load.json]

For each index size it builds an index directory of synthetic clustered vectors (the real store:
SQLite + FAISS Flat + manifest), starts a real `diffgap-serve` on 127.0.0.1, and drives it with
wrk (Debian's package; C, so the load generator takes little of the 2 cores) at 1, 8 and 32
connections, cycling through 16 different text queries. Encoders have random weights, which cost
what trained ones cost: the compact encoder as trained here, and a full-size CLAP (transformers'
default ClapConfig, the size of LAION's HTSAT-unfused: ~150M parameters) at 100k items.
Refiners are untrained, same size as trained ones. Each row is one wrk run; quote them side by side.

Other modes: `--profile-only` (each stage of one query in process, 100k items), `--workers 1,2
[--repeats R]` (saturated throughput and memory per number of server processes, with the cores the
server and wrk used), `--clap-saturation [--repeats R]` (full-size CLAP at 32 clients, then one
client's /v1/search/batch of 32, against the text tower's best batched rate measured just before).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from diffgap.diffusion.adapter import TextAdapter  # noqa: E402
from diffgap.diffusion.refiner import Refiner, RefinerConfig  # noqa: E402
from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.encoders.base import l2_normalize  # noqa: E402
from diffgap.encoders.sentence import load_sentence_encoder, sentence_model_available  # noqa: E402
from diffgap.index.faiss_sync import sync_faiss  # noqa: E402
from diffgap.index.meaning import AUTO, MeaningIndex, resolve_meaning_model, sync_meaning  # noqa: E402
from diffgap.index.store import FileRecord, IndexStore  # noqa: E402
from diffgap.models.mapper_net import Mapper  # noqa: E402
from diffgap.models.refiner_net import RefinerNetConfig  # noqa: E402
from diffgap.models.segments import SEGMENTS  # noqa: E402

QUERIES = [
    "a dog barks twice then a car passes",
    "rain on a tin roof with distant thunder",
    "a high beep twice at the start",
    "a low buzz at the end",
    "church bells ringing in the distance",
    "footsteps on gravel while wind blows",
    "a door slams and a man shouts",
    "birds chirping in the morning",
    "a faint hum throughout with clicks",
    "water dripping into a bucket slowly",
    "an engine starts and idles",
    "crowd cheering after a goal",
    "a kettle whistles loudly",
    "typing on a mechanical keyboard",
    "a gong struck once then fading",
    "static noise bursts repeatedly",
]

LUA = """
local bodies = {}
local queries = %s
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = i + 1
  local q = queries[(i %% #queries) + 1]
  return wrk.format(nil, "/v1/search", nil, '{"text": "' .. q .. '", "k": 10, %s}')
end
"""


def make_compact(out: Path) -> str:
    from diffgap.encoders.compact import CompactModel, train_tokenizer
    from diffgap.models.audio_net import AudioNetConfig
    from diffgap.models.text_net import TextNetConfig

    tokenizer = train_tokenizer(QUERIES * 10, 4000)
    text = TextNetConfig(vocab_size=tokenizer.get_vocab_size())
    CompactModel(AudioNetConfig(), text, None, tokenizer).eval().save(out)
    return f"compact:{out}"


def make_full_clap(out: Path) -> str:
    from clap_text_batch import word_list_tokenizer
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    (out / "_bpe").mkdir(parents=True, exist_ok=True)
    tokenizer = word_list_tokenizer(out / "_bpe")  # English queries as long as RoBERTa would make them
    ClapModel(ClapConfig()).eval().save_pretrained(out)
    # the unfused model (as laion/clap-htsat-unfused) takes one mel channel: no "fusion" truncation
    extractor = ClapFeatureExtractor(truncation="rand_trunc")
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return f"clap:{out}"


def clustered(n: int, dim: int, seed: int = 0, centres: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    x = mu[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


WORDS = sorted({w for q in QUERIES for w in q.split() if len(w) > 3})  # file descriptions draw from these


def build_index(root: Path, spec: str, n: int, meaning: bool = True, segments: int = SEGMENTS) -> None:
    """n one-window files with synthetic vectors, `segments` time spans each and three-word descriptions,
    committed through the real store (words by meaning embedded when the sentence model is installed and
    `meaning`), plus a text refiner."""
    encoders = load_encoders(spec)
    dim = encoders.audio.dim
    store = IndexStore.create(
        root, encoder_spec=spec, fingerprint=encoders.audio.fingerprint, dim=dim, segments=segments
    )  # as a compact index keeps them: the time spans of each window
    chunk = 20_000
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        xb = clustered(min(chunk, n - start), dim, seed=start)
        spans = l2_normalize(xb[:, None] + 0.5 * rng.standard_normal((len(xb), segments, dim)).astype(np.float32))
        words = rng.choice(WORDS, size=(len(xb), 3))
        store.commit_files(
            FileRecord(f"synthetic/{' '.join(words[i])}/{start + i:07d}.wav", f"h{start + i}", 1, 0.0, "indexed",
                       duration=10.0, sample_rate=16000, channels=1, description=" ".join(words[i]),
                       windows=[(0.0, 10.0)], vectors=xb[i : i + 1], segments=spans[i : i + 1])
            for i in range(len(xb))
        )  # fmt: skip
    sync_faiss(store)
    if meaning:  # minutes at 100k files; runs that search by sound only skip it
        sync_meaning(store, resolve_meaning_model(AUTO))
    store.close()
    assert encoders.text is not None
    net = RefinerNetConfig(audio_dim=dim, query_dim=encoders.text.dim)
    config = RefinerConfig(
        net=net,
        prediction_type="sample",
        audio_fingerprint=encoders.audio.fingerprint.to_dict(),
        query_fingerprint=encoders.text.fingerprint.to_dict(),
        query_modality="text",
        # as train-refiner ships one: the mapper beside the network and all three scores mixed (the
        # weights it picks vary; any with every part above zero costs the same)
        mix={"refined": 0.5, "mapped": 0.3, "direct": 0.2},
    )
    Refiner(config, mapper=Mapper(net.query_dim, net.audio_dim, config.mapper_hidden)).save(root / "refiner-text")


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal, ...), or
    none where /proc/stat is missing."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """The share of CPU time a virtual machine's host gave to others between two `cpu_times`: a busy
    neighbour slows every stage alike, which the load average inside the machine does not show."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round((after[7] - before[7]) / total, 4) if total > 0 else None


def in_process_profile(index: Path, spec: str, threads: int, segments: int = SEGMENTS) -> dict[str, float]:
    """Median ms of each stage for one query, in this process (no HTTP): where a request's time goes
    (`segments`: the time spans a window of the index keeps)."""
    from diffgap.resources import set_compute_threads
    from diffgap.retrieval.search import Query, RefineSpec, Searcher

    set_compute_threads(threads)  # as the service does
    encoders = load_encoders(spec)
    refiner = Refiner.load(index / "refiner-text")
    store = IndexStore.open(index, readonly=True)
    store.vector_index(mmap=True)
    meaning = MeaningIndex.load(store)
    searcher = Searcher(store, encoders, {"text": refiner}, meaning)
    assert encoders.text is not None
    xq = encoders.text.encode([QUERIES[0]])

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(100):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(float(np.median(times)) * 1e3, 3)

    # A new text at each call wherever the sentence model reads it: it keeps the token states of its
    # last few batches (diffgap/encoders/sentence.py), and a repeated text would time that lookup.
    fresh = itertools.cycle(QUERIES)
    by_meaning = {}
    if meaning is not None:
        by_meaning = {
            "encode text for meaning (sentence model)": median_ms(lambda: meaning.sentence.encode([next(fresh)])),
            "whole query, refine 1 step, words fused: exact + meaning (the default)": median_ms(
                lambda: searcher.run([Query("text", 10, text=next(fresh), lexical=True, refine=RefineSpec(steps=1))])
            ),
        }

    with_adapter = {}
    if sentence_model_available():
        # a refiner as train-refiner ships it when the held-out pairs give the text adapter a weight; its
        # sentence-model pass is the adapter's own here (this text tower reads no sentence model; a beside
        # tower's pass is shared: diffgap/encoders/sentence.py keeps a batch's token states)
        adapter = TextAdapter.new(load_sentence_encoder(), encoders.audio.dim)
        config = replace(refiner.config, mix={"refined": 0.25, "mapped": 0.25, "direct": 0.25, "adapted": 0.25})
        adapted = Refiner(config, refiner.net, refiner.mapper, adapter)
        with_adapter_searcher = Searcher(store, encoders, {"text": adapted}, meaning)
        states, mask, _ = adapter.sentence.token_states([QUERIES[1]])

        @torch.inference_mode()
        def head_only(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return adapter.read({"states": states, "mask": mask})

        with_adapter = {
            "text adapter, its own sentence-model pass": median_ms(lambda: adapter.encode([next(fresh)])),
            "text adapter head, on token states already read": median_ms(lambda: head_only(states, mask)),
            "whole query, refine 1 step, mixed with the mapper, direct and the text adapter, sound only": median_ms(
                lambda: with_adapter_searcher.run([Query("text", 10, text=next(fresh), refine=RefineSpec(steps=1))])
            ),
        }

    # as train-refiner ships it when the held-out pairs give the library side a weight: each candidate's
    # audio mapped back into the text space, once per window while the searcher lives
    back = Mapper(refiner.config.net.audio_dim, refiner.config.net.query_dim, refiner.config.mapper_hidden)
    two = Refiner(replace(refiner.config, library_weight=0.5), refiner.net, refiner.mapper, mapper_back=back)
    warm = Searcher(store, encoders, {"text": two}, meaning)
    t = time.perf_counter()
    assert warm.warm_library() == {"text": store.ntotal}
    warm_s = time.perf_counter() - t  # once, as a server does before it says it is ready
    candidates = warm.search_vectors(two.refine(xq), [Query("text", 100, text="x", collapse=False)])[0]  # (100 hits)
    two_sided = {
        "map every window for the library side at start (one call, ms)": round(warm_s * 1e3, 1),
        "whole query, refine 1 step, two-sided, its candidates not yet mapped (a new searcher)": median_ms(
            lambda: Searcher(store, encoders, {"text": two}, meaning).run(
                [Query("text", 10, text=QUERIES[2], refine=RefineSpec(steps=1))]
            )
        ),
        "whole query, refine 1 step, two-sided, every window mapped at start": median_ms(
            lambda: warm.run([Query("text", 10, text=QUERIES[2], refine=RefineSpec(steps=1))])
        ),
        "two-sided rescoring of 100 candidates alone, every window mapped at start": median_ms(
            lambda: warm._two_sided(two, xq[0], [dataclasses.replace(h) for h in candidates])
        ),
        "backward mapper, 100 candidates": median_ms(lambda: back.map(np.zeros((100, two.dims(0)[0]), np.float32))),
    }
    # as train-refiner ships a video refiner on an index that keeps spans: the query's spans refined as the
    # query is, in the same call, then each candidate's spans read from SQLite and scored
    # (the text refiner stands in for a video one of the same size: the spans' cost is its dims')
    spans = l2_normalize(np.repeat(xq[:, None], segments, 1))  # (1, S, c)
    timed = replace(two.config, segment_weight=0.5, segments=segments)
    with_spans = Refiner(timed, two.net, two.mapper, mapper_back=back)
    refined_spans = with_spans.refine_with_spans(xq, spans, steps=1)[1][0]  # (S, d)
    # the spans mapped by a mapper trained on span pairs instead (an MLP of the mapper's size stands in)
    mapped = replace(timed, span_map="mapped")
    by_span_mapper = Refiner(mapped, two.net, two.mapper, mapper_back=back, mapper_spans=two.mapper)
    # and with the spans' library side: each candidate's spans mapped back (the backward mapper stands in)
    span_two = Refiner(replace(timed, span_library_weight=0.5), two.net, two.mapper, mapper_back=back,
                       mapper_spans_back=back)  # fmt: skip

    def rescore_spans(refiner: Refiner, cold: bool = False) -> object:
        if cold:  # the spans' library side of no window kept yet
            warm._library_spans.clear()
        return warm._with_segments(refiner, refined_spans, spans[0], [dataclasses.replace(h) for h in candidates], 0.5)

    span_stages = {
        "refine 1 step, mixed, the query alone (as above)": median_ms(lambda: with_spans.refine(xq, steps=1)),
        f"refine 1 step, mixed, the query and its {segments} spans in one call (as served)": median_ms(
            lambda: with_spans.refine_with_spans(xq, spans, steps=1)
        ),
        f"refine 1 step, mixed, the query; its {segments} spans by a span mapper (span_map mapped)": median_ms(
            lambda: by_span_mapper.refine_with_spans(xq, spans, steps=1)
        ),
        "segment rescoring of 100 candidates alone (their spans read from SQLite)": median_ms(
            lambda: rescore_spans(with_spans)
        ),
        "segment rescoring of 100 candidates with the spans' library side, their spans not yet mapped": median_ms(
            lambda: rescore_spans(span_two, cold=True)
        ),
        "segment rescoring of 100 candidates with the spans' library side, their spans mapped before": median_ms(
            lambda: rescore_spans(span_two)
        ),
    }

    stages = {
        "encode text": median_ms(lambda: encoders.text.encode([QUERIES[1]])),
        "refine, 1 step": median_ms(lambda: refiner.refine(xq, steps=1, blend=0.0)),
        "refine, 5 steps": median_ms(lambda: refiner.refine(xq, steps=5, blend=0.0)),
        "refine, 5 steps, blend 0.5": median_ms(lambda: refiner.refine(xq, steps=5, blend=0.5)),
        "refine, 1 step, mixed with the mapper and direct (as shipped)": median_ms(lambda: refiner.refine(xq, steps=1)),
        "mapper alone": median_ms(lambda: refiner.mapper.map(xq)),
        "exact search + metadata (k=10)": median_ms(lambda: searcher.search_vectors(xq, [Query("text", 10, text="x")])),
        "whole query, refine off": median_ms(lambda: searcher.run([Query("text", 10, text=QUERIES[2])])),
        "whole query, refine off, every window (collapse off)": median_ms(
            lambda: searcher.run([Query("text", 10, text=QUERIES[2], collapse=False)])
        ),
        "whole query, refine off, words fused: exact only": median_ms(
            lambda: searcher.run([Query("text", 10, text=QUERIES[2], lexical=True, meaning=False)])
        ),
        "whole query, refine 5 steps": median_ms(
            lambda: searcher.run([Query("text", 10, text=QUERIES[2], refine=RefineSpec(steps=5))])
        ),
        "whole query, refine 1 step, refined vector only (blend 0), sound only": median_ms(
            lambda: searcher.run([Query("text", 10, text=QUERIES[2], refine=RefineSpec(steps=1, blend=0.0))])
        ),
        "whole query, refine 1 step, sound only": median_ms(
            lambda: searcher.run([Query("text", 10, text=QUERIES[2], refine=RefineSpec(steps=1))])
        ),
        **two_sided,
        **span_stages,
        **by_meaning,
        **with_adapter,
    }
    store.close()
    return stages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, index: Path, threads: int | None, workers: int = 1) -> None:
        self.port = free_port()
        self.log = open(index / "serve.log", "w")  # noqa: SIM115
        threads_flag = ["--threads", str(threads)] if threads else []  # none: the service's default per worker
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "diffgap-serve"), "--index", str(index), "--port", str(self.port),
             "--workers", str(workers), *threads_flag],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "DIFFGAP_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server did not become ready; see {index / 'serve.log'}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the distinct processes have used so far (/proc/PID/stat)."""
    ticks = 0
    for pid in set(pids):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk_with_cores(pids: list[int], port: int, clients: int, seconds: int, options: str, tmp: Path) -> dict:
    """`run_wrk`, plus the cores the server's processes `pids` and wrk kept busy over the run."""
    server_cpu, wrk_cpu = cpu_seconds(pids), children_cpu_seconds()
    stats = run_wrk(port, clients, seconds, options, tmp)
    return {**stats, "server_cores": round((cpu_seconds(pids) - server_cpu) / seconds, 2),
            "wrk_cores": round((children_cpu_seconds() - wrk_cpu) / seconds, 2)}  # fmt: skip


def memory_mb(pid: int, mapping: str | None = None) -> dict[str, float]:
    """Rss and Pss (a shared page counted once across the processes that map it) of a process, or of
    its mappings of one file, from /proc/PID/smaps."""
    totals = {"Rss": 0, "Pss": 0}
    inside = mapping is None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = mapping is None or line.endswith(mapping)
        elif inside and head[0].rstrip(":") in totals:
            totals[head[0].rstrip(":")] += int(head[1])
    return {k.lower() + "_mb": round(v / 1024, 1) for k, v in totals.items()}


# the sound path, as before words joined the default query: at 100k files whose synthetic descriptions
# share the queries' words, the word side costs ~70 ms a query and would be all that this measures
WORKER_QUERIES = (
    ("refine off", '"refine": false, "lexical": false'),
    ("refine 1 step", '"refine": true, "lexical": false'),
)


def worker_sweep(args: argparse.Namespace) -> None:
    """Saturated throughput with 1..N server processes on one 100k-item compact index (service default
    threads per worker), and what each process holds: every worker maps the same vectors.npy."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        spec = make_compact(tmp / "compact")
        index = tmp / "index"
        build_index(index, spec, args.workers_items, meaning=False)
        vectors = str((index / "vectors.npy").resolve())
        # repeats alternate the worker counts, so that a drift in the machine's speed hits each alike
        for repeat, workers in itertools.product(range(args.repeats), [int(w) for w in args.workers.split(",")]):
            server = Server(index, None, workers)
            try:
                time.sleep(3)  # every worker loaded (the supervisor's /readyz came from one of them)
                for label, options in WORKER_QUERIES:
                    for clients in (8, 32):
                        run_wrk(server.port, clients, 2, options, tmp)  # warm every worker
                        pids = children(server.proc.pid) if workers > 1 else [server.proc.pid]
                        # cores busy over the run: what one process leaves for a second to use
                        stats = run_wrk_with_cores([server.proc.pid, *pids], server.port, clients, args.seconds,
                                                   options, tmp)  # fmt: skip
                        per = [memory_mb(p) for p in pids]
                        shared = [memory_mb(p, vectors) for p in pids]
                        row = {"items": args.workers_items, "repeat": repeat, "workers": workers, "query": label,
                               "clients": clients,
                               **stats, "rss_mb": round(sum(m["rss_mb"] for m in per), 1),
                               "pss_mb": round(sum(m["pss_mb"] for m in per), 1),
                               "vectors_rss_mb": round(sum(m["rss_mb"] for m in shared), 1),
                               "vectors_pss_mb": round(sum(m["pss_mb"] for m in shared), 1),
                               "processes": len(pids)}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                server.stop()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    data["workers"] = {"machine": machine, "seconds_per_run": args.seconds, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def clap_saturation(args: argparse.Namespace) -> None:
    """Issue 19's CLAP measure, in one sitting: the text tower's best batched rate in a process of its
    own (bench/clap_text_batch.py, batch 32, the server's threads), then the service at 32 clients
    (sound only, refine off) over a few runs, with the CPU the server and wrk used and the batches'
    size and stage times, then one client sending the same queries as batches of 32."""
    tmp_out = Path(args.out).with_suffix(".clap_text.json")
    subprocess.run([sys.executable, str(ROOT / "bench" / "clap_text_batch.py"), "--batches", "32",
                    "--threads", str(args.threads), "--out", str(tmp_out)], check=True)  # fmt: skip
    best = json.loads(tmp_out.read_text())["rows"][0]["sentences_per_s"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        index = tmp / "index"
        build_index(index, make_full_clap(tmp / "clap"), args.clap_size, meaning=False)
        server = Server(index, args.threads)
        try:
            options = '"refine": false, "lexical": false'
            run_wrk(server.port, 32, 3, options, tmp)  # warm up
            for _ in range(args.repeats):
                before = batch_metrics(server.port)
                stats = run_wrk_with_cores([server.proc.pid], server.port, 32, args.seconds, options, tmp)
                after = batch_metrics(server.port)
                batches = max(1.0, after["batches"] - before["batches"])
                rows.append({**stats, "share_of_batched_rate": round(stats["req_per_s"] / best, 3),
                             "queries_per_batch": round((after["queries"] - before["queries"]) / batches, 1),
                             "encode_ms_per_batch": stage_ms(before, after, "encode"),
                             "search_ms_per_batch": stage_ms(before, after, "search")})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
            # the same queries as one client's batches of 32 (/v1/search/batch): HTTP paid once per 32
            before = batch_metrics(server.port)
            stats = run_wrk_batch(server.port, args.seconds, tmp)
            after = batch_metrics(server.port)
            rows.append({"client": "one, /v1/search/batch of 32", **stats,
                         "share_of_batched_rate": round(stats["queries_per_s"] / best, 3),
                         "encode_ms_per_batch": stage_ms(before, after, "encode"),
                         "search_ms_per_batch": stage_ms(before, after, "search")})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["clap_saturation"] = {"batched_sentences_per_s": best, "threads": args.threads, "items": args.clap_size,
                               "seconds_per_run": args.seconds, "rows": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def run_wrk_batch(port: int, seconds: int, tmp: Path, size: int = 32) -> dict:
    """One connection posting batches of `size` queries to /v1/search/batch (sound only, refine off)."""
    texts = [QUERIES[i % len(QUERIES)] for i in range(size)]
    body = json.dumps({"texts": texts, "k": 10, "refine": False, "lexical": False})
    script = tmp / "batch.lua"
    lua = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"', f"wrk.body = {json.dumps(body)}"]
    script.write_text("\n".join(lua) + "\n")
    out = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", f"{seconds}s", "--timeout", "30s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/v1/search/batch"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise RuntimeError(f"batch requests failed:\n{out}")
    per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"batches_per_s": round(per_s, 2), "queries_per_s": round(per_s * size, 1)}


def batch_metrics(port: int) -> dict[str, float]:
    """The batcher's counters and the encode and search stages' sums and counts, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {"queries": "diffgap_batcher_queries", "batches": "diffgap_batcher_batches"}
    for stage in ("encode", "search"):
        values[f"{stage}_s"] = f'diffgap_stage_seconds_sum{{stage="{stage}"}}'
        values[f"{stage}_n"] = f'diffgap_stage_seconds_count{{stage="{stage}"}}'
    found = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
    return {key: float(found.get(name, 0.0)) for key, name in values.items()}


def stage_ms(before: dict[str, float], after: dict[str, float], stage: str) -> float:
    """Mean ms of a stage between two `batch_metrics` readings: a query carries its whole batch's stage
    time, so the mean over queries is the mean per batch."""
    n = after[f"{stage}_n"] - before[f"{stage}_n"]
    return round(1e3 * (after[f"{stage}_s"] - before[f"{stage}_s"]) / max(1.0, n), 1)


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(port: int, clients: int, seconds: int, options: str, tmp: Path) -> dict:
    script = tmp / "query.lua"
    queries = "{" + ", ".join(json.dumps(q) for q in QUERIES) + "}"
    script.write_text(LUA % (queries, options))
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds}s", "--timeout", "10s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    if "50" not in lat:
        raise RuntimeError(f"wrk reported no latencies:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "requests": requests,
        "req_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1),  # type: ignore[union-attr]
        "p50_ms": round(to_ms(lat["50"]), 2),
        "p99_ms": round(to_ms(lat["99"]), 2),
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (1 if socket_errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clap-size", type=int, default=100_000, help="index size for the full-size CLAP rows (0: skip)")
    ap.add_argument("--out", default="runs/query_load.json")
    ap.add_argument("--profile-only", action="store_true", help="only the in-process stage profile at 100k items")
    ap.add_argument("--segments", type=int, default=SEGMENTS, help="profile: time spans a window keeps")
    ap.add_argument("--workers", help="only the worker sweep, e.g. 1,2: saturated throughput and memory")
    ap.add_argument("--workers-items", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=1, help="worker sweep and CLAP saturation: runs of each row")
    ap.add_argument("--clap-saturation", action="store_true",
                    help="only full-size CLAP at 32 clients against its batched rate (clap_text_batch.py)")  # fmt: skip
    args = ap.parse_args()
    if (args.workers or args.clap_saturation) and not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    if args.workers:
        worker_sweep(args)
        return
    if args.clap_saturation:
        clap_saturation(args)
        return
    if args.profile_only:
        # what else ran: run I (2026-12-03) timed the span stages 2-3x slower than runs J and K an hour
        # later on the same code, so a profile says how busy the machine was before it started
        load, started, cpu = os.getloadavg(), time.time(), cpu_times()
        if load[0] > (os.cpu_count() or 1) / 2:
            print(f"the machine is busy (load average {load[0]:.2f} over the last minute): "
                  "these times are not comparable with an idle machine's", file=sys.stderr)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            spec = make_compact(tmp / "compact")
            build_index(tmp / "index", spec, 100_000, segments=args.segments)
            stages = in_process_profile(tmp / "index", spec, args.threads, args.segments)
        steal = steal_share(cpu, cpu_times())
        print(json.dumps(stages))
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {"rows": []}
        out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
                   "segments": args.segments,
                   "load_average_before": [round(x, 2) for x in load], "steal_share": steal,
                   "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started))}  # fmt: skip
        out.write_text(json.dumps({**data, "in_process_100k": stages, "in_process_machine": machine}, indent=1))
        return
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk")
    rows = []
    configs = [("refine off", '"refine": false')] + [
        (f"refine {s} steps", f'"refine": true, "steps": {s}') for s in (5, 20, 50)
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sizes = [int(s) for s in args.sizes.split(",") if s]
        plans = [("compact", make_compact(tmp / "compact"), n) for n in sizes]
        if args.clap_size:
            plans.append(("CLAP full size", make_full_clap(tmp / "clap"), args.clap_size))
        for encoder, spec, n in plans:
            index = tmp / f"index-{encoder.split()[0]}-{n}"
            t = time.perf_counter()
            build_index(index, spec, n)
            print(f"built {index.name} in {time.perf_counter() - t:.0f} s", flush=True)
            server = Server(index, args.threads)
            try:
                for label, options in configs:
                    if encoder != "compact" and label.endswith(("20 steps", "50 steps")):
                        continue
                    for clients in (1, 8, 32):
                        if label.endswith(("20 steps", "50 steps")) and n != 100_000:
                            continue
                        stats = run_wrk(server.port, clients, args.seconds, options, tmp)
                        row = {"encoder": encoder, "items": n, "query": label, "clients": clients,
                               "threads": args.threads, **stats,
                               "rss_mb": round(server.rss_mb(), 1)}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                server.stop()
            shutil.rmtree(index)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds_per_run": args.seconds,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
