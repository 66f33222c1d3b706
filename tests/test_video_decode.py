"""Decoding real (tiny) videos: containers, exact frame indices with and without seeking, VFR, rotation,
broken files, and load_clips end to end."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from reliability_corpus import audio_only

import catnet.video.decode as decode
from catnet.errors import CatnetError, VideoError
from catnet.video import ClipSampling, SpatialConfig, load_clips, probe, read_frames, sample_clips
from catnet.video import transforms as T
from catnet.video.encode import write_video


def numbered(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame i shows i as flat grey levels, left half i % 16, right half i // 16 (steps of 16 survive
    lossy codecs)."""
    video = np.zeros((n, h, w, 3), np.uint8)
    i = np.arange(n)
    video[:, :, : w // 2] = ((i % 16) * 16 + 8)[:, None, None, None]
    video[:, :, w // 2:] = ((i // 16) * 16 + 8)[:, None, None, None]
    return video


def frame_ids(frames: np.ndarray) -> np.ndarray:
    w = frames.shape[2]
    level = lambda part: np.round((part.astype(float).mean(axis=(1, 2, 3)) - 8) / 16).astype(int)  # noqa: E731
    # ignore a margin: chroma subsampling blurs the boundary between the two halves
    return level(frames[:, 2:-2, 2: w // 2 - 4]) + 16 * level(frames[:, 2:-2, w // 2 + 4: -2])


FORMATS = {  # name: (codec, pix_fmt, options); every one with keyframes every 8 frames where it has GOPs
    "h264.mp4": ("libx264", "yuv420p", {"g": "8", "crf": "12"}),
    "mpeg4.avi": ("mpeg4", "yuv420p", {"g": "8", "qmax": "3"}),
    "ffv1.mkv": ("ffv1", "yuv444p", {"g": "8"}),
    "vp9.webm": ("libvpx-vp9", "yuv420p", {"g": "8", "crf": "20", "b": "0", "deadline": "realtime"}),
    "anim.gif": ("gif", "rgb8", None),
    # MPEG-PS with B-frames: its timestamps after a seek are a few frames off, so it is never seeked
    "mpeg1.mpg": ("mpeg1video", "yuv420p", {"g": "8", "bf": "2", "qmax": "3"}),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_containers_exact_indices_seek_equals_sequential(tmp_path, name):
    codec, pix, opts = FORMATS[name]
    n = 40
    path = write_video(tmp_path / name, numbered(n), fps=25, codec=codec, pix_fmt=pix, options=opts)
    info = probe(path)
    assert (info.num_frames, info.width, info.height, info.rotation) == (n, 48, 32, 0)
    assert info.fps == pytest.approx(25, rel=0.02) and info.duration == pytest.approx(n / 25, rel=0.1)
    want = [33, 0, 7, 8, 20, 39, 20]  # unsorted, repeated, across keyframes
    sequential = read_frames(path, np.arange(n), seek_gap=10**9)
    assert frame_ids(sequential).tolist() == list(range(n))
    seeking = read_frames(path, want, seek_gap=2)
    assert frame_ids(seeking).tolist() == want
    np.testing.assert_array_equal(seeking, sequential[want])


def test_a_longer_audio_track_does_not_change_the_video_rate(tmp_path):
    """mkv/webm record no per-stream duration; the container's is the longest stream's (3 s of audio
    here), which would put every clip time 1.5x too late: the rate comes from the video's packets."""
    from fractions import Fraction

    path = tmp_path / "av.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 48, 32, "yuv420p"
        a = c.add_stream("aac", rate=48000)
        for frame in numbered(50):  # 2 s of video
            c.mux(v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(v.encode())
        for n in range(0, 3 * 48000, 1024):  # 3 s of audio
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
            af.sample_rate, af.pts, af.time_base = 48000, n, Fraction(1, 48000)
            c.mux(a.encode(af))
        c.mux(a.encode())
    info = probe(path)
    assert (info.num_frames, info.fps) == (50, pytest.approx(25.0)) and info.duration == pytest.approx(2.0)


class SeekSpy:
    """Wraps av.open's containers to count seeks and decoded frames."""

    def __init__(self):
        self.seeks = self.decoded = 0
        self.real_open = av.open

    def open(self, *args, **kwargs):
        spy, container = self, self.real_open(*args, **kwargs)

        class Proxy:
            def __getattr__(self, name):
                return getattr(container, name)

            def seek(self, *a, **k):
                spy.seeks += 1
                return container.seek(*a, **k)

            def decode(self, *a, **k):
                for frame in container.decode(*a, **k):
                    spy.decoded += 1
                    yield frame

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                container.close()

        return Proxy()


def test_long_gaps_are_seeked_and_frames_match_full_decode(tmp_path, monkeypatch):
    n = 240
    path = write_video(tmp_path / "long.mp4", numbered(n), codec="libx264", options={"g": "8", "crf": "12"})
    full = read_frames(path, np.arange(n), seek_gap=10**9)
    spy = SeekSpy()
    monkeypatch.setattr(decode.av, "open", spy.open)
    want = [3, 100, 101, 180, 239]
    got = read_frames(path, want, seek_gap=8)
    assert spy.seeks >= 2  # 100 and 180 are reached by seeking, not by decoding everything before them
    assert spy.decoded < n // 4  # each run only decodes from the keyframe before it
    np.testing.assert_array_equal(got, full[want])
    assert frame_ids(got).tolist() == want


@pytest.mark.parametrize("name,codec,pix", [("vfr.mkv", "ffv1", "yuv444p"),
                                            ("vfr.mp4", "libx264", "yuv420p")])
def test_variable_frame_rate_indexed_by_decode_order(tmp_path, name, codec, pix):
    n = 40
    pts = np.cumsum([0] + [1 if i % 3 else 4 for i in range(n - 1)])  # irregular gaps of 1 and 4 ticks
    path = write_video(tmp_path / name, numbered(n), codec=codec, pix_fmt=pix, options={"g": "4"},
                       pts=pts.tolist())
    info = probe(path)
    assert info.num_frames == n and info.duration == pytest.approx(pts[-1] / 25, abs=0.1)
    assert info.fps == pytest.approx(n / info.duration, rel=0.1)  # the average rate, for clip times
    want = [2, 17, 30, 39]
    got = read_frames(path, want, seek_gap=2)  # pts -> index by fps would be wrong here: must fall back
    assert frame_ids(got).tolist() == want
    np.testing.assert_array_equal(got, read_frames(path, np.arange(n), seek_gap=10**9)[want])


def test_odd_size_is_lossless_in_ffv1(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 61, 97, 3), dtype=np.uint8)
    path = write_video(tmp_path / "odd.mkv", frames, codec="ffv1", pix_fmt="bgr0")
    info = probe(path)
    assert (info.width, info.height, info.num_frames) == (97, 61, 3)
    np.testing.assert_array_equal(read_frames(path, [2, 0]), frames[[2, 0]])


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, degrees):
    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[:, :, :12] = 250  # a bright band on the left of the stored frame
    frames[:, :8, :, 1] = 120  # and a green one along the top
    path = write_video(tmp_path / "rot.mp4", frames, codec="libx264", pix_fmt="yuv444p",
                       options={"crf": "0"}, rotation=degrees)
    info = probe(path)
    assert info.rotation == degrees
    upright = np.rot90(frames[0], degrees // 90)  # display = stored frame turned counter-clockwise
    assert (info.height, info.width) == upright.shape[:2]
    got = read_frames(path, [1])[0]
    assert got.shape == upright.shape
    assert np.abs(got.astype(int) - upright.astype(int)).max() <= 4


def test_one_frame_video_loads_as_repeated_frame(tmp_path):
    path = write_video(tmp_path / "one.mkv", numbered(1), codec="ffv1", pix_fmt="yuv444p")
    assert probe(path).num_frames == 1
    clips = load_clips(path, ClipSampling(2, 3, 2), SpatialConfig(short_side=32, crop=24, num_crops=1))
    assert clips.indices.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert clips.views.shape == (2, 3, 3, 24, 24)
    assert torch.equal(clips.views[0, :, 0], clips.views[1, :, 2])


def test_broken_inputs_raise_video_error(tmp_path, make_video):
    good = make_video("good.mp4", frames=10)
    cases = {
        "empty": (tmp_path / "empty.mp4", "0 bytes"),
        "text": (tmp_path / "notes.mp4", "cannot open"),
        "truncated": (tmp_path / "truncated.mp4", "cannot open"),
        "audio": (audio_only(tmp_path / "audio.m4a"), "no video stream"),
        "directory": (tmp_path / "folder.mp4", "directory"),
        "missing": (tmp_path / "nothere.mp4", "no such file"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["text"][0].write_text("not a video\n")
    cases["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["directory"][0].mkdir()
    for name, (path, reason) in cases.items():
        for fn in (probe, lambda p: read_frames(p, [0])):
            with pytest.raises(VideoError, match=reason):
                fn(path)
        with pytest.raises(VideoError):
            load_clips(path, ClipSampling(1, 2, 1), SpatialConfig(32, 24, 1))
        assert name  # every case raised
    with pytest.raises(VideoError, match="truncated or shorter"):
        read_frames(good, [9 + decode.END_SLACK + 1])
    with pytest.raises(CatnetError, match=">= 0"):
        read_frames(good, [-1])
    assert read_frames(good, []).shape == (0, 64, 96, 3)


def test_tail_truncated_mkv_loads_the_frames_it_has(tmp_path):
    whole = write_video(tmp_path / "v.mkv", numbered(40), codec="ffv1", pix_fmt="yuv444p").read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole[: len(whole) // 2])
    n = probe(cut).num_frames  # counted from the packets that are still there
    assert 5 < n < 40
    assert frame_ids(read_frames(cut, [0, n - 1])).tolist() == [0, n - 1]


def test_permission_denied(make_video, monkeypatch):
    path = make_video("secret.mp4", frames=4)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: pretend it cannot
        monkeypatch.setattr(decode.os, "access", lambda p, mode: False)
    try:
        with pytest.raises(VideoError, match="permission denied"):
            probe(path)
    finally:
        path.chmod(0o644)


def test_load_clips_views_are_clip_major_and_times_match(tmp_path):
    n, fps = 50, 10.0
    path = write_video(tmp_path / "v.mkv", numbered(n, 40, 56), fps=fps, codec="ffv1", pix_fmt="yuv444p")
    sampling, spatial = ClipSampling(3, 4, 2), SpatialConfig(short_side=32, crop=24, num_crops=3)
    clips = load_clips(path, sampling, spatial)
    assert clips.views.shape == (9, 3, 4, 24, 24) and clips.views.dtype == torch.float32
    assert clips.views.min() >= 0 and clips.views.max() <= 1
    np.testing.assert_array_equal(clips.indices, sample_clips(n, sampling))
    np.testing.assert_allclose(clips.clip_times[:, 0], clips.indices[:, 0] / fps)
    np.testing.assert_allclose(clips.clip_times[:, 1], (clips.indices[:, -1] + 1) / fps)
    frames = read_frames(path, np.arange(n))
    for k in range(3):
        expect = T.test_views(frames[clips.indices[k]], spatial)
        torch.testing.assert_close(clips.views[k * 3:(k + 1) * 3], expect)

    rng = lambda: np.random.default_rng(7)  # noqa: E731
    a = load_clips(path, sampling, spatial, train=True, rng=rng())
    b = load_clips(path, sampling, spatial, train=True, rng=rng())
    assert a.views.shape == (3, 3, 4, 24, 24)
    assert torch.equal(a.views, b.views) and np.array_equal(a.indices, b.indices)


def test_no_file_handles_leak(tmp_path, make_video):
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc to count open files")
    good, bad = make_video("good.mp4", frames=6), tmp_path / "bad.mp4"
    bad.write_text("not a video")
    probe(good)  # the first call may open files that stay open (shared libraries, caches)
    before = len(list(fds.iterdir()))
    for _ in range(10):
        probe(good)
        read_frames(good, [0, 5])
        with pytest.raises(VideoError):
            read_frames(bad, [0])
    assert len(list(fds.iterdir())) <= before


def test_real_shared_clips(shared_dir):
    for name in ("arm_wrestling_demo.mp4", "v_CricketShot_g04_c01_rgb.gif"):
        path = shared_dir / "data" / "clips" / name
        info = probe(path)
        assert info.num_frames > 10 and info.width > 0 and info.fps > 0
        want = [info.num_frames - 1, 0, info.num_frames // 2]
        got = read_frames(path, want, seek_gap=4)
        assert got.shape == (3, info.height, info.width, 3)
        full = read_frames(path, np.arange(info.num_frames), seek_gap=10**9)
        np.testing.assert_array_equal(got, full[want])
