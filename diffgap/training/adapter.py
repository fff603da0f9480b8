"""Fitting a refiner's text adapter (diffgap/diffusion/adapter.py) on (caption, audio) pairs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffgap.diffusion.adapter import TextAdapter
from diffgap.encoders import EncoderSet
from diffgap.encoders.prior import prior_kind
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL, load_sentence_encoder
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.encoders import HeadFit, HeadFitResult, SentenceStates, fit_head
from diffgap.training.metrics import metrics, ranks_query_to_audio

log = logging.getLogger(__name__)


@dataclass
class AdapterTrainConfig:
    # Batches of 256 captions, as a beside tower's states head is fitted (EncoderTrainConfig.head_steps):
    # 1,200 read SynthCaps's unseen caption style at 0.397 R@1 over frozen audio (BENCHMARKS.md).
    steps: int = 1200
    # Held-out pairs, when given, are scored (MRR@10 among all the clips) every `check_every` steps and
    # the best weights kept; fitting stops after `patience` scores without a better one. 0: no checks.
    check_every: int = 50
    patience: int = 6
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    # None: the text tower's own sentence model when it reads one (a compact "beside" tower: one model
    # loaded, and one pass of it per query serves both), else minilm-l6
    sentence_model: str | None = None
    # True (what `refiner train` does unless told): fit an adapter only for a text tower that reads a
    # sentence model itself, whose pass the adapter then shares (+0.6 ms a query, BENCHMARKS.md run 8).
    # For other towers (CLAP, corpus-only) it costs a sentence-model pass per query, over issue 18's
    # 2 ms budget, and its gain is unmeasured: there it is opt-in.
    only_shared: bool = False


def tower_sentence_model(encoders: EncoderSet) -> str | None:
    """The sentence model the text tower itself reads (a compact tower with a sentence prior), or None."""
    text = encoders.get("text")
    tower = getattr(getattr(text, "model", None), "text", None)  # a compact text tower's network, if any
    prior = getattr(getattr(tower, "cfg", None), "prior", None)
    if prior and getattr(tower.cfg, "prior_dim", 0) > 0 and prior_kind(prior) == "sentence":
        return prior
    return None


def sentence_model_for(encoders: EncoderSet, cfg: AdapterTrainConfig) -> str:
    """The sentence model an adapter for these encoders reads."""
    return cfg.sentence_model or tower_sentence_model(encoders) or DEFAULT_SENTENCE_MODEL


def wanted(encoders: EncoderSet, cfg: AdapterTrainConfig | None) -> bool:
    """Whether to fit an adapter for these encoders (see `AdapterTrainConfig.only_shared`)."""
    if cfg is None:
        return False
    shared = tower_sentence_model(encoders) == sentence_model_for(encoders, cfg)
    if cfg.only_shared and not shared:
        log.info("no text adapter: the text tower reads no sentence model whose pass it could share "
                 "(--adapter fits one anyway, at a sentence-model pass per query)")  # fmt: skip
    return shared or not cfg.only_shared


def fit_adapter(
    train: PairEmbeddings, sentence_model: str, cfg: AdapterTrainConfig, val: PairEmbeddings | None = None
) -> tuple[TextAdapter, HeadFitResult]:
    """A head over `sentence_model`'s token states that places each training caption on its audio
    vector (InfoNCE over batches of 256, the head-fitting loop of the compact text towers), and how the
    fit went. With `val` (pairs whose clips training does not see, texts kept), the weights that rank
    val's captions best among all the clips are kept, and fitting stops once they stop improving."""
    assert train.texts is not None, "fitting a text adapter needs the pairs' texts"
    t0 = time.perf_counter()
    sentence = load_sentence_encoder(sentence_model)
    adapter = TextAdapter.new(sentence, train.audio.shape[1], seed=cfg.seed)
    reading = SentenceStates(sentence, train.texts, adapter.head.cfg.max_tokens)
    xa = torch.from_numpy(train.audio[train.query_group])  # (P, dim) each caption's audio vector
    fit = HeadFit(cfg.steps, cfg.lr, cfg.weight_decay, cfg.seed, one_cycle=True)
    held_out = None
    if val is not None and val.texts and cfg.check_every > 0:
        fit.check_every, fit.patience = cfg.check_every, cfg.patience
        held_out = held_out_score(adapter, SentenceStates(sentence, val.texts, adapter.head.cfg.max_tokens), train, val)
    fitted = fit_head(adapter.head, adapter.read, reading, train.texts, xa, fit, held_out)
    kept = f", kept step {fitted.best_step} (held-out MRR@10 {fitted.best_score:.3f})" if fitted.best_step else ""
    log.info("text adapter over %s fitted on %d captions in %.0f s (%d of %d steps, last loss %.3f%s)",
             sentence.ref.name, len(train.texts), time.perf_counter() - t0, fitted.steps, cfg.steps, fitted.loss,
             kept)  # fmt: skip
    return adapter, fitted


def held_out_score(
    adapter: TextAdapter, reading: SentenceStates, train: PairEmbeddings, val: PairEmbeddings
) -> Callable[[], float]:
    """MRR@10 of the adapter's vectors of val's captions against train's and val's clips together:
    the training clips are the distractors a memorising head falls for."""
    assert val.texts is not None, "held-out scores need the held-out texts"
    xb = np.concatenate([train.audio, val.audio])  # (G_train + G_val, dim)
    target = val.query_group + len(train.audio)  # (Q,) each caption's clip in xb

    @torch.no_grad()
    def score() -> float:
        xq = torch.cat([adapter.read(reading.batch(val.texts[i : i + 256])) for i in range(0, len(val.texts), 256)])
        return metrics(ranks_query_to_audio(xq.numpy(), xb, target))["MRR@10"]

    return score
