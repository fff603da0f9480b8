"""The recovery table of issue 18 from `bench/synthcaps.sh` work folders: per seed, modality and
direction, each method's R@1 under the protocol (encoders on pretrain only) with its recovery, and
its R@1 and gain over direct search with in-domain encoders. Printed as markdown, or written into
BENCHMARKS.md between marker lines; `--png` draws the protocol's R@1 per method against direct search
and the in-domain upper bound.

    python bench/recovery_table.py --work 0=runs/sc-v0-work --work 1=runs/sc-v1-work [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from write_benchmarks import replace_block  # bench/ is on sys.path when run as a script

from diffgap.training.evaluate import DIRECT, UPPER

DIRECTIONS = (("to_audio", "{m} -> audio"), ("from_audio", "audio -> {m}"))


def load(work: Path, run: str, modality: str, suffix: str = "") -> dict[str, dict] | None:
    path = work / run / f"eval-{modality}{suffix}.json"
    if not path.exists():
        return None
    return {_family(r["name"]): r for r in json.loads(path.read_text())["rows"]}


def _family(name: str) -> str:
    """A row name without the numbers a run fills in (chosen weights, steps), so runs line up."""
    return re.sub(r" \([\d./, ]*\)", "", re.sub(r" \([^)]*\)$", "", name))


DIRECT_ROW, UPPER_ROW = _family(DIRECT), _family(UPPER)


def cell(row: dict | None, key: str, base: dict | None, recovery: bool) -> str:
    if row is None or row.get(key) is None:
        return ""
    r1 = row[key]["R@1"]
    if recovery:
        gain = row["notes"].get(f"recovery_{key}")
        return f"{r1:.3f}" + (f" ({gain:.0%})" if gain is not None else "")
    direct = base[key]["R@1"] if base and base.get(key) else None
    return f"{r1:.3f}" + (f" ({r1 / direct:.2f}x)" if direct else "")


def render(works: dict[str, Path], suffix: str = "") -> str:
    parts = []
    for modality in ("text", "video"):
        for key, label in DIRECTIONS:
            columns, tables = [], []
            for seed, work in works.items():
                for run, recovery in (("protocol", True), ("in-domain", False)):
                    table = load(work, run, modality, suffix)
                    if table is not None:
                        columns.append(f"seed {seed} {run} R@1 ({'recovery' if recovery else 'x direct'})")
                        tables.append((table, recovery))
            if not tables:
                continue
            names: list[str] = []
            for table, _ in tables:
                names += [n for n in table if n not in names and any(t.get(n, {}).get(key) for t, _ in tables)]
            lines = [f"**{label.format(m=modality)}**", "", "| method | " + " | ".join(columns) + " |"]
            lines.append("|---" * (len(columns) + 1) + "|")
            for name in names:
                cells = [cell(t.get(name), key, t.get(DIRECT_ROW), rec) for t, rec in tables]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def draw(works: dict[str, Path], modality: str, png: Path, suffix: str = "") -> None:
    """One panel per seed and direction: each method's R@1 with the protocol's encoders as a bar, direct
    search (dashed) and the in-domain upper bound (solid) as lines, so recovery is the bar's reach
    from the dashed line to the solid one."""
    panels = [
        (seed, key, label, table)
        for seed, work in works.items()
        if (table := load(work, "protocol", modality, suffix)) is not None
        for key, label in DIRECTIONS
    ]
    if not panels:
        raise SystemExit(
            f"recovery_table: no protocol/eval-{modality}{suffix}.json under {', '.join(map(str, works.values()))}"
        )
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("recovery_table: --png needs matplotlib (pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.4 * len(panels)), squeeze=False)
    for ax, (seed, key, label, table) in zip(axes[:, 0], panels, strict=True):
        rows = [(n, r[key]["R@1"]) for n, r in table.items() if r.get(key) and n not in (DIRECT_ROW, UPPER_ROW)]
        upper = table.get(UPPER_ROW, {}).get(key)
        ax.barh([_short(n) for n, _ in rows], [v for _, v in rows], color="#4c72b0")
        ax.axvline(table[DIRECT_ROW][key]["R@1"], color="k", ls="--", lw=1, label="direct search")
        if upper:
            ax.axvline(upper["R@1"], color="#c44e52", lw=1.5, label="in-domain upper bound")
        ax.set_title(f"seed {seed}: {label.format(m=modality)}", fontsize=10)
        ax.set_xlabel("R@1, protocol encoders")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


SHORT = (  # (words of a row name, its label in a chart), first match wins
    ("with the plain regression mapper", "ensemble over the plain mapper"),  # beside a ranking mapper's
    ("ensemble", "ensemble"),
    ("bridge from the mapper", "bridge from mapper"),
    ("blend chosen", "BST refiner, blend picked"),
    ("regression mapper", "MLP mapper"),
    ("mapper with a ranking loss", "MLP mapper + ranking loss"),
    ("without BST", "refiner, one way"),
    ("adapter alone", "text adapter"),
    ("refiner with BST (m=", "BST refiner"),
)


def _short(name: str) -> str:
    """A row name cut to what tells the rows apart in a chart's axis."""
    label = next((label for words, label in SHORT if words in name), name.split(",")[0].replace("refiner with", ""))
    if label == "ensemble":  # what train-refiner ships: two-sided where the library side got a weight
        return "ensemble, two-sided (shipped)" if "two-sided" in name else "ensemble, query side only"
    return label + (", two-sided" if "two-sided" in name else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", action="append", required=True, help="SEED=WORK_DIR of a bench/synthcaps.sh run")
    ap.add_argument("--out", help="insert into this markdown file between the --marker lines")
    ap.add_argument("--marker", default="recovery", help="the markers' name: <!-- NAME:begin --> (one per table kept)")
    ap.add_argument("--png", type=Path, help="also draw the protocol's rows of --modality as this PNG")
    ap.add_argument("--modality", default="video", choices=["text", "video"])
    ap.add_argument(
        "--suffix",
        default="",
        help="read eval-MODALITY{SUFFIX}.json: --suffix=-rank reads a second eval beside the first",
    )
    args = ap.parse_args()
    if bad := [w for w in args.work if "=" not in w]:
        ap.error(f"--work takes SEED=WORK_DIR, got {bad[0]!r}")
    works = {k: Path(v) for k, v in (w.split("=", 1) for w in args.work)}
    block = render(works, args.suffix)
    if not block:  # an empty table would wipe the one between the markers
        names = f"eval-text{args.suffix}.json or eval-video{args.suffix}.json"
        ap.error(f"no {names} under {', '.join(map(str, works.values()))}")
    if args.png:
        draw(works, args.modality, args.png, args.suffix)
    if not args.out:
        print(block)
        return
    begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
    replace_block(Path(args.out), begin, end, f"{begin}\n\n{block}\n\n{end}")


if __name__ == "__main__":
    main()
