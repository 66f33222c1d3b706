"""`catnet finetune-backbone`: train a clip backbone end to end on videos - the paper's baseline (Sec. 4.1).

    catnet finetune-backbone VIDEOS --out RUN [--backbone i3d_r50] [--inflate-from resnet50_2d.pth]
    torchrun --nproc_per_node=8 -m catnet finetune-backbone VIDEOS --out RUN      # data parallel
    catnet extract VIDEOS --backbone i3d_r50 --checkpoint RUN/backbone.safetensors --out STORE

The paper initialises ResNet-50 I3D from ImageNet and fine-tunes it on clips of the training videos
before extracting the features CATNet is trained on. Training sees one random clip per video per step
(a random slot of `ClipSampling`, random short side in [256, 320], random 224 crop, random flip:
`catnet.video.train_view`). Evaluation is the "ResNet-50 I3D (Baseline)" row of Table 1: each video's
10 clips x 3 crops = 30 views go through the network and their softmax probabilities are averaged
(probabilities, not logits, so that no single over-confident view dominates the vote).

RUN (same layout as `catnet train`, docs/training.md):

    RUN/run.json                backbone, initial weights, classes, sampling + crops, this FinetuneConfig
    RUN/checkpoints/last.pt     model, optimiser, scheduler, RNG states, epoch (weights-only loadable)
    RUN/checkpoints/best.pt     the model with the best validation top-1 (the last epoch without validation)
    RUN/backbone.safetensors    best.pt's weights, classifier included, as `build_backbone(checkpoint=...)`
                                and `catnet extract --checkpoint` read them
    RUN/metrics.csv, RUN/tb/    per-epoch logs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import catnet
from catnet.utils import distributed as dist
from catnet.backbones.common import amp_dtype, autocast, save_safetensors
from catnet.config import from_dict, load_yaml, to_dict
from catnet.errors import CatnetError, VideoError
from catnet.features.extract import VideoEntry, list_videos
from catnet.utils.io import atomic_write_json
from catnet.engine.metrics import MetricAccumulator
from catnet.engine.runs import (
    CHECKPOINTS,
    NO_VALIDATION,
    RUN_JSON,
    fmt_metric,
    holdout,
    load_checkpoint,
    log_scalars,
    open_writer,
    read_run_info,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    wrap_ddp,
    write_metrics,
)
from catnet.engine.train import parse_head_opts
from catnet.video import ClipSampling, SpatialConfig, load_clips

BACKBONE_FILE = "backbone.safetensors"
IGNORE = -100  # label of a clip that failed to decode: cross-entropy skips it


@dataclass
class FinetuneConfig:
    """One backbone fine-tuning run. Paper values where it gives them (Sec. 4.1); the rest are marked."""

    source: str = ""  # folder of videos (one sub-folder per class) or an annotation file
    out: str = ""
    backbone: str = "i3d_r50"
    backbone_options: dict[str, Any] = field(default_factory=dict)  # e.g. {variant: mmaction2} for i3d_r50
    checkpoint: str | None = None  # initial weights; the classifier is replaced for this dataset's classes
    pretrained: bool = False  # the backbone's own pretrained weights (i3d_inception: Kinetics-400)
    inflate_from: str | None = None  # i3d_r50 only: a 2-D ImageNet ResNet-50, inflated (paper's init)
    epochs: int = 90
    batch_size: int = 64  # clips per step, global (paper: 8 GPUs x 8)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not stated in the paper; the usual value for ResNet SGD
    lr_step: int = 30  # lr x lr_gamma every lr_step epochs
    lr_gamma: float = 0.1
    dropout: float = 0.5  # before the classifier; ours (not stated)
    clip_len: int = 32
    stride: int = 4  # Kinetics 4; UCF101/HMDB51 1 ("32 successive frames")
    short_side: int = 256  # test-time resize; training draws it from train_short
    train_short: tuple[int, int] = (256, 320)
    crop: int = 224
    test_clips: int = 10  # the baseline's 10 clips x 3 crops
    test_crops: int = 3
    train_split: str = "train"
    val_split: str | None = None  # None: "test", else "val"; "none": no validation
    holdout_fraction: float = 0.1  # sources without split labels: per-class held-out share
    eval_every: int = 5  # validation is 30 views per video: costly, so not every epoch (always the last)
    eval_batch_size: int = 30  # views per forward pass at evaluation
    amp: str | None = None  # "bfloat16" / "float16": autocast on GPU
    seed: int = 0
    num_workers: int = 4  # decoding processes
    device: str = "auto"
    resume: bool = False
    progress: bool = True

    def check(self) -> None:
        for key in ("epochs", "batch_size", "lr_step", "clip_len", "stride", "crop", "test_clips",
                    "test_crops", "eval_every", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise CatnetError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.momentum < 0 or self.lr_gamma <= 0:
            raise CatnetError("lr and lr_gamma must be > 0, weight_decay and momentum >= 0")
        if not 0 <= self.dropout < 1:
            raise CatnetError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.holdout_fraction < 1:
            raise CatnetError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.num_workers < 0:
            raise CatnetError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.source or not self.out:
            raise CatnetError("a video source and an --out run folder are required")
        if sum([self.checkpoint is not None, self.pretrained, self.inflate_from is not None]) > 1:
            raise CatnetError("give at most one of --checkpoint, --pretrained and --inflate-from")
        if self.inflate_from is not None and self.backbone != "i3d_r50":
            raise CatnetError("--inflate-from (2-D ImageNet ResNet-50) only applies to --backbone i3d_r50")
        amp_dtype(self.amp)
        self.spatial(train=True)  # validates crop vs. short sides

    def sampling(self, train: bool) -> ClipSampling:
        return ClipSampling(num_clips=1 if train else self.test_clips, clip_len=self.clip_len,
                            stride=self.stride)

    def spatial(self, train: bool = False) -> SpatialConfig:
        return SpatialConfig(short_side=self.short_side, crop=self.crop,
                             num_crops=1 if train else self.test_crops, train_short=tuple(self.train_short))


# Keys that may change when resuming: they do not affect the numbers.
RESUME_MUTABLE = ("source", "out", "epochs", "num_workers", "device", "resume", "progress", "eval_batch_size")


# ------------------------------------------------------------------------------------------ model


def build_model(cfg: FinetuneConfig, classes: list[str]) -> nn.Module:
    """The backbone with a fresh `len(classes)`-way classifier on the chosen initial weights."""
    from catnet.backbones import build_backbone

    n = len(classes)
    if cfg.backbone == "i3d_r50":
        options: dict[str, Any] = {**cfg.backbone_options, "num_classes": n, "dropout": cfg.dropout}
        if cfg.checkpoint is None and cfg.inflate_from is None and not cfg.pretrained:
            options["seed"] = cfg.seed  # reproducible random init
        model = build_backbone("i3d_r50", pretrained=cfg.pretrained,
                               checkpoint=cfg.inflate_from or cfg.checkpoint, **options)
        if cfg.inflate_from is not None and not model.weights_source.startswith("resnet2d:"):
            raise CatnetError(f"--inflate-from {cfg.inflate_from} is not a 2-D ResNet-50 checkpoint "
                              f"(found {model.weights_source.split(':')[0]} weights); use --checkpoint")
    elif cfg.backbone == "i3d_inception":
        model = build_backbone("i3d_inception", pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                               **{**cfg.backbone_options, "num_classes": n, "drop_rate": cfg.dropout})
    else:
        raise CatnetError(f"cannot fine-tune backbone {cfg.backbone!r}; choose i3d_r50 or i3d_inception")
    model.labels = list(classes)
    return model


def save_backbone(model: nn.Module, path: str | Path, backbone: str) -> Path:
    """Weights in the format `build_backbone(backbone, checkpoint=path)` loads (safetensors)."""
    if backbone == "i3d_r50":
        from catnet.backbones.i3d_resnet_formats import save_weights

        return save_weights(model, path)
    meta = {"catnet_backbone": backbone, "labels": list(model.labels or [])}
    return save_safetensors(model.state_dict(), path, meta)


# ------------------------------------------------------------------------------------------ data


class TrainClips(torch.utils.data.Dataset):
    """One augmented random clip of video i: (3, L, S, S), label; a bad video gives a blank clip + IGNORE.

    The clip depends only on (seed, epoch, video), never on the worker or on a resume.
    """

    def __init__(self, entries: list[VideoEntry], cfg: FinetuneConfig):
        self.entries, self.cfg = entries, cfg
        self.sampling, self.spatial = cfg.sampling(train=True), cfg.spatial(train=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        e = self.entries[i]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, i])
        try:
            clips = load_clips(e.path, self.sampling, self.spatial, train=True, rng=rng)
            return clips.views[0], e.label
        except VideoError as err:
            print(f"warning: skipping {e.path} this step: {err}", file=sys.stderr)
            s = self.spatial.crop
            return torch.zeros(3, self.sampling.clip_len, s, s), IGNORE


def select_splits(entries: list[VideoEntry], cfg: FinetuneConfig) -> tuple[list[int], list[int], str]:
    """(train indices, validation indices, validation name), the same rules as `catnet train`."""
    labelled = [i for i, e in enumerate(entries) if e.label >= 0]
    if not labelled:
        raise CatnetError(f"{cfg.source} has no labelled videos; fine-tuning needs class labels")
    if not any(entries[i].split for i in labelled):
        if cfg.val_split == NO_VALIDATION:
            return labelled, [], NO_VALIDATION
        held = holdout([entries[i].id for i in labelled], np.array([entries[i].label for i in labelled]),
                        cfg.holdout_fraction)
        train = [i for i, h in zip(labelled, held, strict=True) if not h]
        val = [i for i, h in zip(labelled, held, strict=True) if h]
        if not train or not val:
            raise CatnetError(f"{cfg.source} has no splits and too few videos for a held-out validation "
                              "split; pass --val-split none")
        return train, val, f"holdout{cfg.holdout_fraction:g}"
    by_split: dict[str, list[int]] = {}
    for i in labelled:
        by_split.setdefault(entries[i].split, []).append(i)
    present = ", ".join(sorted(s for s in by_split if s))
    train = by_split.get(cfg.train_split, [])
    if not train:
        raise CatnetError(f"training split {cfg.train_split!r} is empty (splits present: {present})")
    if cfg.val_split == NO_VALIDATION:
        return train, [], NO_VALIDATION
    names = ("test", "val") if cfg.val_split is None else (cfg.val_split,)
    for name in names:
        if by_split.get(name):
            return train, by_split[name], name
    raise CatnetError(f"no labelled videos in validation split {' or '.join(names)} (splits present: "
                      f"{present}); pass --val-split NAME or --val-split none")


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def video_probabilities(model: nn.Module, views: torch.Tensor, batch_size: int, device: str,
                        amp: torch.dtype | None = None) -> torch.Tensor:
    """(C,) the mean over views of softmax(model(view)): the baseline's 30-view video prediction."""
    probs = []
    for chunk in views.split(batch_size):
        with autocast(torch.device(device).type, amp):
            logits = model(chunk.to(device, non_blocking=True))
        probs.append(logits.float().softmax(1))
    return torch.cat(probs).mean(0)


@torch.no_grad()
def evaluate_videos(model: nn.Module, entries: list[VideoEntry], indices: list[int], cfg: FinetuneConfig,
                    device: str, progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5/mean-class accuracy of the view-averaged predictions, sharded over DDP ranks.

    Videos that fail to decode are counted (`failed`) and left out of the metrics.
    """
    from tqdm import tqdm

    model.eval()
    sampling, spatial = cfg.sampling(train=False), cfg.spatial(train=False)
    acc = MetricAccumulator(model.num_classes)
    failed = torch.zeros((), dtype=torch.int64)
    shard = list(dist.ShardSampler(indices))
    loader = torch.utils.data.DataLoader(_EvalClips(entries, shard, sampling, spatial), batch_size=None,
                                         num_workers=cfg.num_workers)
    for views, label in tqdm(loader, desc="eval", leave=False, file=sys.stderr,
                             disable=not (progress and dist.is_main())):
        if views is None:
            failed += 1
            continue
        p = video_probabilities(model, views, cfg.eval_batch_size, device, amp_dtype(cfg.amp))
        logp = p.clamp_min(1e-12).log()[None]
        y = torch.tensor([label])
        acc.update(logp, y, float(-logp[0, label]))
    out = acc.compute()
    out["failed"] = int(dist.all_reduce_sum(failed))
    return out


class _EvalClips(torch.utils.data.Dataset):
    """All test views of one video per item (V, 3, L, S, S), or None when it cannot be decoded."""

    def __init__(self, entries, indices, sampling, spatial):
        self.entries, self.indices, self.sampling, self.spatial = entries, indices, sampling, spatial

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        e = self.entries[self.indices[j]]
        try:
            return load_clips(e.path, self.sampling, self.spatial).views, e.label
        except VideoError as err:
            print(f"warning: evaluation skips {e.path}: {err}", file=sys.stderr)
            return None, e.label


# ------------------------------------------------------------------------------------------ training


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune `cfg.backbone` on the videos of `cfg.source` into `cfg.out`; returns the run summary."""
    cfg.check()
    with dist.session(cfg.device) as info:
        return _finetune(cfg, info)


def _finetune(cfg: FinetuneConfig, info: dist.DistInfo) -> dict[str, Any]:
    main = info.rank == 0
    out = Path(cfg.out)
    ckpt_dir = out / CHECKPOINTS
    last_path = ckpt_dir / "last.pt"
    if cfg.batch_size % info.world_size:
        raise CatnetError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")

    entries, classes = list_videos(cfg.source)
    if not classes:
        raise CatnetError(f"{cfg.source} has no class names; fine-tuning needs labelled videos")
    train_idx, val_idx, val_name = select_splits(entries, cfg)
    if cfg.resume:
        if not last_path.is_file():
            raise CatnetError(f"nothing to resume: {last_path} does not exist (start again without --resume)")
        prev = read_run_info(out)
        diff = [k for k, v in to_dict(cfg).items()
                if k not in RESUME_MUTABLE and _jsonable(prev["finetune"].get(k)) != _jsonable(v)]
        if diff:
            raise CatnetError(f"--resume with settings that differ from the run's: {', '.join(diff)}")
        if prev["classes"] != classes:
            raise CatnetError(f"the classes of {cfg.source} differ from the resumed run's")
    elif last_path.exists():
        raise CatnetError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")

    seed_everything(cfg.seed + info.rank)
    if info.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: let cuDNN pick the fastest 3-D convs
    model = build_model(cfg, classes)
    init_weights = model.weights_id
    model.to(info.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # shared by all ranks: one order per epoch
    start, best_top1, best_epoch, history = 0, -math.inf, 0, []

    if cfg.resume:
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        data_gen.set_state(ckpt["data_generator"])
        if len(ckpt["rng"]) == info.world_size:
            set_rng_state(ckpt["rng"][info.rank])
        start, best_top1, best_epoch = ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"]
        history = list(ckpt["history"])
        if main:
            print(f"resuming {out} after epoch {start}", file=sys.stderr)
    elif main:
        atomic_write_json(out / RUN_JSON, {
            "catnet_version": catnet.__version__, "kind": "backbone",
            "backbone": cfg.backbone,
            "init": {"weights_id": init_weights, "source": getattr(model, "weights_source", None)},
            "classes": classes, "num_classes": len(classes),
            "sampling": {"train": asdict(cfg.sampling(True)), "test": asdict(cfg.sampling(False))},
            "spatial": {"train": asdict(cfg.spatial(True)), "test": asdict(cfg.spatial(False))},
            "splits": {"train": cfg.train_split, "val": val_name, "num_train": len(train_idx),
                       "num_val": len(val_idx)},
            "finetune": _jsonable(to_dict(cfg)), "world_size": info.world_size})

    net = wrap_ddp(model, info.device, info.local_rank, info.world_size)
    sampler = dist.TrainSampler(train_idx, data_gen, info.rank, info.world_size)
    dataset = TrainClips(entries, cfg)
    per_rank = cfg.batch_size // info.world_size
    amp = amp_dtype(cfg.amp)
    device_type = torch.device(info.device).type
    writer = None
    if main:
        writer = open_writer(out, start)
        print(f"fine-tuning {cfg.backbone} on {len(train_idx)} videos ({len(classes)} classes), validating "
              f"on {len(val_idx)} ({val_name}); {info.world_size} process(es) on {info.device}",
              file=sys.stderr)

    from tqdm import tqdm

    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler.epoch_order(),
                                             num_workers=cfg.num_workers,
                                             pin_memory=info.device.startswith("cuda"))
        stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, clips
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not (main and cfg.progress), dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            with autocast(device_type, amp):
                logits = net(x)
            valid = (y != IGNORE).sum()
            loss_sum = F.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="sum")
            loss = loss_sum / valid.clamp_min(1)  # a batch of only failed clips steps with zero gradient
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double(),
                                  valid.double()])
        scheduler.step()
        stats = dist.all_reduce_sum(stats).cpu()
        n = max(float(stats[2]), 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(stats[0]) / n,
                               "train_top1": float(stats[1]) / n}
        if val_idx and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            val = evaluate_videos(model, entries, val_idx, cfg, info.device, progress=cfg.progress)
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                       val_mean_class_acc=val["mean_class_acc"], val_n=val["n"], val_failed=val["failed"])
        row["time_s"] = round(time.time() - t0, 3)
        history.append(row)
        if val_idx:
            improved = "val_top1" in row and row["val_top1"] > best_top1
        else:
            improved = True  # no validation: the latest weights are the result
        if improved:
            best_top1, best_epoch = row.get("val_top1", row["train_top1"]), epoch + 1
        rngs = dist.all_gather_object(rng_state())
        if main:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", {"model": state, "epoch": epoch + 1, "metrics": row})
                save_backbone(model, out / BACKBONE_FILE, cfg.backbone)
            save_checkpoint(last_path, {
                "model": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rngs, "data_generator": data_gen.get_state(), "epoch": epoch + 1,
                "best_top1": best_top1, "best_epoch": best_epoch, "history": history})
            write_metrics(out / "metrics.csv", _uniform(history))
            log_scalars(writer, row, epoch + 1)
            print(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
                  f"top-1 {fmt_metric(row['train_top1'])}  |  val top-1 {fmt_metric(row.get('val_top1'))} "
                  f"top-5 {fmt_metric(row.get('val_top5'))}  |  {row['time_s']:.1f}s"
                  f"{'  *best' if improved else ''}", file=sys.stderr)
        dist.barrier()
    if writer is not None:
        writer.close()
        print(f"done: best val top-1 {fmt_metric(best_top1 if val_idx else None)} at epoch {best_epoch}; "
              f"extract features with --checkpoint {out / BACKBONE_FILE}", file=sys.stderr)
    return {"run_dir": str(out), "backbone_checkpoint": str(out / BACKBONE_FILE), "epochs": cfg.epochs,
            "best_epoch": best_epoch, "best_top1": best_top1 if val_idx else None,
            "final": history[-1] if history else None, "history": history, "world_size": info.world_size}


def _jsonable(v: Any) -> Any:
    """Tuples as lists, as they come back from run.json."""
    return json.loads(json.dumps(v))


def _uniform(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the same columns (epochs without validation get empty validation cells) for the CSV."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    return [{k: row.get(k, "") for k in keys} for row in history]


# ------------------------------------------------------------------------------------------ CLI

# CLI flag -> FinetuneConfig key; each flag, when given, overrides the --config preset.
_FLAGS: dict[str, tuple[str, type]] = {
    "--backbone": ("backbone", str), "--checkpoint": ("checkpoint", str),
    "--inflate-from": ("inflate_from", str), "--epochs": ("epochs", int), "--batch-size": ("batch_size", int),
    "--lr": ("lr", float), "--momentum": ("momentum", float), "--weight-decay": ("weight_decay", float),
    "--lr-step": ("lr_step", int), "--lr-gamma": ("lr_gamma", float), "--dropout": ("dropout", float),
    "--frames": ("clip_len", int), "--stride": ("stride", int), "--short-side": ("short_side", int),
    "--crop-size": ("crop", int), "--test-clips": ("test_clips", int), "--test-crops": ("test_crops", int),
    "--train-split": ("train_split", str), "--val-split": ("val_split", str),
    "--holdout-fraction": ("holdout_fraction", float), "--eval-every": ("eval_every", int),
    "--eval-batch-size": ("eval_batch_size", int), "--amp": ("amp", str), "--seed": ("seed", int),
    "--workers": ("num_workers", int), "--device": ("device", str),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="VIDEOS", help="folder of videos (one sub-folder per class) or an "
                   "annotation file (with train/test splits)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create (or resume)")
    p.add_argument("--config", metavar="YAML", help="FinetuneConfig preset; flags override it")
    for flag, (key, tp) in _FLAGS.items():
        p.add_argument(flag, dest=key, type=tp, default=None, help=f"FinetuneConfig.{key}")
    p.add_argument("--backbone-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="backbone option, repeatable, e.g. --backbone-opt variant=mmaction2 (i3d_r50)")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="start from the backbone's own pretrained weights (i3d_inception: Kinetics-400)")
    p.add_argument("--train-short", nargs=2, type=int, metavar=("LOW", "HIGH"), default=None,
                   help="training short-side range (default 256 320)")
    p.add_argument("--resume", action="store_true", help="continue RUN from checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """--config preset (or the resumed run's own settings) < explicit flags."""
    data: dict[str, Any] = {}
    if args.resume and (Path(args.out) / RUN_JSON).is_file() and not args.config:
        data = dict(read_run_info(args.out).get("finetune") or {})
    elif args.config:
        data = load_yaml(args.config)
    for key, _ in _FLAGS.values():
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.pretrained:
        data["pretrained"] = True
    if args.backbone_opt:
        extra = parse_head_opts(args.backbone_opt)  # key=value, values read as YAML scalars/lists
        data["backbone_options"] = {**(data.get("backbone_options") or {}), **extra}
    if args.train_short is not None:
        data["train_short"] = tuple(args.train_short)
    if "train_short" in data:
        data["train_short"] = tuple(data["train_short"])
    data.update(source=args.source, out=args.out, resume=bool(args.resume),
                progress=not args.no_progress and data.get("progress", True))
    return from_dict(FinetuneConfig, data)


def run(args: argparse.Namespace) -> int:
    result = finetune(config_from_args(args))
    if args.json and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0
