"""`catnet predict VIDEO...`: top-k labels, which moments made the decision and where (catnet.inference).

    catnet predict my_video.mp4                          # pretrained Kinetics-400 Inception-I3D
    catnet predict new.mp4 --checkpoint runs/catnet      # a trained run: its head, attention timeline
    catnet predict match.mp4 --window 4 --hop 2          # per-window top-k + the label timeline
    catnet predict --source udp://127.0.0.1:5000         # live: one line per window as it is ready
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from catnet.cli import add_cost_arguments, check_seconds, cost_overrides
from catnet.errors import CatnetError, VideoError, quoted
from catnet.inference.explain import png_bytes
from catnet.inference.predict import DEFAULT_PROFILE, PROFILES, Prediction, Predictor, format_human
from catnet.inference.timeline import (
    DEFAULT_LIVE_WINDOW,
    Timeline,
    format_timeline,
    format_window,
    iter_window_predictions,
)
from catnet.utils.io import atomic_write_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files to classify")
    p.add_argument("--checkpoint", metavar="RUN", help="trained run directory (default: pretrained "
                   "Inception-I3D with its Kinetics-400 classifier, no attention)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="run checkpoint to load")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per video (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout (JSON lines)")
    p.add_argument("--verbose", action="store_true",
                   help="print the settings used and the time per video (decode, backbone, head) to stderr")
    cost = p.add_argument_group("cost (a profile; explicit --clips/--crops/--frames override it)")
    add_cost_arguments(cost, PROFILES, DEFAULT_PROFILE)
    cost.add_argument("--batch-size", type=int, default=4, help="views per backbone forward pass")
    where = p.add_argument_group("where (Grad-CAM over the key frames of the 3 clips that mattered most)")
    where.add_argument("--explain", action="store_true", help="add saliency maps (JSON: \"explain\")")
    where.add_argument("--explain-out", metavar="DIR", help="also write the overlays as PNG files to DIR")
    time_ = p.add_argument_group("over time (per-window top-k and the label timeline; live input)")
    time_.add_argument("--window", type=float, metavar="S", help="classify windows of S seconds")
    time_.add_argument("--hop", type=float, metavar="H", help="a new window every H seconds (default S)")
    time_.add_argument("--source", metavar="URL_OR_DEVICE",
                       help="live input FFmpeg opens (udp://, tcp://, rtsp://, /dev/video0, a file being "
                            f"written): one line per window as soon as it is ready (default window "
                            f"{DEFAULT_LIVE_WINDOW:g} s); ends at end of stream or Ctrl-C")
    time_.add_argument("--timeout", type=float, default=10.0,
                       help="give up on a live source that sends nothing for this many seconds (default 10)")
    time_.add_argument("--fps", type=float, help="frame rate a live source is resampled to (default: the "
                       "model's, else 25)")
    time_.add_argument("--input-format", metavar="FMT", help="FFmpeg input format of --source (e.g. v4l2)")


def _check(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise CatnetError(f"--top-k must be >= 1, got {args.top_k}")
    if bool(args.videos) == bool(args.source):
        raise CatnetError("give video files or --source, not both" if args.videos else
                          "the following arguments are required: VIDEO (or --source URL_OR_DEVICE)")
    if (args.explain or args.explain_out) and (args.window is not None or args.source):
        raise CatnetError("--explain works on whole videos, not with --window or --source")
    if args.hop is not None and args.window is None and not args.source:
        raise CatnetError("--hop needs --window")
    check_seconds(args, "window", "hop", "timeout")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise CatnetError(f"--fps must be > 0 and at most 1000, got {args.fps}")


def build_predictor(args: argparse.Namespace) -> Predictor:
    overrides = cost_overrides(args)
    if args.checkpoint:
        predictor = Predictor.from_run(args.checkpoint, which=args.which, **overrides)
    else:
        predictor = Predictor.pretrained(**overrides)
    predictor.batch_size = max(1, args.batch_size)
    if args.verbose:
        print(f"catnet predict: {predictor.describe()}", file=sys.stderr)
    return predictor


def run(args: argparse.Namespace) -> int:
    _check(args)
    predictor = build_predictor(args)
    if args.source:
        return run_live(predictor, args)
    failed = 0
    stems = overlay_stems(args.videos)
    for video, stem in zip(args.videos, stems, strict=True):
        try:
            if args.window is not None:
                record, text, timing = predict_windows(predictor, video, args)
            else:
                explain = args.explain or bool(args.explain_out)
                # plain calls stay plain: callers (and tests) may wrap Predictor.__call__(path, top_k)
                pred = predictor(video, top_k=args.top_k, explain=True) if explain else \
                    predictor(video, top_k=args.top_k)
                record, text, timing = pred.to_json(), format_human(pred), pred.timing
                if args.explain_out:
                    write_overlays(pred, Path(args.explain_out), record, stem)
            line = json.dumps(record, allow_nan=False) if args.json else text  # never NaN in JSON
        except Exception as e:  # noqa: BLE001 - one bad video (whatever broke) must not stop the others
            failed += 1
            _error(video, e)
            continue
        print(line, flush=True)
        if args.verbose:
            print(f"catnet predict: {video}: {_timing(timing)}", file=sys.stderr)
    if failed:
        print(f"catnet predict: {len(args.videos) - failed} ok, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _error(video: str, e: BaseException) -> None:
    reason = str(e) if isinstance(e, (CatnetError, OSError)) else f"{type(e).__name__}: {e}"
    print(f"catnet predict: error: {quoted(video)}: {(reason.splitlines() or [''])[0]}", file=sys.stderr)


def _timing(timing: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
    return f"{sum(timing.values()):.2f} s ({parts})"


def overlay_stems(videos: list[str]) -> list[str]:
    """A file-name stem per video for --explain-out: the video's own, with -2, -3, ... where several
    videos share one (d1/clip.mp4 and d2/clip.mp4 must not overwrite each other's overlays)."""
    used: set[str] = set()
    stems = []
    for video in videos:
        stem, n = Path(video).stem, 1
        while (stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        stems.append(stem if n == 1 else f"{stem}-{n}")
        used.add(stems[-1])
    return stems


def write_overlays(pred: Prediction, folder: Path, record: dict, stem: str) -> None:
    """The full-resolution Grad-CAM overlays as PNG files; their paths go into the JSON record."""
    for entry, s in zip(record.get("explain", []), pred.explain or [], strict=True):
        label = re.sub(r"[^\w.-]+", "_", s.label)  # a file name without spaces or slashes
        path = folder / f"{stem}.clip{s.clip + 1}.{label}.png"
        atomic_write_bytes(path, png_bytes(s.overlay()))
        entry["file"] = str(path)


def predict_windows(predictor: Predictor, video: str, args) -> tuple[dict, str, dict]:
    """One video, window by window: the JSON record (schema + windows + timeline), its text, the time."""
    timeline, windows, timing = Timeline(predictor.labels), [], {}
    for w in iter_window_predictions(predictor, video, args.window, args.hop, args.top_k):
        timeline.add(w)
        windows.append(w.to_json())
        for k, v in w.timing.items():
            timing[k] = timing.get(k, 0.0) + v
    preds = timeline.predictions(args.top_k)
    record = {"video": video, "predictions": [{"label": lab, "score": round(s, 6)} for lab, s in preds],
              "clips": [{"start": w["start"], "end": w["end"], "attention": None} for w in windows],
              "windows": windows, "timeline": [s.to_json() for s in timeline.segments]}
    width = max((len(lab) for lab, _ in preds), default=0)
    lines = [video] + [f"  {i}. {lab:<{width}}  {s:6.1%}" for i, (lab, s) in enumerate(preds, 1)]
    hop = args.window if args.hop is None else args.hop
    lines.append(f"  label timeline ({args.window:g} s windows, hop {hop:g} s, {len(windows)} windows)")
    lines += format_timeline(timeline.segments, "    ")
    return record, "\n".join(lines), timing


def run_live(predictor: Predictor, args: argparse.Namespace) -> int:
    """Windows of a live source as they come; a summary (the label timeline) at the end, Ctrl-C included.
    A source that fails or stalls: what came before is already out, then one error line, exit 1."""
    timeline, status, error = Timeline(predictor.labels), "end of stream", None
    window = args.window if args.window is not None else DEFAULT_LIVE_WINDOW
    windows = iter_window_predictions(predictor, args.source, window, args.hop, args.top_k, live=True,
                                      timeout=args.timeout, fps=args.fps, fmt=args.input_format)
    try:
        for w in windows:
            timeline.add(w)
            if args.json:
                print(json.dumps({"type": "window", "source": args.source, **w.to_json()}, allow_nan=False),
                      flush=True)
            else:
                print(format_window(w), flush=True)
            if args.verbose:
                print(f"catnet predict: window {w.index}: {_timing(w.timing)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status = "interrupted"
    except VideoError as e:
        status, error = "error", e
    finally:
        windows.close()
    _print_summary(args, timeline, status)
    if error is not None:
        _error(args.source, error)
        return 1
    return 0


def _print_summary(args: argparse.Namespace, timeline: Timeline, status: str) -> None:
    preds = timeline.predictions(args.top_k)
    if args.json:
        print(json.dumps({"type": "summary", "source": args.source, "status": status,
                          "windows": timeline.count,
                          "predictions": [{"label": lab, "score": round(s, 6)} for lab, s in preds],
                          "timeline": [s.to_json() for s in timeline.segments]}, allow_nan=False), flush=True)
        return
    print(f"{args.source}: {status}, {timeline.count} windows; label timeline:", flush=True)
    for line in format_timeline(timeline.segments):
        print(line, flush=True)
