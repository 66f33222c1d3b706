"""`catnet inspect STORE`: what a feature store holds, without reading its features."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from catnet.errors import CatnetError, quoted
from catnet.features.inspect import summarize
from catnet.features.store import FeatureStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="feature store folder (written by `catnet extract`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--max-failures", type=int, default=20,
                   help="failures listed in the human output (default 20; 0: none; --json lists all)")


def _rows(s: dict[str, Any]) -> str:
    r = s["rows_per_video"]
    if r is None:
        return "-"
    median = f"{r['median']:g}"
    return f"min {r['min']}, median {median}, max {r['max']} ({s['rows']} in all)"


def _dense(d: dict[str, Any]) -> str:
    hop = f"{d['hop_seconds']:g} s" if d["hop_seconds"] else f"{d['hop']} frames"
    rate = f"resampled to {d['fps']:g} fps" if d["fps"] else "at each video's own rate"
    seen = ", ".join(f"{x:g}" for x in d["video_fps"])
    return (f"window {d['window']} frames (stride {d['stride']}, span {d['span']}), hop {hop}, {rate}"
            + (f" (fps: {seen})" if seen else ""))


def _groups(g: dict[str, Any]) -> str:
    ungrouped = g.get("ungrouped", {})
    if all(ungrouped.get(k) == v for k, v in g["per_split"].items()):
        return "- (every video its own group)"
    shared = g["in_several_splits"]

    def count(k: str, v: int) -> str:
        return f"{k or '(none)'}: {v}" + (f" ({ungrouped[k]} without a group)" if ungrouped.get(k) else "")

    return (", ".join(count(k, v) for k, v in g["per_split"].items())
            + (f"; {shared} group(s) in more than one split" if shared else "; no group in two splits"))


def _print_human(s: dict[str, Any], max_failures: int) -> None:
    m = s["manifest"]
    table = Table(show_header=False, box=None)
    rows = [
        ("store", quoted(s["path"])),
        ("videos", str(s["videos"])),
        ("shards", str(s["shards"])),
        ("failures", str(s["num_failures"])),
        ("feature dim", str(s["feature_dim"])),
        ("windows per video" if s["dense"] else "clips per video", _rows(s)),
        ("views per video", ", ".join(map(str, s["views_per_video"][:20])) or "-"),
        ("crops", ", ".join(map(str, s["crops"])) or "-"),
        ("splits", ", ".join(f"{k or '(none)'}: {v}" for k, v in s["splits"].items()) or "-"),
        ("groups", _groups(s["groups"])),
        ("classes", str(s["num_classes"])),
        ("backbone", f"{m.get('backbone')} (weights {m.get('weights_id')})"),
    ]
    if s["dense"]:
        rows.append(("dense windows", _dense(s["dense"])))
    rows += [
        ("sampling", json.dumps(m.get("sampling"), sort_keys=True)),
        # train_short is fine-tuning's scale jitter, not how these features were cropped
        ("spatial", json.dumps({k: v for k, v in (m.get("spatial") or {}).items() if k != "train_short"},
                               sort_keys=True)),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items()))),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console = Console(soft_wrap=True)
    console.print(table, markup=False, highlight=False)
    for f in s["failures"][:max_failures]:  # quoted: a non-UTF-8 or control-character name stays one line
        console.print(f"failed: {quoted(f['id'])} ({quoted(f.get('path', ''))}): {f.get('reason', '')}",
                      markup=False, highlight=False)
    if s["num_failures"] > max_failures:
        console.print(f"... and {s['num_failures'] - max_failures} more (--json lists all)")


def run(args: argparse.Namespace) -> int:
    if args.max_failures < 0:
        raise CatnetError(f"--max-failures must be >= 0, got {args.max_failures} (--json lists all)")
    s = summarize(FeatureStore(args.store))
    if args.json:
        print(json.dumps(s, sort_keys=True))
    else:
        _print_human(s, args.max_failures)
    return 0
