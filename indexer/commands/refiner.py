"""`refiner train` and `refiner eval`: a DiffGAP refiner for an index, and the ablation table."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from diffgap.atomic import atomic_write_json
from diffgap.diffusion.refiner import DEFAULT_STEPS
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL, INSTALL_HINT, sentence_model_available
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.pipeline import PairsSource, RefinerJob, evaluate, train_refiner_job
from diffgap.training.adapter import AdapterTrainConfig
from diffgap.training.evaluate import AblationConfig
from diffgap.training.mapper import MapperConfig
from diffgap.training.refiner import LR_SCHEDULES, SPAN_GALLERIES, RefinerTrainConfig
from indexer.common import EXIT_OK, CliError, progress_bars, step_count, step_counts, unit_interval

log = logging.getLogger(__name__)


def _pairs(args: argparse.Namespace, path: str | None = None, split: str | None = None) -> PairsSource:
    return PairsSource(path or args.pairs, layout=args.layout, split=split, audio_dir=args.audio_dir)


def _train_cfg(args: argparse.Namespace) -> RefinerTrainConfig:
    if args.mapper_ranking_weight < 0:
        raise CliError(
            f"--mapper-ranking-weight must be 0 (a plain regression) or more, got {args.mapper_ranking_weight}"
        )
    if not 0.0 <= args.ema < 1.0:
        raise CliError(f"--ema must be in [0, 1) (0 turns the average off), got {args.ema}")
    return RefinerTrainConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        bidirectional=not args.no_bst,
        switch_every=args.switch_every,
        cond_dropout=args.cond_dropout,
        contrastive_weight=args.contrastive_weight,
        path_weight=args.path_weight,
        prediction_type=args.prediction,
        ema_decay=args.ema,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
    )


def _adapter_cfg(args: argparse.Namespace) -> AdapterTrainConfig | None:
    if args.adapter is False:
        return None
    if args.adapter is None and not sentence_model_available(args.adapter_model or DEFAULT_SENTENCE_MODEL):
        log.info("no text adapter: the sentence model is not installed (%s)", INSTALL_HINT)
        return None
    if args.adapter_steps < 1:
        raise CliError(f"--adapter-steps must be at least 1 (--no-adapter turns it off), got {args.adapter_steps}")
    if args.adapter_check_every < 0:
        raise CliError(f"--adapter-check-every must be 0 (no checks) or more, got {args.adapter_check_every}")
    return AdapterTrainConfig(
        steps=args.adapter_steps,
        check_every=args.adapter_check_every,
        seed=args.seed,
        sentence_model=args.adapter_model,
        only_shared=args.adapter is None,
    )


def cmd_train(args: argparse.Namespace) -> int:
    if not args.from_index and not args.pairs:
        raise CliError("give --pairs CSV or --from-index")
    job = RefinerJob(
        index=args.index,
        encoder=args.encoder,
        video_encoder=args.video_encoder,
        modality=args.modality,
        pairs=_pairs(args, split=args.split) if args.pairs else None,
        from_index=args.from_index,
        exclude=tuple(args.exclude or ()),
        cache_dir=args.cache,
        out=args.out,
        train=_train_cfg(args),
        net={"hidden": args.hidden, "n_blocks": args.blocks},
        val_fraction=args.val_fraction,
        eval_steps=args.steps,
        blend=args.blend,
        ensemble=not args.no_ensemble,
        checkpoint_every=args.checkpoint_every,
        adapter=_adapter_cfg(args),
        mapper=MapperConfig(ranking_weight=args.mapper_ranking_weight),
        two_sided=not args.one_sided,
        span_gallery=args.span_gallery,
    )
    _, report, _ = train_refiner_job(job, progress_bars(args.quiet))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = AblationConfig(
        steps=args.steps,
        intervals=tuple(int(m) for m in args.intervals.split(",")) if args.intervals else (),
        train=_train_cfg(args),
        mapper=MapperConfig(
            iterations=args.mapper_iterations, ranking_weight=args.mapper_ranking_weight, seed=args.seed
        ),
        bridge_start=args.bridge_start,
        mapper_bridge_start=args.mapper_bridge_start,
        ablations=not args.no_ablations,
        variants=() if args.no_variants else AblationConfig.variants,
        blend=args.blend,
        adapter=_adapter_cfg(args) if args.modality == "text" else None,
    )
    payload = evaluate(
        _pairs(args, split=args.split),
        _pairs(args, args.test_pairs, split=args.test_split),
        cfg,
        index=args.index,
        encoder=args.encoder,
        video_encoder=args.video_encoder,
        modality=args.modality,
        cache_dir=args.cache,
        refiner=args.refiner,
        upper_index=args.upper_index,
        progress=progress_bars(args.quiet),
    )
    sys.stdout.write(payload["table"] + "\n")
    if args.json:
        atomic_write_json(Path(args.json), payload)
    return EXIT_OK


def _common(p: argparse.ArgumentParser, pairs_required: bool = True) -> None:
    defaults = RefinerTrainConfig()
    p.add_argument("--pairs", required=pairs_required, help="paired CSV (generic, AudioCaps or Clotho layout)")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "audiocaps", "clotho"])
    p.add_argument("--split", help="only rows of this split (generic CSV with a split column)")
    p.add_argument("--audio-dir", help="audio folder for AudioCaps/Clotho layouts (default: next to the CSV)")
    p.add_argument("--index", help="take the encoders from this index (and cache embeddings in it)")
    p.add_argument("--encoder", help="encoder spec when no --index is given, e.g. clap or compact:DIR")
    p.add_argument("--video-encoder", help="video encoder spec, e.g. clip or compact:DIR")
    p.add_argument("--modality", default="text", choices=["text", "video"], help="the query side of the pairs")
    p.add_argument("--cache", help="embedding cache folder (default INDEX/cache)")
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument(
        "--switch-every",
        type=int,
        default=defaults.switch_every,
        help="BST interval m (0: iterations/5, so that training ends on query->audio as the paper's does)",
    )
    p.add_argument("--no-bst", action="store_true", help="train direction query->audio only")
    p.add_argument(
        "--mapper-ranking-weight",
        type=float,
        default=MapperConfig.ranking_weight,
        help="weight of a ranking (InfoNCE) term beside the cosine loss of the mapper the refiner ships "
        "(default 0: a plain regression; eval's baseline row is always the plain one)",
    )
    p.add_argument("--cond-dropout", type=float, default=defaults.cond_dropout, help="condition dropout (guidance)")
    p.add_argument(
        "--contrastive-weight",
        type=float,
        default=defaults.contrastive_weight,
        help="CMMD-style contrastive weight (0: off)",
    )
    p.add_argument(
        "--path-weight",
        type=float,
        default=defaults.path_weight,
        help="weight of the ranking loss on the one-step refinement from the prior's mean, what search computes "
        "(0: off)",
    )
    p.add_argument(
        "--prediction",
        default=defaults.prediction_type,
        choices=["sample", "epsilon"],
        help="what the denoiser predicts: the noise (epsilon, the paper) or z_0 (sample)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=defaults.ema_decay,
        help="keep an exponential moving average of the weights with this decay and ship it (0: off)",
    )
    p.add_argument(
        "--lr-schedule",
        default=defaults.lr_schedule,
        choices=LR_SCHEDULES,
        help="constant, or cosine: warmup then decay to a tenth of --lr",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    adapter = AdapterTrainConfig()
    p.add_argument(
        "--adapter",
        action=argparse.BooleanOptionalAction,
        help="text pairs: also fit a text adapter (a ~1 MB head over a frozen sentence model's token states) "
        "and let the held-out pairs weigh its score in the ensemble (default: on for a text tower that reads "
        "the sentence model itself, whose pass it shares; --adapter for others, CLAP included, at a "
        "sentence-model pass per query; needs diffgap[sentence])",
    )
    p.add_argument(
        "--adapter-steps",
        type=int,
        default=adapter.steps,
        help="batches of 256 captions the adapter is fitted for, at most (see --adapter-check-every)",
    )
    p.add_argument(
        "--adapter-check-every",
        type=int,
        default=adapter.check_every,
        metavar="STEPS",
        help="score the adapter on the held-out pairs every STEPS steps, keep its best weights and stop when "
        f"{adapter.patience} scores in a row are no better (0: fit every step, keep the last weights)",
    )
    p.add_argument(
        "--adapter-model",
        metavar="NAME",
        help="sentence model the adapter reads (default: the text tower's own, else minilm-l6; or a model directory)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    noun = sub.add_parser("refiner", help="train and evaluate DiffGAP refiners")
    verbs = noun.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a refiner on paired data or the index's own descriptions")
    register_train(p)
    p = verbs.add_parser("eval", help="retrieval table: direct, regression mapper, refiner ablations")
    register_eval(p)


def register_train(p: argparse.ArgumentParser) -> None:
    _common(p, pairs_required=False)
    p.add_argument(
        "--from-index",
        action="store_true",
        help="learn from the index's own item descriptions (tags and file names) instead of --pairs",
    )
    p.add_argument(
        "--exclude", action="append", metavar="GLOB", help="with --from-index: files not to learn from (repeatable)"
    )
    p.add_argument("--out", help="output folder (default: INDEX/refiner-MODALITY)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of audio targets held out")
    p.add_argument("--hidden", type=int, default=RefinerNetConfig.hidden)
    p.add_argument("--blocks", type=int, default=RefinerNetConfig.n_blocks)
    p.add_argument(
        "--steps",
        type=step_count,
        default=DEFAULT_STEPS,
        help=f"DDIM steps for the held-out check and the blend choice (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--blend",
        type=unit_interval,
        default=None,
        help="weight of the direct similarity the refiner is served with (default: picked on the held-out pairs)",
    )
    p.add_argument(
        "--no-ensemble",
        action="store_true",
        help="serve the refined score blended with direct only; by default a mapper is trained too and the "
        "weights of the refined, mapped and direct scores are picked on the held-out pairs",
    )
    p.add_argument(
        "--one-sided",
        action="store_true",
        help="score the query side only; by default a backward mapper is trained too and the weight of each "
        "candidate's audio mapped into the query space, scored against the query, is picked on the held-out pairs "
        "(and for video pairs with time spans, of each candidate's spans mapped back against the query's)",
    )
    p.add_argument(
        "--span-gallery",
        default="library",
        choices=SPAN_GALLERIES,
        help="video pairs with time spans: rank the held-out queries among every clip (library) or only the "
        "held-out clips (held-out) while the weight of the span score is picked",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="save resumable training state every N iterations (0: never); a rerun resumes",
    )
    p.set_defaults(func=cmd_train, long_running=True)


def register_eval(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--test-pairs", help="test CSV (default: --pairs with --test-split)")
    p.add_argument("--test-split", help="split of the test rows")
    p.add_argument("--steps", type=step_counts, default=(5, 20, 50), help="DDIM step counts to score (default 5,20,50)")
    p.add_argument("--intervals", default="", help="extra BST intervals m to train, e.g. 100,500")
    p.add_argument("--mapper-iterations", type=int, default=MapperConfig.iterations)
    p.add_argument("--bridge-start", type=int, default=500)
    p.add_argument("--blend", type=unit_interval, default=0.5, help="blend weight of the blended row")
    p.add_argument("--refiner", help="score this trained refiner as the full model instead of training one")
    p.add_argument(
        "--no-ablations",
        action="store_true",
        help="skip the rows earlier runs settled (other prediction target, bridge from the query, from noise, "
        "fixed blend, rerank): baselines, the shipped refiner and the candidate recipes only",
    )
    p.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the rows of training recipes (EMA, cosine LR, retrieval-path loss), a refiner trained each",
    )
    p.add_argument(
        "--upper-index",
        help="an index whose encoders were trained on the target domain: its direct search on the test pairs "
        "is the upper bound, and the table gets a recovery column",
    )
    p.add_argument(
        "--mapper-bridge-start",
        type=int,
        default=AblationConfig.mapper_bridge_start,
        help="step the bridge row from the mapper's estimate starts at",
    )
    p.add_argument("--json", help="also write the table and all numbers as JSON here")
    p.set_defaults(func=cmd_eval, long_running=True)
