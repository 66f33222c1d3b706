"""`catnet demo`: the whole system on the CPU, from nothing but installed packages and the I3D weights.

    synthetic videos (catnet.data.synth)  ->  Inception-I3D clip features (catnet.features.extract, scaled down)
    ->  Table 1 rows + a reduced Table 2 sweep, several seeds each (catnet.engine.train, in-process)
    ->  top-1/top-5 mean ± std tables  ->  report with Figs. 4-6 and training curves (catnet.experiments.report)

Every stage is cached under --out: the dataset by its config, the store by its extraction settings
(resumable), each run by its folder (finished runs are reused, interrupted ones resumed), so a re-run
only re-evaluates and redraws. The paper's extraction settings stay the defaults of `catnet extract`;
the demo scales them down to fit a 2-core CPU budget and says so in its report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catnet.config import from_dict, load_yaml
from catnet.errors import CatnetError
from catnet.utils.io import atomic_write_json

# The paper's Kinetics numbers, for the tables' reference column (Tables 1 and 2).
PAPER_TABLE1 = {"avgpool": (73.0, 91.0), "attention_clusters": (75.0, 91.9),
                "local w/o FC-Norm": (74.6, 91.5), "local w/ FC-Norm": (75.1, 91.7), "catnet": (75.8, 92.0)}
PAPER_TABLE2 = {(1, "concat"): (74.9, 91.7), (1, "sum"): (75.0, 91.5), (4, "concat"): (75.0, 91.6),
                (4, "sum"): (75.0, 91.7), (8, "concat"): (75.2, 91.7), (8, "sum"): (75.1, 91.6),
                (16, "concat"): (75.1, 91.8), (16, "sum"): (75.1, 91.6), (32, "concat"): (75.8, 92.0),
                (32, "sum"): (75.1, 91.7), (64, "concat"): (75.6, 91.9), (64, "sum"): (75.2, 91.7)}


@dataclass
class DemoConfig:
    """The demo's settings (configs/demo.yaml mirrors these defaults)."""

    out: str = "catnet-demo"
    # dataset (catnet.data.synth)
    classes: int = 10
    videos_per_class: int = 40
    frame_size: int = 128
    min_frames: int = 160
    max_frames: int = 240
    data_seed: int = 0
    # extraction: scaled down from the paper's 10 clips x 32 frames (stride 4) x 3 crops of 224
    backbone: str = "i3d_inception"
    pretrained: bool = True
    num_clips: int = 10
    clip_len: int = 16
    stride: int = 2
    num_crops: int = 1
    short_side: int = 128
    crop_size: int = 112
    extract_batch: int = 8
    workers: int = 1
    # Standardise every clip feature with the training split's per-dimension mean and std before the heads.
    # Raw I3D features share a large positive mean, so FC-Norm's L2 normalisation (Eq. 4) maps every video
    # to nearly the same direction; centring them first lets the normalised heads learn at all.
    standardise: bool = True
    # training (catnet.engine.train): paper recipe, shortened
    epochs: int = 10
    batch_size: int = 16
    # Two learning rates: heads whose classifier sees raw (standardised) features, and heads whose
    # classifier sees L2-normalised vectors (FC-Norm, Attention Clusters' shifting): unit-norm inputs give
    # small logits and need a far larger step. Both picked on a held-out part of the train split.
    lr: float = 0.03
    lr_normalised: float = 1.0
    lr_step: int = 8
    weight_decay: float = 1e-4
    train_views: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    table2_heads: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    report_videos: int = 6


TINY = dict(classes=3, videos_per_class=4, frame_size=48, min_frames=16, max_frames=24, pretrained=False,
            num_clips=3, clip_len=4, stride=1, short_side=40, crop_size=32, extract_batch=8, workers=0,
            epochs=2, batch_size=4, lr=0.05, lr_step=10, train_views=3, seeds=[0], table2_heads=[1],
            report_videos=2)


def variants(cfg: DemoConfig) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(Table 1 rows, Table 2 cells) as (head name, options). CATNet's options are explicit so the
    Table 1 CATNet row and the Table 2 cell with the same N and aggregation share one set of runs."""
    from catnet.heads import CATNetConfig, table1_variants

    full = {"num_heads": CATNetConfig.num_heads, "aggregation": CATNetConfig.aggregation}
    t1 = []
    for name, opts in table1_variants():
        t1.append((name, {**full, **opts} if name == "catnet" else opts))
        if name == "avgpool":  # the paper has Attention Clusters in Table 3; the demo puts it here
            t1.append(("attention_clusters", {}))
    t2 = [("catnet", {"num_heads": n, "aggregation": agg})
          for n in cfg.table2_heads for agg in ("concat", "sum")]
    return t1, t2


def _slug(name: str, opts: dict) -> str:
    parts = [name] + [f"{k}-{v}" for k, v in sorted(opts.items())]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts))


def _label(name: str, opts: dict) -> str:
    from catnet.heads import variant_label

    return "catnet" if name == "catnet" and opts == variants_default() else variant_label(name, opts)


def variants_default() -> dict:
    from catnet.heads import CATNetConfig

    return {"num_heads": CATNetConfig.num_heads, "aggregation": CATNetConfig.aggregation}


# ------------------------------------------------------------------------------------------ stages


def make_dataset(cfg: DemoConfig, out: Path, progress: bool) -> Path:
    from catnet.data.synth import SynthConfig, generate

    scfg = SynthConfig(num_classes=cfg.classes, videos_per_class=cfg.videos_per_class, seed=cfg.data_seed,
                       height=cfg.frame_size, width=cfg.frame_size, min_frames=cfg.min_frames,
                       max_frames=cfg.max_frames)
    return generate(out / "data", scfg, progress=progress)


def extract_config(cfg: DemoConfig):
    from catnet.features.extract import ExtractConfig

    return ExtractConfig(backbone=cfg.backbone, pretrained=cfg.pretrained, num_clips=cfg.num_clips,
                         clip_len=cfg.clip_len, stride=cfg.stride, num_crops=cfg.num_crops,
                         short_side=cfg.short_side, crop_size=cfg.crop_size, batch_size=cfg.extract_batch,
                         workers=cfg.workers, device="cpu", shard_size=32)


def make_store(cfg: DemoConfig, annotations: Path, out: Path, progress: bool) -> Path:
    """Extract (or resume extracting) the clip features; the folder name pins the settings."""
    from catnet.features.extract import extract

    ecfg = extract_config(cfg)
    # only the settings that define the features: new ExtractConfig fields must not orphan the cache
    key = json.dumps({k: getattr(ecfg, k) for k in ("backbone", "pretrained", "checkpoint", "num_clips",
                                                     "clip_len", "stride", "num_crops", "short_side",
                                                     "crop_size", "seed")}, sort_keys=True)
    store = out / f"store-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    result = extract(annotations, store, ecfg, progress=progress)
    if result.failed or result.failed_before:
        raise CatnetError(f"{result.failed + result.failed_before} synthetic videos failed to extract; see "
                          f"{store}/failures")
    return store


def standardise_store(src: Path, split: str = "train") -> Path:
    """A copy of store `src` (beside it, `-std` suffix) with every clip feature standardised by the
    per-dimension mean and std of the `split` videos' clips; reused when already complete."""
    from catnet.features.store import FeatureStore, StoreWriter

    dst = src.with_name(src.name + "-std")
    marker = dst / "standardised.json"
    if marker.is_file():
        return dst
    if dst.exists():  # an interrupted copy: start over, it takes seconds
        shutil.rmtree(dst)
    fs = FeatureStore(src)
    idx = fs.split(split)
    if not idx:
        raise CatnetError(f"store {src} has no {split!r} videos to take feature statistics from")
    x = np.concatenate([fs[i].features for i in idx]).astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std = np.maximum(std, 1e-3 * std.mean())  # dead ReLU channels: no blow-up
    manifest = {**fs.manifest, "standardised": {"split": split, "from": src.name}}
    with StoreWriter(dst, manifest, shard_size=64, journal=False) as w:
        for v in fs:
            w.add(v.id, ((v.features - mean) / std).astype(np.float32), v.times, label=v.label,
                  split=v.split, path=v.path, num_crops=v.num_crops)
    np.savez(dst / "stats.npz", mean=mean, std=std)  # to standardise new videos the same way
    atomic_write_json(marker, {"source": str(src), "split": split, "videos": len(fs)})
    return dst


def head_lr(cfg: DemoConfig, name: str, opts: dict) -> float:
    from catnet.heads import CATNetConfig

    normalised = name == "attention_clusters" or (
        name in ("catnet", "local") and opts.get("fc_norm", CATNetConfig.fc_norm))
    return cfg.lr_normalised if normalised else cfg.lr


def train_config(cfg: DemoConfig, store: Path, run_dir: Path, name: str, opts: dict, seed: int):
    from catnet.engine.train import TrainConfig

    return TrainConfig(store=str(store), out=str(run_dir), head=name, head_options=dict(opts),
                       epochs=cfg.epochs, batch_size=cfg.batch_size, lr=head_lr(cfg, name, opts),
                       lr_step=cfg.lr_step,
                       weight_decay=cfg.weight_decay, train_views=cfg.train_views, seed=seed, device="cpu",
                       progress=False)


def _finished(run_dir: Path, epochs: int) -> bool:
    from catnet.experiments.report import read_history

    hist = read_history(run_dir)
    return (run_dir / "checkpoints" / "last.pt").is_file() and bool(hist) and hist[-1]["epoch"] >= epochs


def _stale(run_dir: Path, tcfg) -> bool:
    """True when a run folder was trained with other settings (a changed demo.yaml): retrain it."""
    from catnet.config import to_dict
    from catnet.engine.train import read_run_info

    if not (run_dir / "run.json").is_file():
        return False
    prev = read_run_info(run_dir).get("train", {})
    keys = ("store", "lr", "batch_size", "lr_step", "weight_decay", "train_views", "head_options")
    new = to_dict(tcfg)
    return any(prev.get(k) != new[k] for k in keys)


def train_all(cfg: DemoConfig, store: Path, out: Path, jobs: list[tuple[str, dict, int]],
              progress: bool) -> dict[tuple[str, int], Path]:
    """Train every (head, options, seed) in-process; finished runs are reused, interrupted ones resumed.
    The trainer's per-epoch lines go to each run's train.log; one progress bar shows the runs."""
    from tqdm import tqdm

    from catnet.engine.train import train

    runs = {}
    bar = tqdm(jobs, desc="train heads", unit="run", disable=not progress, file=sys.stderr)
    for name, opts, seed in bar:
        slug = _slug(name, opts)
        run_dir = out / "runs" / slug / f"seed{seed}"
        runs[(slug, seed)] = run_dir
        bar.set_postfix_str(f"{_label(name, opts)} seed {seed}")
        tcfg = train_config(cfg, store, run_dir, name, opts, seed)
        if _stale(run_dir, tcfg):
            shutil.rmtree(run_dir)
        if _finished(run_dir, cfg.epochs):
            continue
        tcfg.resume = (run_dir / "checkpoints" / "last.pt").is_file()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log, contextlib.redirect_stderr(log), \
                contextlib.redirect_stdout(log):
            train(tcfg)
    return runs


def evaluate_all(runs: dict[tuple[str, int], Path], store: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Test-split metrics of each run's last checkpoint (the test split also served as validation during
    training, so "best" would be chosen on the test set)."""
    from catnet.engine.evaluate import evaluate_run

    out = {}
    for key, run_dir in runs.items():
        r = evaluate_run(run_dir, store, "test", which="last")
        out[key] = {"top1": r["top1"], "top5": r["top5"], "mean_class_acc": r["mean_class_acc"], "n": r["n"]}
    return out


def summarise(results: dict[tuple[str, int], dict], slug: str, seeds: list[int]) -> dict[str, float]:
    rows = [results[(slug, s)] for s in seeds]
    out = {}
    for k in ("top1", "top5", "mean_class_acc"):
        v = np.array([r[k] for r in rows]) * 100
        out[k], out[f"{k}_std"] = float(v.mean()), float(v.std())
    out["seeds"] = len(rows)
    return out


# ------------------------------------------------------------------------------------------ tables


def _pm(s: dict, k: str) -> str:
    return f"{s[k]:.1f} ± {s[k + '_std']:.1f}"


def table_rows(cfg: DemoConfig, results: dict) -> tuple[list[list[str]], list[list[str]]]:
    t1, t2 = variants(cfg)
    rows1 = []
    for name, opts in t1:
        s = summarise(results, _slug(name, opts), cfg.seeds)
        label = _label(name, opts)
        paper = PAPER_TABLE1.get("catnet" if name == "catnet" else label.replace(" (baseline)", ""),
                                 PAPER_TABLE1.get(name))
        rows1.append([label, _pm(s, "top1"), _pm(s, "top5"), _pm(s, "mean_class_acc"),
                      f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "-"])
    rows2 = []
    for n in cfg.table2_heads:
        row = [str(n)]
        for agg in ("concat", "sum"):
            s = summarise(results, _slug("catnet", {"num_heads": n, "aggregation": agg}), cfg.seeds)
            row += [_pm(s, "top1"), _pm(s, "top5")]
        paper = [PAPER_TABLE2.get((n, a)) for a in ("concat", "sum")]
        row.append("; ".join(f"{p[0]:.1f}/{p[1]:.1f}" if p else "-" for p in paper))
        rows2.append(row)
    return rows1, rows2


HEAD1 = ["model", "top-1 (%)", "top-5 (%)", "mean class acc (%)", "paper Kinetics top-1 / top-5"]
HEAD2 = ["N", "concat top-1", "concat top-5", "sum top-1", "sum top-5", "paper concat; sum (top-1/top-5)"]


def print_tables(rows1, rows2, seeds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that rows do not wrap
        console = Console(width=130)
    tables = ((f"Table 1 (synthetic test set, mean ± std over {seeds} seed(s))", HEAD1, rows1),
              (f"Table 2 (CATNet, N heads x aggregation, {seeds} seed(s))", HEAD2, rows2))
    for title, head, rows in tables:
        t = Table(title=title)
        for h in head:
            t.add_column(h, justify="left" if h in ("model", "N") else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ------------------------------------------------------------------------------------------ main


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run every stage (cached) and return the results dict also written to OUT/results.json."""
    from catnet.experiments.report import analyse, attention_on_action, find_segments, read_history, write_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.monotonic()

    def stage(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        print(f"[demo] {name} done in {timings[name]:.1f}s", file=sys.stderr)

    print(f"[demo] 1/5 synthetic dataset: {cfg.classes} classes x {cfg.videos_per_class} videos -> "
          f"{out}/data", file=sys.stderr)
    annotations = make_dataset(cfg, out, progress)
    stage("dataset")
    print(f"[demo] 2/5 features: {cfg.backbone} ({'Kinetics-400' if cfg.pretrained else 'random'} weights), "
          f"{cfg.num_clips} clips x {cfg.clip_len} frames (stride {cfg.stride}) x {cfg.num_crops} crop(s) of "
          f"{cfg.crop_size}px", file=sys.stderr)
    store = make_store(cfg, annotations, out, progress)
    if cfg.standardise:
        store = standardise_store(store)
    stage("features")

    t1, t2 = variants(cfg)
    jobs, seen = [], set()
    for name, opts in t1 + t2:
        for seed in cfg.seeds:
            key = (_slug(name, opts), seed)
            if key not in seen:
                seen.add(key)
                jobs.append((name, opts, seed))
    print(f"[demo] 3/5 training {len(jobs)} runs ({len(seen) // len(cfg.seeds)} variants x "
          f"{len(cfg.seeds)} seeds, {cfg.epochs} epochs each)", file=sys.stderr)
    runs = train_all(cfg, store, out, jobs, progress)
    stage("training")

    print("[demo] 4/5 evaluating on the test split", file=sys.stderr)
    results = evaluate_all(runs, store)
    rows1, rows2 = table_rows(cfg, results)
    print_tables(rows1, rows2, len(cfg.seeds))
    stage("evaluation")

    print("[demo] 5/5 report", file=sys.stderr)
    from catnet.engine.evaluate import resolve_split
    from catnet.features.store import FeatureStore
    from catnet.engine.train import load_run

    fs = FeatureStore(store)
    _, test_idx = resolve_split(fs, "test")
    segments = find_segments(fs)
    seed = cfg.seeds[0]
    analyses, attention = {}, {}
    for name, opts in t1:
        slug = _slug(name, opts)
        for s in cfg.seeds:
            head, info = load_run(runs[(slug, s)], which="last")
            hist = read_history(runs[(slug, s)])
            a = analyse(head, fs, test_idx, info["classes"], _label(name, opts), hist)
            if s == seed:
                analyses[slug] = a
            hit = attention_on_action(a, segments)
            if hit is not None:
                attention.setdefault(_label(name, opts), []).append(hit["ratio"])
    base = analyses[_slug(*t1[0])]
    cat = analyses[_slug(*t1[-1])]
    att_md = ""
    if attention:
        att_md = ("Attention on the action (share of local-attention mass on clips overlapping the "
                  "ground-truth action / share of such clips; 1 = no preference), mean over seeds:\n\n" +
                  markdown_table(["model", "ratio"], [[k, f"{np.mean(v):.2f} ± {np.std(v):.2f}"]
                                                      for k, v in attention.items()]) + "\n")
    settings = (f"Settings: {cfg.classes} motion classes x {cfg.videos_per_class} synthetic videos "
                f"({cfg.frame_size}px, {cfg.min_frames}-{cfg.max_frames} frames); features from "
                f"{cfg.backbone} ({'Kinetics-400' if cfg.pretrained else 'random'} weights), {cfg.num_clips} "
                f"clips x {cfg.clip_len} frames (stride {cfg.stride}) x {cfg.num_crops} crop(s) of "
                f"{cfg.crop_size}px from a {cfg.short_side}px short side (the paper: 10 x 32 frames, stride "
                f"4, 3 crops of 224){', standardised by train-split statistics' if cfg.standardise else ''}; "
                f"heads trained {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} (raw-feature heads) "
                f"/ {cfg.lr_normalised} (L2-normalised heads) x0.1 every {cfg.lr_step}, {len(cfg.seeds)} "
                "seed(s); metrics from the last "
                "checkpoint on the test split.")
    extra = "\n\n".join([settings, "### Table 1", markdown_table(HEAD1, rows1), "### Table 2",
                         markdown_table(HEAD2, rows2), att_md])
    md = write_report(out / "report", cat, base, segments, num_videos=cfg.report_videos, extra_md=extra,
                      title="catnet demo report")
    stage("report")
    summary = {"config": asdict(cfg), "store": str(store), "report": str(md), "timings_s": timings,
               "table1": rows1, "table2": rows2,
               "attention_ratio": {k: [float(x) for x in v] for k, v in attention.items()},
               "runs": {f"{k[0]}/seed{k[1]}": v for k, v in results.items()}}
    atomic_write_json(out / "results.json", summary)
    print(f"[demo] done in {sum(timings.values()):.0f}s; report: {md}", file=sys.stderr)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help=f"working folder, cached between runs (default {DemoConfig.out})")
    p.add_argument("--config", default=None, help="YAML with DemoConfig keys (e.g. configs/demo.yaml)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds-long smoke run: 3 classes, random-weight backbone, 1 seed")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per variant (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    data: dict[str, Any] = dict(TINY) if args.tiny else {}
    if args.config:
        data.update(load_yaml(args.config))
    if args.out:
        data["out"] = args.out
    if args.seeds is not None:
        if args.seeds < 1:
            raise CatnetError(f"--seeds must be >= 1, got {args.seeds}")
        data["seeds"] = list(range(args.seeds))
    if args.epochs is not None:
        data["epochs"] = args.epochs
    cfg = from_dict(DemoConfig, data)
    if not cfg.seeds or not cfg.table2_heads:
        raise CatnetError("seeds and table2_heads must not be empty")
    return cfg


def run(args: argparse.Namespace) -> int:
    run_demo(config_from_args(args), progress=not args.no_progress)
    return 0
