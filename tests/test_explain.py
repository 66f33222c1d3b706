"""Grad-CAM over the key frames of the clips that mattered (catnet/inference/explain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import MeanColour, shared_tiny_run, write_tiny_video
from test_serve import decode_png

from catnet.cli import main
from catnet.cli.predict import overlay_stems
from catnet.inference.explain import colormap, grad_cam, overlay, supports_grad_cam, to_frame
from catnet.inference.predict import ClipScore, Prediction, Predictor, ranked_clips
from catnet.video import SpatialConfig, read_frames


@pytest.fixture(scope="module")
def run_predictor():
    """The tiny run's head and random i3d_r50, on 64 px crops: a 2 x 2 feature map, so that maps can
    differ within a crop (the run's own 32 px crops give a 1 x 1 map)."""
    from catnet.engine.runs import load_run
    from catnet.inference.predict import backbone_from_manifest, store_manifest

    head, info = load_run(shared_tiny_run())
    if head.config.standardize:  # the run's statistics describe 32 px crop features, not these 64 px ones
        head.set_standardization(torch.zeros(head.config.in_dim), torch.ones(head.config.in_dim))
    backbone, sampling, _ = backbone_from_manifest(store_manifest(info))
    return Predictor(backbone, info["classes"], sampling, SpatialConfig(short_side=72, crop=64, num_crops=3),
                     head=head)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A bright square crossing a dark 90 x 120 frame."""
    from catnet.video.encode import write_video

    frames = np.full((40, 90, 120, 3), 30, np.uint8)
    for i in range(40):
        x = 5 + i * 2
        frames[i, 30:60, x:x + 30] = (250, 200, 40)
    return write_video(tmp_path_factory.mktemp("explain") / "v.mp4", frames, fps=12.0)


def test_maps_are_finite_frame_sized_and_in_range(run_predictor, video):
    pred = run_predictor(video, top_k=2, explain=True)
    assert len(pred.explain) == 3
    assert [s.clip for s in pred.explain] == ranked_clips(pred, 3)  # the highest-attention clips
    for s in pred.explain:
        frame = read_frames(video, [s.frame_index])[0]
        assert s.heat.shape == frame.shape[:2] and s.frame.shape == frame.shape
        assert np.isfinite(s.heat).all() and s.heat.min() >= 0 and s.heat.max() <= 1
        assert s.frame_index == int(pred.frame_indices[s.clip, pred.frame_indices.shape[1] // 2])
        assert s.view == s.clip * 3 + 1  # the centre crop of the clip
    # Grad-CAM's ReLU zeroes a view with no positive evidence for the class; not every view can be empty
    assert max(s.heat.max() for s in pred.explain) > 0, "all-zero maps explain nothing"


def test_the_map_changes_with_the_class(run_predictor, video):
    pred = run_predictor(video, top_k=2, explain=True)
    (first, _), (second, _) = pred.predictions
    other = run_predictor(video, top_k=2, explain=True, explain_label=second)
    assert [s.label for s in pred.explain] == [first] * 3 and [s.label for s in other.explain] == [second] * 3
    assert [s.clip for s in other.explain] == [s.clip for s in pred.explain]  # same clips, other class
    for a, b in zip(pred.explain, other.explain, strict=True):
        assert np.abs(a.heat - b.heat).max() > 1e-3


def test_grad_cam_of_a_head_depends_on_the_chosen_view_only(run_predictor):
    """d logit / d map_v with every other view held constant: the other views' features are inputs."""
    torch.manual_seed(0)
    views = torch.rand(6, 3, 4, 32, 32)
    feats = run_predictor.runner.features(views)
    cam = grad_cam(run_predictor.backbone, views[2], 0, run_predictor.head, feats, view_index=2)
    assert cam.dim() == 3 and torch.isfinite(cam).all() and (cam >= 0).all()


def test_grad_cam_without_a_head_uses_the_backbones_classifier():
    from catnet.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("i3d_r50", num_classes=5).eval()
    view = torch.rand(3, 4, 64, 64)
    maps = [grad_cam(backbone, view, c) for c in (0, 1)]
    assert maps[0].shape == (2, 2, 2) and all(torch.isfinite(m).all() for m in maps)  # (T', H', W')
    assert not torch.allclose(maps[0], maps[1])


def test_to_frame_places_the_crop_where_load_clips_cut_it():
    crop_map = np.zeros((32, 32), np.float32)
    crop_map[:, :16] = 1.0  # the left half of the crop
    heat, box = to_frame(crop_map, (36, 48), short_side=40, num_crops=1, crop_index=0)
    assert heat.shape == (36, 48) and np.isfinite(heat).all() and heat.max() == pytest.approx(1.0)
    top, left, bottom, right = box  # 40 x 53 resized frame, centre crop at (4, 10) -> frame pixels
    assert (top, left, bottom, right) == (4, 9, 32, 38)
    assert heat[:, :left - 1].max() == 0 and heat[:, right + 1:].max() == 0  # nothing outside the crop
    assert heat[18, left + 3] > 0.9 and heat[18, right - 3] < 0.1


def test_overlay_colours_the_crop_and_greys_the_rest():
    frame = np.full((20, 30, 3), 200, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[5:15, 10:20] = 1.0
    img = overlay(frame, heat, (5, 10, 15, 20))
    assert img.shape == frame.shape
    assert (img[0, 0] == 90).all()  # outside the crop: greyed
    np.testing.assert_array_equal(img[10, 15], (frame[10, 15] * 0.5 + colormap(np.array(1.0)) * 0.5).round())
    assert overlay(frame, heat, (5, 10, 15, 20), height=10).shape == (10, 15, 3)


def test_backbones_without_a_feature_map_explain_nothing(tmp_path):
    from catnet.heads import build_head
    from catnet.video import ClipSampling, SpatialConfig

    assert not supports_grad_cam(MeanColour())
    predictor = Predictor(MeanColour(), ["a", "b"], ClipSampling(3, 4, 2), SpatialConfig(40, 32, 1),
                          head=build_head("local", in_dim=3, num_classes=2, num_heads=2))
    pred = predictor(write_tiny_video(tmp_path / "v.mp4"), explain=True)
    assert pred.explain == [] and pred.to_json()["explain"] == []


def test_ranked_clips_by_attention_then_class_score_then_evenly():
    def pred(att, scores=None):
        return Prediction("v", [("a", 1.0)], [ClipScore(i, i + 1, a) for i, a in enumerate(att)],
                          clip_class_scores=scores)

    assert ranked_clips(pred([0.1, 0.5, 0.2, 0.2]), 3) == [1, 2, 3]
    assert ranked_clips(pred([None] * 4, np.array([0.3, 0.1, 0.9, 0.5])), 3) == [2, 3, 0]
    assert ranked_clips(pred([None] * 5), 3) == [0, 2, 4]


def test_cli_explain_json_and_files(tmp_path, capsys):
    video, run = write_tiny_video(tmp_path / "clip.mp4", frames=30), shared_tiny_run()
    capsys.readouterr()
    out_dir = tmp_path / "maps"
    argv = ["predict", str(video), "--checkpoint", str(run), "--json", "--explain-out", str(out_dir)]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["explain"]) == 3
    for entry in rec["explain"]:
        assert set(entry) == {"clip", "start", "end", "frame_index", "label", "map", "image", "file"}
        clip = rec["clips"][entry["clip"]]
        assert (entry["start"], entry["end"]) == (clip["start"], clip["end"])
        grid = np.array(entry["map"])
        assert grid.ndim == 2 and max(grid.shape) == 12 and np.isfinite(grid).all()
        assert decode_png(entry["image"]).shape == (36, 48, 3)  # small frames are inlined at full size
        assert (out_dir / entry["file"].rsplit("/", 1)[-1]).is_file()


def test_cli_explain_out_keeps_the_overlays_of_videos_with_one_name(tmp_path, capsys):
    """d1/clip.mp4 and d2/clip.mp4: each video's JSON points at its own files, none overwritten."""
    run = shared_tiny_run()
    videos = [write_tiny_video(tmp_path / d / "clip.mp4", frames=30, bright=b)
              for d, b in (("d1", None), ("d2", (0, 30)))]
    capsys.readouterr()
    out_dir = tmp_path / "maps"
    assert main(["predict", *map(str, videos), "--checkpoint", str(run), "--json",
                 "--explain-out", str(out_dir)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    files = [[e["file"] for e in rec["explain"]] for rec in records]
    assert len(set(files[0]) | set(files[1])) == 6 == len(list(out_dir.iterdir()))
    assert all(Path(f).name.startswith("clip-2.") for f in files[1])
    assert overlay_stems(["a/x.mp4", "b/x.mp4", "x-2.mp4", "c/x.avi"]) == ["x", "x-2", "x-2-2", "x-3"]


def test_cli_explain_human_names_the_region(tmp_path, capsys):
    video, run = write_tiny_video(tmp_path / "clip.mp4", frames=30), shared_tiny_run()
    capsys.readouterr()
    assert main(["predict", str(video), "--checkpoint", str(run), "--explain"]) == 0
    where = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("where")]
    assert len(where) == 3 and all("peak at" in ln for ln in where)


def test_explain_with_windows_is_refused(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "clip.mp4")
    assert main(["predict", str(video), "--explain", "--window", "1"]) == 2
    assert "--explain works on whole videos" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.pretrained
@pytest.mark.shared
def test_pretrained_i3d_maps_on_a_real_clip(pretrained_i3d, shared_dir):
    """The Kinetics-400 classifier itself (no head): finite, frame-sized, and class-dependent maps."""
    video = shared_dir / "data" / "clips" / "arm_wrestling_demo.mp4"
    predictor = Predictor.pretrained(num_clips=3, num_crops=1, clip_len=16)
    pred = predictor(video, top_k=2, explain=True)
    other = predictor(video, top_k=2, explain=True, explain_label=pred.predictions[1][0])
    frame = read_frames(video, [pred.explain[0].frame_index])[0]
    for a, b in zip(pred.explain, other.explain, strict=True):
        assert a.heat.shape == frame.shape[:2] and np.isfinite(a.heat).all() and a.heat.max() > 0
        assert np.abs(a.heat - b.heat).max() > 1e-3
