"""A video file -> the (K * crops) views the backbone sees, plus when each clip happens."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from catnet.video.decode import VideoInfo, probe, read_frames
from catnet.video.sampling import ClipSampling, clip_times, sample_clips
from catnet.video.transforms import SpatialConfig, resize_short, test_views, train_view

# Most full-size RGB frames held at once at test time. A 4K frame is 25 MB, so 10 clips x 32 frames would
# otherwise need 8 GB before the first resize (an OOM kill takes a whole extraction down with it).
DECODE_BUDGET = 512 * 2**20


@dataclass
class Clips:
    views: torch.Tensor  # float (K * crops, 3, L, S, S) in [0, 1]; view v = k * crops + c
    clip_times: np.ndarray  # (K, 2) seconds: start of the first frame, end of the last
    info: VideoInfo
    indices: np.ndarray  # (K, L) int64 frame indices


def load_clips(path: str | os.PathLike, sampling: ClipSampling, spatial: SpatialConfig, train: bool = False,
               rng: np.random.Generator | None = None) -> Clips:
    """Sample, decode and crop a video's clips I_1..I_K (Eq. 1).

    Test time gives `spatial.num_crops` views per clip; train time one augmented view per clip. Frames
    shared by overlapping clips are decoded once; only the output tensor grows with K.
    """
    if train and rng is None:
        rng = np.random.default_rng()
    info = probe(path)
    indices = sample_clips(info.num_frames, sampling, train=train, rng=rng)
    uniq, inverse = np.unique(indices, return_inverse=True)
    frames = read_frames(path, uniq) if train else _read_resized(path, uniq, info, spatial.short_side)
    inverse = inverse.reshape(indices.shape)
    crops = 1 if train else spatial.num_crops
    s = spatial.crop
    views = torch.empty(sampling.num_clips * crops, 3, sampling.clip_len, s, s)
    for k in range(sampling.num_clips):
        clip = frames[inverse[k]]
        if train:
            views[k] = train_view(clip, spatial, rng)
        else:
            test_views(clip, spatial, out=views[k * crops:(k + 1) * crops])
    return Clips(views, clip_times(indices, info.fps), info, indices)


def _read_resized(path, uniq: np.ndarray, info: VideoInfo, short: int) -> np.ndarray:
    """`read_frames` in chunks of at most DECODE_BUDGET bytes, each resized to the test short side at once.

    `test_views` then finds frames already at that size and leaves them alone, so views are identical to
    decoding everything first. (Train views pick a random short side per clip, so they decode in one go.)
    """
    chunk = max(1, DECODE_BUDGET // max(1, info.width * info.height * 3))
    if len(uniq) <= chunk:
        return read_frames(path, uniq)
    parts = [resize_short(torch.from_numpy(read_frames(path, uniq[i:i + chunk])), short).numpy()
             for i in range(0, len(uniq), chunk)]
    return np.concatenate(parts)
