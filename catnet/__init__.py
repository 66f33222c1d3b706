"""catnet: cascade multi-head attention networks (CATNet) for video action recognition.

Data flow: video file -> sampled clips (catnet.video) -> 3D CNN backbone (catnet.backbones)
-> per-clip features (catnet.features) -> video-level head (catnet.heads) -> action logits.
"""

__version__ = "0.1.0"


def build_backbone(name, pretrained=False, checkpoint=None, **options):
    """Build a clip backbone by name (see catnet.backbones)."""
    from catnet.backbones import build_backbone as _build

    return _build(name, pretrained=pretrained, checkpoint=checkpoint, **options)


def build_head(name, in_dim, num_classes, **options):
    """Build a video-level head by name (see catnet.heads)."""
    from catnet.heads import build_head as _build

    return _build(name, in_dim, num_classes, **options)


__all__ = ["__version__", "build_backbone", "build_head"]
