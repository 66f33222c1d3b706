"""The paper's head variants, in one place: the Table-1 rows, the Table-2 grid, their labels and the
paper's Kinetics-400 numbers. The demo, `catnet reproduce`, the report and benchmarks/sequences.py all
read these; configs/heads/*.yaml spell the same rows as presets for `catnet train --head-preset`.
"""

from __future__ import annotations

import re
from typing import Any

from catnet.heads import CATNetConfig

# The paper's default CATNet (Sec. 4.1): N = 32, concatenation (Eq. 8). Spelled out so that the Table-1
# CATNet row and the Table-2 cell with the same N and aggregation are one variant (one set of runs).
CATNET_DEFAULT = {"num_heads": CATNetConfig.num_heads, "aggregation": CATNetConfig.aggregation}

# key -> (head name, options): Table 1's rows in order, with Attention Clusters (the paper's Table 3)
# after the baseline, since it is the head closest to CATNet's local attention.
TABLE1: dict[str, tuple[str, dict[str, Any]]] = {
    "avgpool": ("avgpool", {}),
    "attention_clusters": ("attention_clusters", {}),
    "local-nofcnorm": ("local", {"fc_norm": False}),
    "local": ("local", {"fc_norm": True}),
    "catnet": ("catnet", dict(CATNET_DEFAULT)),
}
TABLE2_HEADS = (1, 4, 8, 16, 32, 64)
AGGREGATIONS = ("concat", "sum")

# The paper's Kinetics-400 top-1 / top-5 (Tables 1 and 2), keyed by TABLE1 key and (N, aggregation).
PAPER_TABLE1 = {"avgpool": (73.0, 91.0), "attention_clusters": (75.0, 91.9), "local-nofcnorm": (74.6, 91.5),
                "local": (75.1, 91.7), "catnet": (75.8, 92.0)}
PAPER_TABLE2 = {(1, "concat"): (74.9, 91.7), (1, "sum"): (75.0, 91.5), (4, "concat"): (75.0, 91.6),
                (4, "sum"): (75.0, 91.7), (8, "concat"): (75.2, 91.7), (8, "sum"): (75.1, 91.6),
                (16, "concat"): (75.1, 91.8), (16, "sum"): (75.1, 91.6), (32, "concat"): (75.8, 92.0),
                (32, "sum"): (75.1, 91.7), (64, "concat"): (75.6, 91.9), (64, "sum"): (75.2, 91.7)}


def table1_variants(clusters: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Table 1's rows as (head name, options): baseline, local w/o and w/ FC-Norm, CATNet (and, with
    `clusters`, Attention Clusters after the baseline)."""
    return [v for key, v in TABLE1.items() if clusters or key != "attention_clusters"]


def table2_variants(heads: tuple[int, ...] | list[int] = TABLE2_HEADS) -> list[tuple[str, dict[str, Any]]]:
    """Table 2: N in `heads` x {concatenation, summation}, both with full CATNet."""
    return [("catnet", {"num_heads": n, "aggregation": agg}) for n in heads for agg in AGGREGATIONS]


def variant_label(name: str, options: dict[str, Any]) -> str:
    """A short human name for a (name, options) variant, for table rows and plot legends."""
    if name == "avgpool":
        return "avgpool (baseline)"
    if name == "local":
        return "local w/ FC-Norm" if options.get("fc_norm", True) else "local w/o FC-Norm"
    if name == "catnet" and options:
        if options == CATNET_DEFAULT:
            return "catnet"
        n = options.get("num_heads", CATNetConfig.num_heads)
        return f"catnet N={n} {options.get('aggregation', CATNetConfig.aggregation)}"
    extra = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{name} {extra}".strip()


def variant_key(name: str, options: dict[str, Any]) -> str:
    """The TABLE1 key of a variant ("" when it is not a Table-1 row)."""
    return next((k for k, v in TABLE1.items() if v == (name, options)), "")


def paper_numbers(name: str, options: dict[str, Any]) -> tuple[float, float] | None:
    """The paper's Kinetics-400 (top-1, top-5) for a Table-1 row or Table-2 cell, None otherwise."""
    key = variant_key(name, options)
    if key:
        return PAPER_TABLE1[key]
    if name == "catnet" and set(options) <= {"num_heads", "aggregation"}:
        cell = (options.get("num_heads", CATNetConfig.num_heads),
                options.get("aggregation", CATNetConfig.aggregation))
        return PAPER_TABLE2.get(cell)
    return None


def slug(name: str, options: dict[str, Any]) -> str:
    """A folder name for a variant's runs, e.g. "catnet_aggregation-sum_num_heads-4"."""
    parts = [name] + [f"{k}-{v}" for k, v in sorted(options.items())]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts))
