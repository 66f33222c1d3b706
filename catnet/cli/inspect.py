"""`catnet inspect STORE`: what a feature store holds, without reading its features."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from catnet.features.inspect import summarize
from catnet.features.store import FeatureStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="feature store folder (written by `catnet extract`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--max-failures", type=int, default=20, help="failures listed in the human output")


def _print_human(s: dict[str, Any], max_failures: int) -> None:
    m = s["manifest"]
    table = Table(show_header=False, box=None)
    rows = [
        ("store", s["path"]),
        ("videos", str(s["videos"])),
        ("shards", str(s["shards"])),
        ("failures", str(s["num_failures"])),
        ("feature dim", str(s["feature_dim"])),
        ("views per video", ", ".join(map(str, s["views_per_video"])) or "-"),
        ("clips x crops", f"{s['clips_per_video']} x {s['crops']}"),
        ("splits", ", ".join(f"{k or '(none)'}: {v}" for k, v in s["splits"].items()) or "-"),
        ("classes", str(s["num_classes"])),
        ("backbone", f"{m.get('backbone')} (weights {m.get('weights_id')})"),
        ("sampling", json.dumps(m.get("sampling"), sort_keys=True)),
        ("spatial", json.dumps(m.get("spatial"), sort_keys=True)),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items()))),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console = Console(soft_wrap=True)
    console.print(table)
    for f in s["failures"][:max_failures]:
        console.print(f"failed: {f['id']} ({f.get('path', '')}): {f.get('reason', '')}", markup=False,
                      highlight=False)
    if s["num_failures"] > max_failures:
        console.print(f"... and {s['num_failures'] - max_failures} more (--json lists all)")


def run(args: argparse.Namespace) -> int:
    s = summarize(FeatureStore(args.store))
    if args.json:
        print(json.dumps(s, sort_keys=True))
    else:
        _print_human(s, args.max_failures)
    return 0
