"""Compact text encoder: a small transformer over a corpus-trained WordPiece vocabulary, over a
pretrained token-embedding table (a language prior), over a frozen sentence model's token states,
or a prior's pooled vectors alone through a trained projection; or the corpus transformer with a
sentence model beside it: its vector added inside, trained together ("dual"), or a head over its
token states fitted afterwards and mixed per query by how many of its words the corpus vocabulary
knows ("beside")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextNetConfig:
    vocab_size: int = 4000  # a captioned sound library rarely needs more distinct word pieces
    max_tokens: int = 64  # longer captions are truncated; typical captions use 10-30
    d_model: int = 192  # wider than the audio side: captions carry many attribute words
    n_layers: int = 3  # word order ("A then B") needs context, not just a bag of words
    n_heads: int = 4
    dim: int = 256  # shared embedding size
    pad_id: int = 0
    # A language prior, or None. Two kinds (diffgap/encoders/prior.py, diffgap/encoders/sentence.py):
    # a pretrained token-embedding table as the input embeddings (its vocabulary knows words no training
    # caption has; vocab_size and d_model then follow the table), or a frozen pretrained sentence model
    # whose contextual token states are the input (it also knows phrasings: "two times" ~ "twice").
    prior: str | None = None
    prior_sha256: str | None = None  # of the weights the tower started from: part of the fingerprint
    # Table priors: "frozen" (the table stays, the layers learn), "finetune" (the table learns too, at
    # prior_lr_scale x the learning rate) or "pooled" (no transformer: the mean of the table's vectors
    # through a trained projection). Sentence priors: "tokens" (the layers learn over the frozen
    # model's token states), "residual" (the same, plus a learnt embedding of the model's own token
    # ids, starting at zero: words the training text uses get corrected, words it never saw keep the
    # frozen model's reading) or "pooled" (its sentence vector through a trained projection; with ~1k
    # pairs, the least to overfit), or "dual": the corpus tokenizer's transformer as without a prior,
    # plus the sentence vector through a trained projection, added before the output projection (the
    # corpus words keep the trained style sharp, the sentence model reads what they miss), or "beside":
    # the corpus tower trained exactly as without a prior, and beside it a sentence head (see
    # sentence_head) fitted afterwards to the trained audio tower (diffgap/training/encoders.py:
    # fit_sentence_head); a query's vector mixes the two unit vectors (see prior_weight).
    prior_mode: str = "frozen"
    prior_lr_scale: float = 0.1
    prior_dim: int = 0  # a sentence prior's state width (its hidden size); 0: the input is token ids
    # (vocab_size is then the sentence model's vocabulary: what a "residual" embedding is indexed by;
    # in "dual" mode the input is token ids of the corpus vocabulary and prior_dim the vector's width)
    # "dual" only: the share of training captions whose corpus branch is dropped, so that the sentence
    # branch learns to place a caption on its own (without it, the corpus branch, which fits the
    # training captions' words fastest, does all the work and a new phrasing gets little from the prior)
    corpus_drop: float = 0.3
    # "beside" only: the sentence side's share for a query whose words the corpus vocabulary all knows;
    # each word it lacks (one the corpus tokenizer has to spell in pieces, so the corpus tower reads only
    # its spelling) moves the share toward 1 in proportion. Picked on held-out pairs when training has them.
    prior_weight: float = 0.5
    # "beside" only: a query word the corpus vocabulary lacks is read by the corpus tower as the
    # vocabulary word nearest it by the sentence model, if their cosine is at least this (0: never;
    # diffgap/encoders/vocabulary.py). On SynthCaps's unseen style, 0.3-0.5 gained on both seeds and
    # 0.6 lost on one; towers saved before this field read queries as written (0).
    rewrite_similarity: float = 0.4
    # "beside" only: what the sentence side reads. "states": a narrow transformer over the frozen model's
    # token states, fitted to the trained audio tower as the linear head is; on SynthCaps it read the
    # unseen style at 0.317 R@1 alone where the linear head read 0.203, and the trained style at 0.480
    # against 0.358 (the pooled vector blurs the counts and positions captions spell out). "linear": the
    # pooled sentence vector through a linear map (towers saved before this field).
    sentence_head: str = "states"
    head_d_model: int = 128  # narrower than the corpus tower: it fits fixed targets (its layer is lost in the
    # noise of the sentence model's pass that a query makes anyway: BENCHMARKS.md, issue 17, sixth pass)
    head_layers: int = 1  # the sentence model's states are already contextual: one layer regroups them


class TextNet(nn.Module):
    def __init__(self, cfg: TextNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dual = cfg.prior_dim > 0 and cfg.prior_mode == "dual"  # corpus ids and a sentence vector
        self.beside = cfg.prior_dim > 0 and cfg.prior_mode == "beside"  # corpus tower, sentence head beside it
        # a frozen sentence model feeds token states
        self.from_states = cfg.prior_dim > 0 and not self.dual and not self.beside
        if self.from_states:
            self.inp = nn.Linear(cfg.prior_dim, cfg.d_model)
        if self.dual:
            self.sent = nn.Linear(cfg.prior_dim, cfg.d_model)
        if not self.from_states or cfg.prior_mode == "residual":
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        if self.from_states and cfg.prior_mode == "residual":
            nn.init.zeros_(self.tok.weight)  # at first, the frozen model's reading alone
        self.pooled = cfg.prior is not None and cfg.prior_mode == "pooled"
        if not self.pooled:
            self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(
                cfg.d_model, cfg.n_heads, 4 * cfg.d_model, 0.1, activation="gelu", batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.dim)
        if self.beside and cfg.sentence_head == "linear":  # a 1024-wide MLP on the pooled vector did no better
            self.head: nn.Module = nn.Linear(cfg.prior_dim, cfg.dim)
        elif self.beside:  # the states head is itself a tower over token states, narrower
            if cfg.sentence_head != "states":
                raise ValueError(f"sentence heads are 'states' or 'linear', not {cfg.sentence_head!r}")
            self.head = TextNet(replace(cfg, prior_mode="tokens", d_model=cfg.head_d_model, n_layers=cfg.head_layers))

    def forward(
        self,
        ids: torch.Tensor | None = None,
        *,
        states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        sentence: torch.Tensor | None = None,
        unknown: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, L), or a sentence model's states (B, L, prior_dim) with their mask (B, L) (and
        its token ids, for a residual embedding), or in "dual" mode token ids and the sentence model's
        vectors (B, prior_dim) -> (B, dim) unit vectors. In "beside" mode, token ids alone give the corpus
        tower's vectors (as it trains); with the sentence side's input (see `sentence_side`) and each
        text's share of words the corpus vocabulary lacks (B,), the two sides mixed."""
        if not self.beside:
            return self.read(ids, states=states, mask=mask, sentence=sentence)
        corpus = self.read(ids)  # (B, dim)
        if sentence is None and states is None:
            return corpus
        assert unknown is not None, "a beside tower mixes by each text's share of unknown words"
        side = self.sentence_side(sentence, states=states, mask=mask)  # (B, dim)
        return mix_sides(corpus, side, unknown, self.cfg.prior_weight)

    def read(
        self,
        ids: torch.Tensor | None = None,
        *,
        states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        sentence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tower's own reading (a beside tower's corpus side) -> (B, dim) unit vectors."""
        if states is None:
            assert ids is not None and not self.from_states, "this tower reads token ids"
            ids = ids[:, : self.cfg.max_tokens]
            mask = ids != self.cfg.pad_id  # (B, L)
            h = self.tok(ids)  # (B, L, D)
        else:
            assert mask is not None and self.from_states, "this tower reads a sentence model's states and mask"
            states, mask = states[:, : self.cfg.max_tokens], mask[:, : self.cfg.max_tokens]
            h = self.inp(states)  # (B, L, D)
            if hasattr(self, "tok"):  # residual: a learnt correction per token of the sentence model
                assert ids is not None, "a residual tower reads the sentence model's token ids too"
                h = h + self.tok(ids[:, : self.cfg.max_tokens])  # (B, L, D)
        if not self.pooled:
            h = self.encoder(h + self.pos[: h.shape[1]], src_key_padding_mask=~mask)  # (B, L, D)
        h = self.norm(h)  # (B, L, D)
        w = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
        if self.dual:
            assert sentence is not None, "a dual tower reads the sentence model's vectors too"
            if self.training and self.cfg.corpus_drop > 0:
                keep = torch.rand(pooled.shape[0], 1) >= self.cfg.corpus_drop  # (B, 1)
                pooled = pooled * keep.to(pooled.dtype)  # (B, D)
            pooled = pooled + self.sent(sentence)  # (B, D)
        return F.normalize(self.proj(pooled), dim=-1)  # (B, dim)

    def sentence_side(
        self, sentence: torch.Tensor | None = None, *, states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """A "beside" tower's sentence side -> (B, dim) unit vectors: the sentence model's vectors
        (B, prior_dim) through a linear head, or its token states (B, L, prior_dim) and their mask (B, L)
        through a states head."""
        if self.cfg.sentence_head == "linear":
            assert sentence is not None, "a linear sentence head reads the sentence model's vectors"
            return F.normalize(self.head(sentence), dim=-1)
        assert states is not None and mask is not None, "a states head reads the sentence model's token states"
        return self.head(states=states, mask=mask)


def mix_sides(corpus: torch.Tensor, side: torch.Tensor, unknown: torch.Tensor, weight: float) -> torch.Tensor:
    """A beside tower's output: the corpus (B, dim) and sentence-side (B, dim) unit vectors mixed, the
    sentence side's share rising from `weight` to 1 with each text's share of unknown words (B,)."""
    w = (weight + (1 - weight) * unknown.to(corpus.dtype)).unsqueeze(-1)  # (B, 1)
    return F.normalize((1 - w) * corpus + w * side, dim=-1)  # (B, dim)
