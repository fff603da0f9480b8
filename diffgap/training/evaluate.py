"""The ablation table: direct search, the regression mapper and the refiner variants of the paper's
Tables V-VII, trained on one set of pairs and scored on another in both directions (metrics.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from diffgap.diffusion.adapter import TextAdapter
from diffgap.diffusion.refiner import Refiner, two_sided_scores
from diffgap.diffusion.scoring import ScoreSpec, rerank
from diffgap.models.mapper_net import Mapper
from diffgap.training.adapter import AdapterTrainConfig, fit_adapter
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.mapper import MapperConfig, train_mapper
from diffgap.training.metrics import (
    audio_ranks,
    choose_blend,
    choose_library_weight,
    choose_mix,
    metrics,
    mix,
    query_ranks,
    ranks_after_rerank,
    score_mapping,
)
from diffgap.training.refiner import RefinerTrainConfig, train_refiner

log = logging.getLogger(__name__)


@dataclass
class Row:
    name: str
    to_audio: dict[str, float] | None
    from_audio: dict[str, float] | None
    notes: dict[str, object] = field(default_factory=dict)


@dataclass
class AblationConfig:
    steps: tuple[int, ...] = (5, 20, 50)  # Table VI
    intervals: tuple[int, ...] = ()  # extra BST intervals m to train (Table VII); empty = default only
    train: RefinerTrainConfig = field(default_factory=RefinerTrainConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    bridge_start: int = 500  # bridge mode rows start from the query noised to this step
    rerank: ScoreSpec = field(default_factory=ScoreSpec)  # the denoising-error rerank rows (scoring.py)
    blend: float = 0.5  # weight of direct similarity in the blended row
    val_fraction: float = 0.1  # share of training targets held out to pick the shipped blend weight
    n_samples: int = 1
    # Training recipes scored as their own rows (label, changes to `train`): what diffusion models
    # usually need and the paper does not say (issue 18); a default changes only if a row wins on
    # both SynthCaps seeds.
    variants: tuple[tuple[str, dict], ...] = (
        ("EMA 0.999", {"ema_decay": 0.999}),
        ("EMA 0.999 + cosine LR", {"ema_decay": 0.999, "lr_schedule": "cosine"}),
        ("retrieval-path loss 0.5", {"path_weight": 0.5}),
    )
    mapper_bridge_start: int = 250  # the bridge row from the mapper's estimate starts at this step
    # False skips the rows earlier runs settled (the other prediction target, bridge from the query,
    # from noise, a fixed blend, the denoising-error rerank): a quicker table of baselines, the
    # shipped refiner and the candidate recipes.
    ablations: bool = True
    # With text pairs: a text adapter (diffgap/diffusion/adapter.py) fitted on the pairs less the
    # held-out share, as train-refiner fits it; rows for it alone and in the ensemble. `sentence_model`
    # must be resolved (pipeline.evaluate does it). None: no adapter rows.
    adapter: AdapterTrainConfig | None = None


UPPER = "in-domain upper bound: direct search with encoders trained on the target domain"
DIRECT = "direct (no refiner)"


def run_ablation(
    train: PairEmbeddings,
    test: PairEmbeddings,
    cfg: AblationConfig | None = None,
    refiner: Refiner | None = None,
    upper: PairEmbeddings | None = None,
) -> list[Row]:
    """The rows of the paper's Tables V-VII plus the baselines, trained on `train`, scored on `test`.
    `upper`: the same test pairs embedded by encoders that were trained on the target domain; their
    direct search is the upper bound of the recovery column (`add_recovery`)."""
    cfg = cfg or AblationConfig()
    same_space = train.audio.shape[1] == train.query.shape[1]
    rows: list[Row] = []

    if same_space:
        rows.append(Row(DIRECT, *score_mapping(test, lambda x: x, lambda x: x)))
    if upper is not None:
        assert len(upper.query) == len(test.query), "the upper bound must embed the same test pairs"
        rows.append(Row(UPPER, *score_mapping(upper, lambda x: x, lambda x: x)))

    t0 = time.perf_counter()
    plain = replace(cfg.mapper, ranking_weight=0.0)  # the baseline is the plain regression, whatever ships
    fwd, bwd = train_mapper(train, 0, plain), train_mapper(train, 1, plain)
    plain_maps = (fwd, bwd)
    rows.append(
        Row(
            "regression mapper (MLP)",
            *score_mapping(test, fwd.map, bwd.map),
            {"train_s": round(time.perf_counter() - t0, 1)},
        )
    )
    if cfg.mapper.ranking_weight > 0:
        # the mapper a refiner ships (its mix, the bridge from its estimate): the same MLP and pairs
        t0 = time.perf_counter()
        fwd, bwd = train_mapper(train, 0, cfg.mapper), train_mapper(train, 1, cfg.mapper)
        rows.append(
            Row(
                f"mapper with a ranking loss ({cfg.mapper.ranking_weight:g}), as the refiner ships it",
                *score_mapping(test, fwd.map, bwd.map),
                {"train_s": round(time.perf_counter() - t0, 1), "ranking_weight": cfg.mapper.ranking_weight},
            )
        )

    def refiner_rows(model: Refiner, label: str, steps: tuple[int, ...], bidirectional: bool) -> None:
        for s in steps:

            def to_audio(x: np.ndarray, s: int = s) -> np.ndarray:
                return model.refine(x, direction=0, steps=s, n_samples=cfg.n_samples, blend=0.0)

            def from_audio(x: np.ndarray, s: int = s) -> np.ndarray:
                return model.refine(x, direction=1, steps=s, n_samples=cfg.n_samples)

            rows.append(
                Row(
                    f"{label}, sample, {s} steps",
                    *score_mapping(test, to_audio, from_audio if bidirectional else None),
                    {"steps": s, "mode": "sample", "bytes": model.num_bytes},
                )
            )

    def train_one(**changes: object) -> Refiner:
        t = time.perf_counter()
        model, hist = train_refiner(train, cfg=replace(cfg.train, **changes))
        log.info(
            "trained refiner %s in %.1f s (final loss %.4f)",
            changes,
            time.perf_counter() - t,
            float(np.mean(hist.train_loss[-100:])),
        )
        return model

    # one network per direction is the other candidate for what ships (issue 18), so this row stays
    no_bst = train_one(bidirectional=False)
    refiner_rows(no_bst, "refiner without BST", (cfg.steps[0],), bidirectional=False)
    full = refiner or train_one(bidirectional=True)
    refiner_rows(
        full,
        f"refiner with BST (m={full.config.training.get('switch_every') or 'auto'})",
        cfg.steps,
        bidirectional=True,
    )
    s0 = cfg.steps[0]
    # A second refiner trained without a share of the pairs: the held-out choices (blend, ensemble) use it.
    fit, held_out = train.split(cfg.val_fraction, seed=cfg.train.seed)
    fit_cfg = replace(cfg.train, bidirectional=True)  # the same recipe as `full`, whose rows these choices serve
    fit_refiner = train_refiner(fit, cfg=fit_cfg)[0] if len(held_out.query) and len(fit.query) >= 2 else None

    def reorder(rows: np.ndarray, top: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return rerank(full, test.query[rows], top, test.audio[top], cfg.rerank, scores)

    rerank_from = {f"refiner with BST, sample {s0} steps": full.refine(test.query, steps=s0, blend=0.0)}
    if same_space:
        rerank_from = {"direct": test.query, **rerank_from}
    if not cfg.ablations:
        rerank_from = {}
    for label, mapped in rerank_from.items():
        ranks = ranks_after_rerank(mapped, test.audio, test.query_group, reorder, cfg.rerank.depth)
        rows.append(
            Row(
                f"{label}, top {cfg.rerank.depth} reranked by denoising error",
                metrics(ranks),
                None,
                {"rerank_depth": cfg.rerank.depth, "rerank_levels": cfg.rerank.levels},
            )
        )
    if cfg.ablations:
        other = "sample" if cfg.train.prediction_type == "epsilon" else "epsilon"
        alternative = train_one(bidirectional=True, prediction_type=other)
        label = "z_0-prediction" if other == "sample" else "eps-prediction (as in the paper)"
        refiner_rows(alternative, f"refiner with BST, {label}", (s0,), bidirectional=True)
    if same_space and cfg.ablations:

        def bridge(x: np.ndarray, d: int) -> np.ndarray:
            return full.refine(x, direction=d, steps=s0, mode="bridge", start_step=cfg.bridge_start, blend=0.0)

        rows.append(
            Row(
                f"refiner with BST, bridge from step {cfg.bridge_start}, {s0} steps",
                *score_mapping(test, lambda x: bridge(x, 0), lambda x: bridge(x, 1)),
                {"mode": "bridge", "start_step": cfg.bridge_start},
            )
        )

        def from_noise(x: np.ndarray, d: int) -> np.ndarray:
            return full.refine(x, direction=d, steps=s0, start_noise=1.0, blend=0.0)

        rows.append(
            Row(
                f"refiner with BST, sample {s0} steps from noise (start_noise=1)",
                *score_mapping(test, lambda x: from_noise(x, 0), lambda x: from_noise(x, 1)),
                {"mode": "sample", "start_noise": 1.0},
            )
        )

        def blended(x: np.ndarray, d: int) -> np.ndarray:
            return full.refine(x, direction=d, steps=s0, blend=cfg.blend)

        rows.append(
            Row(
                f"refiner with BST, sample {s0} steps, blend {cfg.blend} with direct",
                *score_mapping(test, lambda x: blended(x, 0), lambda x: blended(x, 1)),
                {"mode": "sample", "blend": cfg.blend},
            )
        )
    # What train-refiner ships: the weight picked on pairs held out of training (here by a
    # second refiner trained without them), applied to the refiner trained on all pairs.
    if same_space and fit_refiner is not None:
        t = time.perf_counter()
        chosen, by_weight = choose_blend(fit_refiner, held_out, steps=s0)
        log.info("blend %.2f chosen on %d held-out pairs (MRR@10: %s)", chosen, len(held_out.query), by_weight)

        def chosen_blend(x: np.ndarray) -> np.ndarray:
            return full.refine(x, direction=0, steps=s0, blend=chosen)

        rows.append(
            Row(
                f"refiner with BST, sample {s0} steps, blend chosen on held-out pairs ({chosen})",
                *score_mapping(test, chosen_blend, None),
                {"blend": chosen, "MRR@10_by_blend": by_weight, "train_s": round(time.perf_counter() - t, 1)},
            )
        )
    for label, changes in cfg.variants:
        refiner_rows(train_one(bidirectional=True, **changes), f"refiner with BST, {label}", (s0,), bidirectional=True)

    def from_mapper(x: np.ndarray, d: int) -> np.ndarray:
        estimate = (fwd if d == 0 else bwd).map(x)
        return full.refine(
            x, direction=d, steps=s0, mode="bridge", start=estimate, start_step=cfg.mapper_bridge_start, blend=0.0
        )

    rows.append(
        Row(
            f"refiner with BST, bridge from the mapper's estimate at step {cfg.mapper_bridge_start}, {s0} steps",
            *score_mapping(test, lambda x: from_mapper(x, 0), lambda x: from_mapper(x, 1)),
            {"mode": "bridge", "start": "mapper", "start_step": cfg.mapper_bridge_start},
        )
    )
    if fit_refiner is not None:
        rows.extend(ensemble_rows(fit, held_out, test, cfg, (full, fwd, bwd), fit_refiner))
        if cfg.mapper.ranking_weight > 0:  # what the ranking term adds to the mix: the same mix over the baseline
            rows.extend(ensemble_rows(fit, held_out, test, cfg, (full, *plain_maps), fit_refiner, mapper=plain))
    if fit_refiner is not None and cfg.adapter is not None and fit.texts is not None and test.texts is not None:
        assert cfg.adapter.sentence_model, "resolve the adapter's sentence model first (sentence_model_for)"
        t = time.perf_counter()
        adapter, _ = fit_adapter(fit, cfg.adapter.sentence_model, cfg.adapter, held_out)
        adapted = adapter.encode(test.texts)  # (Q, d), row-aligned with test.query
        rows.append(
            Row(
                f"text adapter alone (a head over {cfg.adapter.sentence_model}'s token states, fitted on the pairs "
                "less the held-out share)",
                *score_mapping(test, lambda x: adapted, None),
                {"bytes": adapter.num_bytes, "train_s": round(time.perf_counter() - t, 1)},
            )
        )
        rows.extend(ensemble_rows(fit, held_out, test, cfg, (full, fwd, bwd), fit_refiner, adapter))
    for m in cfg.intervals:
        model = train_one(bidirectional=True, switch_every=m)
        refiner_rows(model, f"refiner with BST (m={m})", (s0,), bidirectional=True)
    return add_recovery(rows)


def ensemble_rows(
    fit: PairEmbeddings,
    held_out: PairEmbeddings,
    test: PairEmbeddings,
    cfg: AblationConfig,
    models: tuple[Refiner, Mapper, Mapper],
    fit_refiner: Refiner,
    adapter: TextAdapter | None = None,
    mapper: MapperConfig | None = None,
) -> list[Row]:
    """Refined, mapped and (in one space) direct scores summed with weights picked per direction on
    pairs held out of training, by a refiner and mappers trained without them (`fit`), as the blend
    is; the weights then apply to `models` (refiner, forward and backward mapper on all pairs). With
    an `adapter` (fitted on `fit`, as train-refiner ships it), its score of the query texts is a
    fourth part of the query -> audio direction. `mapper`: how the mappers in `models` were trained
    (default `cfg.mapper`); the held-out choice trains its own the same way. Two rows: that mix, and
    the mix two-sided (the weight of the library side chosen on the held-out pairs after it)."""
    s0 = cfg.steps[0]
    same_space = fit.audio.shape[1] == fit.query.shape[1]
    t = time.perf_counter()
    mapper = mapper or cfg.mapper
    fit_maps = (train_mapper(fit, 0, mapper), train_mapper(fit, 1, mapper))
    full, fwd, bwd = models
    held_adapted = test_adapted = None  # (Q, d) the adapter's reading of each query text
    if adapter is not None:
        assert held_out.texts is not None and test.texts is not None, "the adapter reads the queries' texts"
        held_adapted, test_adapted = adapter.encode(held_out.texts), adapter.encode(test.texts)

    def maps(
        model: Refiner, mappers: tuple[Mapper, Mapper], x: np.ndarray, d: int, adapted: np.ndarray | None = None
    ) -> list[np.ndarray]:
        out = [model.refine(x, direction=d, steps=s0, blend=0.0), mappers[d].map(x)]
        out = out + [x] if same_space else out
        return out + [adapted] if adapted is not None else out

    weights, scores, held_mixed = [], [], []  # per direction
    for d, rows_of, adapted in ((0, held_out.query, held_adapted), (1, held_out.audio, None)):
        parts_of = maps(fit_refiner, fit_maps, rows_of, d, adapted)
        w, score = choose_mix(held_out, parts_of, direction=d)
        weights.append(w)
        scores.append(round(score, 4))
        held_mixed.append(mix(parts_of, w))
    names = ["refined", "mapped"] + (["direct"] if same_space else []) + (["adapted"] if adapter else [])
    parts = ", ".join(names[:-1]) + " and " + names[-1]
    log.info("ensemble weights (%s): %s, held-out MRR@10 %s", parts, weights, scores)
    named = ", ".join("/".join(f"{v:g}" for v in w) for w in weights)
    tag = " with the plain regression mapper" if mapper.ranking_weight == 0 < cfg.mapper.ranking_weight else ""
    name = f"ensemble of {parts} scores{tag}, weights chosen on held-out pairs ({named})"
    mixed = (
        mix(maps(full, (fwd, bwd), test.query, 0, test_adapted), weights[0]),  # (P, d)
        mix(maps(full, (fwd, bwd), test.audio, 1), weights[1]),  # (G, c)
    )
    notes = {"weights": weights, "held_out_MRR@10": scores, "train_s": round(time.perf_counter() - t, 1)}
    # the same mix, then the other side mapped across (each direction's other mapper) against the rows as
    # encoded, weighed on the held-out pairs as train-refiner does (`two_sided_scores`)
    library = [
        choose_library_weight(held_out, held_mixed[0], fit_maps[1].map(held_out.audio), direction=0),
        choose_library_weight(held_out, held_mixed[1], fit_maps[0].map(held_out.query), direction=1),
    ]
    lam = [w for w, _ in library]
    log.info("library-side weights %s, held-out MRR@10 %s", lam, [round(v, 4) for _, v in library])
    to_audio = two_sided_scores(mixed[0] @ test.audio.T, test.query, bwd.map(test.audio), lam[0])  # (P, G)
    from_audio = two_sided_scores(mixed[1] @ test.query.T, test.audio, fwd.map(test.query), lam[1])  # (G, P)
    two_sided = (metrics(query_ranks(to_audio, test.query_group)), metrics(audio_ranks(from_audio, test.query_group)))
    return [
        Row(name, *score_mapping(test, lambda x: mixed[0], lambda x: mixed[1]), notes),
        Row(
            f"{name}, two-sided: the library mapped back, weight chosen on held-out pairs ({lam[0]:g}, {lam[1]:g})",
            *two_sided,
            {**notes, "library_weight": lam, "held_out_MRR@10_two_sided": [round(v, 4) for _, v in library]},
        ),
    ]


def add_recovery(rows: list[Row]) -> list[Row]:
    """Recovery of each row, per direction, when the table has both direct search and the in-domain
    upper bound: (R@1 - direct R@1) / (upper R@1 - direct R@1); 1 = all of what retraining the
    encoders on the target domain gives, 0 = nothing over direct search."""
    by_name = {r.name: r for r in rows}
    if DIRECT not in by_name or UPPER not in by_name:
        return rows
    for key in ("to_audio", "from_audio"):
        low, high = getattr(by_name[DIRECT], key), getattr(by_name[UPPER], key)
        if low is None or high is None or high["R@1"] <= low["R@1"]:
            continue
        for r in rows:
            m = getattr(r, key)
            if m is not None:
                r.notes[f"recovery_{key}"] = round((m["R@1"] - low["R@1"]) / (high["R@1"] - low["R@1"]), 4)
    return rows


def format_table(rows: list[Row], query_name: str = "text") -> str:
    """Markdown; with a recovery column per direction when `add_recovery` could compute one."""
    recovery = any(k.startswith("recovery_") for r in rows for k in r.notes)
    extra = " recovery |" if recovery else ""
    head = (
        f"| method | {query_name}->audio R@1 | R@5 | R@10 | medR | MRR@10 |{extra} audio->{query_name} R@1 | R@5 "
        f"| R@10 | medR | MRR@10 |{extra}"
    )
    lines = [head, "|" + "---|" * (13 if recovery else 11)]

    def cells(r: Row, key: str) -> str:
        m = getattr(r, key)
        gain = r.notes.get(f"recovery_{key}")
        tail = (" | " + (f"{gain:.0%}" if gain is not None else "")) if recovery else ""
        if m is None:
            return "n/a | n/a | n/a | n/a | n/a" + tail
        return f"{m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} | {m['MRR@10']:.3f}" + tail

    for r in rows:
        lines.append(f"| {r.name} | {cells(r, 'to_audio')} | {cells(r, 'from_audio')} |")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
