"""A video file -> the (K * crops) views the backbone sees, plus when each clip happens.

Memory: full-size frames are only ever held a chunk at a time (at most DECODE_BUDGET bytes, together with
the same frames resized), and each chunk is resized and cropped as soon as it is decoded. Only crops are
expanded into clips of L frames, so nothing but the output `views` grows with K and L, and nothing at all
grows with the source resolution beyond the budget (frame geometry itself is bounded by
`decode.MAX_PIXELS` and `decode.MAX_ASPECT`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from catnet.video import transforms as T
from catnet.video.decode import VideoInfo, probe, read_frames
from catnet.video.sampling import ClipSampling, clip_times, sample_clips
from catnet.video.transforms import SpatialConfig, crop_offsets, resize_short, short_size

# Most bytes of full-size RGB frames (plus the same frames resized) held at once. A 4K frame is 25 MB, so
# 10 clips x 32 frames would otherwise need 8 GB before the first resize (an OOM kill takes a whole
# extraction down with it).
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
    shared by overlapping clips are decoded once (at train time: once per group of clips that fits the
    budget); only the output tensor grows with K and L.
    """
    if train and rng is None:
        rng = np.random.default_rng()
    info = probe(path)
    indices = sample_clips(info.num_frames, sampling, train=train, rng=rng)
    if train:
        views = _train_views(path, indices, info, spatial, rng)
    else:
        views = _test_views(path, indices, info, spatial)
    return Clips(views, clip_times(indices, info.fps), info, indices)


def _chunk(info: VideoInfo, resized: tuple[int, int]) -> int:
    """Frames per decode: full-size frames plus their resized copies within DECODE_BUDGET (at least one;
    with MAX_PIXELS and MAX_ASPECT one frame is 192 MB at most, resized to short side 320 about 5 MB)."""
    full, small = info.width * info.height * 3, resized[0] * resized[1] * 3
    return max(1, DECODE_BUDGET // (full + small))


def _test_views(path, indices: np.ndarray, info: VideoInfo, spatial: SpatialConfig) -> torch.Tensor:
    """Decode the distinct frames a chunk at a time, resize each chunk to the short side and cut its crops
    at once; the clips are then gathered from the crops. Identical to `test_views` on full-size clips."""
    uniq, inverse = np.unique(indices, return_inverse=True)
    inverse = inverse.reshape(indices.shape)
    resized = short_size(info.height, info.width, spatial.short_side)
    offsets = crop_offsets(*resized, spatial.crop, spatial.num_crops)
    chunk, s = _chunk(info, resized), spatial.crop
    crops = torch.empty(len(uniq), len(offsets), s, s, 3, dtype=torch.uint8)
    for i in range(0, len(uniq), chunk):
        x = resize_short(torch.from_numpy(read_frames(path, uniq[i:i + chunk])), spatial.short_side)
        for c, (y, xo) in enumerate(offsets):
            crops[i:i + len(x), c] = x[:, y:y + s, xo:xo + s]
        del x
    k_clips, n = indices.shape[0], len(offsets)
    views = torch.empty(k_clips * n, 3, indices.shape[1], s, s)
    for k in range(k_clips):
        clip = crops[torch.from_numpy(inverse[k])]  # (L, crops, S, S, 3) uint8
        for c in range(n):  # copy_ converts and transposes in one pass
            views[k * n + c].copy_(clip[:, c].permute(3, 0, 1, 2))
    return views.div_(255.0)


def _train_views(path, indices: np.ndarray, info: VideoInfo, spatial: SpatialConfig,
                 rng: np.random.Generator) -> torch.Tensor:
    """One augmented view per clip, each resized from the full-size frames at its own random short side
    (as `train_view` on the full-size clip, with the same random draws in the same order).

    Consecutive clips are grouped while their distinct frames fit in one chunk and decoded together; a clip
    with more distinct frames than a chunk is decoded a chunk at a time. Each chunk is resized and cropped
    per clip at once, so at most a chunk of full-size frames is held."""
    augs: list[T.TrainAugment] = [T.train_params(info.height, info.width, spatial, rng) for _ in indices]
    largest = max(augs, key=lambda a: a.short).short
    chunk, s = _chunk(info, short_size(info.height, info.width, largest)), spatial.crop
    per_clip = [np.unique(row, return_inverse=True) for row in indices]
    crops = [torch.empty(len(u), s, s, 3, dtype=torch.uint8) for u, _ in per_clip]
    for group in _groups([u for u, _ in per_clip], chunk):
        union = np.unique(np.concatenate([per_clip[k][0] for k in group]))
        for i in range(0, len(union), chunk):
            part = union[i:i + chunk]
            frames = torch.from_numpy(read_frames(path, part))
            for k in group:
                u = per_clip[k][0]
                mine = np.flatnonzero(np.isin(u, part))  # this clip's frames in this part
                at = np.searchsorted(part, u[mine])
                # contiguous runs of `part` are resized as views, never gathered into a full-size copy
                for run in np.split(np.arange(len(at)), np.flatnonzero(np.diff(at) != 1) + 1):
                    if len(run):
                        a, b = int(at[run[0]]), int(at[run[-1]]) + 1
                        crops[k][torch.from_numpy(mine[run])] = T.train_crop(frames[a:b], augs[k], s)
            del frames
    views = torch.empty(len(indices), 3, indices.shape[1], s, s)
    for k, (_, inverse) in enumerate(per_clip):
        clip = crops[k][torch.from_numpy(inverse.reshape(-1))]
        views[k] = T._finish(clip.flip(2) if augs[k].flip else clip)
    return views


def _groups(uniqs: list[np.ndarray], chunk: int) -> list[list[int]]:
    """Consecutive clips whose distinct frames together fit in one chunk (a clip alone may not)."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    for k, u in enumerate(uniqs):
        merged = seen | set(u.tolist())
        if groups and len(merged) <= chunk:
            groups[-1].append(k)
            seen = merged
        else:
            groups.append([k])
            seen = set(u.tolist())
    return groups
