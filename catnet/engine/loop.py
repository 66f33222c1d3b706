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

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
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
from catnet.utils.io import atomic_write_json, exclusive_lock, remove_stale_temps


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
    seed: int = field(default=0, metadata=spec(ge=0, lt=2**63))
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


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


@contextlib.contextmanager
def run_folder(cfg: Recipe, info: dist.DistInfo) -> Iterator[None]:
    """Own RUN for the block: one writer at a time (a second `catnet train` into the same --out is
    refused, not silently merged), and no temporaries of a killed writer left behind. Rank 0 writes a
    run's files, so rank 0 holds the lock."""
    if info.rank != 0:
        yield
        return
    out = Path(cfg.out)
    with exclusive_lock(out / ".lock", f"another catnet run is writing {out}; wait for it to finish or "
                                         "choose another --out"):
        if (out / CHECKPOINTS).is_dir():
            remove_stale_temps(out / CHECKPOINTS)  # a checkpoint write cut short by a kill
        yield


def check_run_folder(cfg: Recipe, key: str, compat: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse, before any work: a resume without a checkpoint, with other settings or other data
    (`compat`: run.json entries, dotted for nested ones, that must be equal), or a new run into a folder
    that holds one. Returns the run.json of the run to resume (None for a new run)."""
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
    bad = [k for k, v in compat.items() if _lookup(prev, k) != v]
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


class _Run:
    """The state of one training run while the loop runs: model, optimiser, scheduler, loss scaler, data
    order, history, and the writers; one method per phase of an epoch."""

    def __init__(self, job: Job, cfg: Recipe, info: dist.DistInfo, plan: SplitPlan):
        if cfg.batch_size % info.world_size:
            raise CatnetError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
        self.job, self.cfg, self.info, self.plan = job, cfg, info, plan
        self.main, self.out = info.rank == 0, Path(cfg.out)
        self.last_path = self.out / CHECKPOINTS / "last.pt"
        self.model = job.model.to(info.device)
        self.device_type = torch.device(info.device).type
        # The fused kernel updates all parameters in one pass: several times faster steps than the
        # per-tensor loop (docs/benchmarks.md).
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay,
                                         fused=self.device_type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step,
                                                         gamma=cfg.lr_gamma)
        self.amp = amp_dtype(cfg.amp)
        self.scaler = grad_scaler(self.device_type, self.amp)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: one shared order
        self.state = _State()
        self.writer = None

    def start(self, prev: dict[str, Any] | None, run_info: dict[str, Any], key: str) -> None:
        """Resume from last.pt (and record the new config), or write run.json for a new run."""
        cfg, info = self.cfg, self.info
        if prev is not None:
            self.state = _resume(self.last_path, self.model, self.optimizer, self.scheduler, self.scaler,
                                 self.data_gen, info)
            if cfg.epochs < self.state.start:
                raise CatnetError(f"--epochs {cfg.epochs}, but {self.out} has already trained "
                                  f"{self.state.start} epochs; pass --epochs {self.state.start} or more")
            record = {**prev, key: to_dict(cfg)}
        else:
            record = {**run_info, key: to_dict(cfg), "world_size": info.world_size}
        self.net = wrap_ddp(self.model, info.device, info.local_rank, info.world_size)
        self.sampler = dist.TrainSampler(self.plan.train, self.data_gen, info.rank, info.world_size)
        if self.main:
            if prev is not None:
                print(f"resuming {self.out} after epoch {self.state.start}", file=sys.stderr)
            atomic_write_json(self.out / RUN_JSON, record)
            self.writer = open_writer(self.out, self.state.start)
            print(f"{self.job.what} on {len(self.plan.train)} videos, validating on {len(self.plan.val)} "
                  f"({self.plan.val_name}); {info.world_size} process(es) on {info.device}", file=sys.stderr)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's share of the training set; the epoch's (all-reduced) statistics."""
        cfg, device = self.cfg, self.info.device
        lr = self.optimizer.param_groups[0]["lr"]
        self.net.train()
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, items
        batches = self.job.batches(epoch, self.sampler.epoch_order(), cfg.batch_size // self.info.world_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not (self.main and cfg.progress), dynamic_ncols=True)
        for step, batch in enumerate(bar):
            with autocast(self.device_type, self.amp):
                loss, loss_sum, correct, n = self.job.loss(self.net, batch, device)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # accumulated on the device: no host sync per step
            stats += torch.stack([loss_sum.detach().double(), correct.double(), n.double()])
            if step % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        self.scheduler.step()
        stats = dist.all_reduce_sum(stats).cpu()  # the same on every rank: all stop together below
        if not math.isfinite(float(stats[0])):
            raise CatnetError(f"the training loss became non-finite (NaN/Inf) in epoch {epoch + 1}: the "
                              f"weights diverged (lr {cfg.lr:g} too large?); nothing of this epoch was "
                              "saved")
        count = max(float(stats[2]), 1.0)
        return {"epoch": epoch + 1, "lr": lr, "train_loss": float(stats[0]) / count,
                "train_top1": float(stats[1]) / count}

    def end_epoch(self, epoch: int, row: dict[str, Any], t0: float) -> None:
        """Validate, keep the best, checkpoint, log: everything after the epoch's last step."""
        val = self.job.validate(epoch, last=epoch + 1 == self.cfg.epochs) if self.plan.val else None
        if val is not None:
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                       val_mean_class_acc=val["mean_class_acc"], val_n=val["n"],
                       **{f"val_{k}": v for k, v in val.items() if k == "failed"})
        row["time_s"] = round(time.time() - t0, 3)
        st = self.state
        st.history.append(row)
        # no validation: the latest weights are the result
        improved = row["val_top1"] > st.best_top1 if "val_top1" in row else not self.plan.val
        if improved:
            st.best_top1, st.best_epoch = row.get("val_top1", row["train_top1"]), epoch + 1
        rngs = dist.all_gather_object(rng_state())
        if self.main:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            if improved:
                save_checkpoint(self.out / CHECKPOINTS / "best.pt", {"model": weights, "epoch": epoch + 1,
                                                                     "metrics": row})
                self.job.on_best(self.out)
            save_checkpoint(self.last_path, {
                "model": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                "data_generator": self.data_gen.get_state(), "epoch": epoch + 1, "best_top1": st.best_top1,
                "best_epoch": st.best_epoch, "history": st.history})
            write_metrics(self.out / "metrics.csv", uniform_rows(st.history))
            log_scalars(self.writer, row, epoch + 1)
            print(_epoch_line(row, self.cfg.epochs, improved), file=sys.stderr)
        dist.barrier()

    def finish(self) -> dict[str, Any]:
        st = self.state
        if self.writer is not None:
            self.writer.close()
            best = fmt_metric(st.best_top1 if self.plan.val else None)
            print(f"done: best val top-1 {best} at epoch {st.best_epoch}; run saved in {self.out}",
                  file=sys.stderr)
        return {"run_dir": str(self.out), "epochs": self.cfg.epochs, "best_epoch": st.best_epoch,
                "best_top1": st.best_top1, "final": st.history[-1] if st.history else None,
                "history": st.history, "world_size": self.info.world_size}


def fit(job: Job, cfg: Recipe, info: dist.DistInfo, plan: SplitPlan, run_info: dict[str, Any],
        prev: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """Train `job.model` for `cfg.epochs` on `plan.train`; returns the summary (history, best epoch, ...).

    `run_info` is written as RUN/run.json for a new run (with `cfg` under `key`); for a resume (`prev`
    from check_run_folder) the recorded config is updated instead (an extended --epochs).
    """
    run = _Run(job, cfg, info, plan)
    run.start(prev, run_info, key)
    for epoch in range(run.state.start, cfg.epochs):
        t0 = time.time()
        run.end_epoch(epoch, run.train_epoch(epoch), t0)
    return run.finish()
