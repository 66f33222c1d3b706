"""Which videos train and which validate: one rule for `catnet train`, `finetune-backbone` and `eval`.

Items carry a split name ("train", "val", "test", "" for none). With split names, training uses
`train_split` and validation `val_split` (default: "test", else "val"; "none": no validation, then
the best checkpoint is the last). Without any split names a deterministic per-class held-out part of
the items validates (`holdout`). Evaluation defaults to "test", else "val".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catnet.errors import CatnetError
from catnet.features.store import FeatureStore

NO_VALIDATION = "none"
EVAL_DEFAULTS = ("test", "val")


@dataclass
class SplitPlan:
    train: list[int]
    val: list[int]
    val_name: str  # a split name, "holdout<fraction>", or NO_VALIDATION
    train_name: str  # the training split's name, "rest" beside a hold-out

    @property
    def holdout(self) -> bool:
        return self.val_name.startswith("holdout")


def holdout(ids: Sequence[str], labels: np.ndarray, fraction: float) -> list[bool]:
    """Per class, the videos whose sha1(id) sorts first become validation: stable across runs/machines."""
    held = [False] * len(ids)
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c).tolist(),
                         key=lambda i: hashlib.sha1(ids[i].encode("utf-8", "surrogateescape")).hexdigest())
        n_val = int(round(fraction * len(members))) if len(members) > 1 else 0
        for i in members[: max(n_val, 1 if len(members) > 1 else 0)]:
            held[i] = True
    return held


def _present(splits: Sequence[str]) -> str:
    return ", ".join(sorted({s for s in splits if s})) or "none"


def plan_splits(splits: Sequence[str], ids: Sequence[str], labels: np.ndarray, *, train_split: str,
                val_split: str | None, holdout_fraction: float, where: str) -> SplitPlan:
    """Train and validation item indices; refuses empty splits up front (`where` names the source)."""
    n = len(splits)
    if not any(splits):
        if val_split == NO_VALIDATION:
            return SplitPlan(list(range(n)), [], NO_VALIDATION, "rest")
        held = holdout(ids, np.asarray(labels), holdout_fraction)
        train = [i for i, h in enumerate(held) if not h]
        val = [i for i, h in enumerate(held) if h]
        if not train or not val:
            raise CatnetError(f"{where} has no splits and too few videos ({n}) for a held-out validation "
                              "split; pass --val-split none")
        return SplitPlan(train, val, f"holdout{holdout_fraction:g}", "rest")
    train = [i for i, s in enumerate(splits) if s == train_split]
    if not train:
        raise CatnetError(f"training split {train_split!r} of {where} is empty "
                          f"(splits present: {_present(splits)})")
    if val_split == NO_VALIDATION:
        return SplitPlan(train, [], NO_VALIDATION, train_split)
    for name in EVAL_DEFAULTS if val_split is None else (val_split,):
        val = [i for i, s in enumerate(splits) if s == name]
        if val:
            return SplitPlan(train, val, name, train_split)
    if val_split is None:
        raise CatnetError(f"{where} has no 'test' or 'val' videos (splits present: {_present(splits)}); "
                          "pass --val-split NAME or --val-split none")
    raise CatnetError(f"validation split {val_split!r} of {where} is empty (splits present: "
                      f"{_present(splits)})")


def store_splits(store: FeatureStore, cfg) -> SplitPlan:
    """The split plan of a store's videos for a Recipe-like `cfg` (train_split, val_split, holdout)."""
    return plan_splits([r.get("split") or "" for r in store.records()], store.ids, store.labels,
                       train_split=cfg.train_split, val_split=cfg.val_split,
                       holdout_fraction=cfg.holdout_fraction, where=f"store {store.root}")


def split_indices(store: FeatureStore, cfg) -> tuple[list[int], list[int], str]:
    """(train, validation, validation name) of `store_splits`."""
    plan = store_splits(store, cfg)
    return plan.train, plan.val, plan.val_name


def resolve_split(store: FeatureStore, split: str | None) -> tuple[str, list[int]]:
    """(split name, indices) to evaluate: `split`, or the store's "test" then "val" videos when None."""
    splits = [r.get("split") or "" for r in store.records()]
    for name in EVAL_DEFAULTS if split is None else (split,):
        indices = [i for i, s in enumerate(splits) if s == name]
        if indices:
            return name, indices
    if split is None:
        raise CatnetError(f"store {store.root} has no 'test' or 'val' videos; pass --split NAME")
    raise CatnetError(f"split {split!r} of store {store.root} is empty (splits present: {_present(splits)})")
