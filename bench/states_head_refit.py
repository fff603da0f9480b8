"""Give beside towers saved with a linear sentence head a states head, fitted as `encoders train` fits
one (`fit_sentence_head`: the towers stay as trained), and save them to a new directory.

Used to make the SynthCaps seed-1 in-domain upper bound of issue 18's recovery table comparable with
seed 0's, whose in-domain towers were trained with a states head: the seed-1 towers of an earlier
pass (runs/prior-v1) had the linear one.

    python bench/states_head_refit.py --encoders runs/prior-v1/encoders-pretrain+adapt-minilm-l6-beside \\
        --data runs/sc-v1-c --splits pretrain,adapt --out runs/protocol-prior-v1/in-domain-encoders-states
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffgap.encoders.compact import CompactModel  # noqa: E402
from diffgap.models.text_net import TextNet  # noqa: E402
from diffgap.training.encoders import EncoderTrainConfig, fit_sentence_head, load_clips  # noqa: E402
from diffgap.training.pairs import read_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", required=True, help="compact encoder directory with a beside text tower")
    parser.add_argument("--data", required=True, help="SynthCaps folder (captions.csv)")
    parser.add_argument("--splits", default="pretrain,adapt", help="the splits the towers were trained on")
    parser.add_argument("--val-split", default="", help="split whose clips pick the sentence share (none: keep it)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    model = CompactModel.load(args.encoders)
    text = model.text
    assert text is not None and text.beside, f"{args.encoders} has no beside text tower"
    text.cfg = replace(text.cfg, sentence_head="states")
    text.head = TextNet(replace(text.cfg, prior_mode="tokens", d_model=text.cfg.head_d_model,
                                n_layers=text.cfg.head_layers))  # fmt: skip
    cfg = EncoderTrainConfig()
    clips = load_clips(read_pairs(Path(args.data) / "captions.csv", split=args.splits), cfg, use_video=False)
    val = []
    if args.val_split:
        val = load_clips(read_pairs(Path(args.data) / "captions.csv", split=args.val_split), cfg, use_video=False)
    stats = fit_sentence_head(model, clips, val, cfg)
    model.eval().save(args.out, extra={"training": {"refit_from": str(args.encoders), **stats}})
    logging.info("saved %s: %s", args.out, stats)


if __name__ == "__main__":
    main()
