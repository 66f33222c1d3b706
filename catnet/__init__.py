"""catnet: cascade multi-head attention networks (CATNet) for video action recognition.

Data flow: video file -> sampled clips (catnet.video) -> 3D CNN backbone (catnet.backbones)
-> per-clip features (catnet.features) -> video-level head (catnet.heads) -> action logits.

    import catnet
    backbone = catnet.build_backbone("i3d_inception", pretrained=True)
    head = catnet.build_head("catnet", in_dim=1024, num_classes=400)
"""

import importlib

from catnet.version import __version__

# `build_backbone` / `build_head` resolve on first use (PEP 562): importing torch costs ~1 s, which
# `catnet --help`, `catnet weights path` and every `import catnet.errors` would otherwise pay.
_LAZY = {"build_backbone": "catnet.backbones", "build_head": "catnet.heads"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'catnet' has no attribute {name!r}")


__all__ = ["__version__", "build_backbone", "build_head"]
