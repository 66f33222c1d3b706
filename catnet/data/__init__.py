"""Datasets: annotation readers (annotations.py) and the synthetic action videos (synth.py)."""

from catnet.data.annotations import Annotations, VideoItem, load_annotations

__all__ = ["Annotations", "VideoItem", "load_annotations"]
