"""Table-1 heads on real sequences (BasicMotions, PickupGestureWiimoteZ) over several seeds.

    python benchmarks/sequences.py --seeds 5 --out benchmarks/results/sequences

Each dataset's official TRAIN/TEST split is windowed into K "clips" (catnet.data.sequences), written as a
feature store, and every Table-1 variant is trained on it with `catnet.engine.train.train` - the same code
path as on video features - once per seed, with catnet 0.2's recipe pinned (see run_variant). The seed
changes initialisation, data order and dropout, never the split. Accuracy is the LAST epoch's test top-1
(no model selection on test: training runs with `val_split="none"`). Writes OUT/results.json (every run)
and OUT/table.md (mean ± std per variant).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from recipe import old_setting

from catnet.data.sequences import DATASETS, WindowConfig
from catnet.engine.evaluate import evaluate
from catnet.engine.runs import load_run
from catnet.engine.train import TrainConfig, train
from catnet.experiments.variants import table1_variants, variant_label
from catnet.features.sequences import write_sequence_store
from catnet.utils.io import atomic_write_json, atomic_write_text


def run_variant(store: Path, run_dir: Path, head: str, options: dict, seed: int, args) -> dict:
    """One run with catnet 0.2's recipe (recipe.old_setting: step schedule, wd 1e-4, no standardisation,
    no logit scale, dropout 0.5) at this script's lr, epochs and batch, pinned so that later library
    defaults do not change these numbers; today's recipe on the same data is recipe.py's."""
    head_options, recipe = old_setting(options, {"lr": args.lr, "schedule": "step"})
    cfg = TrainConfig(store=str(store), out=str(run_dir), head=head, head_options=head_options,
                      **{**recipe, "epochs": args.epochs}, batch_size=args.batch_size, lr_step=args.lr_step,
                      train_views=args.num_clips, val_split="none", seed=seed, progress=False,
                      device="cpu")
    t0 = time.time()
    train(cfg)
    model, _ = load_run(run_dir, which="last")
    result = evaluate(model, store, "test")
    return {"top1": result["top1"], "mean_class_acc": result["mean_class_acc"], "n": result["n"],
            "train_s": round(time.time() - t0, 2)}


def format_table(results: list[dict], seeds: int) -> str:
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name]
        lines += [f"### {name} ({rows[0]['n']} test sequences)", "",
                  f"| variant | top-1 (mean ± std over {seeds} seeds) | per seed |", "|---|---|---|"]
        for label in dict.fromkeys(r["variant"] for r in rows):
            accs = np.array([r["top1"] for r in rows if r["variant"] == label]) * 100
            per_seed = " ".join(f"{a:.0f}" for a in accs)
            lines.append(f"| {label} | {accs.mean():.1f} ± {accs.std():.1f} | {per_seed} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-step", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-clips", type=int, default=10, help="K windows per sequence")
    p.add_argument("--points", type=int, default=10, help="samples per channel and window")
    p.add_argument("--features", default="both", choices=("raw", "stats", "both"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    p.add_argument("--data-dir", help="folder with NAME/NAME_TRAIN.ts (default: the aeon wheel's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sequences"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    window = WindowConfig(num_clips=args.num_clips, points=args.points, features=args.features)

    results = []
    with tempfile.TemporaryDirectory(prefix="catnet-seq-") as tmp:
        for name in args.datasets:
            store = Path(tmp) / name / "store"
            write_sequence_store(name, store, window, data_dir=args.data_dir)
            for head, options in table1_variants():
                label = variant_label(head, options)
                for seed in range(args.seeds):
                    run_dir = Path(tmp) / name / f"{head}-{len(results)}"
                    r = run_variant(store, run_dir, head, options, seed, args)
                    results.append({"dataset": name, "variant": label, "head": head, "options": options,
                                    "seed": seed, **r})
                    print(f"{name:24s} {label:20s} seed {seed}  top-1 {100 * r['top1']:5.1f}%  "
                          f"({r['train_s']:.1f}s)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out / "results.json", {"settings": settings, "runs": results})
    table = format_table(results, args.seeds)
    atomic_write_text(args.out / "table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
