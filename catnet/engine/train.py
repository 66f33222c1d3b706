"""Training a video-level head on a feature store through the one loop (catnet.engine.loop).

    result = train(TrainConfig(store="STORE", out="RUN", head="catnet"))
    torchrun --nproc_per_node=2 -m catnet train STORE --out RUN        # data parallel (gloo/NCCL)

The defaults are one recipe for every head, from a few dozen videos to Kinetics size (docs/training.md,
"The recipe"): SGD with Nesterov momentum, lr 0.1 with a warmup and a per-step cosine, weight decay
5e-3, batch 64, at least 90 epochs and 1000 steps, and clip features standardised by the training
videos' mean and std (buffers of the head, so eval, predict and export apply them too). The paper's
schedule (lr 0.01, x0.1 every 30 of 90 epochs) is configs/kinetics400.yaml. The head defaults to CATNet,
N = 32, concatenation (Eq. 8). Training sees a random subset of each video's clip views, evaluation all
of them. A run folder holds (docs/architecture.md):

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
from catnet.features.store import FEATURE_KEYS, FeatureStore
from catnet.heads import build_head, head_from_config
from catnet.utils import distributed as dist
from catnet.version import __version__


@dataclass
class TrainConfig(Recipe):
    """One head-training run: the recipe (Recipe, with the defaults of docs/training.md "The recipe"
    instead of the paper's) plus the store, the head and how views are drawn."""

    epochs: int | None = field(default=None, metadata=spec(ge=1))  # max(90, ceil(min_steps / steps))
    lr: float = field(default=0.1, metadata=spec(gt=0))
    nesterov: bool = True
    weight_decay: float = field(default=5e-3, metadata=spec(ge=0))
    schedule: str = field(default="cosine", metadata=spec(choices=("step", "cosine")))
    warmup_fraction: float = field(default=0.05, metadata=spec(ge=0, lt=1))
    store: str = ""
    head: str | None = None  # None: "catnet", or the --init-from run's head
    head_options: dict[str, Any] = field(default_factory=dict)  # e.g. {num_heads: 32, aggregation: concat}
    # before the classifier; None keeps the head's default (0.5)
    dropout: float | None = field(default=None, metadata=spec(ge=0, lt=1))
    # Views (clip x crop features) drawn per video per training step. The paper "randomly choose[s] a few
    # features" without a number; 10 = a third of the 30 views (10 clips x 3 crops) it extracts.
    train_views: int = field(default=10, metadata=spec(ge=1))
    eval_batch_size: int = field(default=64, metadata=spec(ge=1))
    # validate every this many epochs and after the last; None: about 30 times per run (every epoch of
    # a 30-epoch run, every 12th of a tiny store's 334)
    eval_every: int | None = field(default=None, metadata=spec(ge=1))
    num_workers: int = field(default=0, metadata=spec(ge=0, le=64))
    init_from: str | None = None  # a run folder: transfer all but the classifier (paper Sec. 4.3)
    # standardise clip features by the training videos' per-dimension mean and std, held by the head
    standardize: bool = True

    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = (*Recipe.RESUME_MUTABLE, "store", "num_workers")
    LEGACY: ClassVar[dict[str, Any]] = {**Recipe.LEGACY, "standardize": False, "eval_every": 1}


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
    name, options = train_head_args(cfg)
    return build_head(name, in_dim, num_classes, **options), None


def train_head_args(cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
    """(name, options) a non-transfer run passes to build_head / head_config: --head-opt plus the
    training settings that live in the head (standardisation, --dropout)."""
    if "standardize" in cfg.head_options:
        raise CatnetError("standardisation is a training setting: use --standardize / --no-standardize, "
                          "not --head-opt standardize")
    options = {**cfg.head_options, "standardize": cfg.standardize}
    if cfg.dropout is not None:
        options["dropout"] = cfg.dropout
    return cfg.head or "catnet", options


def scan_training_features(store: FeatureStore, indices: list[int], stats_of: list[int] | None
                           ) -> tuple[list[str], tuple[np.ndarray, np.ndarray] | None]:
    """One pass over the features of `indices` before training: the ids of videos with NaN/Inf (refused
    before the first step, not mid-epoch), and, when `stats_of` is given, the per-dimension mean and std
    of every view of those videos. Every rank reads the same videos, so the statistics need no
    collective. Near-constant dimensions (dead ReLU channels) get a floor on their std, not a blow-up."""
    d = store_feature_dim(store)
    acc, n, bad = np.zeros((2, d)), 0, []
    counted = set(stats_of or ())
    for i, x in store.scan_features(indices):
        if not np.isfinite(x).all():
            bad.append(i)
        elif i in counted:
            x = x.astype(np.float64)
            acc[0] += x.sum(0)
            acc[1] += np.square(x).sum(0)
            n += len(x)
    bad_ids = [store.ids[i] for i in sorted(bad)]
    if stats_of is None:
        return bad_ids, None
    mean = acc[0] / max(n, 1)
    std = np.sqrt(np.maximum(acc[1] / max(n, 1) - np.square(mean), 0.0))
    return bad_ids, (mean, np.maximum(std, max(1e-3 * float(std.mean()), 1e-6)))


VALIDATIONS = 30  # per run, when eval_every is not set



class HeadJob(Job):
    """A head on store features: random views per video for training, all views for validation."""

    def __init__(self, cfg: TrainConfig, store: FeatureStore, labels: np.ndarray, head: nn.Module,
                 plan: SplitPlan, info: dist.DistInfo):
        self.cfg, self.store, self.labels, self.plan, self.info = cfg, store, labels, plan, info
        self.model = head
        c = head.config
        self.num_classes = c.num_classes
        self.what = f"training {c.name} ({c.num_classes} classes, {c.in_dim}-d)"

    def train_labels(self) -> np.ndarray:
        return self.labels[self.plan.train]

    def batches(self, epoch: int, order: list[int], batch_size: int):
        return feature_loader(self.store, self.labels, order, batch_size, self.cfg.num_workers,
                              max_views=self.cfg.train_views, seed=self.cfg.seed, epoch=epoch)

    def loss(self, net, batch, device, criterion):
        check_finite(batch, self.store, collective=self.info.world_size > 1)
        x, mask, y = (batch[k].to(device) for k in ("x", "mask", "label"))
        logits = net(x, mask).float()
        loss = criterion(logits, y)
        n = torch.tensor(y.numel(), device=y.device)
        return loss, loss.detach() * n, (logits.argmax(1) == y).sum(), n

    def validate(self, epoch: int, last: bool, epochs: int):
        every = self.cfg.eval_every or max(1, -(-epochs // VALIDATIONS))
        if (epoch + 1) % every and not last:
            return None
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
        # a new run that standardises gets its statistics from the same pass (resumed: from its checkpoint)
        fresh = cfg.standardize and not cfg.init_from and not cfg.resume
        bad, stats = scan_training_features(store, plan.train + plan.val, plan.train if fresh else None)
        raise_nonfinite(bad, store)
        with run_folder(cfg, info):
            # a resumed run must continue on features made the same way (same weights, same sampling)
            made = {f"store.manifest.{k}": store.manifest.get(k) for k in FEATURE_KEYS}
            prev = check_run_folder(cfg, "train", {"in_dim": in_dim, "classes": classes, **made})
            return _train(cfg, info, store, classes, in_dim, plan, labels, prev, stats)


def _train(cfg: TrainConfig, info: dist.DistInfo, store: FeatureStore, classes: list[str], in_dim: int,
           plan: SplitPlan, labels: np.ndarray, prev: dict[str, Any] | None,
           stats: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    seed_everything(cfg.seed + info.rank)
    recorded = (prev or {}).get("head", {}).get("config")
    if recorded is None:
        head, init_from = build_train_head(cfg, in_dim, len(classes))
    else:  # resumed: the head that trained, even if a preset's default changed since (avgpool's dropout, 0.4)
        head, init_from = head_from_config(recorded), prev.get("init_from")
    if head.config.in_dim != in_dim:
        raise CatnetError(f"head expects {head.config.in_dim}-d features, store has {in_dim}-d")
    standardized = head.config.standardize and init_from is None
    if stats is not None:  # a new standardised run (train()); a resumed one reloads them with the weights
        head.set_standardization(*(torch.from_numpy(a) for a in stats))
    run_info = {"catnet_version": __version__,
                "head": {"name": head.config.name, "options": dict(cfg.head_options),
                         "config": dataclasses.asdict(head.config)},
                "in_dim": in_dim, "num_classes": len(classes), "classes": classes,
                "store": {"path": str(Path(store.root).resolve()), "manifest": store.manifest},
                "splits": {"train": plan.train_name, "val": plan.val_name, "num_train": len(plan.train),
                           "num_val": len(plan.val)},
                # the split whose training videos (hold-out excluded) gave the head's input mean/std:
                # "" = a store without split names; "init_from" = the source run's statistics
                "standardized_on": (plan.train_name if standardized
                                    else "init_from" if head.config.standardize else None),
                "init_from": init_from}
    return fit(HeadJob(cfg, store, labels, head, plan, info), cfg, info, plan, run_info, prev, "train")
