"""The optimisation pieces of a Recipe (catnet.engine.loop): optimiser, learning-rate schedule, loss,
class-balanced sampler and the run length. Each is a pure function of the config and of state the
checkpoint already holds (optimiser state, data-order generator, epoch), so `--resume` stays bit-exact.

    schedule = LRSchedule.plan(cfg, steps_per_epoch)     # epochs, total and warmup steps
    lr = schedule.lr(epoch, step)                        # set on every optimisation step
    loss = Criterion.of(cfg, train_labels, num_classes, world_size)(logits, y)

docs/training.md, "The recipe", says why each default is what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from catnet.utils import distributed as dist

# The paper's 90 epochs (Sec. 4.1): what an automatic run length never goes below.
PAPER_EPOCHS = 90


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per optimisation step: a linear warmup over `warmup_steps`, then either the paper's
    step decay (x lr_gamma every lr_step epochs) or a cosine from lr to 0 over the remaining steps."""

    kind: str  # "step" | "cosine"
    base_lr: float
    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    lr_step: int
    lr_gamma: float

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @classmethod
    def plan(cls, cfg, steps_per_epoch: int) -> LRSchedule:
        """The schedule of Recipe `cfg` when an epoch has `steps_per_epoch` steps. `cfg.epochs` None means
        max(90, ceil(min_steps / steps_per_epoch)): a store of a few dozen videos gets enough steps to fit,
        a large one the paper's 90 epochs."""
        steps_per_epoch = max(1, steps_per_epoch)
        epochs = cfg.epochs or max(PAPER_EPOCHS, -(-cfg.min_steps // steps_per_epoch))
        total = epochs * steps_per_epoch
        if cfg.warmup_epochs is not None:
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        else:
            warmup = round(cfg.warmup_fraction * total)
        return cls(cfg.schedule, cfg.lr, epochs, steps_per_epoch, min(warmup, total - 1), cfg.lr_step,
                   cfg.lr_gamma)

    def continuing(self, recorded: dict | None) -> LRSchedule:
        """This schedule for a resumed run whose recorded schedule is `recorded`: with the warmup that run
        had, which an extended --epochs would otherwise stretch when it is a fraction of the run (a
        warmup re-entered or lengthened after the fact). Unchanged for runs without a record."""
        if not recorded or recorded.get("steps_per_epoch") != self.steps_per_epoch:
            return self
        warmup = recorded.get("warmup_steps")
        if warmup is None:
            return self
        return replace(self, warmup_steps=min(int(warmup), self.total_steps - 1))

    def lr(self, epoch: int, step: int) -> float:
        t = epoch * self.steps_per_epoch + step
        if self.kind == "step":
            lr = self.base_lr * self.lr_gamma ** (epoch // self.lr_step)
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            done = min(1.0, max(0, t - self.warmup_steps) / span)
            lr = self.base_lr * 0.5 * (1.0 + math.cos(math.pi * done))
        if t < self.warmup_steps:  # (t + 1) / W: the first step already moves
            lr *= (t + 1) / self.warmup_steps
        return lr

    def record(self) -> dict:
        return {"kind": self.kind, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def make_optimizer(cfg, params, device_type: str, loss_scaled: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov when asked and momentum > 0) or AdamW; weight decay on every tensor.
    The fused kernels update all parameters in one pass: several times faster steps than the per-tensor
    loop (docs/benchmarks.md). Not on a CPU with fp16 loss scaling: torch's fused CPU SGD does not skip
    a step whose gradients overflowed (it corrupts the momentum), and fp16's first steps always overflow
    (tests/test_train.py)."""
    fused = device_type == "cuda" or (device_type == "cpu" and not loss_scaled)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (C_present * n_c) per class (1 on average over the items); 0 for classes without items."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


@dataclass
class Criterion:
    """Cross-entropy with optional label smoothing and class weights (`class_weights: balanced`).

    Under DDP (`world_size` > 1) each rank's own mean would weigh only its share of the batch, and
    DDP's gradient average of those means is not the batch's weighted mean once class weights or
    ignored labels (a fine-tune's failed clips) make the ranks' denominators differ: the denominator
    is then summed over ranks instead, so W processes train as one would on the same global batch."""

    weight: torch.Tensor | None = None
    smoothing: float = 0.0
    ignore_index: int = -100
    world_size: int = 1

    @classmethod
    def of(cls, cfg, labels: np.ndarray, num_classes: int, world_size: int = 1) -> Criterion:
        weight = None
        if cfg.class_weights == "balanced":
            weight = torch.tensor(balanced_weights(labels, num_classes), dtype=torch.float32)
        return cls(weight, cfg.label_smoothing, world_size=world_size)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss over the items whose label is not `ignore_index` (weighted mean with weights)
        of the whole global batch. Under DDP a collective (every rank calls it on every step), and 0 with
        zero gradient when no item of any rank counts; in one process such a batch is the caller's to
        skip (the mean would be 0/0), which keeps the common path free of a host sync."""
        w = self._weight(logits.device)
        if self.world_size == 1:
            return F.cross_entropy(logits, y, weight=w, label_smoothing=self.smoothing,
                                   ignore_index=self.ignore_index)
        total = self.local_sum(logits, y)
        valid = (y != self.ignore_index).float()
        counts = valid if w is None else w[y.clamp_min(0)] * valid
        denominator = dist.all_reduce_sum(counts.sum().detach())
        # DDP averages the ranks' gradients: x world_size turns that into the global weighted mean
        return total * self.world_size / denominator.clamp_min(1e-12)

    def local_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed (weighted) loss of these items alone: what one rank adds to the batch's total."""
        return F.cross_entropy(logits, y, weight=self._weight(logits.device), label_smoothing=self.smoothing,
                               ignore_index=self.ignore_index, reduction="sum")

    def _weight(self, device: torch.device) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device)


class BalancedSampler(dist.TrainSampler):
    """Each epoch draws len(indices) items with replacement, each class equally likely (items of a
    class with probability 1 / (C n_c)), from the same persistent generator as the shuffling sampler, so
    a resumed run draws the same items."""

    def __init__(self, indices: list[int], labels: np.ndarray, generator: torch.Generator, rank: int = 0,
                 world: int = 1):
        super().__init__(indices, generator, rank, world)
        labels = np.asarray(labels)
        per_class = balanced_weights(labels, int(labels.max()) + 1)
        self.weights = torch.tensor(per_class[labels], dtype=torch.float64)

    def epoch_order(self) -> list[int]:
        draw = torch.multinomial(self.weights, len(self.indices), replacement=True,
                                 generator=self.generator).tolist()
        total = len(self) * self.world
        draw = (draw * (total // max(1, len(draw)) + 1))[:total]
        return [self.indices[i] for i in draw[self.rank:: self.world]]


def make_sampler(cfg, indices: list[int], labels: np.ndarray, generator: torch.Generator, rank: int,
                 world: int) -> dist.TrainSampler:
    if cfg.sampler == "balanced":
        return BalancedSampler(indices, labels, generator, rank, world)
    return dist.TrainSampler(indices, generator, rank, world)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
