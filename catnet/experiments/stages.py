"""Cached stages shared by `catnet demo` and `catnet reproduce`: each is done once and reused after.

- `cached_store`: extract features into a store whose folder name pins the settings that define the
  features (resumed if interrupted);
- `derived_store`: a store made from another (relabelled, selected or transformed rows), marked complete
  only once written, rebuilt from scratch if it was interrupted;
- `train_cached`: train a run (in-process, or through a given launcher); a finished run is reused, an
  interrupted one resumed, one trained with other settings, another length, on other features, or whose
  head a changed preset would now build differently, retrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catnet.config import to_dict
from catnet.engine.loop import settings_diff
from catnet.engine.runs import CHECKPOINTS, RUN_JSON, read_history, read_run_info
from catnet.engine.train import TrainConfig, train, train_head_args
from catnet.errors import CatnetError
from catnet.features.extract import ExtractConfig, ExtractResult, extract
from catnet.features.store import FEATURE_KEYS, FeatureStore, StoreWriter
from catnet.heads import head_config
from catnet.utils.io import atomic_write_json

COMPLETE = "complete.json"


def store_key(cfg: ExtractConfig, **extra: Any) -> str:
    """8 hex digits naming the settings that define the features (not speed knobs like workers)."""
    key = {"backbone": cfg.backbone, "pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint,
           "sampling": to_dict(cfg.sampling), "spatial": to_dict(cfg.spatial), "seed": cfg.seed, **extra}
    if cfg.dense is not None:  # only when set, so the keys of K-clip stores made earlier still match
        key["dense"] = cfg.dense.to_dict()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def cached_store(videos: str | Path, folder: Path, cfg: ExtractConfig, prefix: str = "store",
                 progress: bool = False, **key: Any) -> tuple[Path, ExtractResult]:
    """Extract (or resume extracting) `videos` into folder/<prefix>-<store_key(cfg, **key)>."""
    store = folder / f"{prefix}-{store_key(cfg, **key)}"
    return store, extract(videos, store, cfg, progress=progress)


@dataclass
class Row:
    """One video of a derived store."""

    id: str
    features: np.ndarray
    times: np.ndarray
    label: int
    split: str
    path: str
    num_crops: int
    group: str = ""  # the source video, when known (catnet.engine.splits)


def derived_store(dst: Path, manifest: dict[str, Any], rows: Callable[[], Iterable[Row]],
                  info: dict[str, Any] | None = None, marker: str = COMPLETE,
                  identity: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """The store `dst` written from `rows()`, once: returns (dst, the info saved with it).

    A complete store (its `marker` file exists) is reused when it was made from the same `identity`
    (what it is derived from: the source store, the rows chosen; saved in the marker and, as a digest,
    in the manifest, so runs trained on an older version of it are retrained: `train_cached`); an
    interrupted or out-of-date one is rebuilt (no decoding, it takes seconds).
    """
    marker = dst / marker
    digest = None if identity is None else \
        hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("identity") == digest or identity is None:
            return dst, saved
    if dst.exists():
        shutil.rmtree(dst)
    if digest is not None:
        manifest = {**manifest, "derived": digest}
    with StoreWriter(dst, manifest, shard_size=64, flush_seconds=None, journal=False) as w:
        for r in rows():
            w.add(r.id, r.features, r.times, label=r.label, split=r.split, path=r.path, num_crops=r.num_crops,
                  group=r.group)
    info = dict(info or {}, **({"identity": digest} if digest is not None else {}))
    atomic_write_json(marker, info)
    return dst, info


def rows_of(store: FeatureStore) -> Iterable[Row]:
    """Every video of a store as a Row (features float32)."""
    for v, rec in zip(store, store.records(), strict=True):
        yield Row(v.id, v.features, v.times, v.label, v.split, v.path, v.num_crops, rec.get("group", ""))


def run_finished(run_dir: Path, epochs: int | None) -> bool:
    """Whether the run in `run_dir` has trained `epochs` epochs (None: its planned length), or stopped
    early. Runs of catnet <= 0.2 (no "result" in run.json) are judged by metrics.csv."""
    if not (run_dir / CHECKPOINTS / "last.pt").is_file() or not (run_dir / RUN_JSON).is_file():
        return False
    info = read_run_info(run_dir)
    result = info.get("result")
    if result is None:
        hist = read_history(run_dir)
        return bool(hist) and epochs is not None and hist[-1]["epoch"] >= epochs
    planned = epochs or (info.get("schedule") or {}).get("epochs") or 0
    return bool(result.get("stopped_early")) or result["epochs_run"] >= planned


def head_changed(cfg: TrainConfig, info: dict[str, Any]) -> bool:
    """Whether `cfg` would build today a head other than the one run.json recorded: the same flags can
    mean another head after a preset's default changed (avgpool's dropout in catnet 0.4)."""
    if cfg.init_from:  # the architecture comes from the source run, not from a preset
        return False
    try:
        name, options = train_head_args(cfg)
        config = head_config(name, info["in_dim"], info["num_classes"], **options)
    except (CatnetError, KeyError):  # retrained, and train() says what is wrong
        return True
    return to_dict(config) != (info.get("head") or {}).get("config")


# what decides a store's features, beside FEATURE_KEYS: the source of a derived store and its digest
STORE_IDENTITY = (*FEATURE_KEYS, "features_from", "derived")


def store_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in STORE_IDENTITY}


def stale_run(cfg: TrainConfig, info: dict[str, Any]) -> bool:
    """Whether a recorded run is not what `cfg` would train today: other settings, another length (a
    cached 2-epoch run is not a default-length one, and extending a cosine run differs from a straight
    run), another store or features, or a head a changed preset would build differently."""
    old = info.get("train") or {}
    if settings_diff(cfg, old) or old.get("epochs") != cfg.epochs or old.get("store") != cfg.store:
        return True
    recorded = ((info.get("store") or {}).get("manifest")) or {}
    try:
        current = FeatureStore(cfg.store).manifest
    except CatnetError:  # no store there: train() says so
        return True
    return store_identity(recorded) != store_identity(current) or head_changed(cfg, info)


def train_cached(cfg: TrainConfig, log: str = "train.log",
                 trainer: Callable[[TrainConfig], Any] | None = None) -> bool:
    """Train `cfg` into cfg.out unless it is already there; the trainer's lines go to RUN/`log`.

    Returns True when it trained (or resumed). A stale run (`stale_run`) is deleted first. `trainer`
    (default: `train` in this process, its output redirected) is called with cfg.resume set, e.g. to
    launch the same run under torchrun.
    """
    run_dir = Path(cfg.out)
    if (run_dir / RUN_JSON).is_file() and stale_run(cfg, read_run_info(run_dir)):
        shutil.rmtree(run_dir)
    if run_finished(run_dir, cfg.epochs):
        return False
    cfg.resume = (run_dir / CHECKPOINTS / "last.pt").is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer is not None:
        trainer(cfg)
        return True
    with open(run_dir / log, "a") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
        train(cfg)
    return True
