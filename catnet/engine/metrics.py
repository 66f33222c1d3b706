"""Classification metrics for video-level predictions: top-k, mean class accuracy, per-class, confusion.

Everything is computed from integer counts (a confusion matrix and top-k hit counts), so results summed
over DDP ranks are exactly the single-process results: ranks reduce counts, never averages.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from catnet.utils import distributed as dist


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their target among the top-k logits, for each k (k is capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax), best first
    hit = top == targets.long().unsqueeze(1)
    return [int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks]


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Recall of each class; None for a class with no samples (kept out of the mean)."""
    confusion = np.asarray(confusion)
    support = confusion.sum(1)
    return [float(confusion[c, c] / support[c]) if support[c] else None for c in range(len(support))]


def mean_class_accuracy(confusion: np.ndarray) -> float:
    """Mean of the per-class accuracies over the classes that have samples."""
    accs = [a for a in per_class_accuracy(confusion) if a is not None]
    return float(np.mean(accs)) if accs else float("nan")


class MetricAccumulator:
    """Accumulate a split's predictions batch by batch; `compute()` reduces across DDP ranks first."""

    def __init__(self, num_classes: int, ks: tuple[int, ...] = (1, 5)):
        self.num_classes = num_classes
        self.ks = ks
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.topk = torch.zeros(len(ks), dtype=torch.int64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float | None = None) -> None:
        logits, targets = logits.detach().float().cpu(), targets.cpu()
        self.confusion += confusion_matrix(logits.argmax(1), targets, self.num_classes)
        self.topk += torch.tensor(topk_correct(logits, targets, self.ks))
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)

    def compute(self, reduce: bool = True) -> dict:
        """top1/top5/mean_class_acc in [0, 1], loss per video, per-class accuracies and the confusion."""
        conf, topk, loss = self.confusion.clone(), self.topk.clone(), self.loss_sum.clone()
        if reduce and dist.world_size() > 1:
            conf, topk, loss = (dist.all_reduce_sum(t) for t in (conf, topk, loss))
        conf_np = conf.numpy()
        n = int(conf_np.sum())
        out = {"n": n, "loss": float(loss) / n if n else math.nan}
        for k, hits in zip(self.ks, topk.tolist(), strict=True):
            out[f"top{k}"] = hits / n if n else math.nan
        out["mean_class_acc"] = mean_class_accuracy(conf_np)
        out["per_class_acc"] = per_class_accuracy(conf_np)
        out["confusion"] = conf_np.tolist()
        return out
