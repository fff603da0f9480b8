"""Insert the SynthCaps eval tables into BENCHMARKS.md between marker lines (idempotent)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from diffgap.atomic import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--elapsed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="encoders trained on: pretrain")
    args = ap.parse_args()
    work = Path(args.work)
    slug = "".join(c if c.isalnum() else "-" for c in args.label.lower())
    BEGIN, END = f"<!-- synthcaps:{slug}:begin -->", f"<!-- synthcaps:{slug}:end -->"
    enc = json.loads((work / "encoders" / "config.json").read_text())["training"]
    parts = [
        BEGIN,
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"this invocation of bench/synthcaps.sh {args.elapsed / 60:.1f} min (steps already done in WORK_DIR are "
        f"reused). Compact encoders: {enc['steps']} steps on "
        f"{enc['clips']} clips in {enc['seconds'] / 60:.1f} min.",
        "",
    ]
    for modality in ("text", "video"):
        path = work / f"eval-{modality}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        parts += [
            f"### {modality} -> audio (test split: {data['test_queries']} queries, {data['test_audio']} clips; "
            f"refiner and mapper trained on {data['train_pairs']} adapt pairs)",
            "",
            data["table"],
            "",
        ]
    parts.append(END)
    replace_block(Path(args.out), BEGIN, END, "\n".join(parts))


def replace_block(out: Path, begin: str, end: str, block: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) where those markers stand in `out`,
    or append it; the file is replaced atomically."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(out, text)


if __name__ == "__main__":
    main()
