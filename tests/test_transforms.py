"""Spatial transforms: resize once per clip, crops inside the frame for any size, train augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from catnet.errors import CatnetError
from catnet.video import SpatialConfig, train_view
from catnet.video import transforms as T


def ramp(t: int, h: int, w: int) -> np.ndarray:
    """Frames whose red channel is the column, green the row, blue the frame number."""
    x = np.zeros((t, h, w, 3), np.uint8)
    x[..., 0] = np.arange(w)[None, None, :] % 256
    x[..., 1] = np.arange(h)[None, :, None] % 256
    x[..., 2] = np.arange(t)[:, None, None]
    return x


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 700), w=st.integers(1, 700), crop=st.integers(1, 300), n=st.integers(1, 5))
def test_crops_inside_frame_any_size(h, w, crop, n):
    if crop > min(h, w):
        with pytest.raises(CatnetError):
            T.crop_offsets(h, w, crop, n)
        return
    offsets = T.crop_offsets(h, w, crop, n)
    assert len(offsets) == n
    for y, x in offsets:
        assert 0 <= y <= h - crop and 0 <= x <= w - crop
    along = [y for y, _ in offsets] if h > w else [x for _, x in offsets]
    assert along == sorted(along)
    if n == 3:  # first crop at one end, last at the other, middle one centred
        assert along[0] == 0 and along[-1] == max(h, w) - crop
        assert abs(along[1] - (max(h, w) - crop) / 2) <= 0.5


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 90), w=st.integers(8, 90), short=st.integers(8, 40), crop=st.integers(1, 8),
       n=st.sampled_from([1, 3]))
def test_test_views_shape_and_range_for_odd_sizes(h, w, short, crop, n):
    views = T.test_views(ramp(2, h, w), SpatialConfig(short_side=short, crop=crop, num_crops=n,
                                                      train_short=(crop, crop)))
    assert views.shape == (n, 3, 2, crop, crop) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1


def test_three_crops_along_long_side_landscape_and_portrait():
    cfg = SpatialConfig(short_side=32, crop=32, num_crops=3)
    land = T.test_views(ramp(1, 32, 96), cfg)  # no resize needed: short side is already 32
    left_cols = [int(round(float(v[0, 0, 0, 0]) * 255)) for v in land]
    assert left_cols == [0, 32, 64]  # left / centre / right crops start at these columns
    port = T.test_views(ramp(1, 96, 32), cfg)
    top_rows = [int(round(float(v[1, 0, 0, 0]) * 255)) for v in port]
    assert top_rows == [0, 32, 64]
    centre = T.test_views(ramp(1, 32, 96), SpatialConfig(short_side=32, crop=32, num_crops=1))
    assert torch.equal(centre[0], land[1])


def test_resize_short_side_once_per_clip_with_antialias(monkeypatch):
    calls = []
    real = F.interpolate

    def spy(x, **kw):
        calls.append((tuple(x.shape), kw))
        return real(x, **kw)

    monkeypatch.setattr(T.F, "interpolate", spy)
    frames = np.full((5, 60, 100, 3), 77, np.uint8)
    views = T.test_views(frames, SpatialConfig(short_side=30, crop=24, num_crops=3))
    assert len(calls) == 1 and calls[0][0] == (5, 3, 60, 100)  # all T frames in one call
    assert calls[0][1]["antialias"] and calls[0][1]["size"] == (30, 50)
    torch.testing.assert_close(views, torch.full_like(views, 77 / 255))  # a flat image stays flat


def test_train_view_random_scale_crop_and_flip():
    frames = ramp(3, 40, 60)
    cfg = SpatialConfig(short_side=40, crop=24, num_crops=3, train_short=(30, 50))
    a = train_view(frames, cfg, np.random.default_rng(3))
    b = train_view(frames, cfg, np.random.default_rng(3))
    assert a.shape == (3, 3, 24, 24) and torch.equal(a, b)
    flips = set()
    for seed in range(20):
        v = train_view(frames, cfg, np.random.default_rng(seed))
        red = v[0, 0, 0]  # column ramp along the first row
        flips.add(bool(red[0] > red[-1]))  # a flipped crop has decreasing columns
        assert v.min() >= 0 and v.max() <= 1
        torch.testing.assert_close(v[2, 1], torch.full_like(v[2, 1], 1 / 255))  # frame order kept
    assert flips == {True, False}


def test_bad_configs_and_frames():
    with pytest.raises(CatnetError, match="larger than short_side"):
        SpatialConfig(short_side=100, crop=224)
    with pytest.raises(CatnetError, match="train_short"):
        SpatialConfig(train_short=(320, 256))
    with pytest.raises(CatnetError, match="larger than the train short side"):
        train_view(np.zeros((1, 20, 20, 3), np.uint8), SpatialConfig(16, 16, 1, (8, 12)))
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.float32)):
        with pytest.raises(CatnetError, match=r"uint8 \(T, H, W, 3\)"):
            T.test_views(bad, SpatialConfig(8, 4, 1, (4, 8)))
    assert SpatialConfig(train_short=[256, 300]).train_short == (256, 300)
