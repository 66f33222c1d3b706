"""Which videos train and which select the checkpoint: one rule for `catnet train`, `finetune-backbone`
and `eval` (docs/training.md, "Splits").

Items carry a split name ("train", "val", "test", "" for none) and optionally a group (the source video
several clips were cut from: UCF101's `gGG`, an HMDB51 source name, a CSV `group` column). Training uses
`train_split` (every item when no item has a split name). Validation, which picks the best checkpoint
and drives early stopping, is, unless `val_split` names a split:

1. the `val` split, if the items have one;
2. else a held-out part of the training items (`holdout`): per class, ⌊holdout_fraction x its groups⌋
   groups, chosen by a hash of the group name, so it is the same on every machine and a group is never
   on both sides;
3. else none, when no class has 1/holdout_fraction groups (then the best checkpoint is the last). On so
   few videos a hold-out costs more than it selects (benchmarks/recipe_cv.py, docs/training.md).

The test split selects nothing unless asked (`val_split="test"`); the run then records it and `catnet
eval` marks numbers measured on it (`selected_on`). Evaluation defaults to "test", else "val".
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catnet.errors import CatnetError
from catnet.features.store import FeatureStore

NO_VALIDATION = "none"
HOLDOUT_RULES = ("floor", "at_least_one")
EVAL_DEFAULTS = ("test", "val")
VAL_DEFAULT = "val"


@dataclass
class SplitPlan:
    train: list[int]
    val: list[int]
    val_name: str  # a split name, "holdout<fraction>", or NO_VALIDATION
    train_name: str  # the training split's name ("" when the items have no split names)
    # The store split the validation items belong to ("train" for a hold-out, "" when the items have no
    # split names); None without validation. Numbers measured on this split after selection on it are
    # optimistic: `catnet eval` says so.
    selected_on: str | None = None
    note: str = ""  # why there is no validation, when the rule found none

    @property
    def holdout(self) -> bool:
        return self.val_name.startswith("holdout")


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def group_names(ids: Sequence[str], groups: Sequence[str] | None) -> list[str]:
    """Each item's group: its own group name, or its id when it has none (every video its own group).
    Ids and group names live in separate namespaces, so an id never joins a named group by accident."""
    if groups is None:
        return [f"id:{i}" for i in ids]
    return [f"group:{g}" if g else f"id:{i}" for i, g in zip(ids, groups, strict=True)]


def group_members(names: Sequence[str]) -> dict[str, list[int]]:
    """Group name -> the indices of its items, in item order."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(names):
        members[g].append(i)
    return members


def held_groups(n: int, fraction: float, rule: str = "floor") -> int:
    """How many of a class's n training groups validate under `rule` (see `holdout`)."""
    if rule == "floor":  # the epsilon keeps 0.29 x 100 (28.999...) at 29
        return math.floor(fraction * n + 1e-9)
    return max(1, int(round(fraction * n))) if n > 1 else 0


def holdout(ids: Sequence[str], labels: np.ndarray, fraction: float,
            groups: Sequence[str] | None = None, rule: str = "floor") -> list[bool]:
    """Which items validate: per class, the first ⌊fraction x its groups⌋ groups in sha1 order of the group
    name (`rule="at_least_one"`, catnet 0.3's: round(fraction x groups), at least one when the class has
    two or more). A group spanning classes moves as one, and only while every class it holds keeps a
    training group. Without groups each video is its own group."""
    if rule not in HOLDOUT_RULES:
        raise CatnetError(f"unknown hold-out rule {rule!r}; expected one of {', '.join(HOLDOUT_RULES)}")
    names = group_names(ids, groups)
    members = group_members(names)
    labels = np.asarray(labels)
    classes_of = {g: sorted({int(labels[i]) for i in m}) for g, m in members.items()}
    groups_left: dict[int, int] = defaultdict(int)  # training groups per class
    for cs in classes_of.values():
        for c in cs:
            groups_left[c] += 1
    target = {c: held_groups(n, fraction, rule) for c, n in groups_left.items()}
    taken: dict[int, int] = defaultdict(int)
    held = [False] * len(names)
    for g in sorted(members, key=_digest):
        cs = classes_of[g]
        if any(taken[c] < target[c] for c in cs) and all(groups_left[c] > 1 for c in cs):
            for c in cs:
                taken[c] += 1
                groups_left[c] -= 1
            for i in members[g]:
                held[i] = True
    return held


def group_kfold(labels: np.ndarray, k: int, ids: Sequence[str], groups: Sequence[str] | None = None) -> list[
        list[int]]:
    """k folds of item indices for cross-validation inside a training split: every group in exactly one
    fold, folds balanced per class (a group goes to the fold with the fewest items of its most common
    class, then the smallest fold), groups taken largest first, ties in sha1 order. Deterministic."""
    if k < 2:
        raise CatnetError(f"k-fold needs k >= 2, got {k}")
    members = group_members(group_names(ids, groups))
    if len(members) < k:
        raise CatnetError(f"{len(members)} groups cannot fill {k} folds")
    labels = np.asarray(labels)
    per_class = np.zeros((k, int(labels.max()) + 1 if len(labels) else 1), dtype=np.int64)
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in sorted(members, key=lambda g: (-len(members[g]), _digest(g))):
        m = members[g]
        major = int(np.bincount(labels[m]).argmax())
        f = min(range(k), key=lambda j: (per_class[j, major], len(folds[j]), j))
        folds[f] += m
        np.add.at(per_class[f], labels[m], 1)
    return [sorted(f) for f in folds]


def _present(splits: Sequence[str]) -> str:
    return ", ".join(sorted({s for s in splits if s})) or "none"


def _named(splits: Sequence[str], name: str) -> list[int]:
    return [i for i, s in enumerate(splits) if s == name]


def plan_splits(splits: Sequence[str], ids: Sequence[str], labels: np.ndarray, *, train_split: str,
                val_split: str | None, holdout_fraction: float, where: str,
                groups: Sequence[str] | None = None, holdout_rule: str = "floor") -> SplitPlan:
    """Train and validation item indices by the rule above; refuses empty splits up front (`where` names
    the source)."""
    named = any(splits)
    train = _named(splits, train_split) if named else list(range(len(splits)))
    train_name = train_split if named else ""
    if not train:
        raise CatnetError(f"training split {train_split!r} of {where} is empty "
                          f"(splits present: {_present(splits)})")
    if val_split == NO_VALIDATION:
        return SplitPlan(train, [], NO_VALIDATION, train_name)
    if val_split is not None:
        if val_split == train_split:
            raise CatnetError(f"--val-split {val_split!r} is the training split; choose another split, or "
                              "leave it unset for a held-out part of the training videos")
        val = _named(splits, val_split)
        if not val:
            raise CatnetError(f"validation split {val_split!r} of {where} is empty (splits present: "
                              f"{_present(splits)})")
        return SplitPlan(train, val, val_split, train_name, selected_on=val_split)
    val = _named(splits, VAL_DEFAULT) if named and train_split != VAL_DEFAULT else []
    if val:
        return SplitPlan(train, val, VAL_DEFAULT, train_name, selected_on=VAL_DEFAULT)
    sub_groups = None if groups is None else [groups[i] for i in train]
    held = holdout([ids[i] for i in train], np.asarray(labels)[train], holdout_fraction, sub_groups,
                   holdout_rule)
    val = [i for i, h in zip(train, held, strict=True) if h]
    if not val:
        need = next(n for n in itertools.count(2) if held_groups(n, holdout_fraction, holdout_rule))
        return SplitPlan(train, [], NO_VALIDATION, train_name,
                         note=f"{where} has no 'val' split, and no class has the {need} groups of training "
                              f"videos a {holdout_fraction:g} hold-out needs: training on all of them "
                              "without validation (the best checkpoint is the last; a larger "
                              "--holdout-fraction or a val split gives one)")
    train = [i for i, h in zip(train, held, strict=True) if not h]
    return SplitPlan(train, val, f"holdout{holdout_fraction:g}", train_name, selected_on=train_name)


def store_groups(store: FeatureStore, records: list[dict] | None = None) -> list[str]:
    """Each store video's group ("" when it has none); `records`: the store's, when already read."""
    return [str(r.get("group") or "") for r in (store.records() if records is None else records)]


def store_splits(store: FeatureStore, cfg) -> SplitPlan:
    """The split plan of a store's videos for a Recipe-like `cfg` (train_split, val_split, holdout)."""
    records = store.records()
    return plan_splits([r.get("split") or "" for r in records], store.ids, store.labels,
                       train_split=cfg.train_split, val_split=cfg.val_split,
                       holdout_fraction=cfg.holdout_fraction, where=f"store {store.root}",
                       groups=store_groups(store, records), holdout_rule=cfg.holdout_rule)


def resolve_split(store: FeatureStore, split: str | None) -> tuple[str, list[int]]:
    """(split name, indices) to evaluate: `split`, or when None the store's "test" then "val" videos,
    else, in a store without split names (a folder of class folders), all of them ("")."""
    splits = [r.get("split") or "" for r in store.records()]
    for name in EVAL_DEFAULTS if split is None else (split,):
        indices = _named(splits, name)
        if indices:
            return name, indices
    unnamed = " (a store without split names: --split '' takes all its videos)" if not any(splits) else ""
    if split is None:
        if splits and not any(splits):
            return "", list(range(len(splits)))
        raise CatnetError(f"store {store.root} has no 'test' or 'val' videos; pass --split NAME (splits "
                          f"present: {_present(splits)})")
    raise CatnetError(f"split {split!r} of store {store.root} is empty (splits present: "
                      f"{_present(splits)}){unnamed}")


def validation_words(info: dict) -> str:
    """How a run validated, from its run.json, in words: "held-out 'train' videos", "the 'val' split",
    "none"; with ", early stopping" when validation also decided the run's length."""
    val = str((info.get("splits") or {}).get("val") or NO_VALIDATION)
    selected_on, early = selection(info)
    if selected_on is None:
        return "none"
    where = (f"held-out {selected_on!r} videos" if selected_on else "held-out videos") \
        if val.startswith("holdout") else f"the {selected_on!r} split"
    return where + (", early stopping" if early else "")


def selection(info: dict) -> tuple[str | None, bool]:
    """(the store split a run's checkpoint selection used, or None; whether early stopping used it too)
    from its run.json, including runs of earlier catnet versions (which recorded only `splits.val`)."""
    cfg = info.get("train") or info.get("finetune") or {}
    early = bool(cfg.get("early_stop"))
    if "selected_on" in info:
        return info["selected_on"], early
    val = (info.get("splits") or {}).get("val")
    if not val or val == NO_VALIDATION:
        return None, early
    if str(val).startswith("holdout"):
        return (info.get("splits") or {}).get("train", "train") or "", early
    return val, early


def training_note(info: dict, store_root: str | Path, split: str) -> str | None:
    """A one-line warning when `split` of this store is the one the run trained on (a folder store
    without split names, evaluated whole, is the usual way to get here); else None."""
    recorded = (info.get("store") or {}).get("path")
    trained = (info.get("splits") or {}).get("train")
    if recorded is None or trained is None or trained != split:
        return None
    if Path(recorded).resolve() != Path(store_root).resolve():
        return None
    name = f"'{split}'" if split else "all (unnamed)"
    return (f"measured on {name} videos of the store the run trained on: a training number, not a test "
            "one (extract held-out videos into their own store, or give the store a test split)")


def selection_note(info: dict, which: str, split: str) -> str | None:
    """A one-line warning when the numbers of checkpoint `which`, measured on `split`, were selected on
    that same split (the best checkpoint, or the last one of an early-stopped run); else None."""
    selected_on, early = selection(info)
    if selected_on is None or selected_on != split or (which == "last" and not early):
        return None
    what = "best checkpoint" if which == "best" else "run length (early stopping)"
    name = f"'{split}'" if split else "the (unnamed) training"
    return (f"selected on {name}: this run's {what} was chosen on the split it is measured on, so these "
            "numbers are optimistic")
