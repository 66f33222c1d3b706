"""`catnet predict`: top-k labels plus the clip timeline of attention, from a real (tiny) trained run."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from catnet.cli import main
from catnet.errors import CatnetError
from catnet.inference.predict import SPARK, Predictor, clip_attention, sparkline

# extract settings of the tiny run: random i3d_r50, 3 clips x 4 frames, 3 crops of 32 px -> 9 views
TINY_EXTRACT = ["--backbone", "i3d_r50", "--no-pretrained", "--clips", "3", "--frames", "4", "--stride", "2",
                "--crops", "3", "--short-side", "40", "--crop-size", "32", "--batch", "9", "--no-progress"]
CLASSES = ["jump", "run"]


def write_tiny_video(path: Path, frames: int = 24, seed: int = 0,
                     bright: tuple[int, int] | None = None) -> Path:
    """A small moving square; frames in `bright` = [start, stop) are lit up (a 'moment')."""
    from catnet.video.encode import write_video

    rng = np.random.default_rng(seed)
    video = np.empty((frames, 36, 48, 3), np.uint8)
    video[:] = rng.integers(0, 60, size=3, dtype=np.uint8)
    for i in range(frames):
        x = (i * 3) % 38
        video[i, 12:22, x:x + 10] = (250, 200, 40)
    if bright is not None:
        video[bright[0]:bright[1]] = 235
    return write_video(path, video, fps=12.0)


def make_tiny_run(root: Path) -> Path:
    """The real pipeline, tiny: videos -> `catnet extract` (random i3d_r50) -> `catnet train` (1 epoch)."""
    src = root / "videos"
    for i, name in enumerate(["jump/a", "jump/b", "run/c", "run/d"]):
        write_tiny_video(src / f"{name}.mp4", frames=20 + 4 * i, seed=i)
    assert main(["extract", str(src), "--out", str(root / "store"), *TINY_EXTRACT]) == 0
    assert main(["train", str(root / "store"), "--out", str(root / "run"), "--epochs", "1",
                 "--batch-size", "2", "--head-opt", "num_heads=2", "--no-progress"]) == 0
    return root / "run"


@functools.cache
def shared_tiny_run() -> Path:
    """One tiny run per test session, shared by the predict, export and browser tests."""
    root = Path(tempfile.mkdtemp(prefix="catnet-tiny-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_tiny_run(root)


@pytest.fixture
def tiny_run() -> Path:
    return shared_tiny_run()


def test_clip_attention_sums_heads_and_averages_crops():
    # 2 heads, 3 clips x 2 crops, clip-major views (v = k * crops + c)
    alpha = torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.3, 0.1],
                          [0.5, 0.3, 0.0, 0.1, 0.0, 0.1]])
    got = clip_attention(alpha, num_clips=3)
    per_clip = np.array([0.1 + 0.1 + 0.5 + 0.3, 0.2 + 0.2 + 0.0 + 0.1, 0.3 + 0.1 + 0.0 + 0.1])
    np.testing.assert_allclose(got, per_clip / per_clip.sum(), rtol=1e-6)
    assert got.sum() == pytest.approx(1.0)


def test_sparkline_scales_to_the_peak():
    line = sparkline(np.array([0.0, 0.05, 0.1, 0.4]))
    assert len(line) == 4 and line[-1] == SPARK[-1] and line[0] == SPARK[0]
    assert list(line) == sorted(line, key=SPARK.index)  # monotone values -> monotone bars
    assert sparkline(np.zeros(3)) == SPARK[0] * 3


class MeanColour(nn.Module):
    """Stand-in backbone: a clip's feature is its mean RGB (so 'bright' is easy to attend to)."""

    num_features, num_classes, labels = 3, 0, None

    def forward_features(self, x):
        return x.mean(dim=(2, 3, 4))


def test_attention_timeline_points_at_the_bright_moment(tmp_path):
    from catnet.heads import build_head
    from catnet.video import ClipSampling, SpatialConfig

    video = write_tiny_video(tmp_path / "v.mp4", frames=48, bright=(24, 32))  # 2.0-2.67 s at 12 fps
    head = build_head("local", in_dim=3, num_classes=2, num_heads=2)
    with torch.no_grad():
        head.local.score.weight.fill_(20.0)  # every head prefers bright clips
    sampling, spatial = ClipSampling(num_clips=6, clip_len=4, stride=2), SpatialConfig(40, 32, 3)
    pred = Predictor(MeanColour(), ["a", "b"], sampling, spatial, head=head)(video, top_k=5)

    assert len(pred.predictions) == 2 and pred.predictions[0][1] >= pred.predictions[1][1]
    att = np.array([c.attention for c in pred.clips])
    assert len(att) == 6 and att.sum() == pytest.approx(1.0, abs=1e-5)
    peak = pred.clips[int(att.argmax())]
    assert peak.start < 32 / 12 and peak.end > 24 / 12, f"peak clip {peak} misses the bright 2.0-2.67 s"
    assert pred.frame_indices.shape == (6, 4)


def test_predict_cli_json_lines_with_a_bad_video(tiny_run, tmp_path, capsys):
    good = write_tiny_video(tmp_path / "good.mp4", frames=30, seed=7)
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n")
    code = main(["predict", str(good), str(broken), str(tmp_path / "missing.mp4"), "--checkpoint",
                 str(tiny_run), "--json", "--top-k", "2", "--verbose", "--profile", "accurate"])
    out, err = capsys.readouterr()
    assert code == 1  # some videos failed, the good one still ran
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    rec = json.loads(lines[0])
    assert rec["video"] == str(good)
    assert [p["label"] for p in rec["predictions"]] in (CLASSES, CLASSES[::-1])
    scores = [p["score"] for p in rec["predictions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert len(rec["clips"]) == 3  # the run's 3 clips
    assert all(0 <= c["start"] < c["end"] for c in rec["clips"])
    assert sum(c["attention"] for c in rec["clips"]) == pytest.approx(1.0, abs=1e-4)
    err_lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(err_lines) == 2 and "broken.mp4" in err_lines[0] and "missing.mp4" in err_lines[1]
    assert "good.mp4:" in err and " s" in err  # --verbose timing
    assert "profile accurate: 3 clips x 3 crop(s) x 4 frames" in err  # --verbose settings
    timing = next(ln for ln in err.splitlines() if "good.mp4:" in ln)
    assert all(f"{stage} " in timing for stage in ("decode", "backbone", "head"))


def test_predict_cli_human_table_with_cheaper_settings(tiny_run, tmp_path, capsys):
    good = write_tiny_video(tmp_path / "good.mp4", frames=30, seed=3)
    assert main(["predict", str(good), "--checkpoint", str(tiny_run), "--clips", "5", "--crops", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(good))
    assert all(label in out for label in CLASSES) and "%" in out
    timeline = next(ln for ln in out.splitlines() if "timeline" in ln)
    assert "5 clips" in timeline
    assert sum(ch in SPARK for ch in timeline) == 5


def test_predictor_from_run_matches_store_features(tiny_run):
    """The backbone rebuilt from the run's manifest gives the very features the run was trained on."""
    from catnet.features import FeatureStore

    predictor = Predictor.from_run(tiny_run, profile="accurate")  # the run's own settings, fp32
    store = FeatureStore(tiny_run.parent / "store")
    item = store[0]
    from catnet.video import load_clips

    clips = load_clips(item.path, predictor.sampling, predictor.spatial)
    with torch.no_grad():
        feats = predictor.backbone.forward_features(torch.as_tensor(clips.views).float()).numpy()
    np.testing.assert_allclose(feats, item.features, atol=2e-2, rtol=1e-2)  # store keeps fp16


@pytest.mark.parametrize("argv,match", [
    (["--top-k", "0"], "--top-k"),
    (["--crops", "2"], "--crops"),
    (["--clips", "0"], "--clips"),
])
def test_bad_options_are_one_line_errors(tiny_run, tmp_path, capsys, argv, match):
    video = write_tiny_video(tmp_path / "v.mp4")
    assert main(["predict", str(video), "--checkpoint", str(tiny_run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "v.mp4")
    assert main(["predict", str(video), "--checkpoint", str(tmp_path)]) == 2
    assert "not a catnet run" in capsys.readouterr().err


def test_predictor_needs_a_classifier_or_a_head():
    from catnet.video import ClipSampling, SpatialConfig

    with pytest.raises(CatnetError, match="no classifier"):
        Predictor(MeanColour(), ["a"], ClipSampling(), SpatialConfig())


@pytest.mark.pretrained
@pytest.mark.shared
def test_pretrained_baseline_recognises_arm_wrestling(pretrained_i3d, shared_dir):
    """No run: the Kinetics-400 Inception-I3D classifier, at a CPU-cheap 1 clip x 1 crop x 16 frames."""
    pred = Predictor.pretrained(num_clips=1, num_crops=1, clip_len=16)(
        shared_dir / "data" / "clips" / "arm_wrestling_demo.mp4", top_k=5)
    assert len(pred.predictions) == 5 and pred.predictions[0][0] == "arm wrestling"
    assert len(pred.clips) == 1 and pred.clips[0].attention is None
