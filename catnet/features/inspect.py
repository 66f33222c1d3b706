"""What a feature store holds, from its manifest and shard headers only (`catnet inspect STORE`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from catnet.features.store import FeatureStore
from catnet.video.stream import DenseSampling, is_dense


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _dense_settings(sampling: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A dense store's window, hop and stride (frames, as configured), the resampling rate, and the frame
    rates its videos were windowed at (their own rates when not resampled)."""
    if not is_dense(sampling):
        return None
    d = DenseSampling.from_dict(sampling)
    rates = sorted({float(r["fps"]) for r in records if isinstance(r.get("fps"), (int, float))})
    return {"window": d.window, "hop": d.hop if d.hop is not None or d.hop_seconds else d.span,
            "hop_seconds": d.hop_seconds, "stride": d.stride, "span": d.span, "fps": d.fps,
            "video_fps": rates}


def _groups(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Source-video groups per split, counted as training counts them (a video without a group is its
    own), how many of those had no group, and how many named groups have videos in more than one split
    (clips of one source video on both sides of a split: leakage)."""
    per: dict[str, set[str]] = {}
    ungrouped: Counter = Counter()
    for r in records:
        split = r.get("split", "")
        per.setdefault(split, set())
        if r.get("group"):
            per[split].add(r["group"])
        else:
            ungrouped[split] += 1
    seen = Counter(g for groups in per.values() for g in groups)
    return {"per_split": {k: len(v) + ungrouped[k] for k, v in sorted(per.items())},
            "ungrouped": {k: ungrouped[k] for k in sorted(per) if ungrouped[k]},
            "in_several_splits": sum(1 for n in seen.values() if n > 1)}


def summarize(store: FeatureStore) -> dict[str, Any]:
    """Counts, shapes, failures and manifest of a store, from shard headers only."""
    records = store.records()
    failures = store.failures
    sampling = store.manifest.get("sampling") or {}
    return {
        "path": str(store.root),
        "videos": len(records),
        "shards": len(store.shards),
        "feature_dim": store.manifest.get("num_features"),
        "mode": "dense" if is_dense(sampling) else "clips",
        "views_per_video": sorted({r["num_clips"] * r["num_crops"] for r in records}),
        "clips_per_video": sorted({r["num_clips"] for r in records}),
        # rows = clips, or windows of a dense store (each x crops views)
        "rows_per_video": _spread([r["num_clips"] for r in records]),
        "rows": int(sum(r["num_clips"] for r in records)),
        "dense": _dense_settings(sampling, records),
        "crops": sorted({r["num_crops"] for r in records}),
        "splits": dict(sorted(Counter(r.get("split", "") for r in records).items())),
        "groups": _groups(records),
        "num_classes": len(store.classes),
        "num_failures": len(failures),
        "failures": failures,
        "manifest": store.manifest,
    }
