"""What a feature store holds, from its manifest and shard headers only (`catnet inspect STORE`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from catnet.features.store import FeatureStore


def summarize(store: FeatureStore) -> dict[str, Any]:
    """Counts, shapes, failures and manifest of a store, from shard headers only."""
    records = store.records()
    failures = store.failures
    return {
        "path": str(store.root),
        "videos": len(records),
        "shards": len(store.shards),
        "feature_dim": store.manifest.get("num_features"),
        "views_per_video": sorted({r["num_clips"] * r["num_crops"] for r in records}),
        "clips_per_video": sorted({r["num_clips"] for r in records}),
        "crops": sorted({r["num_crops"] for r in records}),
        "splits": dict(sorted(Counter(r.get("split", "") for r in records).items())),
        "num_classes": len(store.classes),
        "num_failures": len(failures),
        "failures": failures,
        "manifest": store.manifest,
    }
