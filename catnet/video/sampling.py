"""Temporal sampling: which frames make up the K clips I_1..I_K of a video (Eq. 1).

A clip is L frames at stride s, spanning (L - 1) * s + 1 frames. The possible start frames
[0, N - span] are cut into K equal slots, and clip k starts inside slot k: at the slot's centre at test
time (deterministic, uniformly spread, the same every run) and at a random position within it at train
time. Starts are therefore non-decreasing across clips.

Videos shorter than one clip: every clip starts at frame 0 and indices past the end are clamped to the
last frame (the last frame repeats). Clamping keeps indices sorted and in range; looping would not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from catnet.config import check_fields, spec
from catnet.errors import CatnetError


@dataclass
class ClipSampling:
    """K clips of L frames at stride s. The paper: Kinetics 10 x 32 at stride 4; UCF101/HMDB51 stride 1."""

    num_clips: int = field(default=10, metadata=spec(ge=1))
    clip_len: int = field(default=32, metadata=spec(ge=1))
    stride: int = field(default=4, metadata=spec(ge=1))

    def __post_init__(self):
        for name in ("num_clips", "clip_len", "stride"):
            if not isinstance(getattr(self, name), (int, np.integer)):
                raise CatnetError(f"{name} must be an integer, got {getattr(self, name)!r}")
        check_fields(self)

    @property
    def span(self) -> int:
        """Frames from a clip's first to its last, inclusive."""
        return (self.clip_len - 1) * self.stride + 1


def clip_starts(num_frames: int, cfg: ClipSampling, train: bool = False,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """First frame of each of the K clips, int64 (K,), non-decreasing."""
    if num_frames < 1:
        raise CatnetError(f"a video needs at least one frame, got num_frames={num_frames}")
    k = np.arange(cfg.num_clips)
    positions = max(num_frames - cfg.span, 0) + 1  # valid start frames 0 .. N - span
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        offset = rng.random(cfg.num_clips)
    else:
        offset = np.full(cfg.num_clips, 0.5)
    # floor((k + u) * P / K) < P for u < 1, so starts stay in range; u = 0.5 centres clip k in slot k.
    return np.floor((k + offset) * positions / cfg.num_clips).astype(np.int64)


def sample_clips(num_frames: int, cfg: ClipSampling, train: bool = False,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices int64 (K, L) of the K clips: sorted within each clip, all in [0, num_frames)."""
    starts = clip_starts(num_frames, cfg, train, rng)
    idx = starts[:, None] + cfg.stride * np.arange(cfg.clip_len, dtype=np.int64)[None]
    return np.minimum(idx, num_frames - 1)


def clip_times(indices: np.ndarray, fps: float) -> np.ndarray:
    """(K, 2) float64 seconds: start of each clip's first frame, end of its last frame."""
    indices = np.asarray(indices)
    return np.stack([indices[:, 0] / fps, (indices[:, -1] + 1) / fps], axis=1).astype(np.float64)
