"""The ablation table: direct search, the regression mapper and the refiner variants of the paper's
Tables V-VII, trained on one set of pairs and scored on another in both directions (metrics.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from diffgap.diffusion.refiner import Refiner
from diffgap.diffusion.scoring import ScoreSpec, rerank
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.mapper import MapperConfig, train_mapper
from diffgap.training.metrics import choose_blend, metrics, ranks_after_rerank, score_mapping
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


def run_ablation(
    train: PairEmbeddings, test: PairEmbeddings, cfg: AblationConfig | None = None, refiner: Refiner | None = None
) -> list[Row]:
    """The rows of the paper's Tables V-VII plus the baselines, trained on `train`, scored on `test`."""
    cfg = cfg or AblationConfig()
    same_space = train.audio.shape[1] == train.query.shape[1]
    rows: list[Row] = []

    if same_space:
        rows.append(Row("direct (no refiner)", *score_mapping(test, lambda x: x, lambda x: x)))

    t0 = time.perf_counter()
    fwd, bwd = train_mapper(train, 0, cfg.mapper), train_mapper(train, 1, cfg.mapper)
    rows.append(
        Row(
            "regression mapper (MLP)",
            *score_mapping(test, fwd.map, bwd.map),
            {"train_s": round(time.perf_counter() - t0, 1)},
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

    def reorder(rows: np.ndarray, top: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return rerank(full, test.query[rows], top, test.audio[top], cfg.rerank, scores)

    rerank_from = {f"refiner with BST, sample {s0} steps": full.refine(test.query, steps=s0, blend=0.0)}
    if same_space:
        rerank_from = {"direct": test.query, **rerank_from}
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
    other = "sample" if cfg.train.prediction_type == "epsilon" else "epsilon"
    alternative = train_one(bidirectional=True, prediction_type=other)
    label = "z_0-prediction" if other == "sample" else "eps-prediction (as in the paper)"
    refiner_rows(alternative, f"refiner with BST, {label}", (s0,), bidirectional=True)
    if same_space:

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
        fit, held_out = train.split(cfg.val_fraction, seed=cfg.train.seed)
        if len(held_out.query) and len(fit.query) >= 2:
            t = time.perf_counter()
            chosen, by_weight = choose_blend(train_refiner(fit, cfg=cfg.train)[0], held_out, steps=s0)
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
    for m in cfg.intervals:
        model = train_one(bidirectional=True, switch_every=m)
        refiner_rows(model, f"refiner with BST (m={m})", (s0,), bidirectional=True)
    return rows


def format_table(rows: list[Row], query_name: str = "text") -> str:
    head = (
        f"| method | {query_name}->audio R@1 | R@5 | R@10 | medR | MRR@10 | audio->{query_name} R@1 | R@5 | R@10 "
        "| medR | MRR@10 |"
    )
    lines = [head, "|" + "---|" * 11]

    def cells(m: dict | None) -> str:
        if m is None:
            return "n/a | n/a | n/a | n/a | n/a"
        return f"{m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.0f} | {m['MRR@10']:.3f}"

    for r in rows:
        lines.append(f"| {r.name} | {cells(r.to_audio)} | {cells(r.from_audio)} |")
    return "\n".join(lines)


def rows_to_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
