"""The synthetic dataset: deterministic, real videos, classes decided by motion rather than appearance."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import av
import numpy as np
import pytest

from catnet.cli import main
from catnet.data.synth import CLASSES, SynthConfig, generate, plan, render
from catnet.errors import CatnetError

TINY = SynthConfig(num_classes=3, videos_per_class=3, height=48, width=48, min_frames=16, max_frames=24)


def test_generate_layout_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ann = generate(a, TINY, progress=False)
    generate(b, TINY, progress=False)
    rows = list(csv.DictReader(ann.open()))
    assert len(rows) == 9 and {r["label"] for r in rows} == set(CLASSES[:3])
    assert {r["split"] for r in rows} == {"train", "test"}
    for r in rows:  # folder per class, real H.264 files
        assert r["path"].split("/")[0] == r["label"]
        with av.open(str(a / r["path"])) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        with av.open(str(b / r["path"])) as c:
            frames_b = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        # rendering is exact; H.264 encoding is not bit-exact run to run, so compare decoded pixels
        assert len(frames) == len(frames_b)
        diff = np.abs(np.stack(frames).astype(int) - np.stack(frames_b))
        assert diff.mean() < 3.0  # of 255; x264 at crf 18 on noisy 48x48 frames
    seg_a, seg_b = json.loads((a / "segments.json").read_text()), (b / "segments.json").read_text()
    assert seg_a == json.loads(seg_b)
    for s in seg_a.values():
        assert 0 <= s["action_start"] < s["action_end"] <= s["num_frames"]
        assert s["action_end_s"] == pytest.approx(s["action_end"] / s["fps"])
    # a rerun with the same config reuses the files
    mtime = (a / rows[0]["path"]).stat().st_mtime_ns
    generate(a, TINY, progress=False)
    assert (a / rows[0]["path"]).stat().st_mtime_ns == mtime


def test_another_config_regenerates_the_videos_not_only_the_lists(tmp_path):
    """A video already there is reused as complete, so a changed config must not leave the old ones
    (the lists and segments would describe videos that are not there); so must an interrupted run."""
    from catnet.video import probe

    def lengths_match(root):
        segments = json.loads((root / "segments.json").read_text())
        return all(probe(root / s["path"]).num_frames == s["num_frames"] for s in segments.values())

    generate(tmp_path, TINY, progress=False)
    other = replace(TINY, seed=1)
    generate(tmp_path, other, progress=False)
    assert lengths_match(tmp_path)
    # interrupted: a pending marker of another config, no complete one
    (tmp_path / "synth.json").unlink()
    (tmp_path / "synth.pending.json").write_text(json.dumps({"config": {"seed": 99}}))
    generate(tmp_path, TINY, progress=False)
    assert lengths_match(tmp_path) and not (tmp_path / "synth.pending.json").exists()


def test_plan_varies_length_segment_and_seed():
    items = plan(replace(TINY, num_classes=10, videos_per_class=6, min_frames=40, max_frames=120))
    lengths = [s.num_frames for _, _, s in items]
    rel_start = [s.action_start / s.num_frames for _, _, s in items]
    frac = [(s.action_end - s.action_start) / s.num_frames for _, _, s in items]
    assert len(set(lengths)) > 20 and np.std(rel_start) > 0.1
    assert min(frac) >= 0.15 and max(frac) <= 0.35  # the action covers only a small part of each video
    other = plan(replace(TINY, seed=1))
    assert [s.appearance_seed for *_, s in other] != [s.appearance_seed for *_, s in plan(TINY)]
    assert len(CLASSES) >= 10


def test_frames_before_the_action_do_not_depend_on_the_class():
    cfg = replace(TINY, height=64, width=64)
    frames = {}
    for label in ("move_left", "separate", "grow"):
        spec = replace(plan(cfg)[0][2], label=label, num_frames=30, action_start=12, action_end=24)
        frames[label] = render(spec, cfg)
    a, b, c = frames.values()
    assert np.array_equal(a[:12], b[:12]) and np.array_equal(a[:12], c[:12])
    assert not np.array_equal(a[12:24], b[12:24]) and not np.array_equal(a[12:24], c[12:24])


def test_appearance_statistics_overlap_across_classes():
    """Mean colour and contrast of a video say (almost) nothing about its class."""
    cfg = SynthConfig(num_classes=4, videos_per_class=8, height=40, width=40, min_frames=12, max_frames=14)
    feats, labels = [], []
    for _, _, spec in plan(cfg):
        f = render(spec, cfg)[::4].astype(np.float64)
        feats.append(np.concatenate([f.mean((0, 1, 2)), f.std((0, 1, 2))]))
        labels.append(CLASSES.index(spec.label))
    x, y = np.array(feats), np.array(labels)
    # every class's per-video statistics span ranges that overlap every other class's
    for c in range(4):
        for d in range(c + 1, 4):
            lo = np.maximum(x[y == c].min(0), x[y == d].min(0))
            hi = np.minimum(x[y == c].max(0), x[y == d].max(0))
            assert (lo < hi).all()
    # leave-one-out nearest class mean on appearance: no better than a little above chance (25%)
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        means = np.stack([x[keep & (y == c)].mean(0) for c in range(4)])
        hits += int(np.argmin(((means - x[i]) ** 2).sum(1)) == y[i])
    assert hits / len(y) < 0.5


def test_bad_config_is_a_catnet_error(tmp_path, capsys):
    with pytest.raises(CatnetError, match="classes"):
        plan(replace(TINY, num_classes=99))
    assert main(["synth", str(tmp_path / "o"), "--videos-per-class", "1"]) == 2
    assert "videos-per-class" in capsys.readouterr().err


def test_class_motions_are_large_displacements():
    """move_left and move_right from the same start end far apart: the motion a frozen backbone must see."""
    cfg = replace(TINY, height=64, width=64)
    spec = replace(plan(cfg)[0][2], num_frames=30, action_start=5, action_end=25)
    left = render(replace(spec, label="move_left"), cfg)[-1].astype(int)
    right = render(replace(spec, label="move_right"), cfg)[-1].astype(int)
    cols = np.flatnonzero((np.abs(left - right).sum(-1) > 120).any(0))  # columns where actor A differs
    assert cols.max() - cols.min() > 0.5 * cfg.width
