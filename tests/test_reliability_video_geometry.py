"""Issue #18, video layer: memory bounded by the decode budget whatever the frame size, absurd geometry
refused, mid-stream resolution changes, the full display matrix (rotation + mirror), and file names quoted
in errors so that every reason stays on one line."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from reliability_corpus import encode

import catnet.video.decode as decode
from catnet.errors import VideoError, quoted
from catnet.video import ClipSampling, SpatialConfig, load_clips, probe, read_frames, sample_clips
from catnet.video import clips as clips_mod
from catnet.video.encode import write_video
from catnet.video.transforms import train_view

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

# ------------------------------------------------------------------------------------------ memory

# Peak RSS of the child itself. VmHWM is this process's own high-water mark: ru_maxrss (getrusage, wait4)
# would also count the parent's resident memory at exec (Linux keeps the old mm's high-water mark), so a
# large pytest process would hide the child's real peak.
CHILD = """
import sys
import numpy as np
from catnet.video import ClipSampling, SpatialConfig, load_clips
clips = load_clips(sys.argv[1], ClipSampling(num_clips=10, clip_len=64, stride=1), SpatialConfig(),
                   train=sys.argv[2] == "train", rng=np.random.default_rng(0))
assert clips.views.shape == ((10 if sys.argv[2] == "train" else 30), 3, 64, 224, 224), clips.views.shape
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
"""


def _peak_rss(path: Path, mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc/self/status (Linux)")
@pytest.mark.parametrize("mode", ["test", "train"])
def test_peak_rss_of_a_2_frame_4000x4000_video_stays_within_the_budget(tmp_path, mode):
    """10 clips x 64 frames of a 2-frame video: each clip repeats the frames 32 times. Before, clips were
    expanded from full-size frames (48 MB each): peak 7.3 GB at test time, 6.7 GB at train time."""
    big = encode(tmp_path / "big.mp4", np.full((2, 4000, 4000, 3), 90, np.uint8))
    tiny = encode(tmp_path / "tiny.mp4", np.full((2, 32, 32, 3), 90, np.uint8))
    baseline = _peak_rss(tiny, mode)  # interpreter + torch + the output views (1.2 GB of float at test time)
    peak = _peak_rss(big, mode)
    bound = baseline + clips_mod.DECODE_BUDGET + decode.DECODER_FRAMES_BUDGET + 64 * MB
    print(f"{mode}: peak {peak / MB:.0f} MB, baseline {baseline / MB:.0f} MB, bound {bound / MB:.0f} MB")
    assert peak < bound, f"peak {peak / MB:.0f} MB > bound {bound / MB:.0f} MB (baseline {baseline / MB:.0f})"


def test_chunks_never_hold_more_than_the_budget_and_views_are_identical(tmp_path, monkeypatch):
    """A lowered budget: every read_frames call stays within it (full + resized frames), at test and at
    train time, and the views equal those of a full-size decode with the per-clip transforms."""
    n = 30
    frames = np.random.default_rng(0).integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)
    path = write_video(tmp_path / "v.mkv", frames, codec="ffv1", pix_fmt="bgr0")
    sampling = ClipSampling(3, 8, 2)
    spatial = SpatialConfig(short_side=40, crop=32, num_crops=3, train_short=(40, 56))
    whole_test = load_clips(path, sampling, spatial)
    whole_train = load_clips(path, sampling, spatial, train=True, rng=np.random.default_rng(5))

    calls = []
    real = clips_mod.read_frames

    def spy(p, idx, **kw):
        calls.append(len(idx))
        return real(p, idx, **kw)

    monkeypatch.setattr(clips_mod, "read_frames", spy)
    budget = 5 * 48 * 64 * 3
    monkeypatch.setattr(clips_mod, "DECODE_BUDGET", budget)
    chunked = load_clips(path, sampling, spatial)
    assert len(calls) > 1 and max(calls) * (48 * 64 + 40 * 53) * 3 <= budget
    assert torch.equal(chunked.views, whole_test.views)
    calls.clear()
    chunked = load_clips(path, sampling, spatial, train=True, rng=np.random.default_rng(5))
    assert len(calls) > 1 and max(calls) * (48 * 64 + 56 * 75) * 3 <= budget
    assert torch.equal(chunked.views, whole_train.views)

    # the reference: train_view on each full-size clip, with the same random draws in the same order
    rng = np.random.default_rng(5)
    idx = sample_clips(n, sampling, train=True, rng=rng)
    full = read_frames(path, np.arange(n))
    expect = torch.stack([train_view(full[row], spatial, rng) for row in idx])
    assert np.array_equal(idx, whole_train.indices) and torch.equal(whole_train.views, expect)


# ---------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("h,w", [(2, 512), (512, 2), (2, 16384), (16384, 2)])
def test_extreme_aspect_ratios_are_refused_in_one_line(tmp_path, h, w):
    path = encode(tmp_path / f"thin_{h}x{w}.mp4", np.full((2, h, w, 3), 90, np.uint8))
    for fn in (probe, lambda p: read_frames(p, [0]),
               lambda p: load_clips(p, ClipSampling(10, 64, 1), SpatialConfig())):
        with pytest.raises(VideoError, match="aspect ratio beyond catnet's limit of 16:1") as e:
            fn(path)
        assert "\n" not in str(e.value) and f"{w}x{h} frames" in str(e.value)


def test_frames_beyond_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = encode(tmp_path / "big.mp4", np.full((1, 64, 96, 3), 90, np.uint8))
    monkeypatch.setattr(decode, "MAX_PIXELS", 64 * 96 - 1)
    with pytest.raises(VideoError, match=r"96x64 frames, more than catnet's limit of 0 megapixels"):
        load_clips(path, ClipSampling(1, 2, 1), SpatialConfig(32, 32, 1))
    with pytest.raises(VideoError, match="megapixels"):
        decode._open(path)  # from the container's frame size, before the decoder allocates a frame


@pytest.mark.parametrize("h,w,rotation", [
    (4320, 7680, 0),  # 8K UHD
    (72, 256, 0),  # 32:9 panorama
    (90, 160, 90),  # a phone's vertical 9:16 video: stored landscape, displayed portrait
    (34, 544, 0),  # exactly 16:1, the limit
])
def test_real_world_geometry_loads(tmp_path, h, w, rotation):
    path = write_video(tmp_path / "v.mp4", np.full((1, h, w, 3), 90, np.uint8), rotation=rotation,
                       options={"preset": "ultrafast"})
    info = probe(path)
    assert (info.height, info.width) == ((w, h) if rotation == 90 else (h, w))
    clips = load_clips(path, ClipSampling(2, 4, 1), SpatialConfig())
    assert clips.views.shape == (6, 3, 4, 224, 224)


# --------------------------------------------------------------------------- mid-stream resolution


def two_sizes(path: Path, parts: list[np.ndarray], fps: int = 25) -> Path:
    """One H.264 stream in MPEG-TS whose resolution changes between `parts` (each part its own encoder;
    MPEG-TS carries the new parameter sets in-band, as broadcast streams do)."""
    rate = Fraction(fps)
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=rate)
        stream.height, stream.width = parts[0].shape[1:3]
        stream.pix_fmt = "yuv420p"
        n = 0
        for i, frames in enumerate(parts):
            if i == 0:
                enc = stream.codec_context
            else:
                enc = av.CodecContext.create("libx264", "w")
                enc.height, enc.width = frames.shape[1:3]
                enc.pix_fmt, enc.time_base, enc.framerate = "yuv420p", stream.codec_context.time_base, rate
            enc.options = {"g": "4", "crf": "10"}
            for f in frames:
                vf = av.VideoFrame.from_ndarray(f, format="rgb24")
                vf.pts, vf.time_base, n = n, 1 / rate, n + 1
                for p in enc.encode(vf):
                    p.stream = stream
                    c.mux(p)
            for p in enc.encode(None):
                p.stream = stream
                c.mux(p)
    return path


def test_resolution_change_mid_stream_across_chunks(tmp_path, monkeypatch):
    a = np.full((12, 48, 64, 3), 200, np.uint8)
    b = np.full((12, 96, 80, 3), 40, np.uint8)
    path = two_sizes(tmp_path / "change.ts", [a, b])
    with av.open(str(path)) as c:  # the file really changes size
        sizes = {(f.width, f.height) for f in c.decode(video=0)}
    assert sizes == {(64, 48), (80, 96)}
    info = probe(path)
    assert (info.num_frames, info.width, info.height) == (24, 64, 48)
    # any subset of frames, alone or together, comes out at frame 0's size
    for want in ([20, 23], [0, 15], list(range(24))):
        got = read_frames(path, want)
        assert got.shape == (len(want), 48, 64, 3)
        level = got.reshape(len(want), -1).mean(axis=1)
        np.testing.assert_allclose(level, [200 if i < 12 else 40 for i in want], atol=4)

    sampling, spatial = ClipSampling(4, 6, 1), SpatialConfig(short_side=40, crop=32, num_crops=3)
    whole = load_clips(path, sampling, spatial)
    monkeypatch.setattr(clips_mod, "DECODE_BUDGET", 3 * 48 * 64 * 3)  # a chunk of two frames
    chunked = load_clips(path, sampling, spatial)  # used to fail: "all the input array dimensions ..."
    assert torch.equal(chunked.views, whole.views)
    train = load_clips(path, sampling, spatial, train=True, rng=np.random.default_rng(1))
    assert train.views.shape == (4, 3, 6, 32, 32)


# ---------------------------------------------------------------------------------- display matrix


def quadrants(h: int = 32, w: int = 48) -> np.ndarray:
    """A frame that shows every flip and turn: four flat quadrants of different colours."""
    f = np.zeros((h, w, 3), np.uint8)
    f[: h // 2, : w // 2] = (250, 20, 20)
    f[: h // 2, w // 2:] = (20, 250, 20)
    f[h // 2:, : w // 2] = (20, 20, 250)
    f[h // 2:, w // 2:] = (250, 250, 20)
    return f


def as_displayed(stored: np.ndarray, matrix) -> np.ndarray:
    """What a player shows, from the matrix itself (QuickTime / FFmpeg semantics): the stored pixel at
    column x, row y (y pointing down) lands at (a x + c y, b x + d y), then the result is moved to the
    origin. Independent of catnet's table of orientations."""
    a, b, _, c, d = (np.sign(v) for v in list(matrix)[:5])
    h, w = stored.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    dx, dy = a * x + c * y, b * x + d * y
    dx, dy = dx - dx.min(), dy - dy.min()
    out = np.zeros((dy.max() + 1, dx.max() + 1, 3), np.uint8)
    out[dy, dx] = stored[y, x]
    return out


def _write_with_matrix(path: Path, frame: np.ndarray, matrix=None, degrees=0, hflip=False, vflip=False):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.height, s.width = frame.shape[:2]
        s.pix_fmt, s.options = "yuv444p", {"crf": "0"}
        if matrix is not None:
            s.set_display_matrix(matrix)
        else:
            s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(2):
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:  # what the file really says
        f = next(c.decode(video=0))
        return np.frombuffer(bytes(f.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)), "<i4")


ONE = 1 << 16


@pytest.mark.parametrize("degrees,hflip,vflip", [(d, h, v) for d in (0, 90, 180, 270)
                                                  for h, v in ((False, False), (True, False), (False, True))
                                                  if (d, h, v) != (0, False, False)])
def test_display_matrix_rotation_and_mirror_land_pixels_where_a_player_shows_them(tmp_path, degrees,
                                                                                  hflip, vflip):
    stored = quadrants()
    matrix = _write_with_matrix(tmp_path / "m.mp4", stored, degrees=degrees, hflip=hflip, vflip=vflip)
    expect = as_displayed(stored, matrix)
    info = probe(tmp_path / "m.mp4")
    assert (info.height, info.width) == expect.shape[:2]
    got = read_frames(tmp_path / "m.mp4", [1])[0]
    assert got.shape == expect.shape and np.abs(got.astype(int) - expect.astype(int)).max() <= 4


def test_a_mirror_matrix_is_a_mirror_not_a_half_turn(tmp_path):
    """The issue's case: the matrix [-1 0 0; 0 1 0; 0 0 1] (selfie video) used to come out turned 180
    degrees (VideoFrame.rotation says -180 for it)."""
    stored = quadrants()
    mirror = [-ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30]
    matrix = _write_with_matrix(tmp_path / "mirror.mp4", stored, matrix=mirror)
    assert matrix[:5].tolist() == [-ONE, 0, 0, 0, ONE]
    info = probe(tmp_path / "mirror.mp4")
    assert (info.rotation, info.hflip, info.width, info.height) == (0, True, 48, 32)
    got = read_frames(tmp_path / "mirror.mp4", [0, 1])
    assert np.abs(got[0].astype(int) - stored[:, ::-1].astype(int)).max() <= 4
    assert np.abs(got[0].astype(int) - stored[::-1, ::-1].astype(int)).max() > 100  # not a half turn
    # and write_video's hflip writes the same
    path = write_video(tmp_path / "w.mp4", np.stack([stored] * 2), pix_fmt="yuv444p", options={"crf": "0"},
                       hflip=True)
    assert np.abs(read_frames(path, [0])[0].astype(int) - stored[:, ::-1].astype(int)).max() <= 4


# ---------------------------------------------------------------------------------- names in errors

NEWLINE = "bad\nname.mp4"
NON_UTF8 = os.fsdecode(b"bad\xffname.mp4")  # a surrogate-escaped byte, as os.listdir returns it
TINY_EXTRACT = ["--backbone", "i3d_r50", "--no-pretrained", "--clips", "2", "--frames", "4", "--crops", "1",
                "--short-side", "40", "--crop-size", "32", "--batch", "4", "--no-progress", "--workers", "0"]


def test_quoted_leaves_plain_names_alone_and_escapes_the_rest():
    assert quoted("v_CricketShot g04 é.mp4") == "v_CricketShot g04 é.mp4"
    assert quoted(Path("a/b.mp4")) == "a/b.mp4"
    assert quoted(NEWLINE) == "'bad\\nname.mp4'"
    assert quoted(NON_UTF8) == "'bad\\udcffname.mp4'" == quoted(b"bad\xffname.mp4")
    assert quoted("tab\there") == "'tab\\there'"


@pytest.mark.parametrize("name", [NEWLINE, NON_UTF8])
def test_odd_names_give_one_line_errors_and_good_files_still_load(tmp_path, make_video, name):
    bad = tmp_path / name
    bad.write_bytes(b"not a video at all\n" * 10)
    with pytest.raises(VideoError) as e:
        load_clips(bad, ClipSampling(1, 2, 1), SpatialConfig(32, 32, 1))
    msg = str(e.value)
    assert msg == f"cannot open {quoted(name)}: Invalid data found when processing input"
    assert msg.isprintable()
    cases = [(lambda p: p.write_bytes(b""), "is empty"), (lambda p: p.mkdir(), "directory"),
             (lambda p: None, "no such file")]
    for make, expect in cases:
        odd = tmp_path / "sub" / name
        odd.parent.mkdir(exist_ok=True)
        make(odd)
        with pytest.raises(VideoError, match=expect) as e:
            probe(odd)
        assert str(e.value).isprintable() and quoted(odd) in str(e.value)
        if odd.is_dir():
            odd.rmdir()
        elif odd.exists():
            odd.unlink()
    good = make_video("good.mp4", frames=6)
    os.rename(good, tmp_path / ("ok" + name))
    clips = load_clips(tmp_path / ("ok" + name), ClipSampling(1, 2, 1), SpatialConfig(32, 32, 1))
    assert clips.views.shape == (1, 3, 2, 32, 32)


@pytest.mark.usefixtures("one_thread")
def test_extract_records_one_line_reasons_for_odd_names(tmp_path, make_video, capfd):
    import json

    from catnet.cli import main

    src = tmp_path / "videos" / "cls"
    src.mkdir(parents=True)
    os.rename(make_video("good.mp4", frames=8), src / "good.mp4")
    os.rename(make_video("good2.mp4", frames=8, seed=1), src / ("ok" + NON_UTF8))  # a good video, odd name
    for name in (NEWLINE, NON_UTF8):
        (src / name).write_bytes(b"not a video at all\n" * 10)
    store = tmp_path / "store"
    code = main(["extract", str(tmp_path / "videos"), "--out", str(store), *TINY_EXTRACT])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    records = [json.loads(line) for f in sorted((store / "failures").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        name = os.path.basename(rec["path"])
        assert name in (NEWLINE, NON_UTF8)
        assert rec["reason"] == f"cannot open {quoted(name)}: Invalid data found when processing input"
    # every stderr line that carries a reason carries it whole
    for name in (NEWLINE, NON_UTF8):
        reason = f"cannot open {quoted(name)}: Invalid data found"
        assert sum(reason in line for line in err.splitlines()) == 1


@pytest.mark.usefixtures("one_thread")
def test_extract_stderr_has_one_line_per_failure(tmp_path, capfd):
    from catnet.cli import main

    src = tmp_path / "videos" / "cls"
    src.mkdir(parents=True)
    (src / NEWLINE).write_bytes(b"not a video at all\n" * 10)
    code = main(["extract", str(tmp_path / "videos"), "--out", str(tmp_path / "store"), *TINY_EXTRACT])
    lines = capfd.readouterr().err.splitlines()
    assert code == 1
    failed = [line for line in lines if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].endswith(": Invalid data found when processing input")
