"""Clip-feature stores: crash-safe safetensors shards written by `catnet extract`, read lazily."""

from catnet.features.store import FeatureStore, StoreWriter, VideoFeatures, make_manifest

__all__ = ["FeatureStore", "StoreWriter", "VideoFeatures", "make_manifest"]
