"""Training a video-level head on a feature store: the paper's recipe (Sec. 4.1) through the one loop.

    result = train(TrainConfig(store="STORE", out="RUN", head="catnet"))
    torchrun --nproc_per_node=2 -m catnet train STORE --out RUN        # data parallel (gloo/NCCL)

Defaults are the paper's: SGD momentum 0.9, lr 0.01 x0.1 every 30 epochs, 90 epochs, batch 64, the CATNet
head with N = 32 and concatenation (Eq. 8). Training sees a random subset of each video's clip views,
evaluation all of them. A run folder holds (docs/architecture.md):

    RUN/run.json               head config, in_dim, classes, store manifest, this TrainConfig
    RUN/checkpoints/last.pt    model, optimiser, scheduler, RNG states, epoch (weights-only loadable)
    RUN/checkpoints/best.pt    the model with the best validation top-1
    RUN/metrics.csv, RUN/tb/   per-epoch logs

Resuming restores everything the next epoch depends on (catnet.engine.loop), so a killed run finishes
with bit-identical weights and metrics (CPU, same thread count). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catnet.config import spec
from catnet.engine.evaluate import evaluate_indices
from catnet.engine.loop import Job, Recipe, check_run_folder, fit, run_folder
from catnet.engine.runs import seed_everything, transfer_head
from catnet.engine.splits import SplitPlan, store_splits
from catnet.errors import CatnetError
from catnet.features.loader import (
    check_finite,
    feature_loader,
    mapped_labels,
    raise_nonfinite,
    store_feature_dim,
)
from catnet.features.store import FeatureStore
from catnet.heads import build_head
from catnet.utils import distributed as dist
from catnet.version import __version__


@dataclass
class TrainConfig(Recipe):
    """One head-training run: the recipe (Recipe) plus the store, the head and how views are drawn."""

    store: str = ""
    head: str | None = None  # None: "catnet", or the --init-from run's head
    head_options: dict[str, Any] = field(default_factory=dict)  # e.g. {num_heads: 32, aggregation: concat}
    # before the classifier; None keeps the head's default (0.5)
    dropout: float | None = field(default=None, metadata=spec(ge=0, lt=1))
    # Views (clip x crop features) drawn per video per training step. The paper "randomly choose[s] a few
    # features" without a number; 10 = a third of the 30 views (10 clips x 3 crops) it extracts.
    train_views: int = field(default=10, metadata=spec(ge=1))
    eval_batch_size: int = field(default=64, metadata=spec(ge=1))
    num_workers: int = field(default=0, metadata=spec(ge=0, le=64))
    init_from: str | None = None  # a run folder: transfer all but the classifier (paper Sec. 4.3)

    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = (*Recipe.RESUME_MUTABLE, "store", "num_workers")


def build_train_head(cfg: TrainConfig, in_dim: int, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The head to train and, for a transfer (--init-from), where it came from."""
    if cfg.init_from:
        if cfg.head_options:
            raise CatnetError("--head-opt cannot be combined with --init-from: the architecture comes from "
                              "the initialising run (only --dropout may change)")
        head, src = transfer_head(cfg.init_from, num_classes, in_dim, cfg.dropout)
        if cfg.head is not None and cfg.head != head.config.name:
            raise CatnetError(f"--head {cfg.head} but the --init-from run has a {head.config.name!r} head")
        return head, {"run": str(cfg.init_from), "classes": src["classes"], "head": src["head"]["name"]}
    options = dict(cfg.head_options)
    if cfg.dropout is not None:
        options["dropout"] = cfg.dropout
    return build_head(cfg.head or "catnet", in_dim, num_classes, **options), None


# Manifest entries that say how a store's features were made; a resumed run must not change them.
FEATURE_KEYS = ("backbone", "weights_id", "num_features", "sampling", "spatial")


class HeadJob(Job):
    """A head on store features: random views per video for training, all views for validation."""

    def __init__(self, cfg: TrainConfig, store: FeatureStore, labels: np.ndarray, head: nn.Module,
                 plan: SplitPlan, info: dist.DistInfo):
        self.cfg, self.store, self.labels, self.plan, self.info = cfg, store, labels, plan, info
        self.model = head
        c = head.config
        self.what = f"training {c.name} ({c.num_classes} classes, {c.in_dim}-d)"

    def batches(self, epoch: int, order: list[int], batch_size: int):
        return feature_loader(self.store, self.labels, order, batch_size, self.cfg.num_workers,
                              max_views=self.cfg.train_views, seed=self.cfg.seed, epoch=epoch)

    def loss(self, net, batch, device):
        check_finite(batch, self.store, collective=self.info.world_size > 1)
        x, mask, y = (batch[k].to(device) for k in ("x", "mask", "label"))
        logits = net(x, mask).float()
        loss = F.cross_entropy(logits, y)
        n = torch.tensor(y.numel(), device=y.device)
        return loss, loss.detach() * n, (logits.argmax(1) == y).sum(), n

    def validate(self, epoch: int, last: bool):
        return evaluate_indices(self.model, self.store, self.labels, self.plan.val,
                                batch_size=self.cfg.eval_batch_size, device=self.info.device,
                                num_workers=self.cfg.num_workers, num_classes=self.model.config.num_classes,
                                progress=self.cfg.progress)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a head on `cfg.store` into `cfg.out`; returns the run summary (history, best epoch, ...)."""
    if not cfg.store or not cfg.out:
        raise CatnetError("a feature store and an --out run folder are required")
    with dist.session(cfg.device) as info:
        # Everything that can be refused is checked before any work starts.
        store = FeatureStore(cfg.store)
        classes = store.classes
        if not classes:
            raise CatnetError(f"store {store.root} has no class list in its manifest; training needs labels")
        in_dim = store_feature_dim(store)
        plan = store_splits(store, cfg)
        labels = mapped_labels(store, classes, plan.train + plan.val)
        if len(set(labels[plan.train].tolist())) < 2:
            raise CatnetError(f"the training videos of {store.root} cover {len(set(labels[plan.train]))} "
                              "class(es); a classifier needs at least 2")
        raise_nonfinite(store.nonfinite_ids(plan.train + plan.val), store)  # not first met mid-epoch
        with run_folder(cfg, info):
            # a resumed run must continue on features made the same way (same weights, same sampling)
            made = {f"store.manifest.{k}": store.manifest.get(k) for k in FEATURE_KEYS}
            prev = check_run_folder(cfg, "train", {"in_dim": in_dim, "classes": classes, **made})
            return _train(cfg, info, store, classes, in_dim, plan, labels, prev)


def _train(cfg: TrainConfig, info: dist.DistInfo, store: FeatureStore, classes: list[str], in_dim: int,
           plan: SplitPlan, labels: np.ndarray, prev: dict[str, Any] | None) -> dict[str, Any]:
    seed_everything(cfg.seed + info.rank)
    head, init_from = build_train_head(cfg, in_dim, len(classes))
    if head.config.in_dim != in_dim:
        raise CatnetError(f"head expects {head.config.in_dim}-d features, store has {in_dim}-d")
    run_info = {"catnet_version": __version__,
                "head": {"name": head.config.name, "options": dict(cfg.head_options),
                         "config": dataclasses.asdict(head.config)},
                "in_dim": in_dim, "num_classes": len(classes), "classes": classes,
                "store": {"path": str(Path(store.root).resolve()), "manifest": store.manifest},
                "splits": {"train": plan.train_name, "val": plan.val_name, "num_train": len(plan.train),
                           "num_val": len(plan.val)},
                "init_from": init_from}
    return fit(HeadJob(cfg, store, labels, head, plan, info), cfg, info, plan, run_info, prev, "train")
