"""bench/data_efficiency.py: the markdown table BENCHMARKS.md quotes, from a result file's rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def _bench_module():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling rerank_synthcaps
    try:
        spec = importlib.util.spec_from_file_location("data_efficiency", BENCH / "data_efficiency.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _row(pairs: int, shipped: float, library_weight: float) -> dict:
    row = {"pairs": pairs, "direct": 0.4, "mapper": 0.5, "refiner": 0.45, "blended": 0.46, "blend": 0.25,
           "shipped": shipped, "mix": {"refined": 0.25, "mapped": 0.75, "direct": 0.0},
           "library_weight": library_weight, "train_s": 12.5, "adapter": None, "adapter_fixed": None}  # fmt: skip
    for key in ("mapper", "refiner", "shipped"):
        row[f"{key}_recovery"] = (row[key] - 0.4) / (0.6 - 0.4)
    return row


def test_the_table_names_each_size_s_weights_and_the_library_side_only_where_it_has_one():
    table = _bench_module().table({"upper": 0.6, "rows": [_row(100, 0.41, 0.0), _row(2000, 0.58, 0.875)]})
    lines = table.splitlines()
    assert lines[2] == "| 100 | 0.400 | 0.500 (50%) | 0.450 (25%) | 0.460 (0.25) | 0.410 (5%) (0.25/0.75/0) | 12.5 |"
    assert "| 2,000 |" in lines[3] and "0.580 (90%) (0.25/0.75/0, w 0.875)" in lines[3]
    assert lines[-1] == "Upper bound (direct search with in-domain encoders): R@1 0.600."


def test_the_table_names_the_spans_weight_and_the_spans_alone_where_they_were_measured():
    row = {**_row(1000, 0.7, 0.5), "segment_weight": 0.375}
    table = _bench_module().table({"upper": 0.6, "segments_alone": 0.59, "upper_segments_alone": 0.87, "rows": [row]})
    assert "(0.25/0.75/0, w 0.5, spans 0.375)" in table.splitlines()[2]
    assert table.splitlines()[-1] == "Segment score alone (no pairs): R@1 0.590; with in-domain encoders 0.870."
    mapped = {**row, "span_map": "mapped", "span_library_weight": 0.625}  # and how the spans were served
    assert "(0.25/0.75/0, w 0.5, spans 0.375 mapped, span library 0.625)" in _bench_module().table({"rows": [mapped]})
