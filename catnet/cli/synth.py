"""`catnet synth OUT`: the synthetic action-video dataset (catnet.data.synth)."""

from __future__ import annotations

import argparse

from catnet.config import Flag, add_flags, apply_flags, from_dict
from catnet.data.synth import CLASSES, SynthConfig, generate

FLAGS = {
    "--classes": Flag("num_classes", f"classes (2-{len(CLASSES)}; default {SynthConfig.num_classes})"),
    "--videos-per-class": Flag("videos_per_class", f"default {SynthConfig.videos_per_class}"),
    "--seed": Flag("seed", "default 0"),
    "--min-frames": Flag("min_frames", f"default {SynthConfig.min_frames}"),
    "--max-frames": Flag("max_frames", f"default {SynthConfig.max_frames}"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")
    add_flags(p, SynthConfig, FLAGS)
    p.add_argument("--size", type=int, default=None, help="frame height and width in pixels (default 128)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    data = apply_flags(args, SynthConfig, FLAGS, {})
    if args.size is not None:
        data.update(height=args.size, width=args.size)
    cfg = from_dict(SynthConfig, data)
    ann = generate(args.out, cfg, progress=not args.no_progress)
    n = cfg.num_classes * cfg.videos_per_class
    print(f"{n} videos of {cfg.num_classes} classes in {args.out}; annotations: {ann}")
    return 0
