"""A WordPiece vocabulary learnt from a corpus's own words, the same on every run.

`tokenizers`' WordPieceTrainer learns its vocabulary by byte-pair merges, and which of two equally
frequent pairs it merges depends on hash-map order, so the same captions give a different vocabulary
from one run to the next (huggingface/tokenizers#1794; here four trainings on the same six captions
gave four vocabularies, and a compact encoder trained with a fixed seed did not reproduce). This learner
does the same merges with ties broken by the pieces' text, so one corpus always gives one vocabulary.

Pieces follow WordPiece's convention: a word's first piece is bare, every later piece starts with
"##"; merging "bar" and "##k" gives "bark", merging "##r" and "##k" gives "##rk".
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

CONTINUE = "##"  # the prefix of a piece that continues a word


def word_pieces(word: str) -> tuple[str, ...]:
    """A word spelled out letter by letter: its first letter bare, the others as continuations."""
    return (word[0], *(CONTINUE + c for c in word[1:]))


def merged(left: str, right: str) -> str:
    """The piece two neighbouring pieces become ("bar" + "##k" -> "bark")."""
    assert right.startswith(CONTINUE), f"only a continuation can be merged onto a piece, got {right!r}"
    return left + right[len(CONTINUE) :]


def learn_wordpiece_vocab(
    words: Iterable[str], vocab_size: int, specials: Iterable[str] = (), alphabet: Iterable[str] = ()
) -> list[str]:
    """The vocabulary, in id order: the special tokens, every letter bare and as a continuation (sorted),
    then merged pieces in the order they were learnt, until `vocab_size` pieces or no pair is left (the
    specials and letters are always kept, so a vocab_size below their count gets just them).
    Each step merges the pair of neighbouring pieces seen most often across `words` (with repeats); a tie
    goes to the pair whose pieces sort first. `alphabet` adds letters the words may not use, so an unseen
    word is spelled out in pieces instead of becoming unknown."""
    counts = Counter(w for w in words if w)
    letters = sorted(set(alphabet) | {c for w in counts for c in w})
    vocab = [*dict.fromkeys(specials), *letters, *(CONTINUE + c for c in letters)]
    known = set(vocab)
    spelled = [list(word_pieces(w)) for w in counts]  # each distinct word as its current pieces
    freq = list(counts.values())
    pairs: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)  # pair -> the words that hold it
    for i, pieces in enumerate(spelled):
        for pair in zip(pieces, pieces[1:], strict=False):
            pairs[pair] += freq[i]
            where[pair].add(i)
    # a max-heap by count, ties to the smaller pair; entries go stale as counts change and are skipped
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -n:
            continue  # stale: this pair's count changed after the entry was pushed
        piece = merged(*pair)
        if piece not in known:
            vocab.append(piece)
            known.add(piece)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old = spelled[i]
            new = _merge_in(old, pair, piece)
            for p in zip(old, old[1:], strict=False):
                pairs[p] -= freq[i]
                changed.add(p)
            for p in zip(new, new[1:], strict=False):
                pairs[p] += freq[i]
                where[p].add(i)
                changed.add(p)
            spelled[i] = new
        for p in sorted(changed):  # sorted: the heap's contents do not depend on set order
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                del pairs[p]
                where.pop(p, None)
    return vocab


def _merge_in(pieces: list[str], pair: tuple[str, str], piece: str) -> list[str]:
    """`pieces` with every occurrence of `pair`, left to right, replaced by `piece`."""
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(piece)
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out
