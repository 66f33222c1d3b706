"""`catnet eval RUN --store STORE`: top-1/top-5, mean class accuracy, per-class accuracy and confusion.

    catnet eval RUN --store STORE [--split test] [--json]
    catnet eval RUN1 RUN2 RUN3 --store S1 S2 S3     # UCF101/HMDB51 3-split protocol: mean ± std
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from catnet.engine.evaluate import evaluate_splits
from catnet.errors import CatnetError
from catnet.utils import distributed as dist
from catnet.utils.io import to_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `catnet train`")
    p.add_argument("--store", nargs="+", required=True, metavar="STORE",
                   help="feature store(s): one per RUN (3-split protocol) or one for all")
    p.add_argument("--split", default=None, help="store split to evaluate (default: test, else val)")
    p.add_argument("--which", default="best", choices=("best", "last"),
                   help="checkpoint to evaluate (default: best, chosen on the run's validation videos)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def _pct(x: float) -> str:
    return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CatnetError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise CatnetError(f"--num-workers must be >= 0, got {args.num_workers}")
    with dist.session(args.device) as info:
        out = evaluate_splits(args.runs, args.store, args.split, which=args.which, batch_size=args.batch_size,
                              device=info.device, num_workers=args.num_workers, progress=not args.json)
    if info.rank != 0:
        return 0
    if args.json:
        print(to_json(out if len(out["splits"]) > 1 else out["splits"][0]))
        return 0
    print(f"{'run':<32} {'split':<8} {'videos':>6} {'top-1':>7} {'top-5':>7} {'mean-cls':>8}")
    for r in out["splits"]:
        print(f"{Path(r['run']).name[:32]:<32} {r['split']:<8} {r['n']:>6} {_pct(r['top1']):>7} "
              f"{_pct(r['top5']):>7} {_pct(r['mean_class_acc']):>8}")
    if len(out["splits"]) > 1:
        s = out["summary"]
        # one store per run: the 3-split protocol; one store for all: runs (seeds, heads) on one split
        over = "splits" if len({r["store"] for r in out["splits"]}) > 1 else "runs, one store"
        print(f"mean ± std over {over}: " + ", ".join(
            f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for k, v in s.items()))
    for r in out["splits"]:
        if r.get("note"):
            print(f"note: {Path(r['run']).name}: {r['note']}")
    for r in out["splits"]:
        if "saved_to" in r:
            print(f"saved {r['saved_to']}", file=sys.stderr)
    return 0
