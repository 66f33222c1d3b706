"""Clip backbones r(·; θ1) of the paper's Eq. (1): a video clip in, one feature vector out.

    model = build_backbone("i3d_r50", checkpoint="I3D_8x8_R50.pyth")
    feats = model.forward_features(clips)   # clips: (B, 3, T, H, W) float RGB in [0, 1] -> (B, D)
    maps = model.forward_map(clips)         # the last feature map (B, D, T', H', W')

Every backbone keeps the `ClipBackbone` contract (backbones/common.py): it normalises its input itself
and carries num_features, num_classes, labels, weights_id, weights_source and pretrained_cfg (the clip
length, stride, crop and statistics its weights expect). Unlike timm, `forward_features` returns the
pooled clip feature, the x_i the heads consume; `forward_map` is timm's `forward_features`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from catnet.backbones.common import ClipBackbone, PretrainedConfig
from catnet.backbones.i3d_inception import build_i3d_inception
from catnet.backbones.i3d_resnet import i3d_r50
from catnet.errors import CatnetError

# name -> builder(pretrained=..., checkpoint=..., **options)
BACKBONES: dict[str, Callable[..., ClipBackbone]] = {
    "i3d_r50": i3d_r50,
    "i3d_inception": build_i3d_inception,
}

__all__ = ["BACKBONES", "ClipBackbone", "PretrainedConfig", "build_backbone", "list_backbones"]


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                   **options) -> ClipBackbone:
    """Build backbone `name` with random, pretrained (`pretrained=True`) or checkpoint weights."""
    if name not in BACKBONES:
        raise CatnetError(f"unknown backbone {name!r}; choose from {', '.join(list_backbones())}")
    return BACKBONES[name](pretrained=pretrained, checkpoint=checkpoint, **options)
