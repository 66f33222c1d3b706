"""*Where* in a clip the decision came from: Grad-CAM (Selvaraju et al., ICCV 2017) on the backbone's last
feature map, shown over the key frame (middle frame) of the clips that mattered most.

For a class c and one view v (a clip's centre crop), with A = backbone.forward_map(v) (D, T', H', W'):
  y_c   = the trained head's logit c, with view v's pooled feature recomputed from A and every other
          view's feature held constant (so the gradient is d y_c / d A_v alone); without a head, the
          backbone's own classifier on v (forward_head(pool(A))).
  w_d   = mean over (t, h, w) of d y_c / d A_d  (spatially and temporally averaged gradients)
  cam   = ReLU(sum_d w_d A_d)                    (T', H', W')
The cam is upsampled (trilinear) to the clip's (L, S, S), read at the key frame, placed where the crop
sits in the resized frame (transforms.crop_offsets) and resized to the decoded frame: zero outside the
crop, which the model did not see. It is normalised to [0, 1] by its maximum.
"""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catnet.backbones.common import ClipBackbone
from catnet.errors import CatnetError
from catnet.video.transforms import crop_offsets, short_size

NUM_EXPLAINED = 3  # clips explained per video: Grad-CAM costs a backward pass of the backbone per clip
GRID_CELLS = 12  # cells along the long side of the JSON "map" grid
OVERLAY_HEIGHT = 192  # height of the overlay images inlined as data URLs


@dataclass
class Saliency:
    """Grad-CAM of one clip, over its key frame."""

    clip: int
    view: int
    label: str  # the class the map is for
    frame_index: int  # the key frame (decode order)
    heat: np.ndarray  # float32 (H, W) in [0, 1], the decoded frame's size; 0 outside the crop
    frame: np.ndarray  # uint8 (H, W, 3), the decoded key frame
    crop_box: tuple[int, int, int, int]  # (top, left, bottom, right) of the crop, in frame pixels

    def grid(self, cells: int = GRID_CELLS) -> list[list[float]]:
        """The heat averaged over a small grid (at most `cells` along the long side), 3 decimals."""
        h, w = self.heat.shape
        size = (max(1, round(cells * h / max(h, w))), max(1, round(cells * w / max(h, w))))
        small = F.adaptive_avg_pool2d(torch.from_numpy(self.heat)[None, None], size)[0, 0]
        return [[round(float(v), 3) for v in row] for row in small]

    def overlay(self, height: int | None = None) -> np.ndarray:
        """uint8 (h, w, 3): the frame with the heat as a colour map inside the crop, greyed outside."""
        return overlay(self.frame, self.heat, self.crop_box, height)


def supports_grad_cam(backbone: nn.Module) -> bool:
    """Whether the backbone implements the ClipBackbone contract's forward_map (its last feature map)."""
    return isinstance(backbone, ClipBackbone) and type(backbone).forward_map is not ClipBackbone.forward_map


def grad_cam(backbone: nn.Module, view: torch.Tensor, class_index: int, head: nn.Module | None = None,
             features: torch.Tensor | None = None, view_index: int = 0) -> torch.Tensor:
    """Grad-CAM (T', H', W') of one view (3, L, S, S) for `class_index`.

    With `head`, `features` (V, D) are every view's features of the video and `view_index` says which one
    `view` is; the head sees all V, only view `view_index` is recomputed with gradients.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = view[None].clone().requires_grad_(True)  # a graph even if the weights are frozen
        maps = backbone.forward_map(x)
        pooled = backbone.pool(maps).float()
        if head is None:
            score = backbone.forward_head(pooled)[0, class_index]
        else:
            if features is None:
                raise CatnetError("Grad-CAM through a head needs the video's clip features")
            rest = features.detach().clone().float()  # constants: outside inference mode, no grad
            feats = torch.cat([rest[:view_index], pooled, rest[view_index + 1:]])
            score = head(feats[None])[0, class_index]
        (grad,) = torch.autograd.grad(score, maps)
    weights = grad.float().mean(dim=(2, 3, 4), keepdim=True)
    return F.relu((weights * maps.detach().float()).sum(1))[0]


def key_frame_map(cam: torch.Tensor, clip_len: int, crop: int) -> np.ndarray:
    """cam (T', H', W') -> float32 (crop, crop) at the clip's key frame (its middle frame, L // 2)."""
    up = F.interpolate(cam[None, None], size=(clip_len, crop, crop), mode="trilinear", align_corners=False)
    return up[0, 0, clip_len // 2].numpy().astype(np.float32)


def to_frame(crop_map: np.ndarray, frame_hw: tuple[int, int], short_side: int, num_crops: int,
             crop_index: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A (S, S) map on one crop -> (H, W) on the decoded frame, normalised to [0, 1]; and the crop's box
    (top, left, bottom, right) in frame pixels. Same geometry as load_clips: resize the short side, crop."""
    h, w = frame_hw
    rh, rw = short_size(h, w, short_side)
    s = crop_map.shape[0]
    oy, ox = crop_offsets(rh, rw, s, num_crops)[crop_index]
    canvas = torch.zeros(1, 1, rh, rw)
    canvas[0, 0, oy:oy + s, ox:ox + s] = torch.from_numpy(crop_map)
    heat = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp_(min=0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 and np.isfinite(peak) else torch.zeros_like(heat)
    box = (round(oy * h / rh), round(ox * w / rw), round((oy + s) * h / rh), round((ox + s) * w / rw))
    return torch.nan_to_num(heat, nan=0.0).numpy().astype(np.float32), box


def colormap(heat: np.ndarray) -> np.ndarray:
    """float [0, 1] (...) -> uint8 (..., 3): the 'jet' ramp (blue, cyan, yellow, red)."""
    h = np.clip(np.asarray(heat, np.float32), 0, 1)[..., None]
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # r, g, b peak at 3/4, 1/2, 1/4
    return (np.clip(1.5 - np.abs(4 * h - centres), 0, 1) * 255).round().astype(np.uint8)


def overlay(frame: np.ndarray, heat: np.ndarray, box: tuple[int, int, int, int],
            height: int | None = None) -> np.ndarray:
    """Blend the colour map into the crop (the region the model saw); grey out the rest of the frame."""
    out = frame.astype(np.float32) * 0.45
    top, left, bottom, right = box
    inside = (slice(top, bottom), slice(left, right))
    out[inside] = frame[inside].astype(np.float32) * 0.5 + colormap(heat[inside]).astype(np.float32) * 0.5
    img = torch.from_numpy(out).permute(2, 0, 1)[None]
    if height is not None and height != frame.shape[0]:
        size = (height, max(1, round(frame.shape[1] * height / frame.shape[0])))
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
    return img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> a PNG file; a few lines of zlib instead of an image library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def png_data_url(rgb: np.ndarray) -> str:
    """uint8 (H, W, 3) -> `data:image/png;base64,...`."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")
