"""Property tests of clip sampling (hypothesis): any video length / clip config gives valid indices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catnet.errors import CatnetError
from catnet.video import ClipSampling, clip_times, sample_clips

configs = st.builds(ClipSampling, num_clips=st.integers(1, 12), clip_len=st.integers(1, 40),
                    stride=st.integers(1, 8))
lengths = st.integers(1, 5000)


@settings(max_examples=300, deadline=None)
@given(n=lengths, cfg=configs, train=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_indices_in_range_sorted_and_shaped(n, cfg, train, seed):
    idx = sample_clips(n, cfg, train=train, rng=np.random.default_rng(seed))
    assert idx.shape == (cfg.num_clips, cfg.clip_len) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n
    assert (np.diff(idx, axis=1) >= 0).all()  # sorted within a clip
    assert (np.diff(idx[:, 0]) >= 0).all()  # clips in temporal order
    if n >= cfg.span:  # long enough: exact stride, no clamping
        assert (np.diff(idx, axis=1) == cfg.stride).all()


@settings(max_examples=200, deadline=None)
@given(n=lengths, cfg=configs)
def test_test_time_is_deterministic_and_centred(n, cfg):
    a, b = sample_clips(n, cfg), sample_clips(n, cfg, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)  # test time ignores the rng
    free = max(n - cfg.span, 0)
    if cfg.num_clips == 1:  # one clip sits in the middle of the video
        assert abs(a[0, 0] - free / 2) <= 0.5
    else:  # K clips spread over the whole video: first and last stay within one slot of the ends
        assert a[0, 0] <= (free + 1) / cfg.num_clips and free - a[-1, 0] <= (free + 1) / cfg.num_clips


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 60), cfg=configs)
def test_short_videos_clamp_to_last_frame(n, cfg):
    if n >= cfg.span:
        return
    idx = sample_clips(n, cfg)
    expected = np.minimum(np.arange(cfg.clip_len) * cfg.stride, n - 1)
    assert (idx == expected).all()  # every clip starts at 0, the last frame repeats


def test_paper_configs():
    # Kinetics: 10 clips x 32 frames at stride 4 over a 10 s, 25 fps video
    idx = sample_clips(250, ClipSampling(10, 32, 4))
    assert idx.shape == (10, 32) and idx[0, 0] == 6 and idx[-1, -1] == 243  # 6 spare frames at each end
    # UCF101/HMDB51: 32 consecutive frames
    idx = sample_clips(100, ClipSampling(10, 32, 1))
    assert (np.diff(idx, axis=1) == 1).all() and len(np.unique(idx[:, 0])) == 10


def test_train_offsets_are_random_but_reproducible():
    cfg = ClipSampling(4, 8, 2)
    a = sample_clips(500, cfg, train=True, rng=np.random.default_rng(0))
    b = sample_clips(500, cfg, train=True, rng=np.random.default_rng(0))
    c = sample_clips(500, cfg, train=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_clip_times_and_bad_configs():
    idx = np.array([[0, 2, 4], [10, 12, 14]])
    np.testing.assert_allclose(clip_times(idx, 10.0), [[0.0, 0.5], [1.0, 1.5]])
    with pytest.raises(CatnetError, match="num_clips"):
        ClipSampling(num_clips=0)
    with pytest.raises(CatnetError, match="at least one frame"):
        sample_clips(0, ClipSampling())
