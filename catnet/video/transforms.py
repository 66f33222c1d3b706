"""Spatial transforms of a clip, in plain torch (no torchvision).

Test time: short side to 256, then three 224 crops along the long side (left/centre/right for landscape,
top/centre/bottom for portrait) or one centre crop. Train time: short side random in [256, 320], one
random 224 crop, random horizontal flip (the paper's augmentation, Sec. 4.1).

A clip's T frames are resized in one `F.interpolate` call, in uint8. Resizing is bilinear with
`antialias=True`, so downscaling averages over the source pixels instead of skipping them (aliasing);
it only makes a difference when shrinking. Crops are cut in uint8 and only they become float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from catnet.config import check_fields, spec
from catnet.errors import CatnetError


@dataclass
class SpatialConfig:
    """Test-time resize + crops and train-time scale jitter (Sec. 4.1: 224 crops, short side 256-320)."""

    short_side: int = field(default=256, metadata=spec(ge=1))
    crop: int = field(default=224, metadata=spec(ge=1))
    # 3: along the long side; 1: centre; n: n evenly spaced along the long side
    num_crops: int = field(default=3, metadata=spec(ge=1))
    train_short: tuple[int, int] = (256, 320)

    def __post_init__(self):
        self.train_short = tuple(self.train_short)  # YAML/JSON give lists
        check_fields(self)
        if self.crop > self.short_side:
            raise CatnetError(f"crop {self.crop} is larger than short_side {self.short_side} (a crop size "
                              "larger than short side: lower --crop-size or raise --short-side)")
        lo, hi = self.train_short
        if not 1 <= lo <= hi:
            raise CatnetError(f"train_short must be (low, high), 1 <= low <= high; got {self.train_short}")


def _as_thwc(frames) -> torch.Tensor:
    """uint8 (T, H, W, 3) numpy or torch -> uint8 torch tensor, no copy."""
    x = frames if torch.is_tensor(frames) else torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise CatnetError(f"frames must be uint8 (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x


def short_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to `short`, aspect ratio kept (long side rounded)."""
    scale = short / min(height, width)
    if height <= width:
        return short, max(short, round(width * scale))
    return max(short, round(height * scale)), short


def resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> short side `short`, aspect ratio kept (long side rounded), still uint8."""
    h, w = x.shape[1:3]
    size = short_size(h, w, short)
    if size == (h, w):
        return x
    # (T, 3, H, W) as a view of THWC is channels-last: uint8 + channels-last + antialias is PyTorch's
    # vectorised path, far faster on CPU than float (docs/benchmarks.md); it rounds to whole grey levels.
    y = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1)


def crop_offsets(height: int, width: int, crop: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of `num_crops` crops spread evenly along the long side, centred across."""
    if crop > min(height, width):
        raise CatnetError(f"crop {crop} does not fit in a {height}x{width} frame")
    along = np.linspace(0, max(height, width) - crop, num_crops) if num_crops > 1 else \
        np.array([(max(height, width) - crop) / 2])
    across = (min(height, width) - crop) // 2
    along = np.round(along).astype(int).tolist()
    return [(a, across) for a in along] if height > width else [(across, a) for a in along]


def _finish(x: torch.Tensor) -> torch.Tensor:
    """uint8 (T, S, S, 3) -> float (3, T, S, S) in [0, 1]."""
    return x.permute(3, 0, 1, 2).float().div_(255.0)


def test_views(frames, cfg: SpatialConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """Test-time views of one clip: float (num_crops, 3, T, crop, crop) in [0, 1], written into `out`
    when given (load_clips fills its batch tensor in place)."""
    x = resize_short(_as_thwc(frames), cfg.short_side)
    s = cfg.crop
    offsets = crop_offsets(x.shape[1], x.shape[2], s, cfg.num_crops)
    if out is None:
        out = torch.empty(len(offsets), 3, x.shape[0], s, s)
    for i, (y, xo) in enumerate(offsets):  # crop in uint8; copy_ converts and transposes in one pass
        out[i].copy_(x[:, y:y + s, xo:xo + s].permute(3, 0, 1, 2))
    return out.div_(255.0)


test_views.__test__ = False  # its name would make pytest collect it wherever a test module imports it


@dataclass(frozen=True)
class TrainAugment:
    """One clip's random augmentation: resize the short side to `short`, crop at (y, x), maybe mirror."""

    short: int
    y: int
    x: int
    flip: bool


def train_params(height: int, width: int, cfg: SpatialConfig, rng: np.random.Generator) -> TrainAugment:
    """Draw a clip's augmentation for frames of height x width (short side, then crop corner, then flip)."""
    lo, hi = cfg.train_short
    short = int(rng.integers(lo, hi + 1))
    h, w = short_size(height, width, short)
    s = cfg.crop
    if s > min(h, w):
        raise CatnetError(f"crop {s} is larger than the train short side {min(h, w)} (train_short {lo}-{hi})")
    y, xo = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return TrainAugment(short, y, xo, bool(rng.random() < 0.5))


def train_crop(frames, aug: TrainAugment, crop: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> resized and cropped (T, crop, crop, 3) uint8, not yet mirrored."""
    x = resize_short(_as_thwc(frames), aug.short)
    return x[:, aug.y:aug.y + crop, aug.x:aug.x + crop]


def train_view(frames, cfg: SpatialConfig, rng: np.random.Generator | None = None) -> torch.Tensor:
    """One augmented view of a clip: float (3, T, crop, crop) in [0, 1]."""
    rng = rng if rng is not None else np.random.default_rng()
    x = _as_thwc(frames)
    aug = train_params(x.shape[1], x.shape[2], cfg, rng)
    x = train_crop(x, aug, cfg.crop)
    if aug.flip:
        x = x.flip(2)
    return _finish(x)
