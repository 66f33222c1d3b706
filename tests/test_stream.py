"""Dense windows (catnet.video.stream): the index math (property tests), the rolling reader's equality with
read_frames, its bounded memory, live TCP streams (windows before the sender is done, clean end, stall
timeout, Ctrl-C), files still being written, mid-stream resolution changes and one-line errors."""

from __future__ import annotations

import _thread
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_corpus import audio_only
from test_video_decode import frame_ids, numbered

from catnet.errors import CatnetError, VideoError
from catnet.video import ClipSampling, probe, read_frames, sample_clips
from catnet.video.encode import write_video
from catnet.video.stream import (
    DenseSampling,
    dense_windows,
    hop_frames,
    iter_windows,
    resample_indices,
    resampled_length,
)
from catnet.video.transforms import resize_short

# ------------------------------------------------------------------------------------------ index math


def reference_windows(n: int, window: int, hop: int, stride: int) -> list[list[int]]:
    """The tail rule spelled out: all full windows on the hop grid, then the first partial one if it
    starts before the end and frames after the last full window are still uncovered; clamped."""
    span = (window - 1) * stride + 1
    out, covered, s = [], 0, 0
    while s < n:
        if s + span <= n:
            out.append(s)
            covered = s + span
        else:
            if covered < n:
                out.append(s)
            break
        s += hop
    return [[min(s + stride * m, n - 1) for m in range(window)] for s in out]


lengths = st.integers(1, 400)
windows = st.tuples(st.integers(1, 40), st.integers(1, 50), st.integers(1, 5))  # window, hop, stride


@settings(max_examples=400, deadline=None)
@given(n=lengths, cfg=windows)
def test_dense_windows_properties(n, cfg):
    window, hop, stride = cfg
    idx = dense_windows(n, window, hop, stride)
    span = (window - 1) * stride + 1
    assert idx.dtype == np.int64 and idx.ndim == 2 and idx.shape[1] == window and len(idx) >= 1
    assert idx.min() >= 0 and idx.max() < n  # in range
    assert (np.diff(idx, axis=1) >= 0).all() and (np.diff(idx[:, 0]) >= 0).all()  # sorted within and across
    np.testing.assert_array_equal(idx[:, 0], hop * np.arange(len(idx)))  # hop spacing
    clamped = [t for t in range(len(idx)) if idx[t, 0] + span > n]
    assert clamped in ([], [len(idx) - 1])  # at most one partial window, the last
    for t in range(len(idx)):
        if t not in clamped:  # full windows: exact stride
            np.testing.assert_array_equal(np.diff(idx[t]), stride)
    if hop <= span:  # windows overlap or touch: together they cover every frame
        assert idx[-1, 0] + span >= n and idx[-1, -1] == n - 1
    assert idx.tolist() == reference_windows(n, window, hop, stride)
    if n < span:  # shorter than one window: the one window is the K-clip sampler's short-video clip
        np.testing.assert_array_equal(idx, sample_clips(n, ClipSampling(1, window, stride)))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 500), fps_in=st.sampled_from([10.0, 23.976, 25.0, 29.97, 30.0, 50.0, 60.0]),
       fps_out=st.sampled_from([5.0, 10.0, 12.5, 15.0, 25.0, 30.0, 60.0]))
def test_resample_indices_properties(n, fps_in, fps_out):
    src = resample_indices(n, fps_in, fps_out)
    assert len(src) == resampled_length(n, fps_in, fps_out)
    assert len(src) == max(1, int(np.ceil(n * fps_out / fps_in - 1e-6)))
    assert src.min() >= 0 and src.max() <= n - 1 and (np.diff(src) >= 0).all()
    i = np.arange(len(src))
    np.testing.assert_array_equal(src, np.minimum(np.floor(i * fps_in / fps_out + 0.5), n - 1))


def test_resampling_and_seconds():
    np.testing.assert_array_equal(resample_indices(10, 30, 30), np.arange(10))  # same rate: identity
    np.testing.assert_array_equal(resample_indices(10, 30, 15), [0, 2, 4, 6, 8])  # half: every other
    np.testing.assert_array_equal(resample_indices(3, 10, 20), [0, 1, 1, 2, 2, 2])  # double: halves round up
    assert hop_frames(0.5, 30) == 15 and hop_frames(0.01, 30) == 1 and hop_frames(1 / 3, 29.97) == 10
    plan = DenseSampling(window=4, hop_seconds=0.2, fps=10).plan(50, 25.0)  # 2 s at 25 fps -> 20 frames at 10
    assert plan.fps == 10 and plan.hop == 2 and plan.positions.shape == (9, 4)
    np.testing.assert_array_equal(plan.indices[1], np.floor(np.array([2, 3, 4, 5]) * 2.5 + 0.5))
    np.testing.assert_allclose(plan.times[1], [0.2, 0.6])
    assert DenseSampling(window=8, stride=2).hop_at(25) == 15  # no hop: windows tile the video (span)
    assert DenseSampling.from_dict(DenseSampling(4, 2).to_dict()) == DenseSampling(4, 2)
    for bad in (dict(window=0), dict(hop=0), dict(hop=2, hop_seconds=1.0), dict(hop_seconds=-1.0),
                dict(fps=float("nan")), dict(stride=1.5)):
        with pytest.raises(CatnetError):
            DenseSampling(**{"window": 4, **bad})
    with pytest.raises(CatnetError):
        dense_windows(0, 4, 2)


# ---------------------------------------------------------------------------- rolling reader: files


def _resized(path, indices, short):
    frames = read_frames(path, indices)
    return frames if short is None else resize_short(torch.from_numpy(frames), short).numpy()


@pytest.fixture(scope="module")
def numbered_mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("stream") / "n.mp4", numbered(101), fps=25,
                       options={"g": "8", "crf": "12"})


@pytest.mark.parametrize("cfg", [
    dict(window=8, hop=4), dict(window=5, hop=7, stride=2), dict(window=16, hop=16),
    dict(window=200, hop=3), dict(window=6, hop=3, fps=10.0), dict(window=6, hop=3, fps=60.0),
    dict(window=4, hop_seconds=0.3), dict(window=3, hop=40, stride=3)])
def test_windows_equal_read_frames(numbered_mp4, cfg):
    info = probe(numbered_mp4)
    plan = DenseSampling(**cfg).plan(info.num_frames, info.fps)
    got = list(iter_windows(numbered_mp4, short_side=24, **cfg))
    assert len(got) == len(plan.indices)
    for t, w in enumerate(got):
        assert w.index == t and w.frames.dtype == np.uint8 and w.frames.shape[0] == cfg["window"]
        np.testing.assert_array_equal(w.frame_indices, plan.indices[t])
        np.testing.assert_array_equal(w.frames, _resized(numbered_mp4, plan.indices[t], 24))
        assert (w.start_s, w.end_s) == (plan.times[t, 0], plan.times[t, 1])  # index / fps, exactly
        assert w.partial == (t == len(got) - 1 and plan.positions[t, 0] + DenseSampling(**cfg).span
                             > plan.positions[-1, -1] + 1)
        wanted = plan.positions[t, 0] + cfg.get("stride", 1) * np.arange(cfg["window"])
        assert w.real_frames == (int((wanted <= plan.positions[-1, -1]).sum()) if w.partial else None)
    assert frame_ids(got[0].frames[:1])[0] == plan.indices[0, 0]


def test_rotation_and_no_resize(tmp_path):
    path = write_video(tmp_path / "rot.mp4", numbered(20, 32, 48), fps=25, rotation=90, options={"crf": "12"})
    got = list(iter_windows(path, 8, 6, short_side=None))
    plan = dense_windows(20, 8, 6)
    assert got[0].frames.shape == (8, 48, 32, 3)  # upright: portrait
    for w, idx in zip(got, plan, strict=True):
        np.testing.assert_array_equal(w.frames, read_frames(path, idx))


def test_resolution_change_pinned_to_first_frame(tmp_path):
    a = write_video(tmp_path / "a.ts", numbered(12, 32, 48), fps=25, options={"crf": "12"})
    b = write_video(tmp_path / "b.ts", numbered(12, 64, 96)[::-1].copy(), fps=25, options={"crf": "12"})
    joined = tmp_path / "joined.ts"  # MPEG-TS segments concatenate byte-wise, as in live streaming
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    got = list(iter_windows(joined, 4, 4, short_side=None, timestamps="index"))
    assert len(got) == 6 and {w.frames.shape for w in got} == {(4, 32, 48, 3)}
    ids = frame_ids(np.concatenate([w.frames for w in got]))
    assert ids[:12].tolist() == list(range(12)) and ids[12:].tolist() == list(range(11, -1, -1))


def test_memory_does_not_grow_with_length(tmp_path):
    rng = np.random.default_rng(0)
    peaks = {}
    for n in (500, 3000):
        video = rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)
        path = write_video(tmp_path / f"long{n}.mp4", video, fps=30, options={"preset": "ultrafast"})
        del video
        tracemalloc.start()
        count = 0
        for w in iter_windows(path, 16, 8, short_side=32):
            count += 1
            del w
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == len(dense_windows(n, 16, 8))
    # ring (16 frames) + a few windows of 16 x 32 x 42 x 3 bytes: ~100 KB either way; a decoder that kept
    # frames would hold 6x more for the longer video (3000 x 4 KB = 12 MB)
    assert peaks[3000] < 1.25 * peaks[500] + 64 * 1024, peaks
    assert peaks[3000] < 2 * 2**20, peaks


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_threads_or_descriptors_left_behind(numbered_mp4, tmp_path):
    ts = write_video(tmp_path / "n.ts", numbered(30), fps=25)
    list(iter_windows(ts, 4, 4, follow=True, timeout=0.2))  # warm up lazily opened library files
    before_fds = _open_fds()
    before = {t for t in threading.enumerate() if t.name.startswith("catnet-windows")}
    gen = iter_windows(numbered_mp4, 4, 4)
    next(gen)
    gen.close()  # what a `break` out of a for loop does
    assert len(list(iter_windows(ts, 4, 4, follow=True, timeout=0.2))) == 8  # a followed file, to its end
    with pytest.raises(VideoError):
        list(iter_windows(tmp_path / "n.ts", 4, 4, fps=10, input_fps=25, timestamps="pts", follow=True,
                          timeout=0.2, options={"no_such_option": "1"}, format="mp4"))
    time.sleep(0.1)
    assert {t for t in threading.enumerate() if t.name.startswith("catnet-windows")} == before
    assert _open_fds() == before_fds


def test_bad_sources_are_one_line_video_errors(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video\n" * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    audio = audio_only(tmp_path / "audio.m4a")
    port = _free_port()
    cases = {tmp_path / "missing.mp4": "no such file", tmp_path: "directory", tmp_path / "empty.mp4": "empty",
             tmp_path / "text.mp4": "cannot open", audio: "no video stream",
             f"tcp://127.0.0.1:{port}": "cannot open"}
    for source, reason in cases.items():
        with pytest.raises(VideoError) as e:
            next(iter(iter_windows(source, 4, 2, timeout=2)))
        assert reason in str(e.value) and "\n" not in str(e.value), (source, str(e.value))
    with pytest.raises(CatnetError):
        iter_windows(tmp_path / "text.mp4", 4, 2, timestamps="wallclock")


# ----------------------------------------------------------------------------- live and growing sources

SENDER = r'''
import sys, time
import av
import numpy as np


def numbered(n, h=32, w=48):
    video = np.zeros((n, h, w, 3), np.uint8)
    i = np.arange(n)
    video[:, :, : w // 2] = ((i % 16) * 16 + 8)[:, None, None, None]
    video[:, :, w // 2:] = ((i // 16) * 16 + 8)[:, None, None, None]
    return video


url, n, pace, stall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

deadline = time.monotonic() + 10
while True:  # the reader listens; connect as soon as it does
    try:
        out = av.open(url, "w", format="mpegts", options={"flush_packets": "1"})
        break
    except (av.FFmpegError, OSError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s = out.add_stream("libx264", rate=25)
s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
s.options = {"tune": "zerolatency", "preset": "ultrafast", "crf": "12", "g": "10"}
for i, frame in enumerate(numbered(n)):
    for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(p)
    time.sleep(pace)
print("sent", flush=True)
time.sleep(stall)  # a stalled sender: the socket stays open, nothing more arrives
for p in s.encode():
    out.mux(p)
out.close()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sender(tmp_path: Path, url: str, n: int, pace: float, stall: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    return subprocess.Popen([sys.executable, str(script), url, str(n), str(pace), str(stall)],
                            stdout=subprocess.DEVNULL)


def test_live_tcp_stream_windows_arrive_while_sending_and_end_cleanly(tmp_path):
    port = _free_port()
    n = 60
    proc = _sender(tmp_path, f"tcp://127.0.0.1:{port}", n, pace=0.04)  # 2.4 s of video in real time
    try:
        got, alive = [], []
        for w in iter_windows(f"tcp://127.0.0.1:{port}?listen=1", 8, 8, short_side=None, timeout=5):
            got.append(w)
            alive.append(proc.poll() is None)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert alive[0] and sum(alive) >= 2  # windows came while the sender was still sending
    assert [w.index for w in got] == list(range(len(dense_windows(n, 8, 8))))  # 7 full + the partial tail
    assert got[-1].partial and not any(w.partial for w in got[:-1])
    ids = frame_ids(np.concatenate([w.frames for w in got]))
    np.testing.assert_array_equal(ids, dense_windows(n, 8, 8).reshape(-1))  # every frame, in order
    starts = np.array([w.start_s for w in got])
    np.testing.assert_allclose(starts, np.arange(len(got)) * 8 / 25, atol=1e-3)  # from the stream's pts


def test_stalled_stream_times_out_with_a_clear_message(tmp_path):
    port = _free_port()
    proc = _sender(tmp_path, f"tcp://127.0.0.1:{port}", 24, pace=0.0, stall=30)
    got = []
    try:
        with pytest.raises(VideoError) as e:
            for w in iter_windows(f"tcp://127.0.0.1:{port}?listen=1", 4, 4, short_side=None, timeout=1.5):
                got.append((w, time.monotonic()))
        t_err = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    msg = str(e.value)
    assert msg == f"no frames from tcp://127.0.0.1:{port}?listen=1 for 1.5 s (stalled source)"
    assert len(got) >= 4  # what was sent before the stall came through
    assert t_err - got[-1][1] < 1.5 + 2.0  # the timeout plus slack, not the 30 s stall


def test_ctrl_c_reaches_the_caller_while_a_read_blocks(sigint_handled):
    port = _free_port()  # UDP: nobody sends, so opening blocks until its timeout (6 s)
    threading.Timer(0.5, _thread.interrupt_main).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in iter_windows(f"udp://127.0.0.1:{port}", 4, 4, timeout=6):
            pass
    assert time.monotonic() - t0 < 0.5 + JOIN_SLACK


JOIN_SLACK = 1.5  # iter_windows waits up to JOIN_SECONDS (0.5 s) for the decoding thread, then returns


GROWER = r'''
import sys, time
import av
import numpy as np


def numbered(n, h=32, w=48):
    video = np.zeros((n, h, w, 3), np.uint8)
    i = np.arange(n)
    video[:, :, : w // 2] = ((i % 16) * 16 + 8)[:, None, None, None]
    video[:, :, w // 2:] = ((i // 16) * 16 + 8)[:, None, None, None]
    return video


out = av.open(sys.argv[1], "w", format="mpegts", options={"flush_packets": "1"})
s = out.add_stream("libx264", rate=25)
s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
s.options = {"tune": "zerolatency", "preset": "ultrafast", "crf": "12"}
for frame in numbered(int(sys.argv[2])):
    for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(p)
    time.sleep(0.04)
for p in s.encode():
    out.mux(p)
out.close()
'''


def test_file_being_written_is_followed_to_its_end(tmp_path):
    path, n = tmp_path / "growing.ts", 50
    script = tmp_path / "grower.py"
    script.write_text(GROWER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)])
    try:
        deadline = time.monotonic() + 10
        while (not path.exists() or path.stat().st_size < 4096) and time.monotonic() < deadline:
            time.sleep(0.02)
        got, alive = [], []
        for w in iter_windows(path, 5, 5, short_side=None, follow=True, timeout=1.0):
            got.append(w)
            alive.append(proc.poll() is None)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert any(alive)  # windows before the writer finished
    np.testing.assert_array_equal(frame_ids(np.concatenate([w.frames for w in got])), np.arange(n))
