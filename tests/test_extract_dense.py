"""`catnet extract --dense`: one row per fixed-stride window, in the same crash-safe store.

Dense rows equal K-clip rows at the same frame positions; row counts vary per video and `catnet inspect`
shows them; the decoder streams windows in pieces (never a whole video); a video's features depend on it
and --batch only (not on its neighbours, the worker count or where a resumed run started); a kill -9 mid
dense extraction redoes at most the video in flight; misuse is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store_journal import kill_at_third_video

import catnet.features.extract as extract
from catnet.cli import main
from catnet.features import FeatureStore
from catnet.features.extract import _Batcher, _WindowStream
from catnet.features.interchange import merge_stores
from catnet.features.store import JOURNAL_SUFFIX
from catnet.video import SpatialConfig, probe
from catnet.video.stream import DenseSampling

REPO = Path(__file__).resolve().parents[1]
BASE = ["--backbone", "i3d_inception", "--no-pretrained", "--short-side", "40", "--crop-size", "32",
        "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def videos(make_video, tmp_path):
    lengths = {"jump/a": 30, "jump/b": 13, "run/c": 47}  # different lengths: different row counts
    for i, (vid, n) in enumerate(lengths.items()):
        make_video(f"videos/{vid}.mp4", frames=n, height=36, width=48, seed=i)
    return tmp_path / "videos", lengths


def _extract(src, out, *extra) -> int:
    return main(["extract", str(src), "--out", str(out), *BASE, *extra])


def _same_bits(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids and a.records() == b.records()
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read_features(i).view(np.uint16), b.read_features(i).view(np.uint16))
        np.testing.assert_array_equal(a[i].times, b[i].times)


def test_dense_rows_equal_kclip_rows_at_the_same_positions(videos, tmp_path):
    """Window t of a hop-1 dense store starts at frame t, so it holds every clip a K-clip sampler picks:
    K-clip clip k (start s_k) must equal dense row s_k, views (3 crops) and times alike."""
    src, lengths = videos
    common = ["--crops", "3", "--batch", "4", "--workers", "0"]  # 4 views a batch: windows split across
    assert _extract(src, tmp_path / "clips", "--clips", "3", "--frames", "4", "--stride", "2", *common) == 0
    assert _extract(src, tmp_path / "dense", "--dense", "--window", "4", "--hop", "1", "--stride", "2",
                    *common) == 0
    clips, dense = FeatureStore(tmp_path / "clips"), FeatureStore(tmp_path / "dense")
    assert clips.manifest["weights_id"] == dense.manifest["weights_id"]
    assert dense.manifest["sampling"] == DenseSampling(window=4, hop=1, stride=2).to_dict()
    for vid, n in lengths.items():
        k, d = clips[vid], dense[vid]
        assert d.num_clips == max(1, n - 7 + 1) and d.num_crops == 3  # span 7: every start 0 .. n - 7
        fps = probe(src / f"{vid}.mp4").fps
        starts = np.round(k.times[:, 0] * fps).astype(int)
        np.testing.assert_array_equal(d.times[starts], k.times)
        rows = (starts[:, None] * 3 + np.arange(3)[None]).reshape(-1)  # view v = window * crops + crop
        a, b = d.features[rows], k.features
        # the same views through the backbone: equal within float16 rounding (here bit for bit)
        np.testing.assert_allclose(a, b, rtol=2**-10, atol=1e-6 * np.abs(b).max())
        assert dense.records()[dense.ids.index(vid)]["fps"] == pytest.approx(fps)


def test_variable_rows_inspect_workers_and_resampling(videos, tmp_path, capsys):
    src, lengths = videos
    dense = ["--dense", "--window", "8", "--hop", "4", "--crops", "1", "--batch", "3"]
    assert _extract(src, tmp_path / "w0", *dense, "--workers", "0") == 0
    capsys.readouterr()
    assert _extract(src, tmp_path / "w2", *dense, "--workers", "2", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {vid: (n - 8) // 4 + 1 + ((n - 8) % 4 > 0) for vid, n in lengths.items()}  # + the tail window
    assert summary["extracted"] == 3 and summary["rows"] == sum(rows.values())
    w0, w2 = FeatureStore(tmp_path / "w0"), FeatureStore(tmp_path / "w2")
    assert {v: w0[v].num_clips for v in w0.ids} == rows
    _same_bits(w0, w2)  # pieces of 2 workers interleave; each video is still batched alone

    assert main(["inspect", str(tmp_path / "w2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "dense" and info["rows"] == sum(rows.values())
    counts = list(rows.values())
    assert info["rows_per_video"] == {"min": min(counts), "median": np.median(counts), "max": max(counts)}
    assert (info["dense"]["window"], info["dense"]["hop"], info["dense"]["video_fps"]) == (8, 4, [25.0])
    assert main(["inspect", str(tmp_path / "w2")]) == 0
    text = capsys.readouterr().out
    assert "windows per video" in text and f"max {max(rows.values())}" in text and "hop 4 frames" in text

    # export -> import gives the same store back, bit for bit, per-video fps included
    x, y = str(tmp_path / "x"), str(tmp_path / "y")
    assert main(["features", "export", str(tmp_path / "w2"), "--out", x, "--no-progress"]) == 0
    assert main(["features", "import", x, "--out", y, "--no-progress"]) == 0
    back = FeatureStore(tmp_path / "y")
    _same_bits(back, w2)
    assert back.manifest == w2.manifest and all(r["fps"] == 25.0 for r in back.records())

    # resampled to 10 fps, hop in seconds: rows and times counted at 10 fps
    assert _extract(src, tmp_path / "r", "--dense", "--window", "4", "--hop-seconds", "0.5", "--fps", "10",
                    "--crops", "1", "--workers", "0") == 0
    r = FeatureStore(tmp_path / "r")
    v = r["run/c"]  # 47 frames at 25 fps -> 19 at 10 fps; windows of 4 every 5 frames -> starts 0, 5, 10, 15
    np.testing.assert_allclose(v.times, [[0.0, 0.4], [0.5, 0.9], [1.0, 1.4], [1.5, 1.9]], atol=1e-6)
    assert r.records()[r.ids.index("run/c")]["fps"] == 10.0


def test_window_stream_never_holds_a_whole_video(make_video):
    """The decoder hands over pieces of about a batch of views (whole windows), never a video's worth."""
    path = make_video("long.mp4", frames=120, height=36, width=48)
    spatial = SpatialConfig(short_side=40, crop=32, num_crops=3)
    stream = _WindowStream([type("E", (), {"path": path})()], DenseSampling(window=4, hop=2), spatial, 7)
    pieces = list(stream)
    assert all(error is None for *_, error in pieces) and pieces[-1][4] and not any(p[4] for p in pieces[:-1])
    sizes = [len(p[1]) for p in pieces]
    assert sum(sizes) == 3 * 59 and max(sizes) <= 7 + 3 - 1 and all(s % 3 == 0 for s in sizes)
    assert sum(len(p[2]) for p in pieces) == 59 and pieces[-1][3] == pytest.approx(25.0)


class _Recorder(torch.nn.Module):
    """A stand-in backbone that records each batch's first-pixel tags (which video, which view)."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[tuple[int, int]]] = []

    def forward_features(self, x):
        tags = x[:, 0, 0, 0, :2].round().long().tolist()
        self.batches.append([tuple(t) for t in tags])
        return x[:, 0, 0, 0, :2].clone()


def test_batches_hold_one_video_at_fixed_positions():
    """Views of a video go through in batches of `batch` views of that video alone, at offsets 0, b, 2b, ...
    whatever came before and however the views arrived: the structure behind bit-identical resumes."""
    def views(video, first, n):
        x = torch.zeros(n, 3, 1, 1, 2)
        x[:, 0, 0, 0, 0], x[:, 0, 0, 0, 1] = video, torch.arange(first, first + n)
        return x

    model, done = _Recorder(), {}
    b = _Batcher(model, 4, torch.device("cpu"), lambda i, f: done.setdefault(i, f))
    b.push(0, views(0, 0, 6))  # K clips: a whole video at once
    b.push(1, views(1, 0, 3), final=False)  # dense: pieces, interleaved with another video's
    b.push(2, views(2, 0, 2), final=False)
    b.push(1, views(1, 3, 3), final=False)
    b.push(2, views(2, 2, 1), final=True)
    b.push(1, None, final=True)
    assert model.batches == [[(0, 0), (0, 1), (0, 2), (0, 3)], [(0, 4), (0, 5)],
                             [(1, 0), (1, 1), (1, 2), (1, 3)], [(2, 0), (2, 1), (2, 2)], [(1, 4), (1, 5)]]
    assert {i: f[:, 1].tolist() for i, f in done.items()} == {0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3, 4, 5],
                                                               2: [0, 1, 2]}
    assert not b.pending and not b.outputs


def test_features_do_not_depend_on_neighbours_and_barely_on_batch(videos, tmp_path, monkeypatch):
    """A run resumed after an interruption equals an uninterrupted one bit for bit at the same --batch (3
    views a video in batches of 2: batches that crossed videos used to start elsewhere after a resume);
    another --batch changes features only within float16 rounding (docs/feature_store.md)."""
    src, _ = videos
    k = ["--clips", "3", "--frames", "4", "--stride", "2", "--crops", "1", "--workers", "0", "--batch", "2"]
    getitem = extract._ClipDataset.__getitem__

    def interrupted(self, i):
        if i == 1:
            raise KeyboardInterrupt  # Ctrl-C while the second video decodes: the first is stored
        return getitem(self, i)

    monkeypatch.setattr(extract._ClipDataset, "__getitem__", interrupted)
    assert _extract(src, tmp_path / "resumed", *k) == 130
    assert FeatureStore(tmp_path / "resumed").ids == ["jump/a"]
    monkeypatch.undo()
    assert _extract(src, tmp_path / "resumed", *k) == 0
    assert _extract(src, tmp_path / "clean", *k) == 0
    _same_bits(FeatureStore(tmp_path / "resumed"), FeatureStore(tmp_path / "clean"))

    assert _extract(src, tmp_path / "b3", *k[:-1], "3") == 0
    a, c = FeatureStore(tmp_path / "clean"), FeatureStore(tmp_path / "b3")
    for i in range(len(a)):
        x, y = a[i].features, c[i].features
        np.testing.assert_allclose(y, x, rtol=2**-10, atol=1e-4 * np.abs(x).max())


# Logs (fsynced) each video as its windows start streaming, and dawdles per window, so the kill lands in
# the middle of a video (some of its windows through the backbone) even on a loaded machine.
CHILD = """
import os, sys, time
import catnet.features.extract as extract
log = open(sys.argv[1], "a")
video, windows = extract._WindowStream._video, extract.iter_windows
def logged(self, i):
    log.write(self.entries[i].id + "\\n"); log.flush(); os.fsync(log.fileno())
    yield from video(self, i)
def slow(*args, **kwargs):
    for w in windows(*args, **kwargs):
        time.sleep(0.05)
        yield w
extract._WindowStream._video, extract.iter_windows = logged, slow
from catnet.cli import main
raise SystemExit(main(sys.argv[2:]))
"""
KILL = ["--dense", "--window", "4", "--hop", "2", "--crops", "1", "--batch", "2", "--workers", "0",
        "--shard-size", "100", "--flush-seconds", "1000"]


def test_kill9_mid_dense_extraction_redoes_at_most_the_video_in_flight(make_video, tmp_path, capsys):
    src, n = tmp_path / "videos", 5
    for i in range(n):
        make_video(f"videos/c{i % 2}/v{i}.mp4", frames=24 + 3 * i, height=32, width=40, seed=i)
    out, log = tmp_path / "killed", tmp_path / "started.log"
    log.write_text("")
    # a few of its windows in before the kill
    started = kill_at_third_video(CHILD, log, ["extract", str(src), "--out", str(out), *BASE, *KILL], 0.3)
    assert not list((out / "shards").glob("*.safetensors")), "a shard was flushed: nothing to test"
    saved = set(FeatureStore(out).ids)  # the journal, read-only
    assert len(saved) >= 2 and saved <= set(started) and len(set(started) - saved) <= 1

    capsys.readouterr()
    assert _extract(src, out, *KILL, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovered"] == summary["already_done"] == len(saved)
    assert summary["extracted"] == n - len(saved)  # only what was not finished, the one in flight included
    assert not list((out / "shards").glob("*" + JOURNAL_SUFFIX))
    assert _extract(src, tmp_path / "clean", *KILL) == 0
    _same_bits(FeatureStore(out), FeatureStore(tmp_path / "clean"))  # bit for bit: per-video batches


@pytest.mark.slow
def test_two_rank_torchrun_dense_equals_single_process(videos, tmp_path):
    src, _ = videos
    args = ["--dense", "--window", "4", "--hop", "3", "--crops", "1", "--batch", "4", "--workers", "0",
            "--shard-size", "1"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "catnet", "extract", str(src),
           "--out", str(tmp_path / "two"), *BASE, *args, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints the all-rank totals
    assert (summary["total"], summary["extracted"], summary["failed"]) == (3, 3, 0)
    assert _extract(src, tmp_path / "one", *args) == 0
    two, one = FeatureStore(tmp_path / "two"), FeatureStore(tmp_path / "one")
    assert {p.name.split("-")[0] for p in two.shards} == {"rank000", "rank001"}
    assert summary["rows"] == sum(r["num_clips"] for r in one.records())
    _same_bits(two, one)


def test_dense_refusals_are_one_line(videos, tmp_path, capsys):
    src, _ = videos
    k = ["--clips", "2", "--frames", "4", "--stride", "2", "--crops", "1", "--workers", "0"]
    d = ["--dense", "--window", "4", "--hop", "4", "--crops", "1", "--workers", "0"]
    assert _extract(src, tmp_path / "k", *k) == 0
    assert _extract(src, tmp_path / "d", *d) == 0
    capsys.readouterr()
    shards = {p: p.read_bytes() for p in (tmp_path / "k" / "shards").iterdir()}
    cases = [
        ((tmp_path / "k", *d), "different settings (sampling: K clips (2 clips x 4 frames) != dense windows"),
        ((tmp_path / "d", *k), "(sampling: dense windows of 4 frames, hop 4 != K clips (2 clips x 4 "),
        ((tmp_path / "d", *d[:-4], "--hop", "2", *d[-4:]), "sampling.hop: 4 != 2"),
        ((tmp_path / "n", "--window", "4"), "--window sets dense windows: add --dense"),
        ((tmp_path / "n", "--dense", "--frames", "4"), "--frames sets K-clip sampling; with --dense give"),
        ((tmp_path / "n", "--dense", "--hop", "2", "--hop-seconds", "1"), "a hop in frames or in seconds"),
        ((tmp_path / "n", "--dense", "--window", "0"), "--window must be >= 1, got 0"),
        ((tmp_path / "n", "--dense", "--fps", "-5"), "--fps must be > 0"),
        ((tmp_path / "n", "--dense", "--hop-seconds", "nan"), "--hop-seconds must be a finite number"),
    ]
    for (out, *extra), message in cases:
        assert _extract(src, out, *extra) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("catnet extract: error: ") and message in err[0], err
    assert {p: p.read_bytes() for p in (tmp_path / "k" / "shards").iterdir()} == shards  # untouched
    assert not (tmp_path / "n").exists()
    with pytest.raises(Exception, match=r"different extraction settings \(sampling: K clips"):
        merge_stores([tmp_path / "k", tmp_path / "d"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cached_stage_key_tells_dense_settings_apart():
    from catnet.experiments.stages import store_key
    from catnet.features.extract import ExtractConfig
    from catnet.video.stream import DenseSampling

    clips = ExtractConfig()
    a, b = ExtractConfig(dense=DenseSampling(window=16)), ExtractConfig(dense=DenseSampling(window=8))
    assert len({store_key(clips), store_key(a), store_key(b)}) == 3
    assert store_key(ExtractConfig()) == store_key(clips)  # K-clip keys unchanged by the dense field
