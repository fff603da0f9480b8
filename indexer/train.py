"""Training and evaluation commands: train-refiner, eval (and train-encoders, in encoders_cmd)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffgap.embeddings import PairEmbeddings, embed_index_pairs, embed_pairs
from diffgap.encoders import EncoderSet, load_encoders
from diffgap.evaluate import (
    AblationConfig,
    choose_blend,
    format_table,
    rows_to_json,
    run_ablation,
    score_mapping,
)
from diffgap.mapper import MapperConfig
from diffgap.models.refiner_net import RefinerNetConfig
from diffgap.pairs import read_pairs
from diffgap.refiner import Refiner
from diffgap.store import IndexStore, atomic_write_bytes
from diffgap.train_refiner import RefinerTrainConfig, train_refiner

log = logging.getLogger("diffgap.train")


def _encoders(args: argparse.Namespace) -> tuple[EncoderSet, str]:
    spec = args.encoder
    if args.index:
        with IndexStore.open(args.index, readonly=True) as store:
            spec = spec or store.manifest.encoder_spec
            encoders = load_encoders(spec, args.video_encoder)
            store.check_fingerprint(encoders.audio.fingerprint)
            return encoders, spec
    if not spec:
        raise ValueError("give --index INDEX or --encoder SPEC")
    return load_encoders(spec, args.video_encoder), spec


def _embed(path: str, split: str | None, args: argparse.Namespace, encoders: EncoderSet) -> PairEmbeddings:
    pairs = read_pairs(path, layout=args.layout, split=split, audio_dir=args.audio_dir)
    cache = args.cache or (Path(args.index) / "cache" if args.index else None)
    with (
        logging_redirect_tqdm(),
        tqdm(total=None, unit="item", desc=f"embedding {Path(path).name}", disable=args.quiet or None) as bar,
    ):
        data = embed_pairs(pairs, encoders, args.modality, cache_dir=cache, progress=bar.update)
    log.info("%s: %d %s queries for %d audio targets", path, len(data.query), args.modality, len(data.audio))
    return data


def _train_cfg(args: argparse.Namespace, **extra: object) -> RefinerTrainConfig:
    return RefinerTrainConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        bidirectional=not args.no_bst,
        switch_every=args.switch_every,
        cond_dropout=args.cond_dropout,
        contrastive_weight=args.contrastive_weight,
        prediction_type=args.prediction,
        seed=args.seed,
        **extra,
    )


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def cmd_train_refiner(args: argparse.Namespace) -> int:
    encoders, spec = _encoders(args)
    if args.from_index:
        if not args.index or args.modality != "text":
            raise ValueError("--from-index needs --index INDEX and text queries")
        with IndexStore.open(args.index, readonly=True) as store:
            data = embed_index_pairs(store, encoders)
        log.info("%d (description, audio) pairs from %s, e.g. %r", len(data.query), args.index, data.audio_keys[0])
    elif args.pairs:
        data = _embed(args.pairs, args.split, args, encoders)
    else:
        raise ValueError("give --pairs CSV or --from-index")
    train, val = data.split(args.val_fraction, seed=args.seed)
    cfg = _train_cfg(args)
    out = Path(args.out or (Path(args.index) / f"refiner-{args.modality}" if args.index else "refiner"))
    checkpoint = out.parent / f".{out.name}.checkpoint"  # beside, not inside: the service reads `out`
    net_cfg = RefinerNetConfig(
        audio_dim=data.audio.shape[1], query_dim=data.query.shape[1], hidden=args.hidden, n_blocks=args.blocks
    )
    with logging_redirect_tqdm(), tqdm(total=cfg.iterations, unit="it", disable=args.quiet or None) as bar:

        def progress(it: int, loss: float) -> None:
            bar.update(1)
            if it % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        refiner, history = train_refiner(
            train,
            val if len(val.query) else None,
            cfg=cfg,
            net_cfg=net_cfg,
            progress=progress,
            checkpoint=checkpoint if args.checkpoint_every else None,
            checkpoint_every=args.checkpoint_every or 1,
        )
    query_encoder = encoders.text if args.modality == "text" else encoders.video
    refiner.config.audio_fingerprint = encoders.audio.fingerprint.to_dict()
    refiner.config.query_fingerprint = query_encoder.fingerprint.to_dict()
    refiner.config.training["encoder_spec"] = spec
    refiner.config.training["video_encoder_spec"] = args.video_encoder
    report: dict[str, object] = {
        "val_loss": history.val_loss[-1] if history.val_loss else None,
        "bytes": refiner.num_bytes,
        "pairs_train": int(len(train.query)),
        "pairs_val": int(len(val.query)),
    }
    if len(val.query):
        same = data.audio.shape[1] == data.query.shape[1]
        refined, _ = score_mapping(val, lambda x: refiner.refine(x, steps=args.steps, blend=0.0), None)
        report["val_refined"] = refined
        if same:
            report["val_direct"] = score_mapping(val, lambda x: x, None)[0]
        chosen, by_weight = choose_blend(refiner, val, steps=args.steps)
        if by_weight:
            report["val_MRR@10_by_blend"] = {str(w): round(v, 4) for w, v in by_weight.items()}
            log.info("blend %.2f picked on the held-out pairs (MRR@10 by weight: %s)", chosen, by_weight)
        refiner.config.blend = chosen
        refiner.config.training["validation"] = report
        direct = report.get("val_direct")
        log.info(
            "held-out %s->audio R@1: refined %.3f%s (R@10 %.3f), %d queries",
            args.modality,
            refined["R@1"],
            f" vs direct {direct['R@1']:.3f}" if direct else "",
            refined["R@10"],
            refined["n"],
        )
    if args.blend is not None:
        refiner.config.blend = args.blend
    report["blend"] = refiner.config.blend
    refiner.save(out)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the finished model supersedes it
    log.info("saved refiner (%d bytes of weights) to %s", refiner.num_bytes, out)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    encoders, _ = _encoders(args)
    train = _embed(args.pairs, args.split, args, encoders)
    test = _embed(args.test_pairs or args.pairs, args.test_split, args, encoders)
    steps = tuple(int(s) for s in args.steps.split(","))
    intervals = tuple(int(m) for m in args.intervals.split(",")) if args.intervals else ()
    cfg = AblationConfig(
        steps=steps,
        intervals=intervals,
        train=_train_cfg(args),
        mapper=MapperConfig(iterations=args.mapper_iterations, seed=args.seed),
        bridge_start=args.bridge_start,
        blend=args.blend,
    )
    refiner = Refiner.load(args.refiner) if args.refiner else None
    if refiner is not None:
        query_encoder = encoders.text if args.modality == "text" else encoders.video
        refiner.check_encoders(encoders.audio.fingerprint, query_encoder.fingerprint if query_encoder else None)
    rows = run_ablation(train, test, cfg, refiner=refiner)
    table = format_table(rows, args.modality)
    sys.stdout.write(table + "\n")
    if args.json:
        payload = {
            "modality": args.modality,
            "train_pairs": int(len(train.query)),
            "test_queries": int(len(test.query)),
            "test_audio": int(len(test.audio)),
            "rows": rows_to_json(rows),
            "table": table,
        }
        atomic_write_bytes(Path(args.json), json.dumps(payload, indent=2).encode())
    return 0


def _common(p: argparse.ArgumentParser, pairs_required: bool = True) -> None:
    p.add_argument("--pairs", required=pairs_required, help="paired CSV (generic, AudioCaps or Clotho layout)")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "audiocaps", "clotho"])
    p.add_argument("--split", help="only rows of this split (generic CSV with a split column)")
    p.add_argument("--audio-dir", help="audio folder for AudioCaps/Clotho layouts (default: next to the CSV)")
    p.add_argument("--index", help="take the encoders from this index (and cache embeddings in it)")
    p.add_argument("--encoder", help="encoder spec when no --index is given, e.g. clap or compact:DIR")
    p.add_argument("--video-encoder", help="video encoder spec, e.g. clip or compact:DIR")
    p.add_argument("--modality", default="text", choices=["text", "video"], help="the query side of the pairs")
    p.add_argument("--cache", help="embedding cache folder")
    p.add_argument("--iterations", type=int, default=RefinerTrainConfig.iterations)
    p.add_argument("--batch-size", type=int, default=RefinerTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=RefinerTrainConfig.lr)
    p.add_argument("--switch-every", type=int, default=0, help="BST interval m (0: iterations/4, the paper's ratio)")
    p.add_argument("--no-bst", action="store_true", help="train direction query->audio only")
    p.add_argument("--cond-dropout", type=float, default=0.0, help="condition dropout for guidance")
    p.add_argument(
        "--contrastive-weight", type=float, default=0.2, help="CMMD-style contrastive weight (0: off)"
    )
    p.add_argument(
        "--prediction",
        default=RefinerTrainConfig.prediction_type,
        choices=["sample", "epsilon"],
        help="what the denoiser predicts: the noise (epsilon, the paper) or z_0 (sample)",
    )
    p.add_argument("--seed", type=int, default=0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-refiner", help="train a DiffGAP refiner on paired data")
    _common(p, pairs_required=False)
    p.add_argument(
        "--from-index",
        action="store_true",
        help="learn from the index's own item descriptions (tags and file names) instead of --pairs",
    )
    p.add_argument("--out", help="output folder (default: INDEX/refiner-MODALITY)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of audio targets held out")
    p.add_argument("--hidden", type=int, default=RefinerNetConfig.hidden)
    p.add_argument("--blocks", type=int, default=RefinerNetConfig.n_blocks)
    p.add_argument("--steps", type=int, default=5, help="sampling steps for the held-out check")
    p.add_argument(
        "--blend",
        type=unit_interval,
        default=None,
        help="weight of the direct similarity the refiner is served with (default: picked on the held-out pairs)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="save resumable training state every N iterations (0: never); a rerun resumes",
    )
    p.set_defaults(func=cmd_train_refiner)

    p = sub.add_parser("eval", help="retrieval table: direct, regression mapper, refiner ablations")
    _common(p)
    p.add_argument("--test-pairs", help="test CSV (default: --pairs with --test-split)")
    p.add_argument("--test-split", help="split of the test rows")
    p.add_argument("--steps", default="5,20,50", help="sampling step counts to score")
    p.add_argument("--intervals", default="", help="extra BST intervals m to train, e.g. 100,500")
    p.add_argument("--mapper-iterations", type=int, default=MapperConfig.iterations)
    p.add_argument("--bridge-start", type=int, default=500)
    p.add_argument("--blend", type=float, default=0.5)
    p.add_argument("--refiner", help="score this trained refiner as the full model instead of training one")
    p.add_argument("--json", help="also write the table and all numbers as JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_train_encoders(args: argparse.Namespace) -> int:
    from diffgap.train_encoders import EncoderTrainConfig, train_compact_encoders

    pairs = read_pairs(args.pairs, layout=args.layout, split=args.split, audio_dir=args.audio_dir)
    cfg = EncoderTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes
    )
    log.info("training compact encoders on %d pairs from %s", len(pairs), args.pairs)
    with logging_redirect_tqdm(), tqdm(unit="clip", desc="decoding", disable=args.quiet or None) as load_bar:
        bar = tqdm(unit="step", desc="training", disable=args.quiet or None)

        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        stats = train_compact_encoders(
            pairs, args.out, cfg, use_video=not args.no_video, progress=progress, load_progress=load_bar.update
        )
        bar.close()
    log.info("saved compact encoders to %s (%s)", args.out, ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
    return 0


def register_encoders(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-encoders", help="train the compact audio/text/video encoders contrastively")
    p.add_argument("--pairs", required=True, help="paired CSV with audio and text and/or video")
    p.add_argument("--layout", default="auto", choices=["auto", "csv", "audiocaps", "clotho"])
    p.add_argument("--split", help="only rows of this split")
    p.add_argument("--audio-dir", help="audio folder for AudioCaps/Clotho layouts")
    p.add_argument("--out", required=True, help="output folder (use it as --encoder compact:OUT)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this much training time")
    p.add_argument("--no-video", action="store_true", help="ignore the video column")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_encoders)
