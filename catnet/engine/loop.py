"""The one training loop, shared by `catnet train` (heads on features) and `catnet finetune-backbone`.

    prev = check_run_folder(cfg, "train", {"in_dim": 1024, "classes": classes})   # refuse before work
    seed_everything(cfg.seed + rank); job = MyJob(...)                           # the job builds its model
    summary = fit(job, cfg, info, plan, run_info, prev)

The loop owns what both jobs must do identically: resume (model, optimiser, scheduler, loss scaler,
data order and every RNG, so a killed run finishes bit-identical on CPU), the epoch loop under autocast
with fp16 loss scaling, the all-reduce of the epoch's statistics, validation, best/last checkpoints,
metrics.csv, TensorBoard and the epoch line. A `Job` says only what differs: which batches, the loss of
one batch, how to validate, and what to save next to a new best checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from catnet.config import check_fields, load_yaml, spec, to_dict
from catnet.engine.runs import (
    CHECKPOINTS,
    RUN_JSON,
    fmt_metric,
    load_checkpoint,
    log_scalars,
    open_writer,
    read_run_info,
    rng_state,
    save_checkpoint,
    set_rng_state,
    uniform_rows,
    wrap_ddp,
    write_metrics,
)
from catnet.engine.splits import SplitPlan
from catnet.errors import CatnetError
from catnet.utils import distributed as dist
from catnet.utils.amp import amp_dtype, autocast, grad_scaler
from catnet.utils.io import atomic_write_json


@dataclass
class Recipe:
    """What every training run has: the run folder, the optimisation recipe, splits, seed and device.
    `TrainConfig` and `FinetuneConfig` extend it. Paper values where the paper gives them (Sec. 4.1)."""

    out: str = ""
    epochs: int = field(default=90, metadata=spec(ge=1))
    batch_size: int = field(default=64, metadata=spec(ge=1))  # global: split over DDP ranks (paper: 8 x 8)
    lr: float = field(default=0.01, metadata=spec(gt=0))
    momentum: float = field(default=0.9, metadata=spec(ge=0))
    weight_decay: float = field(default=1e-4, metadata=spec(ge=0))  # not stated in the paper
    lr_step: int = field(default=30, metadata=spec(ge=1))  # lr x lr_gamma every lr_step epochs
    lr_gamma: float = field(default=0.1, metadata=spec(gt=0))
    train_split: str = "train"
    val_split: str | None = None  # None: "test", else "val"; "none": no validation (best = last)
    holdout_fraction: float = field(default=0.1, metadata=spec(gt=0, lt=1))  # stores without split labels
    seed: int = 0
    device: str = "auto"
    # Autocast: "bf16" (CPU with AVX512-BF16, or GPU) or "fp16" (GPU; loss scaling). None = fp32.
    amp: str | None = None
    resume: bool = False
    progress: bool = True

    # Keys that may change when resuming (they do not affect the numbers); subclasses extend it.
    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = ("out", "epochs", "device", "resume", "progress")

    def __post_init__(self) -> None:
        check_fields(self)
        amp_dtype(self.amp)

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config dict from an earlier catnet's run.json in today's shape (the same, unless overridden)."""
        return dict(data)


class Job:
    """The part of a training run that is not the loop. Subclasses set `model` and implement these."""

    model: nn.Module
    what: str = "training"  # the first word of the start line

    def batches(self, epoch: int, order: list[int], batch_size: int) -> Iterable:
        """This rank's training batches for `epoch`, in the sampler's `order`."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
        """(mean loss to back-propagate, summed loss, correct predictions, items), on `device`."""
        raise NotImplementedError

    def validate(self, epoch: int, last: bool) -> dict[str, Any] | None:
        """Validation metrics (top1, top5, mean_class_acc, loss, n, ...) after `epoch`, or None to skip."""
        raise NotImplementedError

    def on_best(self, out: Path) -> None:
        """Files to write beside a new best checkpoint (rank 0 only)."""


def starting_point(cls: type[Recipe], key: str, out: str, resume: bool, preset: str | None) -> dict[str, Any]:
    """The config a command line starts from: a --config preset, else the resumed run's own settings
    (RUN/run.json[key]), else nothing (the defaults)."""
    if preset:
        return cls.upgrade(load_yaml(preset))
    if resume and (Path(out) / RUN_JSON).is_file():
        return cls.upgrade(read_run_info(out).get(key) or {})
    return {}


def settings_diff(cfg: Recipe, recorded: dict[str, Any]) -> list[str]:
    """The config keys whose values would change a run's numbers and differ from a run.json's record."""
    old = type(cfg).upgrade(recorded)
    return [k for k, v in to_dict(cfg).items() if k not in cfg.RESUME_MUTABLE and old.get(k) != v]


def check_run_folder(cfg: Recipe, key: str, compat: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse, before any work: a resume without a checkpoint, with other settings or other data
    (`compat`: run.json entries that must be equal), or a new run into a folder that holds one.
    Returns the run.json of the run to resume (None for a new run)."""
    out = Path(cfg.out)
    last = out / CHECKPOINTS / "last.pt"
    if not cfg.resume:
        if last.exists():
            raise CatnetError(f"{out} already holds a run; pass --resume to continue it or choose a new "
                              "--out")
        return None
    if not last.is_file():
        raise CatnetError(f"nothing to resume: {last} does not exist (no epoch finished yet? start again "
                          "without --resume)")
    prev = read_run_info(out)
    diff = settings_diff(cfg, prev.get(key) or {})
    if diff:
        raise CatnetError(f"--resume with settings that differ from the run's: {', '.join(diff)}")
    bad = [k for k, v in compat.items() if prev.get(k) != v]
    if bad:
        raise CatnetError(f"the data does not match the resumed run ({', '.join(bad)} differ)")
    return prev


@dataclass
class _State:
    start: int = 0
    best_top1: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _resume(path: Path, model, optimizer, scheduler, scaler, data_gen, info: dist.DistInfo) -> _State:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    data_gen.set_state(ckpt["data_generator"])
    rngs = ckpt["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    elif info.rank == 0:
        print(f"note: run was saved with {len(rngs)} processes, resuming with {info.world_size}: "
              "dropout draws will differ from an uninterrupted run", file=sys.stderr)
    return _State(ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"], list(ckpt["history"]))


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    m = fmt_metric
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
            f"top-1 {m(row['train_top1'])}  |  val loss {m(row.get('val_loss'), False)} "
            f"top-1 {m(row.get('val_top1'))} top-5 {m(row.get('val_top5'))} "
            f"mean-class {m(row.get('val_mean_class_acc'))}  |  {row['time_s']:.1f}s"
            f"{'  *best' if improved else ''}")


def fit(job: Job, cfg: Recipe, info: dist.DistInfo, plan: SplitPlan, run_info: dict[str, Any],
        prev: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """Train `job.model` for `cfg.epochs` on `plan.train`; returns the summary (history, best epoch, ...).

    `run_info` is written as RUN/run.json for a new run (with `cfg` under `key`); for a resume (`prev`
    from check_run_folder) the recorded config is updated instead (an extended --epochs).
    """
    main = info.rank == 0
    out = Path(cfg.out)
    last_path = out / CHECKPOINTS / "last.pt"
    if cfg.batch_size % info.world_size:
        raise CatnetError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
    model = job.model.to(info.device)
    device_type = torch.device(info.device).type
    # The fused kernel updates all parameters in one pass: several times faster steps than the per-tensor
    # loop (docs/benchmarks.md).
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, fused=device_type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    amp = amp_dtype(cfg.amp)
    scaler = grad_scaler(device_type, amp)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: one shared order
    if prev is not None:
        state = _resume(last_path, model, optimizer, scheduler, scaler, data_gen, info)
        if main:
            print(f"resuming {out} after epoch {state.start}", file=sys.stderr)
            atomic_write_json(out / RUN_JSON, {**prev, key: to_dict(cfg)})
    else:
        state = _State()
        if main:
            atomic_write_json(out / RUN_JSON, {**run_info, key: to_dict(cfg), "world_size": info.world_size})

    net = wrap_ddp(model, info.device, info.local_rank, info.world_size)
    sampler = dist.TrainSampler(plan.train, data_gen, info.rank, info.world_size)
    writer = open_writer(out, state.start) if main else None
    if main:
        print(f"{job.what} on {len(plan.train)} videos, validating on {len(plan.val)} ({plan.val_name}); "
              f"{info.world_size} process(es) on {info.device}", file=sys.stderr)
    for epoch in range(state.start, cfg.epochs):
        t0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, items
        bar = tqdm(job.batches(epoch, sampler.epoch_order(), cfg.batch_size // info.world_size),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not (main and cfg.progress), dynamic_ncols=True)
        for step, batch in enumerate(bar):
            with autocast(device_type, amp):
                loss, loss_sum, correct, n = job.loss(net, batch, info.device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # accumulated on the device: no host sync per step
            stats += torch.stack([loss_sum.detach().double(), correct.double(), n.double()])
            if step % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        scheduler.step()
        stats = dist.all_reduce_sum(stats).cpu()
        count = max(float(stats[2]), 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(stats[0]) / count,
                               "train_top1": float(stats[1]) / count}
        val = job.validate(epoch, last=epoch + 1 == cfg.epochs) if plan.val else None
        if val is not None:
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                       val_mean_class_acc=val["mean_class_acc"], val_n=val["n"],
                       **{f"val_{k}": v for k, v in val.items() if k == "failed"})
        row["time_s"] = round(time.time() - t0, 3)
        state.history.append(row)
        # no validation: the latest weights are the result
        improved = row["val_top1"] > state.best_top1 if "val_top1" in row else not plan.val
        if improved:
            state.best_top1, state.best_epoch = row.get("val_top1", row["train_top1"]), epoch + 1
        rngs = dist.all_gather_object(rng_state())
        if main:
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if improved:
                save_checkpoint(out / CHECKPOINTS / "best.pt", {"model": weights, "epoch": epoch + 1,
                                                                "metrics": row})
                job.on_best(out)
            save_checkpoint(last_path, {
                "model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "data_generator": data_gen.get_state(),
                "epoch": epoch + 1, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
                "history": state.history})
            write_metrics(out / "metrics.csv", uniform_rows(state.history))
            log_scalars(writer, row, epoch + 1)
            print(_epoch_line(row, cfg.epochs, improved), file=sys.stderr)
        dist.barrier()
    best = state.best_top1 if plan.val else None
    if writer is not None:
        writer.close()
        print(f"done: best val top-1 {fmt_metric(best)} at epoch {state.best_epoch}; run saved in {out}",
              file=sys.stderr)
    return {"run_dir": str(out), "epochs": cfg.epochs, "best_epoch": state.best_epoch,
            "best_top1": state.best_top1, "final": state.history[-1] if state.history else None,
            "history": state.history, "world_size": info.world_size}
