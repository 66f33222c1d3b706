"""`catnet predict VIDEO...`: top-k labels and which moments made the decision (catnet.inference.predict).

    catnet predict my_video.mp4                          # pretrained Kinetics-400 Inception-I3D
    catnet predict new.mp4 --checkpoint runs/catnet      # a trained run: its head, attention timeline
"""

from __future__ import annotations

import argparse
import json
import sys

from catnet.errors import CatnetError, quoted
from catnet.inference.predict import Predictor, format_human


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files to classify")
    p.add_argument("--checkpoint", metavar="RUN", help="trained run directory (default: pretrained "
                   "Inception-I3D with its Kinetics-400 classifier, no attention)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="run checkpoint to load")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per video (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout (JSON lines)")
    p.add_argument("--verbose", action="store_true", help="print time per video to stderr")
    cost = p.add_argument_group("cost (CPU users: fewer clips/crops/frames run faster)")
    cost.add_argument("--clips", type=int, help="clips per video K (default: the run's, or 10)")
    cost.add_argument("--crops", type=int, help="spatial crops per clip, 1 or 3 (default: the run's, or 3)")
    cost.add_argument("--frames", type=int, help="frames per clip L (default: the run's/backbone's)")
    cost.add_argument("--batch-size", type=int, default=4, help="views per backbone forward pass")


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise CatnetError(f"--top-k must be >= 1, got {args.top_k}")
    overrides = dict(num_clips=args.clips, num_crops=args.crops, clip_len=args.frames)
    if args.checkpoint:
        predictor = Predictor.from_run(args.checkpoint, which=args.which, **overrides)
    else:
        predictor = Predictor.pretrained(**overrides)
    predictor.batch_size = max(1, args.batch_size)

    failed = 0
    for video in args.videos:
        try:
            pred = predictor(video, top_k=args.top_k)
        except Exception as e:  # noqa: BLE001 - one bad video (whatever broke) must not stop the others
            failed += 1
            reason = str(e) if isinstance(e, (CatnetError, OSError)) else f"{type(e).__name__}: {e}"
            print(f"catnet predict: error: {quoted(video)}: {(reason.splitlines() or [''])[0]}",
                  file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(pred.to_json()), flush=True)
        else:
            print(format_human(pred), flush=True)
        if args.verbose:
            print(f"catnet predict: {video}: {pred.seconds:.2f} s", file=sys.stderr)
    if failed:
        print(f"catnet predict: {len(args.videos) - failed} ok, {failed} failed", file=sys.stderr)
    return 1 if failed else 0
