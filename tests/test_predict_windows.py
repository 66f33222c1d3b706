"""`catnet predict --window/--hop` (per-window top-k, the label timeline) and `--source` (live input)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import MeanColour, shared_tiny_run, write_tiny_video
from test_stream import _free_port

from catnet.cli import main
from catnet.heads import build_head
from catnet.inference.predict import Predictor
from catnet.inference.timeline import Timeline, WindowPrediction, clips_per_window, iter_window_predictions
from catnet.video import ClipSampling, SpatialConfig

REPO = Path(__file__).resolve().parents[1]


def _window(index, start, end, label, score=0.9, labels=("a", "b")):
    probs = torch.tensor([score, 1 - score]) if label == labels[0] else torch.tensor([1 - score, score])
    return WindowPrediction(index, start, end, False, [(label, score)], [], probs)


def test_timeline_merges_equal_labels_and_tiles_the_video():
    tl = Timeline(["a", "b"])
    for w in [_window(0, 0, 2, "a"), _window(1, 1, 3, "a", 0.7), _window(2, 2, 4, "b"), _window(3, 3, 5, "b"),
              _window(4, 4, 6, "a")]:
        tl.add(w)
    segs = [(s.label, s.start, s.end, s.first, s.last) for s in tl.segments]
    # hop 1 s, windows 2 s: boundaries at the midpoints between window centres (1, 2 | 3 -> 2.5; ...)
    assert segs == [("a", 0, 2.5, 0, 1), ("b", 2.5, 4.5, 2, 3), ("a", 4.5, 6, 4, 4)]
    assert tl.segments[0].score == pytest.approx(0.8)
    assert [lab for lab, _ in tl.predictions(2)] == ["a", "b"] and tl.count == 5


def test_timeline_with_hop_equal_to_window_is_the_windows_spans():
    tl = Timeline(["a", "b"])
    for i, lab in enumerate("aab"):
        tl.add(_window(i, 2 * i, 2 * i + 2, lab))
    assert [(s.start, s.end) for s in tl.segments] == [(0, 4), (4, 6)]


def test_a_short_tail_window_keeps_the_boundary_at_its_start():
    """H = S: segments are exactly the windows' spans, the partial tail window's too (2.0-3.0, 3.0-3.16),
    although its centre is nearer to the previous window's."""
    tl = Timeline(["a", "b"])
    for w in [_window(0, 0, 1, "a"), _window(1, 1, 2, "a"), _window(2, 2, 3, "a"), _window(3, 3, 3.16, "b")]:
        tl.add(w)
    assert [(s.label, s.start, s.end) for s in tl.segments] == [("a", 0, 3), ("b", 3, 3.16)]


def _predictor(clips=3, crops=1):
    torch.manual_seed(0)
    head = build_head("local", in_dim=3, num_classes=2, num_heads=2)
    return Predictor(MeanColour(), ["dark", "bright"], ClipSampling(clips, 4, 2),
                     SpatialConfig(40, 32, crops), head=head)


def test_a_window_spanning_the_video_predicts_like_the_whole_video(tmp_path):
    """Window = the video's 24 frames, K = 24 // 7 = 3 clips: exactly `catnet predict` on the video."""
    video = write_tiny_video(tmp_path / "v.mp4", frames=24)  # 12 fps: 2 s
    predictor = _predictor(clips=3, crops=3)
    (w,) = list(iter_window_predictions(predictor, str(video), window=2.0, top_k=2))
    whole = predictor(video, top_k=2)
    assert clips_per_window(predictor, 24) == 3
    assert [lab for lab, _ in w.predictions] == [lab for lab, _ in whole.predictions]
    np.testing.assert_allclose([s for _, s in w.predictions], [s for _, s in whole.predictions], atol=1e-6)
    np.testing.assert_allclose([(c.start, c.end, c.attention) for c in w.clips],
                               [(c.start, c.end, c.attention) for c in whole.clips], atol=1e-6)
    assert (w.start, w.end, w.partial) == (0.0, 2.0, False)


def test_a_window_longer_than_the_video_classifies_its_real_frames_only(tmp_path):
    """The tail window repeats the last frame up to the window's length; clips spread over the real
    frames only, so a 5 s window on a 2 s video predicts what a 2 s window does, with real clip times."""
    video = write_tiny_video(tmp_path / "v.mp4", frames=24, bright=(0, 6))  # 12 fps: 2 s
    predictor = _predictor(clips=3)
    (exact,) = list(iter_window_predictions(predictor, str(video), window=2.0, top_k=2))
    (longer,) = list(iter_window_predictions(predictor, str(video), window=5.0, top_k=2))
    assert longer.partial and (longer.start, longer.end) == (0.0, 2.0)
    np.testing.assert_allclose([s for _, s in longer.predictions], [s for _, s in exact.predictions],
                               atol=1e-6)
    spans = [(c.start, c.end) for c in longer.clips]
    np.testing.assert_allclose(spans, [(c.start, c.end) for c in exact.clips])
    assert len(set(spans)) == 3 and all(end > start for start, end in spans)


def test_a_half_frame_window_tiles_the_video_without_gaps(tmp_path):
    """0.5 s at 25 fps is 12.5 frames: the window and its default hop round the same way."""
    video = _long_video(tmp_path / "v.mp4", 50)  # 2 s
    wins = list(iter_window_predictions(_predictor(clips=1), str(video), window=0.5, top_k=1))
    assert all(a.end == pytest.approx(b.start) for a, b in zip(wins, wins[1:], strict=False)), \
        [(w.start, w.end) for w in wins]
    assert wins[0].start == 0.0 and wins[-1].end == pytest.approx(2.0)


def test_cli_window_json_keeps_the_schema_and_adds_windows_and_timeline(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "v.mp4", frames=48, bright=(24, 36))  # 4 s, bright 2-3 s
    run = shared_tiny_run()
    capsys.readouterr()
    assert main(["predict", str(video), "--checkpoint", str(run), "--window", "1", "--hop", "0.5",
                 "--json", "--top-k", "2", "--clips", "1"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert {"video", "predictions", "clips", "windows", "timeline"} <= set(rec)
    assert sum(p["score"] for p in rec["predictions"]) == pytest.approx(1.0, abs=1e-4)
    wins = rec["windows"]
    assert len(wins) == 7 and [w["index"] for w in wins] == list(range(7))  # 12-frame windows, hop 6
    assert [w["start"] for w in wins] == pytest.approx([0.5 * i for i in range(7)], abs=1e-3)
    assert all(len(w["predictions"]) == 2 and len(w["clips"]) == 1 for w in wins)
    assert [(c["start"], c["end"]) for c in rec["clips"]] == [(w["start"], w["end"]) for w in wins]
    tl = rec["timeline"]
    assert tl[0]["start"] == 0.0 and tl[-1]["end"] == wins[-1]["end"]
    assert all(a["end"] == b["start"] for a, b in zip(tl, tl[1:], strict=False))  # tiles, no overlap
    assert all(a["label"] != b["label"] for a, b in zip(tl, tl[1:], strict=False))  # merged


def test_cli_window_human_output_shows_the_label_timeline(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "v.mp4", frames=36)
    run = shared_tiny_run()
    capsys.readouterr()
    assert main(["predict", str(video), "--checkpoint", str(run), "--window", "1", "--clips", "1",
                 "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert "label timeline (1 s windows, hop 1 s, 3 windows)" in out
    assert "v.mp4:" in err and "backbone" in err and "decode" in err  # --verbose time split


@pytest.mark.parametrize("argv,match", [(["--window", "0"], "--window"), (["--window", "nan"], "--window"),
                                        (["--hop", "1"], "--hop needs --window"),
                                        (["--window", "1", "--hop", "-2"], "--hop")])
def test_bad_window_options_are_one_line_errors(tmp_path, capsys, argv, match):
    video = write_tiny_video(tmp_path / "v.mp4")
    assert main(["predict", str(video), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def _long_video(path: Path, frames: int) -> Path:
    from catnet.video.encode import write_video

    video = np.zeros((frames, 24, 32, 3), np.uint8)
    video[:, :, :, 0] = (np.arange(frames) % 200)[:, None, None]
    return write_video(path, video, fps=25.0)


def test_memory_is_flat_in_the_videos_length(tmp_path):
    """Peak traced memory for 4x the windows stays within a small margin (the frames ring, not the video)."""
    predictor = _predictor(clips=1)
    peaks = []
    for frames in (250, 1000):
        video = _long_video(tmp_path / f"v{frames}.mp4", frames)
        tracemalloc.start()
        n = sum(1 for _ in iter_window_predictions(predictor, str(video), window=1.0, top_k=1))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == frames // 25
    assert peaks[1] < 1.5 * peaks[0] + 200_000, peaks


# ------------------------------------------------------------------------------------------ live input

SENDER = r'''
import sys, time
import av
import numpy as np

url, n, pace, stall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 60
while True:  # the reader listens once its model is loaded; connect (write the header) as soon as it does
    out = av.open(url, "w", format="mpegts", options={"flush_packets": "1"})
    s = out.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
    s.options = {"tune": "zerolatency", "preset": "ultrafast", "g": "10"}
    try:
        out.start_encoding()
        break
    except (av.FFmpegError, OSError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
for i in range(n):
    frame = np.full((32, 48, 3), 40, np.uint8)
    frame[8:20, (i * 2) % 36:(i * 2) % 36 + 12] = 230
    for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(p)
    time.sleep(pace)
print("sent", flush=True)
time.sleep(stall)  # a stalled sender: the socket stays open, nothing more arrives
for p in s.encode():
    out.mux(p)
out.close()
'''


def _sender(tmp_path: Path, port: int, n: int, pace: float, stall: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    return subprocess.Popen([sys.executable, str(script), f"tcp://127.0.0.1:{port}", str(n), str(pace),
                             str(stall)], stdout=subprocess.DEVNULL)


def _live(port: int, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "catnet", "predict", "--source", f"tcp://127.0.0.1:{port}?listen=1",
            "--checkpoint", str(shared_tiny_run()), "--json", "--window", "0.4", "--clips", "1", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_live_windows_arrive_while_the_stream_runs_and_end_cleanly(tmp_path):
    port = _free_port()
    reader = _live(port, "--fps", "25")
    sender = _sender(tmp_path, port, n=75, pace=0.04)  # 3 s of video in real time
    try:
        lines, alive = [], []
        for line in reader.stdout:
            lines.append(json.loads(line))
            alive.append(sender.poll() is None)
        assert reader.wait(30) == 0, reader.stderr.read()
        assert sender.wait(10) == 0
    finally:
        sender.kill()
        reader.kill()
    windows, summary = lines[:-1], lines[-1]
    assert alive[0], "the first window came only after the stream ended"
    assert all(w["type"] == "window" and w["predictions"] for w in windows)
    assert [w["index"] for w in windows] == list(range(len(windows)))
    assert len(windows) >= 7  # 75 frames in 10-frame windows
    assert summary["type"] == "summary" and summary["status"] == "end of stream"
    assert summary["windows"] == len(windows) and summary["timeline"][0]["start"] == 0.0


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_summary(tmp_path, sigint_handled):
    port = _free_port()
    reader = _live(port)
    # 80 s: far longer than the test even on a loaded machine, where the first window can take over
    # 16 s and a shorter stream would already have ended (status "end of stream")
    sender = _sender(tmp_path, port, n=2000, pace=0.04)
    try:
        first = json.loads(reader.stdout.readline())
        assert first["type"] == "window"
        reader.send_signal(signal.SIGINT)
        rest = [json.loads(line) for line in reader.stdout]
        code = reader.wait(15)
    finally:
        sender.kill()
        reader.kill()
    assert code == 0, reader.stderr.read()
    assert rest[-1]["type"] == "summary" and rest[-1]["status"] == "interrupted"


def test_stalled_stream_times_out_with_one_line_and_keeps_what_came(tmp_path, capsys):
    port = _free_port()
    run = shared_tiny_run()
    sender = _sender(tmp_path, port, n=30, pace=0.0, stall=30)
    capsys.readouterr()
    try:
        t0 = time.monotonic()
        code = main(["predict", "--source", f"tcp://127.0.0.1:{port}?listen=1", "--checkpoint", str(run),
                     "--json", "--window", "0.4", "--clips", "1", "--timeout", "1.5"])
        took = time.monotonic() - t0
    finally:
        sender.kill()
        sender.wait()
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and took < 25
    assert len(lines) >= 3 and lines[-1]["type"] == "summary" and lines[-1]["status"] == "error"
    assert lines[-1]["windows"] == len(lines) - 1  # every window that was ready came out
    errors = err.strip().splitlines()
    assert len(errors) == 1 and "stalled source" in errors[0] and "1.5 s" in errors[0]


@pytest.mark.parametrize("source,match", [("tcp://127.0.0.1:{port}", "cannot open"),
                                          ("{tmp}/missing.ts", "no such file")])
def test_bad_sources_are_one_line_errors(tmp_path, capsys, source, match):
    run = shared_tiny_run()
    capsys.readouterr()
    source = source.format(port=_free_port(), tmp=tmp_path)
    assert main(["predict", "--source", source, "--checkpoint", str(run), "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_source_and_videos_together_is_refused(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "v.mp4")
    assert main(["predict", str(video), "--source", "udp://127.0.0.1:9"]) == 2
    assert "not both" in capsys.readouterr().err
