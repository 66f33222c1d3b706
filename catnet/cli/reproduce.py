"""`catnet reproduce DATASET --root DATA`: the paper's protocol end to end (catnet.experiments.reproduce)."""

from __future__ import annotations

import argparse

import torch

from catnet.config import Flag, add_flags, apply_flags, from_dict
from catnet.errors import CatnetError
from catnet.experiments.reproduce import PROTOCOLS, ReproduceConfig, print_summary, reproduce
from catnet.experiments.variants import TABLE1
from catnet.utils.io import to_json

FLAGS = {
    "--backbone": Flag("extract.backbone", "i3d_r50 (default, the paper's) or i3d_inception"),
    "--checkpoint": Flag("extract.checkpoint", "an already fine-tuned backbone (with --skip-finetune)"),
    "--pretrained": Flag("extract.pretrained", "the backbone's own pretrained weights"),
    "--clips": Flag("extract.sampling.num_clips", "clips per video (default 10)"),
    "--frames": Flag("extract.sampling.clip_len", "frames per clip (default 32)"),
    "--crops": Flag("extract.spatial.num_crops", "crops per clip, 1 or 3 (default 3)", choices=(1, 3)),
    "--crop-size": Flag("extract.spatial.crop", "crop size (default 224)"),
    "--workers": Flag("extract.workers", "decoding processes (default 2)"),
    "--epochs": Flag("epochs", "training epochs (default: configs/DATASET.yaml)"),
    "--seeds": Flag("seeds", "seeds per head (default 1)"),
    "--init-from": Flag("init_from", "Kinetics-trained CATNet run to transfer (Sec. 4.3)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=sorted(PROTOCOLS))
    p.add_argument("--root", required=True, help="dataset root (videos; UCF101/HMDB51 split files)")
    p.add_argument("--annotations", default=None,
                   help="annotation file or split folder (default: found in ROOT)")
    p.add_argument("--out", default=None, help="working folder (default reproduce-DATASET)")
    p.add_argument("--splits", type=int, nargs="+", default=None, help="official splits (default: all)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs (default: all visible; 0 = CPU; >1 = torchrun)")
    p.add_argument("--skip-finetune", action="store_true",
                   help="do not fine-tune the backbone (use --checkpoint or pretrained weights)")
    add_flags(p, ReproduceConfig, FLAGS)
    p.add_argument("--short-side", type=int, default=None, help="default: the crop size x 8/7")
    p.add_argument("--heads", nargs="+", default=None, help=", ".join(TABLE1) + " (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def config_from_args(args: argparse.Namespace) -> ReproduceConfig:
    data = apply_flags(args, ReproduceConfig, FLAGS, {
        "dataset": args.dataset, "root": args.root, "out": args.out or f"reproduce-{args.dataset}",
        "annotations": args.annotations, "splits": list(args.splits or ()),
        "skip_finetune": args.skip_finetune,
        "gpus": torch.cuda.device_count() if args.gpus is None else args.gpus})
    spatial = data.setdefault("extract", {}).setdefault("spatial", {})
    crop = spatial.get("crop", 224)
    spatial["short_side"] = args.short_side or max(crop, round(crop * 8 / 7))
    if args.heads:
        data["heads"] = list(args.heads)
    cfg = from_dict(ReproduceConfig, data)
    if cfg.seeds < 1:
        raise CatnetError(f"--seeds must be >= 1, got {cfg.seeds}")
    return cfg


def run(args: argparse.Namespace) -> int:
    results = reproduce(config_from_args(args))
    if args.json:
        print(to_json(results["summary"], sort_keys=True))
    else:
        print_summary(results)
    left_out = sum(s["left_out"] for s in results["splits"].values())
    return 1 if left_out else 0
