"""Fitting a refiner's text adapter (diffgap/diffusion/adapter.py) on (caption, audio) pairs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from diffgap.diffusion.adapter import TextAdapter
from diffgap.encoders import EncoderSet
from diffgap.encoders.prior import prior_kind
from diffgap.encoders.sentence import DEFAULT_SENTENCE_MODEL, load_sentence_encoder
from diffgap.training.embeddings import PairEmbeddings
from diffgap.training.encoders import HeadFit, SentenceStates, fit_head

log = logging.getLogger(__name__)


@dataclass
class AdapterTrainConfig:
    # Batches of 256 captions, as a beside tower's states head is fitted (EncoderTrainConfig.head_steps):
    # 1,200 read SynthCaps's unseen caption style at 0.397 R@1 over frozen audio (BENCHMARKS.md).
    steps: int = 1200
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


def fit_adapter(train: PairEmbeddings, sentence_model: str, cfg: AdapterTrainConfig) -> TextAdapter:
    """A head over `sentence_model`'s token states that places each training caption on its audio
    vector (InfoNCE over batches of 256, the head-fitting loop of the compact text towers)."""
    assert train.texts is not None, "fitting a text adapter needs the pairs' texts"
    t0 = time.perf_counter()
    sentence = load_sentence_encoder(sentence_model)
    adapter = TextAdapter.new(sentence, train.audio.shape[1], seed=cfg.seed)
    reading = SentenceStates(sentence, train.texts, adapter.head.cfg.max_tokens)
    xa = torch.from_numpy(train.audio[train.query_group])  # (P, dim) each caption's audio vector
    fit = HeadFit(cfg.steps, cfg.lr, cfg.weight_decay, cfg.seed, one_cycle=True)
    loss = fit_head(adapter.head, adapter.read, reading, train.texts, xa, fit)
    log.info("text adapter over %s fitted on %d captions in %.0f s (%d steps, last loss %.3f)",
             sentence.ref.name, len(train.texts), time.perf_counter() - t0, cfg.steps, loss)  # fmt: skip
    return adapter
