"""`catnet train STORE --out RUN`: a video-level head on a feature store (catnet.engine.train).

    catnet train STORE --out RUN [--config configs/kinetics400.yaml] [--head catnet] [--head-opt k=v ...]
    torchrun --nproc_per_node=2 -m catnet train STORE --out RUN        # data parallel (gloo/NCCL)
"""

from __future__ import annotations

import argparse
import os

from catnet.config import Flag, add_flags, apply_flags, from_dict, parse_key_values
from catnet.engine.loop import starting_point
from catnet.engine.train import TrainConfig, train
from catnet.errors import CatnetError
from catnet.heads import load_head_preset
from catnet.utils.io import to_json

# Each flag is optional and, when given, overrides the preset.
FLAGS = {
    "--head": Flag("head", "catnet (default), local, avgpool, attention_clusters, netvlad, lstm, or linear "
                   "(the reference: a linear classifier on the mean clip feature)"),
    "--epochs": Flag("epochs", "training epochs (default: max(90, enough for --min-steps steps))"),
    "--min-steps": Flag("min_steps", "without --epochs: train at least this many steps (default 1000)"),
    "--batch-size": Flag("batch_size", "videos per step over all processes (default 64, as the paper)"),
    "--optimizer": Flag("optimizer", "sgd (default) or adamw (then give its own --lr and --weight-decay)"),
    "--lr": Flag("lr", "peak learning rate (default 0.1; the paper: 0.01)"),
    "--momentum": Flag("momentum", "SGD momentum (default 0.9)"),
    "--nesterov": Flag("nesterov", "Nesterov momentum (default: on)"),
    "--weight-decay": Flag("weight_decay", "weight decay (default 5e-3)"),
    "--schedule": Flag("schedule", "cosine (default: per step, after a warmup) or step (the paper's: "
                       "x --lr-gamma every --lr-step epochs)"),
    "--warmup-epochs": Flag("warmup_epochs", "linear warmup length in epochs (default: --warmup-fraction)"),
    "--warmup-fraction": Flag("warmup_fraction", "linear warmup as a share of all steps (default 0.05)"),
    "--lr-step": Flag("lr_step", "with --schedule step: x --lr-gamma every this many epochs (paper: 30)"),
    "--lr-gamma": Flag("lr_gamma", "with --schedule step: the decay factor (paper: 0.1)"),
    "--label-smoothing": Flag("label_smoothing", "label smoothing of the cross-entropy (default 0)"),
    "--class-weights": Flag("class_weights", "balanced: weight the loss by inverse class frequency"),
    "--sampler": Flag("sampler", "balanced: draw every class equally often (with replacement)"),
    "--early-stop": Flag("early_stop", "stop after this many epochs without a better validation top-1 "
                         "(default 0: off)"),
    "--standardize": Flag("standardize", "standardise clip features by the training videos' mean/std, "
                          "stored in the run (default: on)"),
    "--dropout": Flag("dropout", "dropout before the classifier (default: the head's, 0.5; none for "
                      "avgpool / linear)"),
    "--train-views": Flag("train_views", "random clip views per video while training (default 10)"),
    "--train-split": Flag("train_split", "store split to train on (default train)"),
    "--val-split": Flag("val_split", "split that selects the checkpoint (default: val, else a held-out "
                        "part of train; 'test' only if you mean it; 'none': skip)"),
    "--holdout-fraction": Flag("holdout_fraction", "share of each class's training groups held out when "
                               "there is no val split, rounded down (default 0.1: classes of fewer "
                               "than 10 groups hold out none)"),
    "--eval-every": Flag("eval_every", "validate every this many epochs and after the last (default: "
                         "about 30 times per run)"),
    "--eval-batch-size": Flag("eval_batch_size", "videos per validation batch (all views)"),
    "--seed": Flag("seed", "seed for init, data order, view subsets and dropout"),
    "--num-workers": Flag("num_workers", "DataLoader worker processes (default 0)"),
    "--device": Flag("device", "auto, cpu or cuda"),
    "--amp": Flag("amp", "autocast the head: bf16 (CPU with AVX512-BF16, GPU) or fp16 (GPU); default fp32"),
    "--init-from": Flag("init_from", "RUN folder: copy its head except the classifier (transfer)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="feature store written by `catnet extract`")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create (or resume)")
    p.add_argument("--config", metavar="YAML", help="preset, e.g. configs/ucf101.yaml; flags override it")
    p.add_argument("--head-preset", metavar="YAML", help="head preset, e.g. configs/heads/catnet_sum.yaml")
    p.add_argument("--head-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="head option, repeatable: --head-opt num_heads=4 --head-opt aggregation=sum")
    add_flags(p, TrainConfig, FLAGS)
    p.add_argument("--resume", action="store_true", help="continue RUN from checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config preset (or the resumed run's own config) < --head-preset < explicit flags < --head-opt."""
    data = starting_point(TrainConfig, "train", args.out, args.resume, args.config)
    if args.head_preset:
        name, options = load_head_preset(args.head_preset)
        data.update(head=name, head_options=options)
        if "dropout" in options:  # the head preset's dropout beats the --config's training-level one
            data.pop("dropout", None)
    if args.head is not None and args.head != data.get("head"):
        data["head_options"] = {}  # a preset's options belong to the preset's head
    apply_flags(args, TrainConfig, FLAGS, data)
    if args.head_opt:
        preset = data.get("head_options") or {}
        if not isinstance(preset, dict):
            raise CatnetError(f"config key 'head_options' must be a mapping, got {preset!r}")
        data["head_options"] = {**preset, **parse_key_values(args.head_opt, "--head-opt")}
        if "dropout" in data["head_options"]:  # --head-opt dropout= is the last word, over --dropout
            data.pop("dropout", None)
    data.update(store=args.store, out=args.out, resume=bool(args.resume),
                progress=not args.no_progress and data.get("progress", True))
    return from_dict(TrainConfig, data)


def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    if args.json and os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(to_json({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0
