"""Evaluating heads on feature stores: top-1/top-5, mean class accuracy, per-class accuracy, confusion.

    result = evaluate_run("RUN", "STORE", split="test")       # also saved under RUN/eval/<store>/<split>/
    out = evaluate_splits([RUN1, RUN2, RUN3], [S1, S2, S3])   # UCF101/HMDB51 3-split protocol: mean ± std

Each evaluation is saved in RUN/eval/<store-name>/<split>/ (the best checkpoint's; the last one's in
RUN/eval-last/..., so neither overwrites the other) as metrics.json, per_class.csv and confusion.csv.
Under torchrun every rank evaluates a disjoint shard and the counts are summed (catnet.engine.metrics),
so the numbers equal a single process's exactly.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catnet.engine.metrics import MetricAccumulator
from catnet.engine.runs import load_run
from catnet.engine.splits import resolve_split, selection, selection_note, training_note
from catnet.errors import CatnetError
from catnet.features.loader import (
    check_finite,
    feature_loader,
    mapped_labels,
    nonfinite_ids,
    raise_nonfinite,
    store_feature_dim,
)
from catnet.features.store import FeatureStore
from catnet.utils import distributed as dist
from catnet.utils.io import atomic_write_json, atomic_write_text

# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_indices(head: nn.Module, store: FeatureStore, labels: np.ndarray, indices: list[int], *,
                     batch_size: int = 64, device: str | torch.device = "cpu", num_workers: int = 0,
                     num_classes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of `head` on store videos `indices` (all views), sharded over and reduced across ranks."""
    num_classes = num_classes or head.config.num_classes
    head.eval()
    acc = MetricAccumulator(num_classes)
    shard = list(dist.ShardSampler(indices))
    bad: list[str] = []
    loader = feature_loader(store, labels, shard, batch_size, num_workers)
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


EVAL_FOLDERS = {"best": "eval", "last": "eval-last"}  # RUN/<folder>/<store>/<split>/, per checkpoint


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
    for batch in feature_loader(store, labels, indices, batch_size, 0):
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
    """Load a run's checkpoint, evaluate it on `store`, save under RUN/eval/<store-name>/<split>/
    (RUN/eval-last/... for `which="last"`).

    `selected_on` is the split that chose the run's checkpoint; `selected_on_measured_split` (with a
    one-line `note`) says whether these numbers were selected on the split they measure."""
    head, info = load_run(run_dir, which=which)
    store = FeatureStore(store)
    result = evaluate(head, store, split, classes=info["classes"], batch_size=batch_size, device=device,
                      num_workers=num_workers, progress=progress)
    note = selection_note(info, which, result["split"])
    trained = training_note(info, store.root, result["split"])
    result.update(run=str(run_dir), checkpoint=which, selected_on=selection(info)[0],
                  selected_on_measured_split=note is not None, trained_on_measured_split=trained is not None,
                  note="; ".join(n for n in (note, trained) if n) or None)
    if save and dist.is_main():
        folder = Path(run_dir) / EVAL_FOLDERS[which] / store.root.name / result["split"]
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
