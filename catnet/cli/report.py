"""`catnet report RUN [--baseline RUN2]`: the paper's analysis figures (Figs. 4-6) as Markdown + PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catnet.experiments.report import analyse_run, find_segments, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder (catnet train --out)")
    p.add_argument("--baseline", default=None, help="a second run to compare per class with (Fig. 4)")
    p.add_argument("--store", default=None, help="feature store (default: the one the run trained on)")
    p.add_argument("--split", default=None, help="store split to analyse (default: test, else val, as "
                   "catnet eval; a store without split names: all its videos)")
    p.add_argument("--which", default="last", choices=["best", "last"],
                   help="checkpoint to analyse (default: last, what the demo reports)")
    p.add_argument("--videos", type=int, default=4, help="test videos shown in Fig. 6")
    p.add_argument("--out", default=None, help="report folder (default RUN/report)")


def run(args: argparse.Namespace) -> int:
    a, store = analyse_run(args.run, args.store, args.split, args.which)
    base = None
    if args.baseline:
        base, _ = analyse_run(args.baseline, args.store or store.root, args.split, args.which)
    out = Path(args.out) if args.out else Path(args.run) / "report"
    md = write_report(out, a, base, find_segments(store), num_videos=args.videos,
                      title=f"catnet report: {args.run}")
    for x in (base, a):
        if x is not None and x.note:
            print(f"note: {x.name}: {x.note}")
    print(f"report written to {md}", file=sys.stderr)
    print(md)
    return 0
