"""The default recipe against a strong simple reference, on real data (issue 15): `catnet train STORE`
with no flags, for every Table-1 head and Attention Clusters, over several seeds.

    python benchmarks/recipe.py --datasets basicmotions pickup --seeds 10 --sweep --sweep-seeds 10
    python benchmarks/recipe.py --datasets ucf6 --seeds 3 --sweep --sweep-seeds 3   # (as in recipe.json)
    python benchmarks/recipe.py --datasets pickup --heads avgpool catnet --seeds 1    # a quick look

Datasets (stores are built once under --work, or reused from --reuse):
- ucf6: real UCF101 clips of ../shared/data/ucf6 (train/val by group), Inception-I3D features from
  `catnet extract videos.csv --clips 10 --frames 16 --crops 1 --crop-size 112 --short-side 128`. The
  val split selects the best checkpoint (the library's default); the numbers are the LAST checkpoint
  measured on val, so nothing was chosen on the videos measured.
- basicmotions, pickup: real sensor sequences (catnet.features.sequences.write_sequence_store), TRAIN /
  TEST. No val split, so the library holds out a tenth of each class's training sequences, rounded
  down: one of BasicMotions' 10 per class, none of Pickup's 5 (it trains on all of TRAIN, without
  validation); the numbers are the LAST checkpoint measured on TEST.

Every head runs through the library's `train()` (the code path of `catnet train`) with the default
TrainConfig; only store, out, head and seed are set. Beside them: `--head linear` (the same recipe, a
linear classifier on the mean clip feature) and the reference proper, a multinomial logistic regression
on the standardised mean clip feature fitted with L-BFGS (float64), its L2 strength chosen by
group-aware 3-fold cross-validation inside the training split (catnet.engine.splits.group_kfold) and
refitted on the whole training split. `--sweep` adds, per head, catnet 0.2's defaults (90 epochs,
wd 1e-4, no standardisation, no logit scale, dropout 0.5) over lr {0.01, 0.1, 1} x {step, cosine} for
--sweep-seeds seeds; two bests, both picked on the measured split (oracles): the best seed-0 run, and
the setting with the best mean over the seeds (like for like with the recipe's mean); and the setting a
user sweeping honestly would keep, the best mean validation top-1 of the last checkpoints (ties: lower
validation loss), measured like the rest (on ucf6 the validation split is the measured one, so there it
is an oracle too). Writes --out
(JSON: every run, and mean ± std per head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from catnet.data.annotations import name_group
from catnet.engine.evaluate import evaluate_run
from catnet.engine.runs import read_history, read_run_info
from catnet.engine.splits import group_kfold, store_groups
from catnet.engine.train import TrainConfig, train
from catnet.experiments.variants import table1_variants, variant_label
from catnet.features.sequences import write_sequence_store
from catnet.features.store import FeatureStore
from catnet.utils.io import atomic_write_json
from catnet.utils.memory import hold_freed_memory

REPO = Path(__file__).resolve().parents[1]
UCF6 = REPO.parent / "shared" / "data" / "ucf6" / "videos.csv"
# dataset -> (split the numbers are measured on, sequence dataset name or None for video)
DATASETS = {"ucf6": ("val", None), "basicmotions": ("test", "BasicMotions"),
            "pickup": ("test", "PickupGestureWiimoteZ")}
RESEARCH = {"ucf6": "ucf6_store", "basicmotions": "basicmotions_store", "pickup": "pickup_store"}
LAMBDAS = [10.0 ** (e / 2) for e in range(-10, 1)]  # 1e-5 ... 1, half decades


def build_store(name: str, work: Path, reuse: Path | None) -> Path:
    """The dataset's store: reused from --reuse when there, else built under --work."""
    if reuse is not None and (reuse / RESEARCH[name] / "manifest.json").is_file():
        return reuse / RESEARCH[name]
    store = work / "stores" / name
    if (store / "manifest.json").is_file():
        return store
    seq = DATASETS[name][1]
    if seq is not None:
        write_sequence_store(seq, store)
        return store
    if not UCF6.is_file():
        raise SystemExit(f"{UCF6} not found: ucf6 needs ../shared")
    cmd = [sys.executable, "-m", "catnet", "extract", str(UCF6), "--out", str(store), "--clips", "10",
           "--frames", "16", "--crops", "1", "--crop-size", "112", "--short-side", "128", "--no-progress"]
    subprocess.run(cmd, check=True)
    return store


# catnet 0.2's defaults (the paper's recipe, no standardisation, no logit scale): the "today" sweep of
# issue 15 runs these with lr x schedule from SWEEP.
OLD_DEFAULTS = {"epochs": 90, "weight_decay": 1e-4, "nesterov": False, "warmup_fraction": 0.0,
                "standardize": False}
SWEEP = [{"lr": lr, "schedule": sched} for lr in (0.01, 0.1, 1.0) for sched in ("step", "cosine")]


def old_setting(options: dict, point: dict) -> tuple[dict, dict]:
    """(head options, TrainConfig overrides) of catnet 0.2's defaults at one SWEEP `point`: every head,
    avgpool too, had dropout 0.5 then."""
    return {"dropout": 0.5, **options, "logit_scale": 1.0}, {**OLD_DEFAULTS, **point}


def run_head(store: Path, run_dir: Path, head: str, options: dict, seed: int, measure: str,
             overrides: dict | None = None) -> dict:
    """`catnet train STORE --head H [--head-opt ...] --seed S` with everything else the default (or
    `overrides`); a run finished by an earlier invocation is evaluated again, not retrained."""
    t0 = time.time()
    if not ((run_dir / "run.json").is_file() and "result" in read_run_info(run_dir)):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        with open(run_dir / "train.log", "w") as log, contextlib.redirect_stderr(log):  # epoch lines
            train(TrainConfig(store=str(store), out=str(run_dir), head=head, head_options=dict(options),
                              seed=seed, progress=False, device="cpu", **(overrides or {})))
    info, hist = read_run_info(run_dir), read_history(run_dir)
    vals = [h["val_top1"] for h in hist if "val_top1" in h]
    last = evaluate_run(run_dir, store, measure, which="last", save=False)
    return {"top1": last["top1"], "top5": last["top5"], "loss": last["loss"], "n": last["n"],
            "selected_on_measured_split": last["selected_on_measured_split"],
            "train_loss": hist[-1]["train_loss"], "epochs": info["schedule"]["epochs"],
            "steps": info["schedule"]["total_steps"], "validation": info["splits"]["val"],
            "best_val_top1": max(vals) if vals else None, "val_top1": hist[-1].get("val_top1"),
            "val_loss": hist[-1].get("val_loss"), "seconds": round(time.time() - t0, 1)}


def mean_features(store: FeatureStore, indices: list[int]) -> np.ndarray:
    return np.stack([store[i].features.astype(np.float64).mean(0) for i in indices])


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float) -> torch.nn.Linear:
    """argmin mean CE(Wx + b, y) + lam/2 ||W||^2 (float64, full batch, L-BFGS)."""
    model = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + lam / 2 * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = np.maximum(std, max(1e-3 * std.mean(), 1e-6))
    return [torch.from_numpy((a - mean) / std) for a in (train, *others)]


def linear_reference(store_path: Path, measure: str) -> dict:
    """Logistic regression on the mean clip feature; lambda by group-aware 3-fold CV inside train (the
    lowest pooled CV log-loss; ties to the larger lambda), refitted on all of train."""
    store = FeatureStore(store_path)
    train_idx, eval_idx = store.split("train"), store.split(measure)
    labels, ids = store.labels, store.ids
    # stores written before groups were recorded: the UCF101 name rule on the id
    groups = [g or name_group(Path(i).name) or "" for g, i in zip(store_groups(store), ids, strict=True)]
    y_tr = torch.from_numpy(labels[train_idx].astype(np.int64))
    folds = group_kfold(labels[train_idx], 3, [ids[i] for i in train_idx], [groups[i] for i in train_idx])
    raw_tr = mean_features(store, train_idx)
    c = len(store.classes)
    cv = []
    for lam in LAMBDAS:
        losses, hits = [], 0
        for fold in folds:
            rest = [j for j in range(len(train_idx)) if j not in set(fold)]
            xa, xb = standardise(raw_tr[rest], raw_tr[fold])
            logits = fit_logreg(xa, y_tr[rest], c, lam)(xb).detach()
            losses.append(torch.nn.functional.cross_entropy(logits, y_tr[fold], reduction="sum").item())
            hits += int((logits.argmax(1) == y_tr[fold]).sum())
        cv.append({"lam": lam, "cv_loss": sum(losses) / len(train_idx), "cv_top1": hits / len(train_idx)})
    best = min(cv, key=lambda r: (round(r["cv_loss"], 6), -r["lam"]))
    x_tr, x_ev = standardise(raw_tr, mean_features(store, eval_idx))
    model = fit_logreg(x_tr, y_tr, c, best["lam"])
    y_ev = torch.from_numpy(labels[eval_idx].astype(np.int64))
    with torch.no_grad():
        logits, train_logits = model(x_ev), model(x_tr)
    top5 = logits.topk(min(5, c), 1).indices.eq(y_ev[:, None]).any(1).double().mean().item()
    return {"top1": (logits.argmax(1) == y_ev).double().mean().item(), "top5": top5,
            "loss": torch.nn.functional.cross_entropy(logits, y_ev).item(), "n": len(eval_idx),
            "train_loss": torch.nn.functional.cross_entropy(train_logits, y_tr).item(), "lam": best["lam"],
            "cv": cv}


def summarise(runs: list[dict]) -> dict:
    out = {"seeds": len(runs)}
    for k in ("top1", "top5", "train_loss", "best_val_top1", "val_top1", "val_loss"):
        v = [r[k] for r in runs if r.get(k) is not None]
        if v:
            out[k] = {"mean": float(np.mean(v)), "std": float(np.std(v))}
    return out


def slug(label: str) -> str:
    """'local w/o FC-Norm' -> 'local_wo_FC-Norm': one folder name."""
    return label.replace(" ", "_").replace("/", "")


def old_sweep(store: Path, work: Path, name: str, head: str, options: dict, measure: str,
              seeds: int = 1) -> dict:
    """catnet 0.2's defaults for every lr x schedule of SWEEP, seeds 0..seeds-1. Two bests, both picked
    on the measured split itself (oracles, optimistic by construction): `best`, the single best seed-0
    run, and `best_mean`, the setting with the best mean over the seeds, the like-for-like comparison
    with the recipe's mean; and `chosen_on_val`, the setting with the best mean validation top-1."""
    label = slug(variant_label(head, options))
    rows, settings = [], []
    for point in SWEEP:
        base = work / "sweep" / name / label / f"lr{point['lr']:g}_{point['schedule']}"
        runs = []
        for seed in range(seeds):  # seed 0 keeps the folder of the earlier one-seed sweeps
            run_dir = base if seed == 0 else base.with_name(f"{base.name}_seed{seed}")
            old_options, overrides = old_setting(options, point)
            runs.append(run_head(store, run_dir, head, old_options, seed, measure, overrides))
        rows.append({**point, **runs[0]})
        settings.append({**point, **summarise(runs), "runs": runs[1:]})
    best = max(rows, key=lambda r: r["top1"])
    out = {"runs": rows, "best": {k: best[k] for k in ("lr", "schedule", "top1", "top5", "train_loss")}}
    if seeds > 1:
        out["settings"] = settings
        top = max(settings, key=lambda r: r["top1"]["mean"])
        out["best_mean"] = {k: top[k] for k in ("lr", "schedule", "seeds", "top1", "train_loss")}
        if all("val_top1" in r for r in settings):  # what a user sweeping honestly would have picked
            top = max(settings, key=lambda r: (r["val_top1"]["mean"], -r["val_loss"]["mean"]))
            out["chosen_on_val"] = {k: top[k] for k in ("lr", "schedule", "seeds", "top1", "val_top1",
                                                         "train_loss")}
    return out


def heads(chosen: list[str] | None) -> list[tuple[str, dict]]:
    rows = [*table1_variants(clusters=True), ("linear", {})]
    return [(n, o) for n, o in rows if chosen is None or n in chosen or variant_label(n, o) in chosen]


def pct(stat: dict | None) -> str:
    return "-" if not stat else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def print_tables(out: dict) -> None:
    """docs/training.md's tables from the JSON: per dataset, every head beside the linear reference."""
    for name, entry in out["datasets"].items():
        ref = entry["reference"]
        print(f"\n{name}: measured on {entry['measured_on']} ({ref['n']} videos), {entry['classes']} "
              f"classes, ½ ln C = {entry['half_ln_c']:.3f}\n")
        val = "val = measured split" if entry["measured_on"] == "val" else "hold-out"
        print("| head | recipe top-1 | top-5 | final train loss | catnet 0.2 sweep: best seed-0 top-1 (lr, "
              f"schedule) | best mean over seeds (lr, schedule) | chosen on validation ({val}) |")
        print("|---|---|---|---|---|---|---|")
        for label, h in entry["heads"].items():
            sweep = h.get("old_sweep", {}).get("best")
            cell = "-" if not sweep else f"{100 * sweep['top1']:.1f} ({sweep['lr']:g}, {sweep['schedule']})"
            mean = h.get("old_sweep", {}).get("best_mean")
            mean = "-" if not mean else f"{pct(mean['top1'])} ({mean['lr']:g}, {mean['schedule']})"
            chosen = h.get("old_sweep", {}).get("chosen_on_val")
            chosen = "-" if not chosen else f"{pct(chosen['top1'])} ({chosen['lr']:g}, {chosen['schedule']})"
            loss = h.get("train_loss")
            loss = "-" if not loss else f"{loss['mean']:.3f}"
            print(f"| {label} | {pct(h.get('top1'))} | {pct(h.get('top5'))} | {loss} | {cell} | {mean} | "
                  f"{chosen} |")
        print(f"| linear reference (λ = {ref['lam']:.1e}) | {100 * ref['top1']:.1f} | "
              f"{100 * ref['top5']:.1f} | {ref['train_loss']:.3f} | | | |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--heads", nargs="+", default=None, help="head names (default: Table 1 + AC + linear)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/catnet-recipe-bench"))
    p.add_argument("--reuse", type=Path, default=None, help="folder with already built stores")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweep", action="store_true",
                   help="also run catnet 0.2's defaults over lr x schedule for each head")
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds per --sweep setting (0..N-1)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipe.json")
    p.add_argument("--table", action="store_true", help="only print the tables of --out")
    args = p.parse_args(argv)
    if args.table:
        print_tables(json.loads(args.out.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    hold_freed_memory()  # as `catnet train` does: faster, the same numbers (catnet/utils/memory.py)
    out = {"machine": {"threads": args.threads, "torch": torch.__version__}, "datasets": {}}
    if args.out.is_file():  # keep earlier datasets when running a subset
        out["datasets"] = json.loads(args.out.read_text()).get("datasets", {})
    for name in args.datasets:
        measure = DATASETS[name][0]
        store = build_store(name, args.work, args.reuse)
        fs = FeatureStore(store)
        entry = out["datasets"].get(name, {"heads": {}})
        entry.update(store=str(store), measured_on=measure, classes=len(fs.classes),
                     half_ln_c=math.log(len(fs.classes)) / 2)
        entry["reference"] = linear_reference(store, measure)
        print(f"{name}: linear reference top-1 {100 * entry['reference']['top1']:.1f}", file=sys.stderr)
        for head, options in heads(args.heads):
            label = variant_label(head, options)
            folder = args.work / "runs" / name / slug(label)
            runs = [run_head(store, folder / f"seed{s}", head,
                             options, s, measure) for s in range(args.seeds)]
            entry["heads"][label] = {"runs": runs, **summarise(runs)}
            if args.sweep and head != "linear":
                entry["heads"][label]["old_sweep"] = old_sweep(store, args.work, name, head, options, measure,
                                                             args.sweep_seeds)
            t = entry["heads"][label]["top1"]
            print(f"{name}: {label}: top-1 {100 * t['mean']:.1f} ± {100 * t['std']:.1f}", file=sys.stderr)
            out["datasets"][name] = entry
            atomic_write_json(args.out, out)
    atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
