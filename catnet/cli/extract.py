"""`catnet extract SOURCE --out STORE`: clip features of every video, into a crash-safe feature store."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict

from catnet.config import Flag, add_flags, apply_flags, from_dict
from catnet.errors import quoted
from catnet.features.extract import ExtractConfig, extract

FLAGS = {
    "--backbone": Flag("backbone", "i3d_inception (default, Kinetics-400 weights) or i3d_r50"),
    "--checkpoint": Flag("checkpoint", "backbone weights (.safetensors or weights-only .pt)"),
    "--pretrained": Flag("pretrained", "Kinetics-400 weights (default: on for i3d_inception without "
                         "--checkpoint)"),
    "--clips": Flag("sampling.num_clips", "clips per video K (default 10)"),
    "--frames": Flag("sampling.clip_len", "frames per clip L (default 32)"),
    "--stride": Flag("sampling.stride", "frame stride inside a clip (default 4)"),
    "--crops": Flag("spatial.num_crops", "spatial crops per clip, 1 or 3 (default 3)", choices=(1, 3)),
    "--short-side": Flag("spatial.short_side", "test-time short side in pixels (default 256)"),
    "--crop-size": Flag("spatial.crop", "crop size in pixels (default 224)"),
    "--batch": Flag("batch_size", "views per backbone forward pass (default 16)"),
    "--workers": Flag("workers", "decoding processes (0: in-process; default 2)"),
    "--shard-size": Flag("shard_size", "videos per shard (flush interval; default 16)"),
    "--flush-seconds": Flag("flush_seconds", "also flush a shard at least this often (default 60)"),
    "--device": Flag("device", "auto, cpu, cuda, cuda:1, ..."),
    "--optimize": Flag("optimize", "fold BN into convs + channels-last weights for speed (default: on)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of videos (one sub-folder per class) or an annotation file")
    p.add_argument("--out", required=True, help="feature store folder (created, or resumed if it exists)")
    add_flags(p, ExtractConfig, FLAGS)
    p.add_argument("--retry-failed", action="store_true",
                   help="retry videos an earlier run recorded as failed (default: skip them)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile the backbone: faster on long runs, a one-off compile first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt  # flushes finished videos on the way out (schedulers send SIGTERM first)


def run(args: argparse.Namespace) -> int:
    data = apply_flags(args, ExtractConfig, FLAGS, {"retry_failed": args.retry_failed,
                                                     "compile": args.compile})
    cfg = from_dict(ExtractConfig, data)
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        result = extract(args.source, args.out, cfg, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
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
            print(f"{result.extracted} extracted, {result.already_done} already in store, "
                  f"{result.failed} failed, {result.failed_before} failed earlier (not retried; "
                  f"--retry-failed) of {result.total} videos in {result.seconds:.1f}s -> {result.store}")
    return result.exit_code
