"""`catnet finetune-backbone VIDEOS --out RUN`: a clip backbone trained end to end (catnet.engine.finetune).

    catnet finetune-backbone VIDEOS --out RUN [--backbone i3d_r50] [--inflate-from resnet50_2d.pth]
    torchrun --nproc_per_node=8 -m catnet finetune-backbone VIDEOS --out RUN      # data parallel
"""

from __future__ import annotations

import argparse
import os

from catnet.config import Flag, add_flags, apply_flags, from_dict, parse_key_values
from catnet.engine.finetune import FinetuneConfig, finetune
from catnet.engine.loop import starting_point
from catnet.utils.io import to_json

FLAGS = {
    "--backbone": Flag("backbone", "i3d_r50 (default) or i3d_inception"),
    "--checkpoint": Flag("checkpoint", "initial weights (the classifier is replaced)"),
    "--pretrained": Flag("pretrained", "start from the backbone's own pretrained weights (i3d_inception: "
                         "Kinetics-400)"),
    "--inflate-from": Flag("inflate_from", "i3d_r50: a 2-D ImageNet ResNet-50 to inflate (the paper's init)"),
    "--root": Flag("root", "where an annotation file's relative video paths start (default: its folder)"),
    "--epochs": Flag("epochs", "training epochs (paper: 90)"),
    "--batch-size": Flag("batch_size", "clips per step over all processes (paper: 64)"),
    "--lr": Flag("lr", "initial learning rate (paper: 0.01)"),
    "--optimizer": Flag("optimizer", "sgd (default) or adamw"),
    "--momentum": Flag("momentum", "SGD momentum (paper: 0.9)"),
    "--nesterov": Flag("nesterov", "Nesterov momentum (default: off)"),
    "--schedule": Flag("schedule", "step (default, the paper's) or cosine (per step)"),
    "--warmup-epochs": Flag("warmup_epochs", "linear warmup length in epochs (default 0)"),
    "--weight-decay": Flag("weight_decay", "SGD weight decay (default 1e-4)"),
    "--lr-step": Flag("lr_step", "multiply the lr by --lr-gamma every this many epochs (paper: 30)"),
    "--lr-gamma": Flag("lr_gamma", "lr decay factor (paper: 0.1)"),
    "--label-smoothing": Flag("label_smoothing", "label smoothing of the cross-entropy (default 0)"),
    "--class-weights": Flag("class_weights", "balanced: weight the loss by inverse class frequency"),
    "--sampler": Flag("sampler", "balanced: draw every class equally often (with replacement)"),
    "--early-stop": Flag("early_stop", "stop after this many epochs without a better validation top-1"),
    "--dropout": Flag("dropout", "dropout before the classifier (default 0.5)"),
    "--frames": Flag("sampling.clip_len", "frames per clip (default 32)"),
    "--stride": Flag("sampling.stride", "frame stride inside a clip (Kinetics 4; UCF101/HMDB51 1)"),
    "--test-clips": Flag("sampling.num_clips", "clips per video at evaluation (default 10)"),
    "--short-side": Flag("spatial.short_side", "test-time short side (default 256)"),
    "--crop-size": Flag("spatial.crop", "crop size (default 224)"),
    "--test-crops": Flag("spatial.num_crops", "crops per clip at evaluation (default 3)"),
    "--train-short": Flag("spatial.train_short", "training short-side range (default 256 320)"),
    "--train-split": Flag("train_split", "split to train on (default train)"),
    "--val-split": Flag("val_split", "split that selects the checkpoint (default: val, else a held-out "
                        "part of train; 'test' only if you mean it; 'none': skip)"),
    "--holdout-fraction": Flag("holdout_fraction", "share of each class's training groups held out when "
                               "there is no val split, rounded down (default 0.1: classes of fewer "
                               "than 10 groups hold out none)"),
    "--eval-every": Flag("eval_every", "validate every this many epochs (and after the last)"),
    "--eval-batch-size": Flag("eval_batch_size", "views per forward pass at evaluation (default 30)"),
    "--amp": Flag("amp", "autocast: bf16 or fp16 (fp16 with loss scaling); default fp32"),
    "--seed": Flag("seed", "seed for init, data order, clip draws and dropout"),
    "--workers": Flag("num_workers", "decoding processes (default 4)"),
    "--device": Flag("device", "auto, cpu or cuda"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="VIDEOS", help="folder of videos (one sub-folder per class) or an "
                   "annotation file (with train/test splits)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create (or resume)")
    p.add_argument("--config", metavar="YAML", help="FinetuneConfig preset; flags override it")
    add_flags(p, FinetuneConfig, FLAGS)
    p.add_argument("--backbone-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="backbone option, repeatable, e.g. --backbone-opt variant=mmaction2 (i3d_r50)")
    p.add_argument("--resume", action="store_true", help="continue RUN from checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """--config preset (or the resumed run's own settings) < explicit flags."""
    data = starting_point(FinetuneConfig, "finetune", args.out, args.resume, args.config)
    apply_flags(args, FinetuneConfig, FLAGS, data)
    if args.backbone_opt:
        extra = parse_key_values(args.backbone_opt, "--backbone-opt")
        data["backbone_options"] = {**(data.get("backbone_options") or {}), **extra}
    data.update(source=args.source, out=args.out, resume=bool(args.resume),
                progress=not args.no_progress and data.get("progress", True))
    return from_dict(FinetuneConfig, data)


def run(args: argparse.Namespace) -> int:
    result = finetune(config_from_args(args))
    if args.json and os.environ.get("RANK", "0") == "0":
        print(to_json({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0
