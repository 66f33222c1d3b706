"""`catnet extract SOURCE --out STORE`: clip features of every video, into a crash-safe feature store.

    catnet extract VIDEOS/ --out STORE [--clips 10 --frames 32 --stride 4]       # K clips per video
    catnet extract VIDEOS/ --out STORE --dense --window 16 --hop 4 [--fps 25]   # one row per window
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from catnet.config import Flag, add_flags, apply_flags, from_dict
from catnet.errors import CatnetError, quoted
from catnet.features.extract import ExtractConfig, extract

FLAGS = {
    "--backbone": Flag("backbone", "i3d_inception (default, Kinetics-400 weights) or i3d_r50"),
    "--checkpoint": Flag("checkpoint", "backbone weights (.safetensors or weights-only .pt)"),
    "--pretrained": Flag("pretrained", "Kinetics-400 weights (default: on for i3d_inception without "
                         "--checkpoint)"),
    "--clips": Flag("sampling.num_clips", "clips per video K (default 10)"),
    "--frames": Flag("sampling.clip_len", "frames per clip L (default 32)"),
    "--stride": Flag("sampling.stride", "frame stride inside a clip or window (default 4; with --dense 1)"),
    "--window": Flag("dense.window", "with --dense: frames per window L (default 16)"),
    "--hop": Flag("dense.hop", "with --dense: frames from one window's start to the next (default: the "
                  "window's span, i.e. windows tile the video)"),
    "--hop-seconds": Flag("dense.hop_seconds", "with --dense: the hop in seconds (rounded to whole frames)"),
    "--fps": Flag("dense.fps", "with --dense: resample every video to this frame rate first"),
    "--crops": Flag("spatial.num_crops", "spatial crops per clip, 1 or 3 (default 3)", choices=(1, 3)),
    "--short-side": Flag("spatial.short_side", "test-time short side in pixels (default 256)"),
    "--crop-size": Flag("spatial.crop", "crop size in pixels (default 224)"),
    "--batch": Flag("batch_size", "views per backbone forward pass, of one video at a time (default 16)"),
    "--workers": Flag("workers", "decoding processes (0: in-process; default 2)"),
    "--shard-size": Flag("shard_size", "videos per shard (flush interval; default 16)"),
    "--flush-seconds": Flag("flush_seconds", "also flush a shard at least this often (default 60)"),
    "--device": Flag("device", "auto, cpu, cuda, cuda:1, ..."),
    "--optimize": Flag("optimize", "fold BN into convs + channels-last weights for speed (default: on)"),
}
_DENSE_ONLY = ("--window", "--hop", "--hop-seconds", "--fps")
_CLIPS_ONLY = ("--clips", "--frames")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of videos (one sub-folder per class) or an annotation file")
    p.add_argument("--out", required=True, help="feature store folder (created, or resumed if it exists)")
    p.add_argument("--root", default=None,
                   help="where an annotation file's relative video paths start (default: its folder)")
    p.add_argument("--dense", action="store_true",
                   help="one feature row per fixed-stride window (--window, --hop) instead of K clips")
    add_flags(p, ExtractConfig, FLAGS)
    p.add_argument("--retry-failed", action="store_true",
                   help="retry videos an earlier run recorded as failed (default: skip them)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the backbone: faster on long runs, a one-off compile first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    return [f for f in flags if getattr(args, FLAGS[f].key.replace(".", "__")) is not None]


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The flags as an ExtractConfig; window flags need --dense and K-clip flags refuse it."""
    data = apply_flags(args, ExtractConfig, FLAGS, {"retry_failed": args.retry_failed,
                                                     "compile": args.compile})
    if not args.dense:
        if _given(args, _DENSE_ONLY):
            raise CatnetError(f"{_given(args, _DENSE_ONLY)[0]} sets dense windows: add --dense")
        return from_dict(ExtractConfig, data)
    if _given(args, _CLIPS_ONLY):
        raise CatnetError(f"{_given(args, _CLIPS_ONLY)[0]} sets K-clip sampling; with --dense give "
                          "--window (frames per window) and --hop")
    dense = data.setdefault("dense", {})
    stride = data.get("sampling", {}).pop("stride", None)  # --stride: the window's frame stride
    if stride is not None:
        dense["stride"] = stride
    return from_dict(ExtractConfig, data)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # SIGTERM arrives as KeyboardInterrupt (catnet.cli.main): finished videos are flushed on the way out
    result = extract(args.source, args.out, cfg, progress=not args.no_progress, root=args.root)
    for f in result.failures[:20]:
        print(f"failed: {quoted(f['path'])}: {f['reason']}", file=sys.stderr)
    if len(result.failures) > 20:
        print(f"... and {len(result.failures) - 20} more failures this run", file=sys.stderr)
    if result.rank == 0:
        summary = {k: v for k, v in asdict(result).items() if k not in ("failures", "rank")}
        summary["videos_per_s"] = round(result.extracted / max(result.seconds, 1e-9), 3)
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            print(f"{result.extracted} extracted ({result.rows} {'windows' if cfg.dense else 'clips'}), "
                  f"{result.already_done} already in store, {result.failed} failed, {result.failed_before} "
                  f"failed earlier (not retried; --retry-failed) of {result.total} videos in "
                  f"{result.seconds:.1f}s -> {quoted(result.store)}")
    return result.exit_code
