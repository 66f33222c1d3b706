"""Real labelled sensor sequences (catnet.data.sequences) as a feature store: each window is a "clip"."""

from __future__ import annotations

import os
from dataclasses import asdict

from catnet.data.sequences import WindowConfig, load_sequences
from catnet.features.store import FeatureStore


def write_sequence_store(name: str, out: str | os.PathLike, cfg: WindowConfig | None = None, *,
                         data_dir: str | os.PathLike | None = None):
    """A feature store (splits `train` / `test`, one crop per clip) that `catnet train` reads as is."""
    cfg = cfg or WindowConfig()
    train, test = load_sequences(name, cfg, data_dir=data_dir)
    feats = [*train.x, *test.x]
    ids = [f"{name}_train_{i:04d}" for i in range(len(train.y))] + \
          [f"{name}_test_{i:04d}" for i in range(len(test.y))]
    return FeatureStore.write_synthetic(
        out, feats, [*train.y.tolist(), *test.y.tolist()], train.classes, ids=ids,
        splits=["train"] * len(train.y) + ["test"] * len(test.y), times=[*train.times, *test.times],
        backbone=f"sequences:{name}", weights_id=f"window-{cfg.features}-{cfg.num_clips}x{cfg.points}",
        sampling=asdict(cfg))
