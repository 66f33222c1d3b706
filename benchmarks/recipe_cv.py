"""The recipe measured by cross-validation inside TRAIN, where TEST is never read (issue 15).

    python benchmarks/recipe_cv.py --dataset pickup --seeds 3 --sweep  # results/recipe_cv_pickup.json
    python benchmarks/recipe_cv.py --dataset basicmotions --seeds 3 --sweep
    python benchmarks/recipe_cv.py --honest-pick  # a table from the recorded results, nothing trained

Questions about the sensor sequences, on which the default recipe measured on TEST stayed below the
best catnet 0.2 setting of benchmarks/recipe.py's sweep (docs/training.md):
- What does an automatic hold-out cost on a tiny store? A store without a `val` split validates on a
  held-out part of its training videos. catnet 0.3 held out at least one group per class, which on
  PickupGestureWiimoteZ (five training sequences per class) is a fifth of them; today's rule holds out
  ⌊10 % of a class's groups⌋, none there (catnet/engine/splits.py).
- Does the recipe reach the best *validation* top-1 of catnet 0.2's sweep (lr x schedule, recipe.py's
  SWEEP), with cross-validation inside TRAIN as the validation? (`--sweep`; the sweep's best is picked on
  the same folds that measure it, an oracle on them.) And would a choice made without TEST have preferred
  the old setting picked on TEST? Its lr and schedule are read from recipe.py's results (`--sweep-from`).

k-fold cross-validation inside TRAIN (catnet.engine.splits.group_kfold): each fold is measured by runs
trained on the other folds, through the library's `train()`, last checkpoint: the default recipe with
catnet 0.3's hold-out rule, the default recipe as it is today, and catnet 0.2's defaults at the old best
setting and, with --sweep, at every setting of the sweep (on the same videos as today's default). The
features are those of recipe.py's store (z-scored by load_sequences with TRAIN's statistics: label-free,
but a fold's own sequences count in them; catnet 0.2 does not standardise, so without this it would see
raw sensor values). The TEST numbers of recipe.py are printed beside.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from recipe import DATASETS as RECIPE_DATASETS
from recipe import SWEEP, old_setting, pct, run_head, slug

from catnet.data.sequences import load_sequences
from catnet.engine.splits import group_kfold
from catnet.experiments.variants import table1_variants, variant_label
from catnet.features.store import FeatureStore
from catnet.utils.io import atomic_write_json
from catnet.utils.memory import hold_freed_memory

REPO = Path(__file__).resolve().parents[1]
DATASETS = {name: seq for name, (_, seq) in RECIPE_DATASETS.items() if seq}  # the sequence sets
# variant -> TrainConfig overrides: catnet 0.3's hold-out (at least one group per class), and today's
# default, which on folds of fewer than 10 sequences per class holds out none (catnet.engine.splits)
RECIPE = {"holdout": {"holdout_rule": "at_least_one"}, "default": {}}


def fold_stores(name: str, work: Path, k: int) -> list[Path]:
    """One store per fold of TRAIN: the fold is its `test` split, the other folds its `train` split."""
    train_part, _ = load_sequences(DATASETS[name])
    ids = [f"{name}_train_{i:04d}" for i in range(len(train_part.y))]
    folds = group_kfold(train_part.y, k, ids)
    stores = []
    for f, fold in enumerate(folds):
        path = work / "stores" / f"{name}_fold{f}"
        if not (path / "manifest.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            inside = set(fold)
            FeatureStore.write_synthetic(
                path, list(train_part.x), train_part.y.tolist(), train_part.classes, ids=ids,
                splits=["test" if i in inside else "train" for i in range(len(ids))],
                times=list(train_part.times), backbone=f"sequences:{DATASETS[name]}")
        stores.append(path)
    return stores


def cv_top1(stores: list[Path], folder: Path, head: str, options: dict, seeds: int, overrides: dict) -> dict:
    """Top-1 over all folds (every TRAIN sequence measured once), per seed; mean ± std over seeds."""
    accs, losses = [], []
    for seed in range(seeds):
        runs = [run_head(s, folder / f"fold{f}_seed{seed}", head, options, seed, "test", overrides)
                for f, s in enumerate(stores)]  # each fold store's "test" split is the fold
        accs.append(sum(round(r["top1"] * r["n"]) for r in runs) / sum(r["n"] for r in runs))
        losses.append(float(np.mean([r["train_loss"] for r in runs])))
    return {"top1": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "train_loss": float(np.mean(losses))}


def old_cv(stores: list[Path], folder: Path, head: str, options: dict, seeds: int, point: dict) -> dict:
    """catnet 0.2's defaults at one (lr, schedule), cross-validated like the recipe."""
    old_options, overrides = old_setting(options, point)
    return {**point, **cv_top1(stores, folder / f"old_lr{point['lr']:g}_{point['schedule']}", head,
                               old_options, seeds, overrides)}


def honest_pick(recipe: dict, cv: dict[str, dict]) -> list[dict]:
    """The sweep a user would run without TEST: catnet 0.2's setting with the best CV mean (inside
    TRAIN), measured on TEST (recipe.py's runs of that setting, same seeds), beside the recipe on TEST."""
    rows = []
    for name, result in cv.items():
        tested = recipe["datasets"][name]["heads"]
        for label, entry in result["heads"].items():
            pick = entry.get("sweep_best")
            if pick is None:
                continue
            setting = next(s for s in tested[label]["old_sweep"]["settings"]
                           if (s["lr"], s["schedule"]) == (pick["lr"], pick["schedule"]))
            rows.append({"dataset": name, "head": label, "lr": pick["lr"], "schedule": pick["schedule"],
                         "cv_recipe": entry["default"], "cv_pick": pick,
                         "test_recipe": tested[label]["top1"], "test_pick": setting["top1"],
                         "difference": tested[label]["top1"]["mean"] - setting["top1"]["mean"]})
    return rows


def print_honest_pick(rows: list[dict]) -> None:
    print("| dataset | head | CV: recipe | CV: catnet 0.2's best on CV (lr, schedule) | TEST: recipe | "
          "TEST: catnet 0.2 at CV's pick | recipe − pick (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['head']} | {pct(r['cv_recipe'])} | {pct(r['cv_pick'])} ({r['lr']:g}, "
              f"{r['schedule']}) | {pct(r['test_recipe'])} | {pct(r['test_pick'])} | "
              f"{100 * r['difference']:+.1f} |")
    diffs = [round(100 * r["difference"], 1) for r in rows]
    above, level, below = (sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs))
    print(f"\nrecipe above the pick for {above}, level for {level}, below for {below} of {len(diffs)}; "
          f"mean difference {np.mean(diffs):+.1f} points")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pickup", choices=list(DATASETS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--heads", nargs="+", default=None, help="variant labels (default: Table 1 + AC)")
    p.add_argument("--sweep", action="store_true",
                   help="also cross-validate catnet 0.2's whole lr x schedule sweep, its best picked on CV")
    p.add_argument("--sweep-from", type=Path, default=REPO / "benchmarks" / "results" / "recipe.json",
                   help="recipe.py's results: the old best settings and the TEST numbers")
    p.add_argument("--work", type=Path, default=Path("/tmp/catnet-recipe-cv"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--honest-pick", action="store_true",
                   help="print, from the recorded results (--sweep-from and results/recipe_cv_*.json), the "
                        "old setting picked on CV and measured on TEST beside the recipe; train nothing")
    args = p.parse_args(argv)
    if args.honest_pick:
        cv = {name: json.loads(path.read_text()) for name in DATASETS
              if (path := REPO / "benchmarks" / "results" / f"recipe_cv_{name}.json").is_file()}
        rows = honest_pick(json.loads(args.sweep_from.read_text()), cv)
        print_honest_pick(rows)
        atomic_write_json(args.out or REPO / "benchmarks" / "results" / "recipe_honest_pick.json",
                          {"sweep_from": str(args.sweep_from), "rows": rows})
        return 0
    torch.set_num_threads(args.threads)
    hold_freed_memory()  # as `catnet train` does (catnet/utils/memory.py)
    out_path = args.out or REPO / "benchmarks" / "results" / f"recipe_cv_{args.dataset}.json"
    tested = json.loads(args.sweep_from.read_text())["datasets"][args.dataset]["heads"]
    stores = fold_stores(args.dataset, args.work, args.folds)
    result = {"dataset": args.dataset, "folds": args.folds, "seeds": args.seeds,
              "sweep_from": str(args.sweep_from),
              "machine": {"threads": args.threads, "torch": torch.__version__}, "heads": {}}
    print(f"{args.dataset}: {args.folds}-fold CV inside TRAIN (top-1 over all TRAIN sequences, mean ± std "
          f"over {args.seeds} seeds, last checkpoint) beside recipe.py's TEST numbers\n")
    print("| head | CV: recipe with catnet 0.3's hold-out | CV: recipe (today's default) | CV: catnet 0.2 "
          "sweep, best on CV (lr, schedule) | CV: catnet 0.2 at TEST's best (lr, schedule) | TEST: recipe | "
          "TEST: catnet 0.2 at TEST's best |")
    print("|---|---|---|---|---|---|---|")
    for head, options in table1_variants(clusters=True):
        label = variant_label(head, options)
        if args.heads and label not in args.heads and head not in args.heads:
            continue
        old = tested[label]["old_sweep"]["best_mean"]
        folder = args.work / "runs" / slug(label)
        entry = {variant: cv_top1(stores, folder / variant, head, options, args.seeds, overrides)
                 for variant, overrides in RECIPE.items()}
        best = None
        if args.sweep:
            entry["sweep"] = [old_cv(stores, folder, head, options, args.seeds, point) for point in SWEEP]
            best = entry["sweep_best"] = max(entry["sweep"], key=lambda r: r["mean"])
        point = {"lr": old["lr"], "schedule": old["schedule"]}  # one of SWEEP's: not measured twice
        entry["old_best"] = next((r for r in entry.get("sweep", []) if {k: r[k] for k in point} == point),
                                 None) or old_cv(stores, folder, head, options, args.seeds, point)
        entry["test"] = {"recipe": tested[label]["top1"], "old_best": old["top1"]}
        result["heads"][label] = entry
        atomic_write_json(out_path, result)
        swept = "-" if best is None else f"{pct(best)} ({best['lr']:g}, {best['schedule']})"
        print(f"| {label} | {pct(entry['holdout'])} | {pct(entry['default'])} | {swept} | "
              f"{pct(entry['old_best'])} ({old['lr']:g}, {old['schedule']}) | "
              f"{pct(entry['test']['recipe'])} | {pct(entry['test']['old_best'])} |", flush=True)
    print(json.dumps({"out": str(out_path)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
