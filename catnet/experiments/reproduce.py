"""`catnet reproduce DATASET --root DATA`: the paper's protocol end to end for a user who has the data.

    [fine-tune the backbone (catnet.engine.finetune)]  ->  extract clip features once per backbone
    ->  one feature store per official split (same features, that split's labels)
    ->  train the Table-1 heads (catnet.engine.train, recipe from configs/DATASET.yaml)  ->  evaluate
    ->  top-1 / top-5 per head, mean ± std over the 3 splits of UCF101 / HMDB51

Features do not depend on the split unless the backbone was fine-tuned on it, so without fine-tuning
the videos are decoded and run through the backbone once; the per-split stores are cheap relabelled
copies. Every stage is cached under --out, so an interrupted reproduction resumes where it stopped.
The fine-tuning stage runs catnet.engine.finetune on each split's training videos (no validation: the test
videos never select a checkpoint); `--skip-finetune` uses `--checkpoint` (or the backbone's own
pretrained weights) instead.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from catnet.config import check_fields, from_dict, load_yaml, spec, to_dict
from catnet.data.annotations import load_annotations
from catnet.engine.evaluate import evaluate_run
from catnet.engine.finetune import FinetuneConfig, finetune
from catnet.engine.loop import settings_diff
from catnet.engine.runs import RUN_JSON, read_run_info
from catnet.engine.train import TrainConfig
from catnet.errors import CatnetError
from catnet.experiments.stages import (
    Row,
    cached_store,
    derived_store,
    store_identity,
    store_key,
    train_cached,
)
from catnet.experiments.variants import TABLE1
from catnet.features.extract import ExtractConfig
from catnet.features.store import FeatureStore
from catnet.utils.io import atomic_write_json, atomic_write_text, file_digest


@dataclass(frozen=True)
class Protocol:
    splits: tuple[int, ...]  # official train/test splits
    stride: int  # frame stride inside a clip (Sec. 4.1)
    eval_split: str


# Sec. 4.1: Kinetics clips are 32 frames at stride 4; UCF101/HMDB51 clips 32 successive frames.
PROTOCOLS = {"kinetics400": Protocol((1,), 4, "val"), "ucf101": Protocol((1, 2, 3), 1, "test"),
             "hmdb51": Protocol((1, 2, 3), 1, "test")}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ------------------------------------------------------------------------------------------ annotations


def _split_dir(root: Path, dataset: str) -> Path:
    """The folder of UCF101 / HMDB51 split files: ROOT itself or one folder below it."""
    def is_split_dir(d: Path) -> bool:
        if dataset == "ucf101":
            return (d / "classInd.txt").is_file()
        return any(d.glob("*_test_split1.txt"))

    for d in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if is_split_dir(d):
            return d
    raise CatnetError(f"no {dataset} split files under {root}; pass --annotations SPLIT_FOLDER")


def load_split(dataset: str, root: Path, annotations: Path | None,
               split_id: int) -> tuple[list[dict], list[str]]:
    """One official split's labelled videos as dicts {id, path (absolute), label, split}, and the classes."""
    if dataset == "kinetics400":  # train.csv + validate.csv (test.csv has no labels and is skipped)
        sources = [annotations] if annotations else sorted(root.glob("*.csv")) or sorted(root.glob("*/*.csv"))
        if not sources:
            raise CatnetError(f"no Kinetics annotation CSV in {root}; pass --annotations FILE")
        fmt = "kinetics"
    else:
        sources, fmt = [annotations or _split_dir(root, dataset)], dataset
    items, classes, missing = [], [], 0
    for src in sources:
        ann = load_annotations(src, root=root, fmt=fmt, split_id=split_id)
        classes += [c for c in ann.classes if c not in classes]
        missing += len(ann.missing)
        items += [{"id": it.id, "path": str(Path(it.path).resolve()), "label": it.label, "split": it.split,
                   "group": it.group or ""}
                  for it in ann.items if it.label is not None and it.split in ("train", "val", "test")]
    if dataset == "kinetics400":
        classes = sorted(classes)  # the union over the CSVs, in the reader's (sorted) order
    if missing:
        print(f"reproduce: {missing} annotated video(s) of split {split_id} are missing on disk",
              file=sys.stderr)
    if not items:
        raise CatnetError(f"no labelled train/test videos for {dataset} split {split_id} under {root}")
    return items, classes


# ------------------------------------------------------------------------------------------ stages


def _extract() -> ExtractConfig:
    # the paper's ResNet-50 I3D features; the frame stride comes from the dataset's protocol
    return ExtractConfig(backbone="i3d_r50")


@dataclass
class ReproduceConfig:
    dataset: str
    root: str
    out: str
    annotations: str | None = None
    splits: tuple[int, ...] = ()
    skip_finetune: bool = False
    extract: ExtractConfig = field(default_factory=_extract)
    epochs: int | None = field(default=None, metadata=spec(ge=1))  # None: configs/DATASET.yaml
    heads: tuple[str, ...] = tuple(TABLE1)  # keys of catnet.experiments.variants.TABLE1
    seeds: int = field(default=1, metadata=spec(ge=1))
    init_from: str | None = None  # Sec. 4.3: a Kinetics-trained run to transfer (UCF101/HMDB51)
    gpus: int = field(default=0, metadata=spec(ge=0))

    def __post_init__(self) -> None:
        check_fields(self)  # before hours of fine-tuning and extraction, not at the first training run

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def finetune_backbone(cfg: ReproduceConfig, stride: int, split_id: int, items: list[dict], videos_dir: Path,
                      out: Path) -> str:
    """Fine-tune the backbone on a split's training videos; returns its checkpoint."""
    work = out / f"finetune-split{split_id}"
    done = work / "reproduce_done.json"
    # The list names the videos through a link to their folder placed beside it, so that video ids stay
    # short relative paths (absolute paths would be accepted too).
    work.mkdir(parents=True, exist_ok=True)
    link = work / "videos"
    if not link.is_symlink():
        link.symlink_to(videos_dir.resolve(), target_is_directory=True)
    ann = work / "train.csv"
    listed = ann.read_bytes() if ann.is_file() else None
    _write_csv(ann, [{**it, "path": "videos/" + Path(it["path"]).relative_to(videos_dir.resolve()).as_posix()}
                     for it in items if it["split"] == "train"])
    e = cfg.extract
    short = e.spatial.short_side
    spatial = dataclasses.replace(e.spatial, train_short=(short, max(short, round(short * 1.25))))
    fcfg = FinetuneConfig(source=str(ann), out=str(work / "run"), backbone=e.backbone,
                          checkpoint=e.checkpoint, pretrained=bool(e.pretrained),
                          sampling=dataclasses.replace(e.sampling, stride=stride), spatial=spatial,
                          val_split="none", num_workers=e.workers, device=cfg.device,
                          resume=(work / "run" / "checkpoints" / "last.pt").is_file(), progress=False,
                          **({"epochs": cfg.epochs, "lr_step": cfg.epochs} if cfg.epochs else {}))
    if done.is_file():
        checkpoint = json.loads(done.read_text())["checkpoint"]
        if listed == ann.read_bytes() and _finetuned_as(fcfg) and Path(checkpoint).is_file():
            return checkpoint
        shutil.rmtree(work / "run", ignore_errors=True)  # fine-tuned otherwise (backbone, epochs, videos)
        done.unlink()
        fcfg.resume = False
    result = finetune(fcfg)
    atomic_write_json(done, {"checkpoint": result["backbone_checkpoint"]})
    return result["backbone_checkpoint"]


def _finetuned_as(fcfg: FinetuneConfig) -> bool:
    """Whether the finished fine-tuning run in fcfg.out was made with these settings and this length."""
    path = Path(fcfg.out) / RUN_JSON
    old = (read_run_info(fcfg.out).get("finetune") or {}) if path.is_file() else None
    return old is not None and not settings_diff(fcfg, old) and old.get("epochs") == fcfg.epochs


def _write_csv(path: Path, items: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", "group"])
    for it in items:
        w.writerow([it["path"], it["label"], it["split"], it.get("group", "")])
    atomic_write_text(path, buf.getvalue())


def extract_features(cfg: ReproduceConfig, stride: int, videos_dir: Path, checkpoint: str | None,
                     out: Path) -> Path:
    """Clip features of every video under `videos_dir` (all splits at once); cached by settings."""
    ecfg = dataclasses.replace(cfg.extract, checkpoint=checkpoint, device=cfg.device,
                               sampling=dataclasses.replace(cfg.extract.sampling, stride=stride))
    # the checkpoint's bytes, not only its path: a backbone fine-tuned again is saved under the same name
    key = {"source": str(videos_dir), **({"weights": file_digest(checkpoint)} if checkpoint else {})}
    if cfg.gpus <= 1:
        store, result = cached_store(videos_dir, out, ecfg, prefix="features", **key)
        if result.failed or result.failed_before:
            print(f"reproduce: {result.failed + result.failed_before} video(s) failed to extract; they are "
                  f"left out (see {store}/failures)", file=sys.stderr)
        return store
    # one process per GPU, each taking every N-th video (catnet extract under torchrun)
    store = out / f"features-{store_key(ecfg, **key)}"
    e = ecfg
    cmd = ["torchrun", f"--nproc_per_node={cfg.gpus}", "-m", "catnet", "extract", str(videos_dir),
           "--out", str(store), "--backbone", e.backbone, "--clips", str(e.sampling.num_clips), "--frames",
           str(e.sampling.clip_len), "--stride", str(stride), "--crops", str(e.spatial.num_crops),
           "--short-side", str(e.spatial.short_side), "--crop-size", str(e.spatial.crop), "--workers",
           str(e.workers)]
    cmd += ["--checkpoint", checkpoint] if checkpoint else []
    cmd += [] if e.pretrained is None else ["--pretrained" if e.pretrained else "--no-pretrained"]
    if subprocess.run(cmd, stdout=sys.stderr).returncode not in (0, 1):  # stdout: --json's alone
        raise CatnetError(f"feature extraction failed: {' '.join(cmd)}")
    return store


def split_store(base: Path, items: list[dict], classes: list[str], out: Path) -> tuple[Path, int]:
    """A copy of `base` with the split's videos and labels; returns (store, videos left out)."""
    src = FeatureStore(base)
    by_path = {str(Path(r["path"]).resolve()): i for i, r in enumerate(src.records())}
    label_of = {c: i for i, c in enumerate(classes)}
    kept = [(it, by_path[it["path"]]) for it in items if it["path"] in by_path and it["label"] in label_of]

    def rows():
        for it, i in kept:
            v = src[i]
            yield Row(it["id"], v.features, v.times, label_of[it["label"]], it["split"], v.path, v.num_crops,
                      it.get("group", ""))

    manifest = {**src.manifest, "classes": list(classes), "features_from": str(base)}
    info = {"left_out": len(items) - len(kept), "videos": len(kept)}
    # rebuilt when the base features (another checkpoint, other clips) or the split's videos change
    chosen = [[it["id"], it["path"], it["label"], it["split"], it.get("group", "")] for it in items]
    identity = {"features_from": str(base), "base": store_identity(src.manifest), "classes": list(classes),
                "items": chosen}
    store, info = derived_store(out, manifest, rows, info, identity=identity)
    return store, info["left_out"]


def train_config(cfg: ReproduceConfig, store: Path, run_dir: Path, head: str, opts: dict,
                 seed: int) -> TrainConfig:
    """The preset's recipe for one head. Validation follows the preset (UCF101/HMDB51: held-out training
    groups, never the test split that measures the result)."""
    preset = CONFIGS / f"{cfg.dataset}.yaml"
    data = load_yaml(preset) if preset.is_file() else {}
    preset_opts = data.pop("head_options", None) or {}
    data.pop("head", None)
    data.update(store=str(store), out=str(run_dir), head=head, seed=seed,
                head_options={**(preset_opts if head == "catnet" else {}), **opts}, device=cfg.device,
                progress=False)
    if cfg.epochs is not None:
        data["epochs"] = cfg.epochs
        data["lr_step"] = min(int(data.get("lr_step", 30)), cfg.epochs)
    if cfg.init_from and head == "catnet":
        data.update(init_from=cfg.init_from, head=None, head_options={})
    return from_dict(TrainConfig, data)


def train_run(cfg: ReproduceConfig, tcfg: TrainConfig) -> None:
    """Train one run (stages.train_cached: reused only when current), on several GPUs through torchrun."""
    train_cached(tcfg, trainer=None if cfg.gpus <= 1 else functools.partial(_torchrun_train, cfg.gpus))


def _torchrun_train(gpus: int, tcfg: TrainConfig) -> None:
    run_dir = Path(tcfg.out)
    atomic_write_json(run_dir / "train_config.json", {k: v for k, v in to_dict(tcfg).items()
                                                      if k not in ("store", "out", "resume")})
    cmd = ["torchrun", f"--nproc_per_node={gpus}", "-m", "catnet", "train", tcfg.store, "--out",
           tcfg.out, "--config", str(run_dir / "train_config.json"), *(["--resume"] if tcfg.resume else [])]
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:  # stdout: --json's alone
        raise CatnetError(f"training failed: {' '.join(cmd)}")


def _check(cfg: ReproduceConfig) -> tuple[Protocol, tuple[int, ...]]:
    if cfg.dataset not in PROTOCOLS:
        raise CatnetError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[cfg.dataset]
    splits = cfg.splits or proto.splits
    bad = [s for s in splits if s not in proto.splits]
    if bad:
        raise CatnetError(f"{cfg.dataset} has split(s) {', '.join(map(str, proto.splits))}, not {bad}")
    unknown = [h for h in cfg.heads if h not in TABLE1]
    if unknown:
        raise CatnetError(f"unknown head(s) {', '.join(unknown)}; choose from {', '.join(TABLE1)}")
    if not Path(cfg.root).exists():
        raise CatnetError(f"--root {cfg.root} does not exist")
    if not cfg.skip_finetune and cfg.extract.checkpoint:
        raise CatnetError("--checkpoint names an already fine-tuned backbone: pass --skip-finetune with it")
    return proto, splits


def _split(cfg: ReproduceConfig, proto: Protocol, k: int, out: Path) -> dict[str, Any]:
    """One official split: annotations, (fine-tuning,) features, its store, every head x seed."""
    print(f"[reproduce] {cfg.dataset} split {k}: annotations", file=sys.stderr)
    annotations = Path(cfg.annotations) if cfg.annotations else None
    items, classes = load_split(cfg.dataset, Path(cfg.root), annotations, k)
    videos_dir = Path(os.path.commonpath([it["path"] for it in items]))
    if videos_dir.is_file() or videos_dir.suffix:
        videos_dir = videos_dir.parent
    checkpoint = cfg.extract.checkpoint
    if not cfg.skip_finetune:
        print(f"[reproduce] split {k}: fine-tuning {cfg.extract.backbone} on its training videos",
              file=sys.stderr)
        checkpoint = finetune_backbone(cfg, proto.stride, k, items, videos_dir, out)
    print(f"[reproduce] split {k}: features of {videos_dir}", file=sys.stderr)
    base = extract_features(cfg, proto.stride, videos_dir, checkpoint, out)
    store, left_out = split_store(base, items, classes, out / f"store-split{k}")
    if left_out:
        print(f"[reproduce] split {k}: {left_out} video(s) without features left out", file=sys.stderr)
    heads = {}
    for h in cfg.heads:
        name, opts = TABLE1[h]
        per_seed = []
        for seed in range(cfg.seeds):
            run_dir = out / "runs" / f"split{k}" / h / f"seed{seed}"
            print(f"[reproduce] split {k}: training {h} (seed {seed})", file=sys.stderr)
            train_run(cfg, train_config(cfg, store, run_dir, name, opts, seed))
            per_seed.append(evaluate_run(run_dir, store, proto.eval_split, which="last"))
        heads[h] = {m: float(np.mean([p[m] for p in per_seed])) for m in METRICS}
        # which split measured, which checkpoint, and what (if anything) selected it: said beside the numbers
        heads[h].update(n=per_seed[0]["n"], measured_on=per_seed[0]["split"], checkpoint="last",
                        selected_on=per_seed[0]["selected_on"],
                        notes=sorted({p["note"] for p in per_seed if p.get("note")}))
    return {"left_out": left_out, "heads": heads}


METRICS = ("top1", "top5", "mean_class_acc")


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run the protocol; returns (and writes OUT/results.json) per-split and mean ± std metrics."""
    proto, splits = _check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dataset": cfg.dataset, "config": to_dict(cfg),
                               "splits": {str(k): _split(cfg, proto, k, out) for k in splits}}
    summary: dict[str, Any] = {}
    for h in cfg.heads:
        summary[h] = {}
        for m in METRICS:
            v = [results["splits"][str(k)]["heads"][h][m] for k in splits]
            summary[h][m] = {"mean": float(np.mean(v)), "std": float(np.std(v))}  # std over splits, ddof 0
    results["summary"] = summary
    first = [results["splits"][str(k)]["heads"][h] for k in splits for h in cfg.heads]
    results["measured"] = {"split": sorted({r["measured_on"] for r in first}), "checkpoint": "last",
                           "selected_on": sorted({r["selected_on"] for r in first}, key=str),
                           "notes": sorted({n for r in first for n in r["notes"]})}
    atomic_write_json(out / "results.json", results)
    return results


def print_summary(results: dict[str, Any]) -> None:
    n = len(results["splits"])
    t = Table(title=f"{results['dataset']}: {n} split(s), mean ± std over splits")
    for col in ("head", "top-1 (%)", "top-5 (%)", "mean class acc (%)"):
        t.add_column(col, justify="left" if col == "head" else "right")
    for h, s in results["summary"].items():
        t.add_row(h, *(f"{100 * s[m]['mean']:.1f} ± {100 * s[m]['std']:.1f}" for m in METRICS))
    measured = results.get("measured")
    if measured:
        validated = ", ".join(s for s in measured["selected_on"] if s is not None) or "none"
        lines = [f"measured on the {', '.join(measured['split'])} split, the last checkpoint of each run "
                 f"(validation split: {validated})", *(f"note: {n}" for n in measured["notes"])]
        t.caption = "\n".join(lines)
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(t)
