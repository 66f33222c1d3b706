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

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catnet.errors import CatnetError
from catnet.utils.io import atomic_write_json


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
    from catnet.data.annotations import load_annotations

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
        items += [{"id": it.id, "path": str(Path(it.path).resolve()), "label": it.label, "split": it.split}
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


@dataclass
class ReproduceConfig:
    dataset: str
    root: str
    out: str
    annotations: str | None = None
    splits: tuple[int, ...] = ()
    skip_finetune: bool = False
    backbone: str = "i3d_r50"  # the paper's ResNet-50 I3D
    checkpoint: str | None = None
    pretrained: bool | None = None
    num_clips: int = 10
    clip_len: int = 32
    num_crops: int = 3
    short_side: int = 256
    crop_size: int = 224
    epochs: int | None = None  # None: configs/DATASET.yaml
    heads: tuple[str, ...] = ("avgpool", "attention_clusters", "local-nofcnorm", "local", "catnet")
    seeds: int = 1
    init_from: str | None = None  # Sec. 4.3: a Kinetics-trained run to transfer (UCF101/HMDB51)
    gpus: int = 0
    workers: int = 2


HEAD_VARIANTS = {"avgpool": ("avgpool", {}), "attention_clusters": ("attention_clusters", {}),
                 "local-nofcnorm": ("local", {"fc_norm": False}), "local": ("local", {"fc_norm": True}),
                 "catnet": ("catnet", {})}


def finetune_backbone(cfg: ReproduceConfig, stride: int, split_id: int, items: list[dict], videos_dir: Path,
                      out: Path) -> str:
    """Fine-tune the backbone on a split's training videos (catnet.engine.finetune); returns its checkpoint."""
    try:
        from catnet.engine.finetune import FinetuneConfig, finetune
    except ImportError:
        raise CatnetError("backbone fine-tuning (catnet.engine.finetune) is not part of this install; pass "
                          "--skip-finetune (with --checkpoint CKPT for a fine-tuned backbone)") from None
    work = out / f"finetune-split{split_id}"
    done = work / "reproduce_done.json"
    if done.is_file():
        return json.loads(done.read_text())["checkpoint"]
    # The annotation reader refuses paths outside an annotation file's folder, so the list names the
    # videos through a link to their folder placed beside it.
    work.mkdir(parents=True, exist_ok=True)
    link = work / "videos"
    if not link.is_symlink():
        link.symlink_to(videos_dir.resolve(), target_is_directory=True)
    ann = work / "train.csv"
    _write_csv(ann, [{**it, "path": "videos/" + Path(it["path"]).relative_to(videos_dir.resolve()).as_posix()}
                     for it in items if it["split"] == "train"])
    short = cfg.short_side
    fcfg = FinetuneConfig(source=str(ann), out=str(work / "run"), backbone=cfg.backbone,
                          checkpoint=cfg.checkpoint, pretrained=bool(cfg.pretrained),
                          clip_len=cfg.clip_len, stride=stride, short_side=short,
                          train_short=(short, max(short, round(short * 1.25))), crop=cfg.crop_size,
                          test_clips=cfg.num_clips, test_crops=cfg.num_crops, val_split="none",
                          num_workers=cfg.workers, device="cuda" if cfg.gpus > 0 else "cpu",
                          resume=(work / "run" / "checkpoints" / "last.pt").is_file(), progress=False,
                          **({"epochs": cfg.epochs, "lr_step": cfg.epochs} if cfg.epochs else {}))
    result = finetune(fcfg)
    atomic_write_json(done, {"checkpoint": result["backbone_checkpoint"]})
    return result["backbone_checkpoint"]


def _write_csv(path: Path, items: list[dict]) -> None:
    import csv
    import io

    from catnet.utils.io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    for it in items:
        w.writerow([it["path"], it["label"], it["split"]])
    atomic_write_text(path, buf.getvalue())


def extract_features(cfg: ReproduceConfig, stride: int, videos_dir: Path, checkpoint: str | None,
                     out: Path) -> Path:
    """Clip features of every video under `videos_dir` (all splits at once); cached by settings."""
    from catnet.features.extract import ExtractConfig, extract

    ecfg = ExtractConfig(backbone=cfg.backbone, checkpoint=checkpoint, pretrained=cfg.pretrained,
                         num_clips=cfg.num_clips, clip_len=cfg.clip_len, stride=stride,
                         num_crops=cfg.num_crops,
                         short_side=cfg.short_side, crop_size=cfg.crop_size, workers=cfg.workers,
                         device="cuda" if cfg.gpus > 0 else "cpu")
    key = json.dumps({k: getattr(ecfg, k) for k in ("backbone", "pretrained", "checkpoint", "num_clips",
                                                     "clip_len", "stride", "num_crops", "short_side",
                                                     "crop_size", "seed")} | {"source": str(videos_dir)},
                     sort_keys=True)
    store = out / f"features-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if cfg.gpus > 1:  # one process per GPU, each taking every N-th video (catnet.features.extract under torchrun)
        cmd = ["torchrun", f"--nproc_per_node={cfg.gpus}", "-m", "catnet", "extract", str(videos_dir),
               "--out", str(store), "--backbone", cfg.backbone, "--clips", str(cfg.num_clips), "--frames",
               str(cfg.clip_len), "--stride", str(stride), "--crops", str(cfg.num_crops), "--short-side",
               str(cfg.short_side), "--crop-size", str(cfg.crop_size), "--workers", str(cfg.workers)]
        cmd += ["--checkpoint", checkpoint] if checkpoint else []
        cmd += [] if cfg.pretrained is None else ["--pretrained" if cfg.pretrained else "--no-pretrained"]
        if subprocess.run(cmd).returncode not in (0, 1):
            raise CatnetError(f"feature extraction failed: {' '.join(cmd)}")
    else:
        result = extract(videos_dir, store, ecfg)
        if result.failed or result.failed_before:
            print(f"reproduce: {result.failed + result.failed_before} video(s) failed to extract; they are "
                  f"left out (see {store}/failures)", file=sys.stderr)
    return store


def split_store(base: Path, items: list[dict], classes: list[str], out: Path) -> tuple[Path, int]:
    """A copy of `base` with the split's videos and labels; returns (store, videos left out)."""
    from catnet.features.store import FeatureStore, StoreWriter

    done = out / "complete.json"
    if done.is_file():
        return out, json.loads(done.read_text())["left_out"]
    if out.exists():
        shutil.rmtree(out)  # an interrupted copy: rebuild (cheap, no decoding)
    src = FeatureStore(base)
    by_path = {str(Path(r["path"]).resolve()): i for i, r in enumerate(src.records())}
    manifest = {**src.manifest, "classes": list(classes), "features_from": str(base)}
    label_of = {c: i for i, c in enumerate(classes)}
    left_out = 0
    with StoreWriter(out, manifest, flush_seconds=None) as w:
        for it in items:
            i = by_path.get(it["path"])
            if i is None or it["label"] not in label_of:
                left_out += 1
                continue
            v = src[i]
            w.add(it["id"], v.features, v.times, label=label_of[it["label"]], split=it["split"], path=v.path,
                  num_crops=v.num_crops)
    atomic_write_json(done, {"left_out": left_out, "videos": len(items) - left_out})
    return out, left_out


def train_config(cfg: ReproduceConfig, store: Path, run_dir: Path, head: str, opts: dict, seed: int,
                 eval_split: str):
    from catnet.config import from_dict, load_yaml
    from catnet.engine.train import TrainConfig

    preset = CONFIGS / f"{cfg.dataset}.yaml"
    data = load_yaml(preset) if preset.is_file() else {}
    preset_opts = data.pop("head_options", None) or {}
    data.pop("head", None)
    data.update(store=str(store), out=str(run_dir), head=head, seed=seed, val_split=eval_split,
                head_options={**(preset_opts if head == "catnet" else {}), **opts},
                device="cuda" if cfg.gpus > 0 else "cpu", progress=False)
    if cfg.epochs is not None:
        data["epochs"] = cfg.epochs
        data["lr_step"] = min(int(data.get("lr_step", 30)), cfg.epochs)
    if cfg.init_from and head == "catnet":
        data.update(init_from=cfg.init_from, head=None, head_options={})
    return from_dict(TrainConfig, data)


def train_run(cfg: ReproduceConfig, tcfg) -> None:
    from catnet.engine.train import train

    run_dir = Path(tcfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "checkpoints" / "last.pt").is_file():
        from catnet.experiments.report import read_history

        hist = read_history(run_dir)
        if hist and hist[-1]["epoch"] >= tcfg.epochs:
            return  # finished earlier
        tcfg.resume = True
    if cfg.gpus > 1:
        cmd = ["torchrun", f"--nproc_per_node={cfg.gpus}", "-m", "catnet", "train", tcfg.store, "--out",
               tcfg.out, "--config", str(run_dir / "train_config.json")]
        atomic_write_json(run_dir / "train_config.json", {k: v for k, v in asdict(tcfg).items()
                                                          if k not in ("store", "out")})
        cmd += ["--resume"] if tcfg.resume else []
        if subprocess.run(cmd).returncode != 0:
            raise CatnetError(f"training failed: {' '.join(cmd)}")
        return
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stderr(log):
        train(tcfg)


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run the protocol; returns (and writes OUT/results.json) per-split and mean ± std metrics."""
    from catnet.engine.evaluate import evaluate_run

    if cfg.dataset not in PROTOCOLS:
        raise CatnetError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[cfg.dataset]
    splits = cfg.splits or proto.splits
    bad = [s for s in splits if s not in proto.splits]
    if bad:
        raise CatnetError(f"{cfg.dataset} has split(s) {', '.join(map(str, proto.splits))}, not {bad}")
    unknown = [h for h in cfg.heads if h not in HEAD_VARIANTS]
    if unknown:
        raise CatnetError(f"unknown head(s) {', '.join(unknown)}; choose from {', '.join(HEAD_VARIANTS)}")
    root, out = Path(cfg.root), Path(cfg.out)
    if not root.exists():
        raise CatnetError(f"--root {root} does not exist")
    if not cfg.skip_finetune and cfg.checkpoint:
        raise CatnetError("--checkpoint names an already fine-tuned backbone: pass --skip-finetune with it")
    out.mkdir(parents=True, exist_ok=True)
    annotations = Path(cfg.annotations) if cfg.annotations else None

    results: dict[str, Any] = {"dataset": cfg.dataset, "config": asdict(cfg), "splits": {}}
    for k in splits:
        print(f"[reproduce] {cfg.dataset} split {k}: annotations", file=sys.stderr)
        items, classes = load_split(cfg.dataset, root, annotations, k)
        videos_dir = Path(os.path.commonpath([it["path"] for it in items]))
        if videos_dir.is_file() or videos_dir.suffix:
            videos_dir = videos_dir.parent
        checkpoint = cfg.checkpoint
        if not cfg.skip_finetune:
            print(f"[reproduce] split {k}: fine-tuning {cfg.backbone} on its training videos",
                  file=sys.stderr)
            checkpoint = finetune_backbone(cfg, proto.stride, k, items, videos_dir, out)
        print(f"[reproduce] split {k}: features of {videos_dir}", file=sys.stderr)
        base = extract_features(cfg, proto.stride, videos_dir, checkpoint, out)
        store, left_out = split_store(base, items, classes, out / f"store-split{k}")
        if left_out:
            print(f"[reproduce] split {k}: {left_out} video(s) without features left out", file=sys.stderr)
        split_res = {}
        for h in cfg.heads:
            name, opts = HEAD_VARIANTS[h]
            per_seed = []
            for seed in range(cfg.seeds):
                run_dir = out / "runs" / f"split{k}" / h / f"seed{seed}"
                print(f"[reproduce] split {k}: training {h} (seed {seed})", file=sys.stderr)
                train_run(cfg, train_config(cfg, store, run_dir, name, opts, seed, proto.eval_split))
                r = evaluate_run(run_dir, store, proto.eval_split, which="last")
                per_seed.append({"top1": r["top1"], "top5": r["top5"], "mean_class_acc": r["mean_class_acc"],
                                 "n": r["n"]})
            split_res[h] = {m: float(np.mean([p[m] for p in per_seed])) for m in ("top1", "top5",
                                                                                   "mean_class_acc")}
            split_res[h]["n"] = per_seed[0]["n"]
        results["splits"][str(k)] = {"left_out": left_out, "heads": split_res}
    summary: dict[str, Any] = {}
    for h in cfg.heads:
        summary[h] = {}
        for m in ("top1", "top5", "mean_class_acc"):
            v = [results["splits"][str(k)]["heads"][h][m] for k in splits]
            summary[h][m] = {"mean": float(np.mean(v)), "std": float(np.std(v))}  # std over splits, ddof 0
    results["summary"] = summary
    atomic_write_json(out / "results.json", results)
    return results


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    n = len(results["splits"])
    t = Table(title=f"{results['dataset']}: {n} split(s), mean ± std over splits")
    for col in ("head", "top-1 (%)", "top-5 (%)", "mean class acc (%)"):
        t.add_column(col, justify="left" if col == "head" else "right")
    for h, s in results["summary"].items():
        t.add_row(h, *(f"{100 * s[m]['mean']:.1f} ± {100 * s[m]['std']:.1f}" for m in ("top1", "top5",
                                                                                       "mean_class_acc")))
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(t)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ReproduceConfig("", "", "")
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
    p.add_argument("--backbone", default=d.backbone, choices=["i3d_r50", "i3d_inception"])
    p.add_argument("--checkpoint", default=None, help="an already fine-tuned backbone")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--clips", type=int, default=d.num_clips)
    p.add_argument("--frames", type=int, default=d.clip_len)
    p.add_argument("--crops", type=int, default=d.num_crops, choices=[1, 3])
    p.add_argument("--short-side", type=int, default=None, help="default: the crop size x 8/7")
    p.add_argument("--crop-size", type=int, default=d.crop_size)
    p.add_argument("--epochs", type=int, default=None, help="default: configs/DATASET.yaml")
    p.add_argument("--heads", nargs="+", default=list(d.heads), help=", ".join(HEAD_VARIANTS))
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--init-from", default=None, help="Kinetics-trained CATNet run to transfer (Sec. 4.3)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    gpus = args.gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    short = args.short_side or max(args.crop_size, round(args.crop_size * 8 / 7))
    cfg = ReproduceConfig(dataset=args.dataset, root=args.root, out=args.out or f"reproduce-{args.dataset}",
                          annotations=args.annotations, splits=tuple(args.splits or ()),
                          skip_finetune=args.skip_finetune, backbone=args.backbone,
                          checkpoint=args.checkpoint, pretrained=args.pretrained, num_clips=args.clips,
                          clip_len=args.frames, num_crops=args.crops, short_side=short,
                          crop_size=args.crop_size, epochs=args.epochs,
                          heads=tuple(args.heads), seeds=args.seeds, init_from=args.init_from, gpus=gpus,
                          workers=args.workers)
    if cfg.seeds < 1:
        raise CatnetError(f"--seeds must be >= 1, got {cfg.seeds}")
    results = reproduce(cfg)
    if args.json:
        print(json.dumps(results["summary"], sort_keys=True))
    else:
        print_summary(results)
    left_out = sum(s["left_out"] for s in results["splits"].values())
    return 1 if left_out else 0
