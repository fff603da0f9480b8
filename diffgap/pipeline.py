"""The steps the CLI and the demo share, each a library call: build or update an index from a corpus,
embed paired data, train encoders and refiners for an index, evaluate, and the whole demo.

Callers that show progress pass a `ProgressFactory`: given a total, a unit and a description it
returns a context manager yielding a `step(n)` callback (the CLI's makes tqdm bars). The default
shows nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.diffusion.refiner import DEFAULT_STEPS, Refiner, load_refiner
from diffgap.encoders import EncoderLoadError, EncoderSet, load_encoders
from diffgap.encoders.sentence import SentenceEncoder
from diffgap.index.build import BuildReport, SourceFile, build_index, is_excluded, scan_folder, scan_list
from diffgap.index.layout import CACHE_DIR, is_index_dir, refiner_dir
from diffgap.index.meaning import AUTO, OFF, resolve_meaning_model, sync_meaning
from diffgap.index.store import IndexStore
from diffgap.media.synthetic import generate_demo_corpus
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.models.segments import SEGMENTS
from diffgap.retrieval.search import Query, RefineSpec, open_searcher
from diffgap.training.adapter import AdapterTrainConfig, sentence_model_for, wanted
from diffgap.training.embeddings import PairEmbeddings, embed_index_pairs, embed_pairs
from diffgap.training.encoders import EncoderTrainConfig, train_compact_encoders
from diffgap.training.evaluate import AblationConfig, format_table, rows_to_json, run_ablation
from diffgap.training.mapper import MapperConfig
from diffgap.training.metrics import metrics, ranks_query_to_audio
from diffgap.training.pairs import Pair, read_pairs
from diffgap.training.refiner import RefinerTrainConfig, fit_refiner

log = logging.getLogger(__name__)

Step = Callable[[int], None]
ProgressFactory = Callable[[int | None, str, str], contextlib.AbstractContextManager[Step]]


@contextlib.contextmanager
def no_progress(total: int | None, unit: str, desc: str) -> Iterator[Step]:
    yield lambda n: None


# ---- indexes -----------------------------------------------------------------------------------------
@dataclass
class BuildOptions:
    """How the work of a build or update is done (not what the index is)."""

    num_jobs: int = 1  # decoding worker processes (Ray: encoder actors)
    batch_size: int = 32  # windows per encoder call
    chunk_files: int = 32  # files per committed chunk: the resume granularity
    file_timeout: float | None = 120.0  # skip a file whose decoding takes longer (s)
    max_file_seconds: float | None = 4 * 3600.0  # index at most this much of one recording (s)
    ray: str | None = None  # 'local', 'auto' or ray://HOST:PORT: decode and encode on Ray
    shard_dir: Path | None = None  # with ray: where the embedding shards go (default INDEX/shards)


def build(
    index: str | Path,
    encoder_spec: str,
    *,
    corpus: str | Path | None = None,
    manifest_csv: str | Path | None = None,
    column: str = "audio",
    split: str | None = None,
    index_type: str | None = None,
    window_s: float | None = None,
    hop_s: float | None = None,
    prune: bool = False,
    exclude: Sequence[str] = (),
    meaning: str = AUTO,
    segments: int | None = None,
    options: BuildOptions | None = None,
    progress: ProgressFactory = no_progress,
) -> BuildReport:
    """Index a folder (or the files a CSV names) into `index`, creating it or resuming it. `exclude`
    globs are kept in the manifest, so later updates leave the same files out. `meaning` names the
    sentence model that embeds each file's description for search by meaning (`auto`: the default one
    when installed; `off`: none; diffgap/index/meaning.py). `segments`: time spans a new index keeps per
    window for video queries' segment scores (None: SEGMENTS where the encoder keeps time, else 0)."""
    if manifest_csv:
        root, files = scan_list(manifest_csv, column=column, split=split)
        files = [f for f in files if not is_excluded(f.rel, exclude)]
    elif corpus:
        root, files = Path(corpus).resolve(), scan_folder(corpus, exclude=exclude)
    else:
        raise ValueError("give a corpus folder or a manifest CSV")
    encoders = load_encoders(encoder_spec, need_text=False)
    ray = bool(options and options.ray)  # Ray's shards carry vectors only: a Ray build keeps no spans
    if segments is None:
        segments = SEGMENTS if encoders.audio.keeps_time and not ray else 0
    elif segments < 0:
        raise ValueError(f"--segments must be a count >= 0, got {segments}")
    elif segments and (ray or not encoders.audio.keeps_time):
        what = "a Ray build keeps" if ray else f"{encoder_spec} audio vectors keep"
        raise ValueError(f"{what} no time spans: build with --segments 0 or without it")
    sentence = resolve_meaning_model(meaning)
    store = IndexStore.create(
        index,
        encoder_spec=encoder_spec,
        fingerprint=encoders.audio.fingerprint,
        dim=encoders.audio.dim,
        index_type=index_type,
        window_s=window_s,
        hop_s=hop_s,
        corpus_root=str(root),
        segments=segments,
    )
    if exclude:
        store.manifest.exclude = list(exclude)
    log.info("indexing %d files from %s into %s (%s)", len(files), root, index, encoder_spec)
    return _run_build(
        store, encoders, sentence, files, options or BuildOptions(), remove_missing=prune, progress=progress
    )


def update(
    index: str | Path,
    corpus: str | Path | None = None,
    *,
    exclude: Sequence[str] | None = None,
    meaning: str | None = None,
    options: BuildOptions | None = None,
    progress: ProgressFactory = no_progress,
) -> BuildReport:
    """Add new and changed files of the corpus (default: the one the index was built from), drop removed
    ones. `exclude` replaces the index's globs (None keeps them); `meaning` the index's sentence model
    (None keeps it; an index that has none gets the default one when it is installed)."""
    store = IndexStore.open(index)
    try:
        root = Path(corpus or store.manifest.corpus_root or "").resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"corpus folder {root} does not exist; pass it as the second argument")
        encoders = load_encoders(store.manifest.encoder_spec, need_text=False)
        store.check_fingerprint(encoders.audio.fingerprint)
        if corpus:
            store.manifest.corpus_root = str(root)
        if exclude is not None:
            store.manifest.exclude = list(exclude)
        files = scan_folder(root, exclude=store.manifest.exclude)
        own = store.manifest.meaning
        sentence = resolve_meaning_model(meaning or (own["name"] if own else AUTO))
        if meaning == OFF:
            store.set_meaning_model(None)
    except BaseException:
        store.close()
        raise
    log.info("updating %s from %s (%d files found)", index, root, len(files))
    return _run_build(
        store, encoders, sentence, files, options or BuildOptions(), remove_missing=True, progress=progress
    )


def _run_build(
    store: IndexStore,
    encoders: EncoderSet,
    sentence: SentenceEncoder | None,
    files: list[SourceFile],
    options: BuildOptions,
    *,
    remove_missing: bool,
    progress: ProgressFactory,
) -> BuildReport:
    try:
        if options.ray:
            from diffgap.index.ray_build import build_index_ray

            log.info("decoding and encoding on Ray (%s), %d actors", options.ray, options.num_jobs)
            return build_index_ray(
                store,
                store.manifest.encoder_spec,
                files,
                options.shard_dir or store.root / "shards",
                num_actors=options.num_jobs,
                remove_missing=remove_missing,
                max_file_seconds=options.max_file_seconds,
                address=None if options.ray == "local" else options.ray,
            )
        with progress(len(files), "file", "indexing") as step:
            return build_index(
                store,
                encoders.audio,
                files,
                num_jobs=options.num_jobs,
                batch_size=options.batch_size,
                chunk_files=options.chunk_files,
                remove_missing=remove_missing,
                progress=step,
                file_timeout=options.file_timeout,
                max_file_seconds=options.max_file_seconds,
            )
    finally:
        try:
            with progress(None, "file", "meaning") as step:
                sync_meaning(store, sentence, progress=step)
        finally:
            store.close()


# ---- encoders and paired data --------------------------------------------------------------------------
def encoders_for(
    index: str | Path | None, encoder_spec: str | None = None, video_encoder: str | None = None
) -> tuple[EncoderSet, str]:
    """The encoders of an index (checked against its fingerprint) or of an explicit spec, and the spec."""
    if index:
        with IndexStore.open(index, readonly=True) as store:
            spec = encoder_spec or store.manifest.encoder_spec
            encoders = load_encoders(spec, video_encoder)
            store.check_fingerprint(encoders.audio.fingerprint)
            return encoders, spec
    if not encoder_spec:
        raise ValueError("give an index or an encoder spec")
    return load_encoders(encoder_spec, video_encoder), encoder_spec


def pair_segments(index: str | Path | None, encoders: EncoderSet, modality: str) -> int:
    """Time spans to embed pairs with, so that a refiner can weigh the segment score: the index's own
    count for video pairs when both towers keep time; 0 otherwise."""
    if not index or modality != "video" or not encoders.audio.keeps_time:
        return 0
    if not encoders.for_modality("video").keeps_time:
        return 0
    with IndexStore.open(index, readonly=True) as store:
        return store.manifest.segments


@dataclass
class PairsSource:
    """Where paired data comes from: a CSV (generic, AudioCaps or Clotho layout)."""

    path: str | Path
    layout: str = "auto"
    split: str | None = None
    audio_dir: str | Path | None = None


def embed_pairs_file(
    source: PairsSource,
    encoders: EncoderSet,
    modality: str,
    *,
    cache_dir: str | Path | None = None,
    progress: ProgressFactory = no_progress,
    segments: int = 0,
) -> PairEmbeddings:
    pairs = read_pairs(source.path, layout=source.layout, split=source.split, audio_dir=source.audio_dir)
    with progress(None, "item", f"embedding {Path(source.path).name}") as step:
        data = embed_pairs(pairs, encoders, modality, cache_dir=cache_dir, progress=step, segments=segments)
    log.info("%s: %d %s queries for %d audio targets", source.path, len(data.query), modality, len(data.audio))
    return data


def train_encoders(
    source: PairsSource,
    out: str | Path,
    cfg: EncoderTrainConfig | None = None,
    *,
    use_video: bool = True,
    progress: ProgressFactory = no_progress,
) -> dict[str, float]:
    """Train the compact encoders on paired data and save them to `out` (use as `compact:OUT`)."""
    pairs = read_pairs(source.path, layout=source.layout, split=source.split, audio_dir=source.audio_dir)
    log.info("training compact encoders on %d pairs from %s", len(pairs), source.path)
    with progress(None, "clip", "decoding") as load_step, progress(None, "step", "training") as train_step:
        stats = train_compact_encoders(
            pairs, out, cfg, use_video=use_video, progress=lambda *_: train_step(1), load_progress=load_step
        )
    log.info("saved compact encoders to %s (%s)", out, ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
    return stats


# How `encoders train --from-index` trains by default: a few hundred to a few thousand names, the epoch
# that ranks the held-out files best kept. Augmentation stays opt-in: on the real library of
# BENCHMARKS.md it cost held-out R@10 at the same 30 epochs (0.344 -> 0.289, refined).
LIBRARY_TRAINING: dict[str, Any] = {"epochs": 60, "batch_size": 32, "patience": 8}


def train_encoders_from_index(
    index: str | Path,
    out: str | Path,
    cfg: EncoderTrainConfig | None = None,
    *,
    val_fraction: float = 0.1,
    exclude: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """Compact encoders for a library with no captions: (description, audio) pairs of the files of an
    index built with any encoder (its descriptions come from tags and names), a share of the files
    held out (as `refiner train --from-index` does) and scored at the end: held-out description ->
    audio R@1/R@10 among the held-out files. Rebuild the index with `compact:OUT` to use them.

    The default config for this path keeps the epoch that ranks the held-out files best and stops
    after `patience` epochs without a better one (`LIBRARY_TRAINING`)."""
    cfg = cfg or EncoderTrainConfig(**LIBRARY_TRAINING)
    with IndexStore.open(index, readonly=True) as store:
        root = Path(store.manifest.corpus_root or ".")
        described = {path: text for _, path, text in store.described_items() if not is_excluded(path, exclude)}
    if len(described) < 8:
        raise ValueError(f"{index} has {len(described)} described files; training encoders needs at least 8")
    paths = sorted(described)
    order = np.random.default_rng(cfg.seed).permutation(len(paths))
    n_val = min(max(int(round(len(paths) * val_fraction)), 1), len(paths) - 4) if val_fraction > 0 else 0
    held = {paths[i] for i in order[:n_val]}
    pairs = [Pair(root / p, text=described[p]) for p in paths if p not in held]
    val_pairs = [Pair(root / p, text=described[p]) for p in sorted(held)]
    log.info("training compact encoders on %d described files of %s (%d held out)", len(pairs), index, len(held))
    with progress(None, "clip", "decoding") as load_step, progress(None, "step", "training") as train_step:
        stats: dict[str, Any] = train_compact_encoders(
            pairs,
            out,
            cfg,
            use_video=False,
            val_pairs=val_pairs,
            progress=lambda *_: train_step(1),
            load_progress=load_step,
        )
    if held:
        data = embed_pairs(val_pairs, load_encoders(f"compact:{out}"), "text")
        held_metrics = metrics(ranks_query_to_audio(data.query, data.audio, data.query_group))
        stats["held_out"] = held_metrics
        chose = " (they also chose the epoch kept)" if cfg.patience else ""
        log.info("held-out description->audio among %d files%s: R@1 %.3f, R@10 %.3f", held_metrics["n"], chose,
                 held_metrics["R@1"], held_metrics["R@10"])  # fmt: skip
    return stats


# ---- refiners ----------------------------------------------------------------------------------------
@dataclass
class RefinerJob:
    """What `refiner train` trains on and where it puts the result."""

    index: str | Path | None = None
    encoder: str | None = None  # spec, when no index gives it
    video_encoder: str | None = None
    modality: str = "text"
    pairs: PairsSource | None = None
    from_index: bool = False  # (description, audio) pairs from the index itself
    exclude: tuple[str, ...] = ()  # with from_index: globs of files whose descriptions are not learnt from
    cache_dir: str | Path | None = None  # embedding cache (default INDEX/cache)
    out: str | Path | None = None  # default INDEX/refiner-MODALITY
    train: RefinerTrainConfig = field(default_factory=RefinerTrainConfig)
    net: dict[str, int] = field(default_factory=dict)  # RefinerNetConfig overrides (hidden, n_blocks)
    val_fraction: float = 0.1
    eval_steps: int = DEFAULT_STEPS
    blend: float | None = None
    ensemble: bool = True  # also train the mapper and weigh refined, mapped and direct scores (fit_refiner)
    checkpoint_every: int = 500
    # with text pairs and the ensemble: also fit a text adapter and weigh its score (fit_refiner); None: none
    adapter: AdapterTrainConfig | None = None
    # the ensemble's mapper (its loss and size; iterations and seed follow `train`); None: MapperConfig()
    mapper: MapperConfig | None = None
    two_sided: bool = True  # with the ensemble: also weigh the library side (a backward mapper; fit_refiner)
    span_gallery: str = "library"  # where held-out queries rank while the span weight is picked (SPAN_GALLERIES)

    def output(self) -> Path:
        if self.out:
            return Path(self.out)
        return refiner_dir(self.index, self.modality) if self.index else Path("refiner")

    def cache(self) -> Path | None:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(self.index) / CACHE_DIR if self.index else None


def train_refiner_job(job: RefinerJob, progress: ProgressFactory = no_progress) -> tuple[Refiner, dict[str, Any], Path]:
    """Embed the job's pairs and fit a refiner on them (`fit_refiner`); returns it, its report and where
    it was saved."""
    encoders, spec = encoders_for(job.index, job.encoder, job.video_encoder)
    if job.from_index:
        if not job.index or job.modality != "text":
            raise ValueError("learning from the index's descriptions needs an index and text queries")
        with IndexStore.open(job.index, readonly=True) as store:
            data = embed_index_pairs(store, encoders, exclude=job.exclude)
        log.info("%d (description, audio) pairs from %s, e.g. %r", len(data.query), job.index, data.audio_keys[0])
    elif job.pairs is not None:
        segments = pair_segments(job.index, encoders, job.modality)
        data = embed_pairs_file(
            job.pairs, encoders, job.modality, cache_dir=job.cache(), progress=progress, segments=segments
        )
    else:
        raise ValueError("give paired data (a CSV) or learn from the index's descriptions")
    net_cfg = RefinerNetConfig(audio_dim=data.audio.shape[1], query_dim=data.query.shape[1], **job.net)
    out = job.output()
    with progress(job.train.iterations, "it", f"training the {job.modality} refiner") as step:
        refiner, report = fit_refiner(
            data,
            encoders,
            out,
            cfg=job.train,
            net_cfg=net_cfg,
            val_fraction=job.val_fraction,
            eval_steps=job.eval_steps,
            blend=job.blend,
            ensemble=job.ensemble,
            checkpoint_every=job.checkpoint_every,
            record={"encoder_spec": spec, "video_encoder_spec": job.video_encoder},
            progress=lambda it, loss: step(1),
            adapter=job.adapter if job.modality == "text" else None,
            mapper=job.mapper,
            two_sided=job.two_sided,
            span_gallery=job.span_gallery,
        )
    return refiner, report, out


def evaluate(
    train_pairs: PairsSource,
    test_pairs: PairsSource,
    cfg: AblationConfig,
    *,
    index: str | Path | None = None,
    encoder: str | None = None,
    video_encoder: str | None = None,
    modality: str = "text",
    cache_dir: str | Path | None = None,
    refiner: str | Path | None = None,
    upper_index: str | Path | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """The ablation table on paired data: rows as JSON, the rendered table and the data sizes.
    `upper_index`: an index whose encoders were trained on the target domain (their own query
    towers, video included for compact encoders); its direct search on the test pairs is the upper
    bound of the table's recovery column."""
    encoders, _ = encoders_for(index, encoder, video_encoder)
    cache = cache_dir or (Path(index) / CACHE_DIR if index else None)
    train = embed_pairs_file(train_pairs, encoders, modality, cache_dir=cache, progress=progress)
    test = embed_pairs_file(test_pairs, encoders, modality, cache_dir=cache, progress=progress)
    upper = None
    if upper_index:
        upper_encoders, _ = encoders_for(upper_index)
        if upper_encoders.get(modality) is None:
            raise ValueError(f"the encoders of {upper_index} have no {modality} tower for the upper bound")
        upper = embed_pairs_file(
            test_pairs, upper_encoders, modality, cache_dir=Path(upper_index) / CACHE_DIR, progress=progress
        )
    trained = load_refiner(refiner, encoders) if refiner else None
    if not wanted(encoders, cfg.adapter):
        cfg = replace(cfg, adapter=None)
    elif cfg.adapter is not None:
        cfg = replace(cfg, adapter=replace(cfg.adapter, sentence_model=sentence_model_for(encoders, cfg.adapter)))
    rows = run_ablation(train, test, cfg, refiner=trained, upper=upper)
    return {
        "modality": modality,
        "train_pairs": int(len(train.query)),
        "test_queries": int(len(test.query)),
        "test_audio": int(len(test.audio)),
        "rows": rows_to_json(rows),
        "table": format_table(rows, modality),
    }


# ---- the demo ----------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    clips: int = 240  # synthetic captioned clips (a fifth held out as `test`)
    epochs: int = 12  # compact encoder epochs
    refiner_iterations: int = 600
    compact: bool = False  # compact encoders even when LAION CLAP weights are in the local cache
    num_jobs: int = 2
    seed: int = 0
    queries: tuple[str, ...] = ("a high beep twice at the start", "a low buzz at the end")


def demo_encoders(workdir: Path, corpus: Path, cfg: DemoConfig, progress: ProgressFactory) -> tuple[str, str | None]:
    """(audio/text spec, video spec): LAION CLAP when its weights are here, else compact encoders
    trained on the demo corpus (once; a rerun reuses them)."""
    if not cfg.compact:
        try:
            load_encoders("clap", need_text=False)
            log.info("LAION CLAP weights found: using them")
            return "clap", None
        except EncoderLoadError:
            log.info("no CLAP weights available offline: training compact encoders on the demo corpus")
    encoders = workdir / "encoders"
    if not (encoders / "config.json").exists():
        train_encoders(
            PairsSource(corpus / "captions.csv", split="train"),
            encoders,
            EncoderTrainConfig(epochs=cfg.epochs, batch_size=32, seed=cfg.seed),
            progress=progress,
        )
    return f"compact:{encoders}", f"compact:{encoders}"


def run_demo(workdir: str | Path, cfg: DemoConfig | None = None, progress: ProgressFactory = no_progress) -> Path:
    """corpus -> encoders -> index -> refiners (text, and video with compact encoders) -> example
    searches; every step is skipped when its output exists. Returns the index directory."""
    cfg = cfg or DemoConfig()
    workdir = Path(workdir).resolve()
    corpus = workdir / "corpus"
    if not (corpus / "captions.csv").exists():
        log.info("generating %d demo clips in %s", cfg.clips, corpus)
        generate_demo_corpus(corpus, cfg.clips, seed=cfg.seed)
    spec, video_spec = demo_encoders(workdir, corpus, cfg, progress)
    index = workdir / "index"
    report = build(index, spec, corpus=corpus / "audio", options=BuildOptions(num_jobs=cfg.num_jobs), progress=progress)
    log.info("%s", report.summary())
    if not is_index_dir(index) or report.total_items == 0:
        raise ValueError(f"the demo index {index} holds no items")
    for modality in ("text", "video") if video_spec else ("text",):
        if refiner_dir(index, modality).exists():
            continue
        job = RefinerJob(
            index=index,
            video_encoder=video_spec,
            modality=modality,
            pairs=PairsSource(corpus / "captions.csv", split="train"),
            train=RefinerTrainConfig(iterations=cfg.refiner_iterations),
        )
        train_refiner_job(job, progress)
    searcher = open_searcher(index)
    try:
        for text in cfg.queries:
            result = searcher.search(Query("text", 3, text=text, refine=RefineSpec()))
            top = ", ".join(f"{h.item.path} ({h.score:+.3f})" for h in result.hits)
            log.info("example search %r (refined: %s): %s", text, result.refined, top)
    finally:
        searcher.store.close()
    log.info("demo index ready: %s  (serve it with: diffgap-serve --index %s)", index, index)
    return index
