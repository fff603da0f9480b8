"""Where a compact beside tower's text falls short: fit a fresh states head (the beside tower's sentence
side, diffgap/models/text_net.py) on one split's captions against the tower's own frozen audio vectors,
and score it alone, direct text -> audio on SynthCaps test, styles B and C.

    python bench/sentence_head_probe.py --encoders DIR [--data runs/synthcaps-data] [--split pretrain]
        [--steps 150,400,1200] [--drop 0.0]

With the protocol's towers (trained on `pretrain`), `--split pretrain` asks whether a head fitted
differently reads style B better zero-shot; `--split adapt` fits on style-B captions (not zero-shot),
which bounds what the frozen audio tower allows once the text side has seen the words
(BENCHMARKS.md, issue 17, seventh pass). `--drop` drops that share of token states at random while
fitting (never [CLS]). The head is fitted by `encoders train`'s own `fit_head`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffgap.encoders import load_encoders  # noqa: E402
from diffgap.models.text_net import TextNet  # noqa: E402
from diffgap.training.embeddings import embed_pairs  # noqa: E402
from diffgap.training.encoders import EncoderTrainConfig, HeadFit, SentenceStates, fit_head  # noqa: E402
from diffgap.training.metrics import metrics, ranks_query_to_audio  # noqa: E402
from diffgap.training.pairs import read_pairs  # noqa: E402

log = logging.getLogger("head-probe")


class DroppedStates:
    """A states reading that drops a share of each caption's token states at random (never [CLS])."""

    def __init__(self, states: SentenceStates, drop: float) -> None:
        self.states, self.drop, self.gen = states, drop, torch.Generator().manual_seed(0)

    def batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.states.batch(texts)
        keep = torch.rand(out["mask"].shape, generator=self.gen) > self.drop  # (B, L)
        keep[:, 0] = True
        return {**out, "mask": out["mask"] & keep}


def fresh_head(text: TextNet, reading, texts: list[str], xa: torch.Tensor, steps: int) -> tuple[TextNet, float]:
    """A copy of the tower with a newly initialised head, fitted as `encoders train` fits one."""
    tower = copy.deepcopy(text)
    torch.manual_seed(0)
    tower.head = TextNet(tower.head.cfg)
    cfg = EncoderTrainConfig()
    fit = HeadFit(steps, cfg.lr, cfg.weight_decay, cfg.seed, one_cycle=True)
    fitted = fit_head(tower.head, lambda batch: tower.sentence_side(states=batch["states"], mask=batch["mask"]),
                      reading, texts, xa, fit)  # fmt: skip
    return tower.eval(), fitted.loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", required=True, help="compact encoder directory with a states head")
    parser.add_argument("--data", default="runs/synthcaps-data", help="generated with --caption-templates")
    parser.add_argument("--split", default="pretrain", help="the captions the head is fitted on")
    parser.add_argument("--steps", default="150,400,1200")
    parser.add_argument("--drop", type=float, default=0.0)
    parser.add_argument("--cache", default=None, help="embedding cache (default DATA/../head-probe-cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    data = Path(args.data).resolve()
    cache = Path(args.cache) if args.cache else data.parent / "head-probe-cache"
    encoders = load_encoders(f"compact:{args.encoders}")
    model = encoders.text.model
    assert model.text.beside and model.text.cfg.sentence_head == "states", "the probe fits a beside tower's states head"
    pairs = read_pairs(data / "captions.csv", split=args.split)
    train = embed_pairs(pairs, encoders, "text", cache_dir=cache)
    texts = [p.text for p in pairs if p.text]  # in the order of train.query
    xa = F.normalize(torch.from_numpy(train.audio[train.query_group]), dim=-1)  # (C, dim) each caption's clip
    states = SentenceStates(model.sentence, texts, 64)
    unseen = sorted(data.glob("captions_style_*.csv"))
    tests = {}
    for name, path in {"B": data / "captions.csv", "C": unseen[0] if unseen else None}.items():
        if path is None:
            continue
        test_pairs = read_pairs(path, split="test")
        test = embed_pairs(test_pairs, encoders, "text", cache_dir=cache)
        with torch.inference_mode():
            h, mask, _ = model.sentence.token_states([p.text for p in test_pairs])  # (N, L, P), (N, L)
        tests[name] = (test, h, mask)
    print("| head fitted on | steps | drop | final loss | style | R@1 | R@10 |")
    print("|---|---|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        t0 = time.time()
        reading = DroppedStates(states, args.drop) if args.drop else states
        tower, loss = fresh_head(model.text, reading, texts, xa, steps)
        log.info("%d steps in %.0f s", steps, time.time() - t0)
        for name, (test, h, mask) in tests.items():
            with torch.inference_mode():
                xq = tower.sentence_side(states=h, mask=mask).numpy().astype(np.float32)  # (N, dim)
            m = metrics(ranks_query_to_audio(xq, test.audio, test.query_group))
            print(f"| {args.split} | {steps} | {args.drop} | {loss:.3f} | {name} | {m['R@1']:.3f} | {m['R@10']:.3f} |")


if __name__ == "__main__":
    main()
