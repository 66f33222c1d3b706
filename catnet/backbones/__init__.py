"""Clip backbones r(·; θ1) of the paper's Eq. (1): a video clip in, one feature vector out.

    model = build_backbone("i3d_r50", checkpoint="I3D_8x8_R50.pyth")
    feats = model.forward_features(clips)   # clips: (B, 3, T, H, W) float RGB in [0, 1] -> (B, D)

Every backbone normalises its input itself, and carries num_features, num_classes, labels,
default_clip_len, default_crop and weights_id (see docs/architecture.md and docs/backbones.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from catnet.errors import CatnetError


def _i3d_r50(**kwargs) -> nn.Module:
    from catnet.backbones.i3d_resnet import i3d_r50

    return i3d_r50(**kwargs)


def _i3d_inception(**kwargs) -> nn.Module:
    # Imported on use, so a problem in one backbone's module never breaks the others.
    from catnet.backbones.i3d_inception import build_i3d_inception

    return build_i3d_inception(**kwargs)


# name -> builder(pretrained=..., checkpoint=..., **options)
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "i3d_r50": _i3d_r50,
    "i3d_inception": _i3d_inception,
}


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                   **options) -> nn.Module:
    """Build backbone `name` with random, pretrained (`pretrained=True`) or checkpoint weights."""
    if name not in BACKBONES:
        raise CatnetError(f"unknown backbone {name!r}; choose from {', '.join(list_backbones())}")
    return BACKBONES[name](pretrained=pretrained, checkpoint=checkpoint, **options)
