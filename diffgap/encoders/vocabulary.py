"""What a compact text tower's corpus vocabulary knows, and how a query's other words reach it.

A compact tower learns the words of its training captions. A word the corpus WordPiece vocabulary
lacks is spelled in pieces, of which the tower reads only the spelling. Two remedies, both for a
"beside" tower (diffgap/models/text_net.py), which has a sentence model at hand:
- `unknown_share`: how much of a query the corpus tower cannot read, so the sentence side's share
  of the query vector rises with it;
- `CorpusWordRewriter`: each such word replaced by the vocabulary word nearest it in the sentence
  model's space ("beeping" -> "beep", "dripping" -> "drip", "lots" -> "many"), so the corpus tower reads
  a query in its own words.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from diffgap.encoders.sentence import SentenceEncoder

MIN_WORD_LETTERS = 3  # shorter vocabulary entries are mostly word-initial pieces, not words
MAX_REMEMBERED = 50_000  # rewrites kept per tower; past it the memory starts over


def text_words(tokenizer: Tokenizer, text: str) -> list[str]:
    """The normalised words and punctuation marks of a text, as the corpus tokenizer splits them."""
    normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
    return [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]


def is_word(token: str) -> bool:
    return any(c.isalnum() for c in token)


def unknown_words(tokenizer: Tokenizer, words: Sequence[str]) -> list[bool]:
    """For each word: does the vocabulary lack it (it is spelled in more than one piece)?"""
    pieces = tokenizer.encode_batch(list(words), add_special_tokens=False) if words else []
    return [len(p.ids) > 1 for p in pieces]


Read = list[list[tuple[str, bool]]]  # each text's tokens, each with "the vocabulary lacks this word"


def read_words(tokenizer: Tokenizer, texts: Sequence[str]) -> Read:
    """Each text's normalised words and punctuation, each marked unknown or not; the batch's distinct
    words are looked up in one call (punctuation is never unknown)."""
    split = [text_words(tokenizer, t) for t in texts]
    distinct = sorted({w for ws in split for w in ws if is_word(w)})
    lacks = dict(zip(distinct, unknown_words(tokenizer, distinct), strict=True))
    return [[(w, lacks.get(w, False)) for w in ws] for ws in split]


def unknown_share(read: Read) -> torch.Tensor:
    """(B,) the share of each text's words that the corpus vocabulary lacks: words it can only spell in
    pieces, of which a tower trained on that corpus reads just the spelling. Punctuation is not a
    word; a text without words counts as all known."""
    shares = []
    for tokens in read:
        flags = [unknown for w, unknown in tokens if is_word(w)]
        shares.append(sum(flags) / max(1, len(flags)))
    return torch.tensor(shares, dtype=torch.float32)


class CorpusWordRewriter:
    """Rewrites each word a corpus vocabulary lacks into the vocabulary's whole word nearest to it by a
    sentence model's vectors of the two words alone, when their cosine is at least `min_similarity`;
    other words stay. Thread-safe; each distinct unknown word is looked up once.

    Measured on SynthCaps (BENCHMARKS.md, issue 17), style C queries against a beside tower: R@1 0.249
    -> 0.269 and 0.213 -> 0.244 on seeds 0 and 1 at 0.4. Single-word neighbours also pair siblings
    ("one" -> "two", "small" -> "medium"), and a short function word the corpus lacks can land on any
    word (a sentence model's vector of a lone "the" is near most others); the sentence side, which
    reads the query as written, is what keeps such a rewrite from deciding alone."""

    def __init__(self, tokenizer: Tokenizer, sentence: SentenceEncoder, min_similarity: float) -> None:
        self.tokenizer, self.sentence, self.min_similarity = tokenizer, sentence, min_similarity
        self.vocabulary = sorted(
            w for w in tokenizer.get_vocab() if w.isalpha() and len(w) >= MIN_WORD_LETTERS and not w.startswith("#")
        )
        self._xb: np.ndarray | None = None  # (V, P) unit vectors of the vocabulary words, made at first use
        self._rewrites: dict[str, str] = {}
        self._lock = threading.Lock()

    def _vocabulary_vectors(self) -> np.ndarray:
        """Made at the first call, whatever its words (a service's warm-up query pays it, not a user):
        one sentence-model pass over the vocabulary's words (SynthCaps's 300: about a second; 4,000
        made-up words took 18 s on one core of a busy machine)."""
        if self._xb is None:
            self._xb = self.sentence.encode(self.vocabulary, batch_size=256)  # (V, P)
        return self._xb

    def _learn(self, words: list[str]) -> None:
        """Finds the rewrite of each new unknown word (one sentence-model batch for all of them)."""
        xb = self._vocabulary_vectors()
        if len(self._rewrites) + len(words) > MAX_REMEMBERED:
            self._rewrites.clear()
        if not len(xb):
            self._rewrites.update((w, w) for w in words)
            return
        scores = self.sentence.encode(words) @ xb.T  # (W, V)
        best = scores.argmax(1)  # (W,)
        for word, j, s in zip(words, best, scores[np.arange(len(words)), best], strict=True):
            self._rewrites[word] = self.vocabulary[j] if s >= self.min_similarity else word

    def rewrite(self, read: Read) -> list[str]:
        """Texts as `read_words` read them -> the texts with their unknown words rewritten."""
        unknown = sorted({w for tokens in read for w, lacks in tokens if lacks})
        with self._lock:
            self._vocabulary_vectors()
            new = [w for w in unknown if w not in self._rewrites]
            if new:
                self._learn(new)
            rewrites = {w: self._rewrites.get(w, w) for w in unknown}
        return [" ".join(rewrites.get(w, w) for w, _ in tokens) for tokens in read]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return self.rewrite(read_words(self.tokenizer, texts))
