"""`catnet demo`: the whole pipeline on the embedded synthetic dataset (catnet.experiments.demo)."""

from __future__ import annotations

import argparse

from catnet.config import load_yaml
from catnet.errors import CatnetError
from catnet.experiments.demo import DemoConfig, demo_config, run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help=f"working folder, cached between runs (default {DemoConfig.out})")
    p.add_argument("--config", default=None, help="YAML with DemoConfig keys (e.g. configs/demo.yaml)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long smoke run: 3 classes, random-weight backbone, 1 seed")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per variant (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every run")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    if args.seeds is not None and not 1 <= args.seeds <= 100:  # each seed trains every variant again
        raise CatnetError(f"--seeds must be between 1 and 100, got {args.seeds}")
    return demo_config(args.tiny, load_yaml(args.config) if args.config else None, out=args.out,
                       seeds=None if args.seeds is None else list(range(args.seeds)),
                       train=None if args.epochs is None else {"epochs": args.epochs})


def run(args: argparse.Namespace) -> int:
    run_demo(config_from_args(args), progress=not args.no_progress)
    return 0
