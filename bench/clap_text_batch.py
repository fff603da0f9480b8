"""What batching buys the full-size CLAP text tower: `ClapModel.get_text_features` at batch 1, 8
and 32 on 1 and 2 threads, with the tokenizer run on the batch at once and padding to its longest.

    .venv/bin/python bench/clap_text_batch.py [--out runs/clap_text.json] [--repeat 7]

The model is transformers' default ClapConfig (the size of LAION's HTSAT-unfused text tower: a
RoBERTa-base, 12 layers x 768) with random weights, which cost what trained ones cost. RoBERTa's
own vocabulary cannot be downloaded here, so the tokenizer is a byte-level BPE of 30,000 tokens
trained on the system word list (/usr/share/dict/words), which splits English queries into about
as many tokens as RoBERTa's does (the mean length is printed). Queries are the 16 of
bench/query_load.py, cycled. Each cell is the median of --repeat calls in this one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORDS = Path("/usr/share/dict/words")


def word_list_tokenizer(tmp: Path):  # noqa: ANN201 - a transformers tokenizer
    from query_load import QUERIES
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    words = [w.strip() for w in WORDS.read_text(errors="ignore").splitlines() if w.strip().isalpha()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)] + QUERIES,
        vocab_size=30_000,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(tmp))
    return RobertaTokenizerFast(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), model_max_length=77)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/clap_text.json")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    from query_load import QUERIES
    from search_bench import median_ms
    from transformers import ClapConfig, ClapModel

    model = ClapModel(ClapConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = word_list_tokenizer(Path(tmp))
    lengths = [len(tokenizer(q)["input_ids"]) for q in QUERIES]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batches.split(",")):
            texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]

            def encode(texts: list[str] = texts) -> None:
                tokens = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
                with torch.inference_mode():
                    model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])

            ms = median_ms(encode, args.repeat)
            per_s = round(batch / ms * 1e3, 1)
            rows.append({"threads": threads, "batch": batch, "ms_per_call": round(ms, 1),
                         "ms_per_sentence": round(ms / batch, 2), "sentences_per_s": per_s})  # fmt: skip
            print(rows[-1], flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
