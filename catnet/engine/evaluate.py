"""`catnet eval`: top-1/top-5, mean class accuracy, per-class accuracy and confusion of a run on a store.

    catnet eval RUN --store STORE [--split test] [--json]
    catnet eval RUN1 RUN2 RUN3 --store S1 S2 S3     # UCF101/HMDB51 3-split protocol: mean ± std

Each evaluation is saved in RUN/eval/<store-name>/<split>/ as metrics.json, per_class.csv and
confusion.csv. Also home of the store -> batch plumbing the trainer shares: `ClipFeatureDataset`
(optionally a random subset of each video's views) and `pad_collate` (zero-pad + mask).
Under torchrun every rank evaluates a disjoint shard and the counts are summed (catnet.engine.metrics).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from catnet.utils import distributed as dist
from catnet.errors import CatnetError
from catnet.features.store import FeatureStore
from catnet.utils.io import atomic_write_json, atomic_write_text
from catnet.engine.metrics import MetricAccumulator

# ------------------------------------------------------------------------------------------ data plumbing


class ClipFeatureDataset(Dataset):
    """Store videos as (features (V', D) in the stored dtype, label, store index), indexed by *store index*.

    With `max_views`, each fetch keeps a random subset of at most that many views (kept in temporal
    order) — the paper's "randomly choose a few features to train". The subset depends only on
    (seed, epoch, video), so it is the same whatever the worker count and after a resume.
    """

    def __init__(self, store: FeatureStore, labels: np.ndarray, max_views: int | None = None, seed: int = 0):
        self.store = store
        self.labels = labels  # per store index, already in the head's class space
        self.max_views = max_views
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        # stored dtype (float16): views are dropped first, and collate widens the whole batch at once
        feats = self.store.read_features(index)
        if self.max_views is not None and feats.shape[0] > self.max_views:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            feats = feats[np.sort(rng.choice(feats.shape[0], self.max_views, replace=False))]
        return feats, int(self.labels[index]), index


def pad_collate(batch: list[tuple[np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
    """Zero-pad videos to the batch's longest as float32; mask (B, K) is True on real views."""
    sizes = [f.shape[0] for f, _, _ in batch]
    k = max(sizes)
    if min(sizes) == k:  # the usual case: one stack and one widening copy for the whole batch
        x = torch.from_numpy(np.stack([f for f, _, _ in batch])).float()
        mask = torch.ones(len(batch), k, dtype=torch.bool)
    else:
        x = torch.zeros(len(batch), k, batch[0][0].shape[1], dtype=torch.float32)
        mask = torch.zeros(len(batch), k, dtype=torch.bool)
        for i, (f, _, _) in enumerate(batch):
            x[i, : f.shape[0]] = torch.from_numpy(f)
            mask[i, : f.shape[0]] = True
    return {"x": x, "mask": mask, "label": torch.tensor([b[1] for b in batch], dtype=torch.int64),
            "index": torch.tensor([b[2] for b in batch], dtype=torch.int64)}


def nonfinite_ids(batch: dict[str, torch.Tensor], store: FeatureStore) -> list[str]:
    # a NaN or +-Inf anywhere makes the video's sum non-finite; features are float16-range, so the
    # float32 sum of a finite video cannot overflow. One reduction instead of an elementwise test.
    bad = ~torch.isfinite(batch["x"].sum(dim=(1, 2)))
    return [store.ids[i] for i in batch["index"][bad].tolist()] if bad.any() else []


def check_finite(batch: dict[str, torch.Tensor], store: FeatureStore, collective: bool = False) -> None:
    """NaN/Inf features would silently poison the weights; name the videos instead.

    `collective`: every DDP rank calls this in lockstep and all of them raise when any rank saw a bad
    video, so no rank is left waiting in a gradient all-reduce.
    """
    raise_nonfinite(nonfinite_ids(batch, store), store, collective)


def raise_nonfinite(ids: list[str], store: FeatureStore, collective: bool = False) -> None:
    total = len(ids)
    if collective and dist.world_size() > 1:
        total = int(dist.all_reduce_sum(torch.tensor(len(ids))))
    if total:
        where = ", ".join(ids[:5]) if ids else "seen by another process"
        raise CatnetError(f"non-finite (NaN/Inf) clip features in {total} video(s) of {store.root}: "
                          f"{where}; re-extract or remove them")


def store_feature_dim(store: FeatureStore) -> int:
    d = store.manifest.get("num_features")
    if not d:
        if len(store) == 0:
            raise CatnetError(f"feature store {store.root} is empty")
        d = store[0].features.shape[1]
    return int(d)


def label_map(head_classes: list[str], store: FeatureStore) -> np.ndarray:
    """Store label index -> head class index, matching by name; refuses classes the head lacks."""
    store_classes = store.classes
    if store_classes == head_classes:
        return np.arange(len(store_classes))
    where = {c: i for i, c in enumerate(head_classes)}
    missing = [c for c in store_classes if c not in where]
    if missing:
        raise CatnetError(f"the model's {len(head_classes)} classes do not match store {store.root} "
                          f"({len(store_classes)} classes; e.g. {', '.join(map(repr, missing[:3]))} unknown "
                          "to the model); evaluate on a store with the run's label set")
    return np.array([where[c] for c in store_classes], dtype=np.int64)


def mapped_labels(store: FeatureStore, head_classes: list[str], indices: list[int]) -> np.ndarray:
    """Labels of all store videos in head class space; refuses unlabelled videos among `indices`."""
    raw = store.labels
    unlabelled = [store.ids[i] for i in indices if not 0 <= raw[i] < len(store.classes)]
    if unlabelled:
        raise CatnetError(f"{len(unlabelled)} video(s) without a valid label in {store.root} "
                          f"(e.g. {unlabelled[0]!r}); labels are needed to train and evaluate")
    lut = label_map(head_classes, store)
    return np.where((raw >= 0) & (raw < len(lut)), lut[np.clip(raw, 0, len(lut) - 1)], -1)


def resolve_split(store: FeatureStore, split: str | None) -> tuple[str, list[int]]:
    """(split name, indices): `split`, or the store's "test" then "val" videos when None."""
    if split is None:
        for name in ("test", "val"):
            if store.split(name):
                return name, store.split(name)
        raise CatnetError(f"store {store.root} has no 'test' or 'val' videos; pass --split NAME")
    indices = store.split(split)
    if not indices:
        have = sorted({r.get("split") or "" for r in store.records()} - {""})
        raise CatnetError(f"split {split!r} of store {store.root} is empty (splits present: "
                          f"{', '.join(have) or 'none'})")
    return split, indices


class ReadAhead:
    """Iterate a loader with the next `depth` batches read by a background thread.

    With num_workers=0 reading and training would otherwise take turns. Reading is mostly `pread`,
    which releases the GIL, so a thread overlaps the disk with the step at no IPC cost (a worker
    process must pickle every batch). Batches come out in the loader's order, and the loader's
    iterator is created here, in the caller's thread, so RNG draws happen where they always did.
    """

    _DONE = object()

    def __init__(self, loader: DataLoader, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for batch in it:
                    if not put(batch):
                        return
                put(self._DONE)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=read, name="catnet-readahead", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class HintedBatches(Sampler[list[int]]):
    """`indices` in batches, in order; before handing out a batch, names the `ahead` batches after it
    to the store (FeatureStore.will_need) so their disk reads overlap the work on this one.

    The hints come from this (the main) process, and the page cache is shared, so they also feed
    DataLoader worker processes.
    """

    def __init__(self, indices: list[int], batch_size: int, store: FeatureStore, ahead: int = 2):
        self.indices, self.batch_size, self.store, self.ahead = list(indices), batch_size, store, ahead

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        batches = [self.indices[i: i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        for n, batch in enumerate(batches):
            # the first time: this batch and the next `ahead`; afterwards the one batch newly in reach
            for later in batches[n + self.ahead if n else 0: n + self.ahead + 1]:
                self.store.will_need(later)
            yield batch


def _loader(store, labels, indices, batch_size, num_workers, max_views=None, seed=0, epoch=0):
    ds = ClipFeatureDataset(store, labels, max_views=max_views, seed=seed)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_sampler=HintedBatches(indices, batch_size, store),
                        collate_fn=pad_collate, num_workers=num_workers)
    return ReadAhead(loader) if num_workers == 0 else loader


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_indices(head: nn.Module, store: FeatureStore, labels: np.ndarray, indices: list[int], *,
                     batch_size: int = 64, device: str | torch.device = "cpu", num_workers: int = 0,
                     num_classes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of `head` on store videos `indices` (all views), sharded over and reduced across ranks."""
    from tqdm import tqdm

    num_classes = num_classes or head.config.num_classes
    head.eval()
    acc = MetricAccumulator(num_classes)
    shard = list(dist.ShardSampler(indices))
    bad: list[str] = []
    loader = _loader(store, labels, shard, batch_size, num_workers)
    bar = tqdm(loader, desc="eval", leave=False, file=sys.stderr, disable=not progress or not dist.is_main())
    for batch in bar:
        bad += nonfinite_ids(batch, store)
        if bad:
            continue  # keep going: ranks must reach the reduction below together
        logits = head(batch["x"].to(device), batch["mask"].to(device))
        y = batch["label"].to(device)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        acc.update(logits, y, float(loss))
    raise_nonfinite(bad, store, collective=True)
    return acc.compute()


def evaluate(head: nn.Module, store: FeatureStore | str | Path, split: str | None = "test", *,
             classes: list[str] | None = None, batch_size: int = 64, device: str = "cpu",
             num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """Evaluate `head` on a store's split; `classes` are the head's class names (default: the store's).

    Returns top1, top5, mean_class_acc (fractions), loss, n, per_class_acc, confusion, split, classes.
    """
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    classes = classes if classes is not None else store.classes
    split, indices = resolve_split(store, split)
    if store_feature_dim(store) != head.config.in_dim:
        raise CatnetError(f"store {store.root} has {store_feature_dim(store)}-d features but the head "
                          f"expects {head.config.in_dim}-d")
    if len(classes) != head.config.num_classes:
        raise CatnetError(f"{len(classes)} class names for a head with {head.config.num_classes} outputs")
    labels = mapped_labels(store, classes, indices)
    raise_nonfinite(store.nonfinite_ids(indices), store)  # before any work, not after a whole pass
    head.to(device)
    out = evaluate_indices(head, store, labels, indices, batch_size=batch_size, device=device,
                           num_workers=num_workers, progress=progress)
    return {**out, "split": split, "classes": list(classes), "store": str(store.root)}


@dataclass
class Predictions:
    """Per-video outputs of `predict_store`, in the order of the requested indices."""

    ids: list[str]
    labels: np.ndarray  # (n,) store labels (-1 = unknown)
    probs: np.ndarray  # (n, C) softmax probabilities
    alpha: list[np.ndarray] | None  # per video (N, V_i) local attention (Eq. 2), None for heads without
    beta: np.ndarray | None  # (n, N) global attention (Eq. 6), None for heads without


@torch.no_grad()
def predict_store(head: nn.Module, store: FeatureStore | str | Path, indices: list[int] | None = None, *,
                  batch_size: int = 64, device: str = "cpu") -> Predictions:
    """Probabilities and attention for store videos `indices` (default: all), using all views.

    Summing alpha over heads (`alpha[i].sum(0)`) gives the per-clip weight of the paper's Fig. 6.
    """
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    indices = list(range(len(store))) if indices is None else [int(i) for i in indices]
    labels = store.labels
    head.eval().to(device)
    probs, alphas, betas = [], [], []
    for batch in _loader(store, labels, indices, batch_size, 0):
        check_finite(batch, store)
        out = head.forward_attention(batch["x"].to(device), batch["mask"].to(device))
        probs.append(out["logits"].float().softmax(-1).cpu().numpy())
        lengths = batch["mask"].sum(1).tolist()
        if out.get("alpha") is not None:
            a = out["alpha"].float().cpu().numpy()
            alphas.extend(a[i, :, :n] for i, n in enumerate(lengths))
        if out.get("beta") is not None:
            betas.append(out["beta"].float().cpu().numpy())
    ids = store.ids
    return Predictions(ids=[ids[i] for i in indices], labels=labels[indices],
                       probs=np.concatenate(probs) if probs else np.zeros((0, head.config.num_classes)),
                       alpha=alphas or None, beta=np.concatenate(betas) if betas else None)


# ------------------------------------------------------------------------------------------ runs + files


SUMMARY_KEYS = ("top1", "top5", "mean_class_acc")


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def save_eval(result: dict[str, Any], folder: Path) -> Path:
    """metrics.json (everything), per_class.csv and confusion.csv (rows = true class)."""
    classes = result["classes"]
    atomic_write_json(folder / "metrics.json", result)
    per_class = [["class", "accuracy", "support"]]
    support = np.asarray(result["confusion"]).sum(1)
    for c, a, s in zip(classes, result["per_class_acc"], support, strict=True):
        per_class.append([c, "" if a is None else f"{a:.6f}", int(s)])
    atomic_write_text(folder / "per_class.csv", _csv(per_class))
    rows = [[c, *row] for c, row in zip(classes, result["confusion"], strict=True)]
    atomic_write_text(folder / "confusion.csv", _csv([["true\\pred", *classes], *rows]))
    return folder


def evaluate_run(run_dir: str | Path, store: str | Path, split: str | None = None, *, which: str = "best",
                 batch_size: int = 64, device: str = "cpu", num_workers: int = 0, progress: bool = False,
                 save: bool = True) -> dict[str, Any]:
    """Load a run's checkpoint, evaluate it on `store`, save under RUN/eval/<store-name>/<split>/."""
    from catnet.engine.train import load_run

    head, info = load_run(run_dir, which=which)
    store = FeatureStore(store)
    result = evaluate(head, store, split, classes=info["classes"], batch_size=batch_size, device=device,
                      num_workers=num_workers, progress=progress)
    result.update(run=str(run_dir), checkpoint=which)
    if save and dist.is_main():
        folder = Path(run_dir) / "eval" / store.root.name / result["split"]
        result["saved_to"] = str(save_eval(result, folder))
    return result


def mean_std(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0, as over a fixed set of 3 splits) of the summary metrics."""
    values = {k: [r[k] for r in results] for k in SUMMARY_KEYS}
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}


def evaluate_splits(runs: list[str | Path], stores: list[str | Path], split: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """The 3-split protocol: run i evaluated on store i (or all on one store); mean ± std over splits."""
    if len(stores) == 1:
        stores = list(stores) * len(runs)
    if len(stores) != len(runs):
        raise CatnetError(f"{len(runs)} runs but {len(stores)} stores; give one store per run or one for all")
    results = [evaluate_run(r, s, split, **kwargs) for r, s in zip(runs, stores, strict=True)]
    return {"splits": results, "summary": mean_std(results)}


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `catnet train`")
    p.add_argument("--store", nargs="+", required=True, metavar="STORE",
                   help="feature store(s): one per RUN (3-split protocol) or one for all")
    p.add_argument("--split", default=None, help="store split to evaluate (default: test, else val)")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint to evaluate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def _pct(x: float) -> str:
    return "  n/a " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CatnetError(f"--batch-size must be >= 1, got {args.batch_size}")
    with dist.session(args.device) as info:
        out = evaluate_splits(args.runs, args.store, args.split, which=args.which, batch_size=args.batch_size,
                              device=info.device, num_workers=args.num_workers, progress=not args.json)
    if info.rank != 0:
        return 0
    if args.json:
        print(json.dumps(out if len(out["splits"]) > 1 else out["splits"][0]))
        return 0
    print(f"{'run':<32} {'split':<8} {'videos':>6} {'top-1':>7} {'top-5':>7} {'mean-cls':>8}")
    for r in out["splits"]:
        print(f"{Path(r['run']).name[:32]:<32} {r['split']:<8} {r['n']:>6} {_pct(r['top1']):>7} "
              f"{_pct(r['top5']):>7} {_pct(r['mean_class_acc']):>8}")
    if len(out["splits"]) > 1:
        s = out["summary"]
        print("mean ± std over splits: " + ", ".join(
            f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for k, v in s.items()))
    for r in out["splits"]:
        if "saved_to" in r:
            print(f"saved {r['saved_to']}", file=sys.stderr)
    return 0
