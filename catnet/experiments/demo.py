"""`catnet demo`: the whole system on the CPU, from nothing but installed packages and the I3D weights.

    synthetic videos (catnet.data.synth)  ->  Inception-I3D clip features (catnet.features.extract, scaled
    down)  ->  Table 1 rows + a reduced Table 2 sweep, several seeds each (catnet.engine.train, in-process)
    ->  top-1/top-5 mean ± std tables  ->  report with Figs. 4-6 and training curves (experiments.report)

Every stage is cached under --out (catnet.experiments.stages): the dataset by its config, the store by its
extraction settings (resumable), each run by its folder (finished runs are reused, interrupted ones
resumed), so a re-run only re-evaluates and redraws. The paper's extraction settings stay the defaults of
`catnet extract`; the demo scales them down to fit a 2-core CPU budget and says so in its report.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from catnet.config import from_dict, merge, to_dict
from catnet.data.synth import SynthConfig, generate
from catnet.engine.evaluate import evaluate_run
from catnet.engine.runs import load_run, read_history
from catnet.engine.splits import resolve_split, validation_words
from catnet.engine.train import TrainConfig
from catnet.errors import CatnetError
from catnet.experiments.report import analyse, attention_on_action, find_segments, write_report
from catnet.experiments.stages import cached_store, train_cached
from catnet.experiments.variants import (
    AGGREGATIONS,
    PAPER_TABLE2,
    paper_numbers,
    slug,
    table1_variants,
    table2_variants,
    variant_label,
)
from catnet.features.extract import ExtractConfig
from catnet.features.store import FeatureStore
from catnet.utils.io import atomic_write_json
from catnet.video import ClipSampling, SpatialConfig


def _synth() -> SynthConfig:
    return SynthConfig(num_classes=10, videos_per_class=40, height=128, width=128, min_frames=160,
                       max_frames=240)


def _extract() -> ExtractConfig:
    # scaled down from the paper's 10 clips x 32 frames (stride 4) x 3 crops of 224
    return ExtractConfig(pretrained=True, sampling=ClipSampling(num_clips=10, clip_len=16, stride=2),
                         spatial=SpatialConfig(short_side=128, crop=112, num_crops=1), batch_size=8,
                         workers=1, device="cpu", shard_size=32)


def _train() -> TrainConfig:
    # the library's recipe, as `catnet train STORE` runs it with no flags (docs/training.md)
    return TrainConfig(device="cpu", progress=False)


@dataclass
class DemoConfig:
    """The demo's settings: a synthetic dataset, how its features are extracted, how heads are trained
    (`train` is the template every run starts from), and which variants and seeds. configs/demo.yaml
    spells the same defaults; a YAML given with --config changes only what it names."""

    out: str = "catnet-demo"
    synth: SynthConfig = field(default_factory=_synth)
    extract: ExtractConfig = field(default_factory=_extract)
    train: TrainConfig = field(default_factory=_train)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    table2_heads: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    report_videos: int = 6

    def __post_init__(self) -> None:
        if not self.seeds or not self.table2_heads:
            raise CatnetError("seeds and table2_heads must not be empty")


# `catnet demo --tiny`: seconds, a random-weight backbone, one seed.
TINY: dict[str, Any] = {
    "synth": {"num_classes": 3, "videos_per_class": 4, "height": 48, "width": 48, "min_frames": 16,
              "max_frames": 24},
    "extract": {"pretrained": False, "sampling": {"num_clips": 3, "clip_len": 4, "stride": 1},
                "spatial": {"short_side": 40, "crop": 32}, "workers": 0},
    "train": {"epochs": 2, "batch_size": 4, "train_views": 3},
    "seeds": [0], "table2_heads": [1], "report_videos": 2}


def demo_config(tiny: bool = False, preset: dict[str, Any] | None = None, **overrides: Any) -> DemoConfig:
    """DemoConfig from the defaults, then TINY (if `tiny`), then a YAML preset, then `overrides`."""
    data = merge(TINY if tiny else {}, preset or {})
    return from_dict(DemoConfig, merge(data, {k: v for k, v in overrides.items() if v is not None}))


def variants(cfg: DemoConfig) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(Table 1 rows, Table 2 cells) as (head name, options)."""
    return table1_variants(clusters=True), table2_variants(cfg.table2_heads)


# ------------------------------------------------------------------------------------------ stages


def train_config(cfg: DemoConfig, store: Path, run_dir: Path, name: str, opts: dict,
                 seed: int) -> TrainConfig:
    return from_dict(TrainConfig, {**to_dict(cfg.train), "store": str(store), "out": str(run_dir),
                                   "head": name, "head_options": dict(opts), "seed": seed})


def train_all(cfg: DemoConfig, store: Path, out: Path, jobs: list[tuple[str, dict, int]],
              progress: bool) -> dict[tuple[str, int], Path]:
    """Train every (head, options, seed) in-process (stages.train_cached); one progress bar for all."""
    runs = {}
    bar = tqdm(jobs, desc="train heads", unit="run", disable=not progress, file=sys.stderr)
    for name, opts, seed in bar:
        run_dir = out / "runs" / slug(name, opts) / f"seed{seed}"
        runs[(slug(name, opts), seed)] = run_dir
        bar.set_postfix_str(f"{variant_label(name, opts)} seed {seed}")
        train_cached(train_config(cfg, store, run_dir, name, opts, seed))
    return runs


def evaluate_all(runs: dict[tuple[str, int], Path], store: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Test-split metrics of each run's last checkpoint (the cosine schedule's end; nothing about it was
    chosen on the test videos, which the runs never saw)."""
    out = {}
    for key, run_dir in runs.items():
        r = evaluate_run(run_dir, store, "test", which="last")
        out[key] = {"top1": r["top1"], "top5": r["top5"], "mean_class_acc": r["mean_class_acc"], "n": r["n"],
                    "selected_on": r["selected_on"]}
    return out


def selected_on_test(results: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """The runs that validated on the test split (a demo config with `train.val_split: test`)."""
    return [f"{k[0]}/seed{k[1]}" for k, r in results.items() if r.get("selected_on") == "test"]


def summarise(results: dict[tuple[str, int], dict], key: str, seeds: list[int]) -> dict[str, float]:
    rows = [results[(key, s)] for s in seeds]
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
    t1, _ = variants(cfg)
    rows1 = []
    for name, opts in t1:
        s = summarise(results, slug(name, opts), cfg.seeds)
        paper = paper_numbers(name, opts)
        rows1.append([variant_label(name, opts), _pm(s, "top1"), _pm(s, "top5"), _pm(s, "mean_class_acc"),
                      f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "-"])
    rows2 = []
    for n in cfg.table2_heads:
        row = [str(n)]
        for agg in AGGREGATIONS:
            s = summarise(results, slug("catnet", {"num_heads": n, "aggregation": agg}), cfg.seeds)
            row += [_pm(s, "top1"), _pm(s, "top5")]
        paper = [PAPER_TABLE2.get((n, a)) for a in AGGREGATIONS]
        row.append("; ".join(f"{p[0]:.1f}/{p[1]:.1f}" if p else "-" for p in paper))
        rows2.append(row)
    return rows1, rows2


HEAD1 = ["model", "top-1 (%)", "top-5 (%)", "mean class acc (%)", "paper Kinetics top-1 / top-5"]
HEAD2 = ["N", "concat top-1", "concat top-5", "sum top-1", "sum top-5", "paper concat; sum (top-1/top-5)"]


def print_tables(rows1, rows2, seeds: int) -> None:
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


def _recipe(t: TrainConfig) -> str:
    length = f"{t.epochs} epochs" if t.epochs else f"at least 90 epochs and {t.min_steps} steps"
    warmup = (f"{t.warmup_epochs:g}-epoch" if t.warmup_epochs is not None else f"{t.warmup_fraction:.0%}")
    sched = (f"{warmup} warmup + cosine" if t.schedule == "cosine"
             else f"x{t.lr_gamma} every {t.lr_step} epochs")
    return (f"{t.optimizer.upper()}{' Nesterov' if t.nesterov and t.optimizer == 'sgd' else ''} lr {t.lr:g}, "
            f"{sched}, weight decay {t.weight_decay:g}, batch {t.batch_size}, {length}"
            f"{', features standardised by the training videos' if t.standardize else ''}")


def _validation(info: dict) -> str:
    """How a run validated, for the settings line."""
    words = validation_words(info)
    return "without validation (nothing selected)" if words == "none" else f"validating on {words}"


def dataset_key(s: SynthConfig) -> dict[str, Any]:
    """What the store key (stages.store_key) adds for the dataset: its config, so features of another
    synthetic dataset are not resumed into this one's store; nothing for the default dataset, whose
    stores were named before this key existed."""
    return {} if s == _synth() else {"synth": dataclasses.asdict(s)}


def _settings(cfg: DemoConfig, validation: str) -> str:
    e, t, s = cfg.extract, cfg.train, cfg.synth
    weights = "Kinetics-400" if e.pretrained else "random"
    return (f"Settings: {s.num_classes} motion classes x {s.videos_per_class} synthetic videos "
            f"({s.height}px, {s.min_frames}-{s.max_frames} frames); features from {e.backbone} ({weights} "
            f"weights), {e.sampling.num_clips} clips x {e.sampling.clip_len} frames (stride "
            f"{e.sampling.stride}) x {e.spatial.num_crops} crop(s) of {e.spatial.crop}px from a "
            f"{e.spatial.short_side}px short side (the paper: 10 x 32 frames, stride 4, 3 crops of 224)"
            f"; heads trained with the library's recipe ({_recipe(t)}), {len(cfg.seeds)} seed(s), "
            f"{validation}; metrics from the last checkpoint on the test split.")


def _report(cfg: DemoConfig, store: Path, runs: dict, rows1, rows2, out: Path) -> tuple[Path, dict]:
    """Figs. 4-6 for the Table-1 runs, the attention-on-action ratios, and the Markdown report."""
    t1, _ = variants(cfg)
    fs = FeatureStore(store)
    _, test_idx = resolve_split(fs, "test")
    segments = find_segments(fs)
    analyses, attention, validation = {}, {}, ""
    for name, opts in t1:
        label = variant_label(name, opts)
        for s in cfg.seeds:
            run_dir = runs[(slug(name, opts), s)]
            head, info = load_run(run_dir, which="last")
            a = analyse(head, fs, test_idx, info["classes"], label, read_history(run_dir))
            a.measured(info, "last", "test", fs.root)
            validation = validation or _validation(info)
            if s == cfg.seeds[0]:
                analyses[slug(name, opts)] = a
            hit = attention_on_action(a, segments)
            if hit is not None:
                attention.setdefault(label, []).append(hit["ratio"])
    att_md = ""
    if attention:
        att_md = ("Attention on the action (share of local-attention mass on clips overlapping the "
                  "ground-truth action / share of such clips; 1 = no preference), mean over seeds:\n\n" +
                  markdown_table(["model", "ratio"], [[k, f"{np.mean(v):.2f} ± {np.std(v):.2f}"]
                                                      for k, v in attention.items()]) + "\n")
    extra = "\n\n".join([_settings(cfg, validation), "### Table 1", markdown_table(HEAD1, rows1),
                         "### Table 2", markdown_table(HEAD2, rows2), att_md])
    md = write_report(out / "report", analyses[slug(*t1[-1])], analyses[slug(*t1[0])], segments,
                      num_videos=cfg.report_videos, extra_md=extra, title="catnet demo report")
    return md, attention


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run every stage (cached) and return the results dict also written to OUT/results.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.monotonic()

    def stage(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        print(f"[demo] {name} done in {timings[name]:.1f}s", file=sys.stderr)

    s, e = cfg.synth, cfg.extract
    print(f"[demo] 1/5 synthetic dataset: {s.num_classes} classes x {s.videos_per_class} videos -> "
          f"{out}/data", file=sys.stderr)
    annotations = generate(out / "data", s, progress=progress)
    stage("dataset")
    print(f"[demo] 2/5 features: {e.backbone} ({'Kinetics-400' if e.pretrained else 'random'} weights), "
          f"{e.sampling.num_clips} clips x {e.sampling.clip_len} frames (stride {e.sampling.stride}) x "
          f"{e.spatial.num_crops} crop(s) of {e.spatial.crop}px", file=sys.stderr)
    store, result = cached_store(annotations, out, e, progress=progress, **dataset_key(s))
    if result.failed or result.failed_before:
        raise CatnetError(f"{result.failed + result.failed_before} synthetic videos failed to extract; see "
                          f"{store}/failures")
    stage("features")

    t1, t2 = variants(cfg)
    jobs = list(dict.fromkeys((name, tuple(sorted(opts.items())), seed) for name, opts in t1 + t2
                              for seed in cfg.seeds))
    jobs = [(name, dict(opts), seed) for name, opts, seed in jobs]
    print(f"[demo] 3/5 training {len(jobs)} runs ({len(jobs) // len(cfg.seeds)} variants x "
          f"{len(cfg.seeds)} seeds; {_recipe(cfg.train)})", file=sys.stderr)
    runs = train_all(cfg, store, out, jobs, progress)
    stage("training")

    print("[demo] 4/5 evaluating on the test split", file=sys.stderr)
    results = evaluate_all(runs, store)
    rows1, rows2 = table_rows(cfg, results)
    print_tables(rows1, rows2, len(cfg.seeds))
    on_test = selected_on_test(results)
    if on_test:
        print(f"[demo] note: selected on test: {len(on_test)} run(s) validated on the test split "
              "(train.val_split: test), so their checkpoints and these numbers are not independent of it",
              file=sys.stderr)
    stage("evaluation")

    print("[demo] 5/5 report", file=sys.stderr)
    md, attention = _report(cfg, store, runs, rows1, rows2, out)
    stage("report")
    summary = {"config": to_dict(cfg), "store": str(store), "report": str(md), "timings_s": timings,
               "table1": rows1, "table2": rows2,
               "attention_ratio": {k: [float(x) for x in v] for k, v in attention.items()},
               "runs": {f"{k[0]}/seed{k[1]}": v for k, v in results.items()},
               "selected_on_test": on_test}
    atomic_write_json(out / "results.json", summary)
    print(f"[demo] done in {sum(timings.values()):.0f}s; report: {md}", file=sys.stderr)
    return summary
