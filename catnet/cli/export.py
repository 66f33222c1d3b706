"""`catnet export RUN --format onnx|pt2|torchscript --out FILE`: a trained head, or its backbone."""

from __future__ import annotations

import argparse
import sys

from catnet.engine.runs import load_run
from catnet.errors import CatnetError
from catnet.inference.export import DEPRECATED, FORMATS, export_backbone, export_head
from catnet.inference.predict import backbone_from_manifest, store_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="trained run directory (from `catnet train`)")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="onnx (dynamo exporter, for onnxruntime), pt2 (torch.export, load with "
                        "torch.export.load) or torchscript (deprecated: torch.jit is deprecated upstream)")
    p.add_argument("--out", required=True, metavar="PATH", help="file to write")
    p.add_argument("--part", choices=("head", "backbone"), default="head",
                   help="the trained head (default) or the backbone that made the run's features")
    p.add_argument("--which", choices=("best", "last"), default="best", help="run checkpoint to export")
    p.add_argument("--frames", type=int, help="backbone example clip length (default: the run's)")
    p.add_argument("--size", type=int, help="backbone example crop size (default: the run's)")


def run(args: argparse.Namespace) -> int:
    head, info = load_run(args.run_dir, which=args.which)
    if args.format in DEPRECATED:
        print(f"catnet export: note: {args.format}: {DEPRECATED[args.format]}", file=sys.stderr)
    if args.part == "head":
        path = export_head(head, args.format, args.out, classes=list(info["classes"]))
    else:
        backbone, sampling, spatial = backbone_from_manifest(store_manifest(info))
        frames = sampling.clip_len if args.frames is None else args.frames
        size = spatial.crop if args.size is None else args.size
        if frames < 1 or size < 1:
            raise CatnetError("--frames and --size must be >= 1")
        path = export_backbone(backbone, args.format, args.out, frames, size)
    print(f"wrote {args.part} ({args.format}) to {path}")
    return 0
