"""The one training loop, shared by `catnet train` (heads on features) and `catnet finetune-backbone`.

    prev = check_run_folder(cfg, "train", {"in_dim": 1024, "classes": classes})   # refuse before work
    seed_everything(cfg.seed + rank); job = MyJob(...)                           # the job builds its model
    summary = fit(job, cfg, info, plan, run_info, prev)

The loop owns what both jobs must do identically: resume (model, optimiser, loss scaler, data order
and every RNG, so a killed run finishes bit-identical on CPU; the learning rate is a function of the
step), the per-step schedule (catnet.engine.optim), the epoch loop under autocast with fp16 loss
scaling, the all-reduce of the epoch's statistics, validation, early stopping, best/last checkpoints,
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

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catnet.config import check_fields, load_yaml, spec, to_dict
from catnet.engine.optim import Criterion, LRSchedule, make_optimizer, make_sampler, set_lr
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
from catnet.engine.splits import HOLDOUT_RULES, SplitPlan
from catnet.errors import CatnetError
from catnet.utils import distributed as dist
from catnet.utils.amp import amp_dtype, autocast, grad_scaler
from catnet.utils.io import atomic_write_json, exclusive_lock, remove_stale_temps
from catnet.utils.threads import iteration


@dataclass
class Recipe:
    """What every training run has: the run folder, the optimisation recipe, splits, seed and device.
    `TrainConfig` (the recipe for heads on features) and `FinetuneConfig` (the paper's) extend it; the
    defaults here are the paper's where it gives them (Sec. 4.1)."""

    out: str = ""
    # None: max(90, ceil(min_steps / steps per epoch)), so tiny stores still get min_steps steps
    epochs: int | None = field(default=90, metadata=spec(ge=1))
    min_steps: int = field(default=1000, metadata=spec(ge=1))
    batch_size: int = field(default=64, metadata=spec(ge=1))  # global: split over DDP ranks (paper: 8 x 8)
    optimizer: str = field(default="sgd", metadata=spec(choices=("sgd", "adamw")))
    lr: float = field(default=0.01, metadata=spec(gt=0))
    momentum: float = field(default=0.9, metadata=spec(ge=0))  # SGD
    nesterov: bool = False  # SGD with momentum > 0
    weight_decay: float = field(default=1e-4, metadata=spec(ge=0))  # not stated in the paper
    # "step": lr x lr_gamma every lr_step epochs (the paper); "cosine": per step from lr to 0
    schedule: str = field(default="step", metadata=spec(choices=("step", "cosine")))
    lr_step: int = field(default=30, metadata=spec(ge=1))
    lr_gamma: float = field(default=0.1, metadata=spec(gt=0))
    # linear warmup: warmup_epochs if given, else this fraction of all steps
    warmup_epochs: float | None = field(default=None, metadata=spec(ge=0))
    warmup_fraction: float = field(default=0.0, metadata=spec(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=spec(ge=0, lt=1))
    class_weights: str = field(default="none", metadata=spec(choices=("none", "balanced")))
    sampler: str = field(default="shuffle", metadata=spec(choices=("shuffle", "balanced")))
    early_stop: int = field(default=0, metadata=spec(ge=0))  # patience in epochs on validation top-1; 0 off
    train_split: str = "train"
    # None: the "val" split, else a held-out part of train, else none; "test" only when asked
    # (catnet.engine.splits); "none": no validation (best = last)
    val_split: str | None = None
    holdout_fraction: float = field(default=0.1, metadata=spec(gt=0, lt=1))  # of train's groups, per class
    # "floor": a class holds out floor(fraction x groups), none below 1/fraction groups; "at_least_one":
    # catnet 0.3's rule (at least one per class), kept for resuming its runs (catnet.engine.splits)
    holdout_rule: str = field(default="floor", metadata=spec(choices=HOLDOUT_RULES))
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

    # What a config of catnet <= 0.2 (no `schedule` key) trained with, for the keys it lacks.
    LEGACY: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd", "nesterov": False, "schedule": "step", "warmup_epochs": None,
        "warmup_fraction": 0.0, "min_steps": 1000, "label_smoothing": 0.0, "class_weights": "none",
        "sampler": "shuffle", "early_stop": 0}

    @classmethod
    def upgrade(cls, data: dict[str, Any], recorded: bool = True) -> dict[str, Any]:
        """A config dict in today's shape. `recorded` (an earlier catnet's run.json): keys it lacks get
        the values that catnet trained with, not today's defaults. A user's YAML (`recorded=False`) only
        has renamed keys moved: what it does not set takes today's defaults, as its flags would."""
        data = dict(data)
        if recorded and "schedule" not in data:
            data = {**cls.LEGACY, **data}
        return data


class Job:
    """The part of a training run that is not the loop. Subclasses set `model` and implement these."""

    model: nn.Module
    num_classes: int
    what: str = "training"  # the first word of the start line

    def train_labels(self) -> np.ndarray:
        """The class of each training item, in the plan's order (class weights, balanced sampler)."""
        raise NotImplementedError

    def batches(self, epoch: int, order: list[int], batch_size: int) -> Iterable:
        """This rank's training batches for `epoch`, in the sampler's `order`."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch, device: str, criterion: Criterion) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss to back-propagate, summed loss, correct predictions, items), on `device`; `criterion`
        is the recipe's loss (label smoothing, class weights)."""
        raise NotImplementedError

    def validate(self, epoch: int, last: bool, epochs: int) -> dict[str, Any] | None:
        """Validation metrics (top1, top5, mean_class_acc, loss, n, ...) after `epoch` of `epochs`, or
        None to skip this epoch."""
        raise NotImplementedError

    def on_best(self, out: Path) -> None:
        """Files to write beside a new best checkpoint (rank 0 only)."""


def recorded_config(cls: type[Recipe], info: dict[str, Any], key: str) -> dict[str, Any]:
    """A run.json's config under `key` in today's shape. Before catnet 0.3 an unset val_split meant the
    store's "test" split: the split such a run did validate on is pinned, so it resumes as it ran; so is
    the hold-out rule of a run from before `holdout_rule`."""
    data = cls.upgrade(info.get(key) or {})
    data.setdefault("holdout_rule", "at_least_one")  # every run.json before the key trained with it
    val = (info.get("splits") or {}).get("val")
    if "selected_on" not in info and data.get("val_split") is None and val and not val.startswith("holdout"):
        data["val_split"] = val
    return data


def starting_point(cls: type[Recipe], key: str, out: str, resume: bool, preset: str | None) -> dict[str, Any]:
    """The config a command line starts from: a --config preset, else the resumed run's own settings
    (RUN/run.json[key]), else nothing (the defaults)."""
    if preset:
        return cls.upgrade(load_yaml(preset), recorded=False)
    if resume and (Path(out) / RUN_JSON).is_file():
        return recorded_config(cls, read_run_info(out), key)
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
        for folder in (out, out / CHECKPOINTS):  # writes cut short by a kill (checkpoints, run.json, ...)
            if folder.is_dir():
                remove_stale_temps(folder)
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
    diff = settings_diff(cfg, recorded_config(type(cfg), prev, key))
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
    stopped: bool = False  # early stopping ended the run


def _resume(path: Path, model, optimizer, scaler, data_gen, info: dist.DistInfo) -> _State:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    data_gen.set_state(ckpt["data_generator"])
    rngs = ckpt["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    elif info.rank == 0:
        print(f"note: run was saved with {len(rngs)} processes, resuming with {info.world_size}: "
              "dropout draws will differ from an uninterrupted run", file=sys.stderr)
    return _State(ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"], list(ckpt["history"]),
                  bool(ckpt.get("stopped", False)))


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    m = fmt_metric
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
            f"top-1 {m(row['train_top1'])}  |  val loss {m(row.get('val_loss'), False)} "
            f"top-1 {m(row.get('val_top1'))} top-5 {m(row.get('val_top5'))} "
            f"mean-class {m(row.get('val_mean_class_acc'))}  |  {row['time_s']:.1f}s"
            f"{'  *best' if improved else ''}")


def selection_record(plan: SplitPlan) -> dict[str, Any]:
    """What run.json says about checkpoint selection: the store split that chose it (None: nothing did,
    the best checkpoint is the last) and, explicitly, whether that was the test split."""
    return {"selected_on": plan.selected_on, "selected_on_test": plan.selected_on == "test"}


class _Run:
    """The state of one training run while the loop runs: model, optimiser, schedule, loss scaler, data
    order, history, and the writers; one method per phase of an epoch."""

    def __init__(self, job: Job, cfg: Recipe, info: dist.DistInfo, plan: SplitPlan):
        if cfg.batch_size % info.world_size:
            raise CatnetError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
        if cfg.early_stop and not plan.val:
            raise CatnetError("--early-stop needs validation videos, but this run has none "
                              f"({plan.note or 'val split none'})")
        self.job, self.cfg, self.info, self.plan = job, cfg, info, plan
        self.main, self.out = info.rank == 0, Path(cfg.out)
        self.last_path = self.out / CHECKPOINTS / "last.pt"
        self.model = job.model.to(info.device)
        self.device_type = torch.device(info.device).type
        self.amp = amp_dtype(cfg.amp)
        self.scaler = grad_scaler(self.device_type, self.amp)
        self.optimizer = make_optimizer(cfg, self.model.parameters(), self.device_type,
                                        loss_scaled=self.scaler.is_enabled())
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: one shared order
        labels = job.train_labels()
        self.sampler = make_sampler(cfg, plan.train, labels, self.data_gen, info.rank, info.world_size)
        self.criterion = Criterion.of(cfg, labels, job.num_classes, info.world_size)
        self.per_rank_batch = cfg.batch_size // info.world_size
        self.schedule = LRSchedule.plan(cfg, -(-len(self.sampler) // self.per_rank_batch))
        self.epochs = self.schedule.epochs
        self.state = _State()
        self.writer = None

    def start(self, prev: dict[str, Any] | None, run_info: dict[str, Any], key: str) -> None:
        """Resume from last.pt (and record the new config), or write run.json for a new run."""
        cfg, info = self.cfg, self.info
        if prev is not None:
            self.state = _resume(self.last_path, self.model, self.optimizer, self.scaler, self.data_gen, info)
            self.schedule = self.schedule.continuing(prev.get("schedule"))
            if self.epochs < self.state.start:
                raise CatnetError(f"--epochs {self.epochs}, but {self.out} has already trained "
                                  f"{self.state.start} epochs; pass --epochs {self.state.start} or more")
            record = {k: v for k, v in prev.items() if k != "result"}
            record.update({key: to_dict(cfg), "schedule": self.schedule.record()})
        else:
            record = {**run_info, **selection_record(self.plan), key: to_dict(cfg),
                      "schedule": self.schedule.record(), "world_size": info.world_size}
        self.record = record
        self.net = wrap_ddp(self.model, info.device, info.local_rank, info.world_size)
        if self.main:
            if prev is not None:
                print(f"resuming {self.out} after epoch {self.state.start}", file=sys.stderr)
            atomic_write_json(self.out / RUN_JSON, record)
            self.writer = open_writer(self.out, self.state.start)
            if self.plan.note:
                print(f"note: {self.plan.note}", file=sys.stderr)
            print(f"{self.job.what} on {len(self.plan.train)} videos, validating on {len(self.plan.val)} "
                  f"({self.plan.val_name}); {self.epochs} epochs x {self.schedule.steps_per_epoch} steps; "
                  f"{info.world_size} process(es) on {info.device}", file=sys.stderr)
            if self.plan.selected_on == "test":
                print("note: selecting the checkpoint on the test split (--val-split test): numbers "
                      "measured on it will be marked as selected on test", file=sys.stderr)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's share of the training set; the epoch's (all-reduced) statistics."""
        cfg, device = self.cfg, self.info.device
        self.net.train()
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, items
        batches = self.job.batches(epoch, self.sampler.epoch_order(), self.per_rank_batch)
        with iteration(batches) as it:  # the read-ahead thread is joined even if the epoch is cut short
            bar = tqdm(it, total=len(batches), desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                       file=sys.stderr, disable=not (self.main and cfg.progress), dynamic_ncols=True)
            for step, batch in enumerate(bar):
                set_lr(self.optimizer, self.schedule.lr(epoch, step))
                with autocast(self.device_type, self.amp):
                    loss, loss_sum, correct, n = self.job.loss(self.net, batch, device, self.criterion)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                # accumulated on the device: no host sync per step
                stats += torch.stack([loss_sum.detach().double(), correct.double(), n.double()])
                if step % 10 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
        stats = dist.all_reduce_sum(stats).cpu()  # the same on every rank: all stop together below
        if not math.isfinite(float(stats[0])):
            raise CatnetError(f"the training loss became non-finite (NaN/Inf) in epoch {epoch + 1}: the "
                              f"weights diverged (lr {cfg.lr:g} too large?); nothing of this epoch was "
                              "saved")
        count = max(float(stats[2]), 1.0)
        return {"epoch": epoch + 1, "lr": self.schedule.lr(epoch, 0), "train_loss": float(stats[0]) / count,
                "train_top1": float(stats[1]) / count}

    def end_epoch(self, epoch: int, row: dict[str, Any], t0: float) -> None:
        """Validate, keep the best, stop early, checkpoint, log: everything after the epoch's last step."""
        val = self.job.validate(epoch, epoch + 1 == self.epochs, self.epochs) if self.plan.val else None
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
        # patience counted in epochs since the best one, checked when validation ran
        st.stopped = bool(self.cfg.early_stop and "val_top1" in row
                          and epoch + 1 - st.best_epoch >= self.cfg.early_stop and epoch + 1 < self.epochs)
        rngs = dist.all_gather_object(rng_state())
        if self.main:
            self._save(epoch, row, improved, rngs)
        dist.barrier()

    def _save(self, epoch: int, row: dict[str, Any], improved: bool, rngs: list) -> None:
        st = self.state
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if improved:
            save_checkpoint(self.out / CHECKPOINTS / "best.pt", {"model": weights, "epoch": epoch + 1,
                                                                 "metrics": row})
            self.job.on_best(self.out)
        save_checkpoint(self.last_path, {
            "model": weights, "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.record(),
            "scaler": self.scaler.state_dict(), "rng": rngs, "data_generator": self.data_gen.get_state(),
            "epoch": epoch + 1, "best_top1": st.best_top1, "best_epoch": st.best_epoch,
            "history": st.history, "stopped": st.stopped})
        write_metrics(self.out / "metrics.csv", uniform_rows(st.history))
        log_scalars(self.writer, row, epoch + 1)
        print(_epoch_line(row, self.epochs, improved), file=sys.stderr)
        if st.stopped:
            print(f"early stop: no better validation top-1 for {self.cfg.early_stop} epochs since epoch "
                  f"{st.best_epoch}", file=sys.stderr)

    def finish(self) -> dict[str, Any]:
        st = self.state
        done = st.history[-1]["epoch"] if st.history else 0
        if self.writer is not None:
            self.writer.close()
            atomic_write_json(self.out / RUN_JSON, {**self.record, "result": {
                "epochs_run": done, "stopped_early": st.stopped, "best_epoch": st.best_epoch}})
            best = fmt_metric(st.best_top1 if self.plan.val else None)
            print(f"done: best val top-1 {best} at epoch {st.best_epoch}; run saved in {self.out}",
                  file=sys.stderr)
        return {"run_dir": str(self.out), "epochs": self.epochs, "epochs_run": done,
                "stopped_early": st.stopped, "best_epoch": st.best_epoch,
                "best_top1": st.best_top1 if self.plan.val else None,  # a validation top-1, or none
                "final": st.history[-1] if st.history else None, "history": st.history,
                "world_size": self.info.world_size, "val": self.plan.val_name,
                "selected_on": self.plan.selected_on}


def fit(job: Job, cfg: Recipe, info: dist.DistInfo, plan: SplitPlan, run_info: dict[str, Any],
        prev: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """Train `job.model` on `plan.train` for the planned epochs (or until early stopping); returns the
    summary (history, best epoch, ...).

    `run_info` is written as RUN/run.json for a new run (with `cfg` under `key`); for a resume (`prev`
    from check_run_folder) the recorded config is updated instead (an extended --epochs).
    """
    run = _Run(job, cfg, info, plan)
    run.start(prev, run_info, key)
    epoch = run.state.start
    while epoch < run.epochs and not run.state.stopped:
        t0 = time.time()
        run.end_epoch(epoch, run.train_epoch(epoch), t0)
        epoch += 1
    return run.finish()
