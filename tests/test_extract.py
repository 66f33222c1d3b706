"""`catnet extract` + `catnet inspect` on a handful of tiny videos, some of them broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from catnet.cli import main
from catnet.data.sources import list_videos
from catnet.errors import CatnetError
from catnet.features import FeatureStore

# tiny but complete: 2 clips x 4 frames, 3 crops of 32 px -> 6 views per video
TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
        "--crops", "3", "--short-side", "40", "--crop-size", "32", "--batch", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def videos(make_video, tmp_path):
    src = tmp_path / "videos"
    good = {"jump/a": 0, "jump/b": 1, "run/c": 2}
    for vid, seed in good.items():  # different lengths: clips sample differently per video
        make_video(f"videos/{vid}.mp4", frames=12 + 4 * seed, height=36, width=48, seed=seed)
    (src / "run" / "notes.mp4").write_text("this is not a video\n")
    (src / "jump" / "empty.mp4").write_bytes(b"")
    whole = (src / "run" / "c.mp4").read_bytes()
    (src / "run" / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (src / "run" / "readme.txt").write_text("ignored: not a video suffix\n")
    return src, sorted(good)


def _extract(src, out, *extra):
    return main(["extract", str(src), "--out", str(out), *TINY, *extra])


def test_list_videos(videos, tmp_path):
    src, good = videos
    entries, classes = list_videos(src)
    assert classes == ["jump", "run"]
    by_id = {e.id: e for e in entries}
    assert sorted(by_id) == sorted([*good, "jump/empty", "run/notes", "run/truncated"])
    assert by_id["run/c"].label == 1 and by_id["jump/a"].label == 0
    for rel in ("x/1.mp4", "y/1.mp4", "top.mkv"):  # a video outside class folders is unlabelled
        (tmp_path / "dup" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dup" / rel).write_bytes(b"")
    entries, _ = list_videos(tmp_path / "dup")
    assert [(e.id, e.label) for e in entries] == [("top", -1), ("x/1", 0), ("y/1", 1)]
    (tmp_path / "dup" / "y" / "1.avi").write_bytes(b"")
    with pytest.raises(CatnetError, match="two videos map to id 'y/1'"):
        list_videos(tmp_path / "dup")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CatnetError, match="no videos"):
        list_videos(tmp_path / "nothing")
    with pytest.raises(CatnetError, match="not found"):
        list_videos(tmp_path / "missing")


def test_extract_store_failures_resume_refusal_inspect(videos, tmp_path, capsys):
    from catnet.backbones import build_backbone
    from catnet.video import ClipSampling, SpatialConfig, load_clips

    src, good = videos
    out = tmp_path / "store"
    assert _extract(src, out, "--workers", "1", "--json") == 1  # bad videos -> exit status 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["total"], summary["extracted"], summary["failed"]) == (6, 3, 3)

    store = FeatureStore(out)
    assert store.ids == good
    assert [store[i].label for i in good] == [0, 0, 1]
    assert {f["id"] for f in store.failures} == {"jump/empty", "run/notes", "run/truncated"}
    assert all(f["reason"] for f in store.failures)
    m = store.manifest
    assert m["backbone"] == "i3d_inception" and m["classes"] == ["jump", "run"]
    assert m["sampling"] == {"num_clips": 2, "clip_len": 4, "stride": 2}
    assert m["spatial"]["crop"] == 32 and m["spatial"]["num_crops"] == 3
    assert {"catnet", "torch", "av"} <= set(m["versions"])

    # features equal the backbone run directly on each video's views (batches crossed videos here)
    torch.manual_seed(0)
    model = build_backbone("i3d_inception").eval()
    assert m["weights_id"] == model.weights_id and m["num_features"] == model.num_features
    sampling, spatial = ClipSampling(2, 4, 2), SpatialConfig(short_side=40, crop=32, num_crops=3)
    for vid in good:
        clips = load_clips(src / f"{vid}.mp4", sampling, spatial)
        with torch.inference_mode():
            want = model.forward_features(torch.as_tensor(clips.views).float()).numpy()
        got = store[vid]
        assert got.features.shape == (6, model.num_features) and got.num_clips == 2 and got.num_crops == 3
        np.testing.assert_allclose(got.features, want, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(got.times, clips.clip_times, atol=1e-4)
        assert np.all(got.times[:, 1] > got.times[:, 0])

    # a rerun redoes nothing and does not retry failures unless asked; still exit 1 (store incomplete)
    shards = {p.name: p.read_bytes() for p in store.shards}
    assert _extract(src, out, "--workers", "0", "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["already_done"], summary["extracted"], summary["failed_before"]) == (3, 0, 3)
    assert _extract(src, out, "--workers", "0", "--json", "--retry-failed") == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["extracted"], summary["failed"], summary["failed_before"]) == (0, 3, 0)
    assert {p.name: p.read_bytes() for p in FeatureStore(out).shards} == shards
    assert len(FeatureStore(out).failures) == 3

    # different settings into the same store: refused, store untouched
    assert _extract(src, out, "--clips", "3") == 2
    assert "different settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in FeatureStore(out).shards} == shards

    # inspect: JSON and human output
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos"] == 3 and info["feature_dim"] == model.num_features
    assert info["views_per_video"] == [6] and info["num_failures"] == 3
    assert {f["id"] for f in info["failures"]} == {"jump/empty", "run/notes", "run/truncated"}
    assert info["manifest"]["backbone"] == "i3d_inception"
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "i3d_inception" in text and "run/truncated" in text and "videos" in text


def test_extract_refuses_bad_arguments(videos, tmp_path, capsys):
    src, _ = videos
    assert main(["extract", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), *TINY]) == 2
    assert "source not found" in capsys.readouterr().err
    assert _extract(src, tmp_path / "s", "--crop-size", "64") == 2
    assert "larger than short side" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_extract_from_annotation_file(videos, tmp_path, capsys):
    src, _ = videos
    ann = src / "list.csv"
    ann.write_text("path,label,split\njump/a.mp4,jump,train\nrun/c.mp4,run,test\nrun/gone.mp4,run,test\n")
    out = tmp_path / "store"
    assert _extract(ann, out, "--workers", "0", "--json") == 1  # gone.mp4 is listed but missing
    summary = json.loads(capsys.readouterr().out)
    assert (summary["total"], summary["extracted"], summary["failed"]) == (3, 2, 1)
    store = FeatureStore(out)
    assert store.classes == ["jump", "run"]
    assert store.ids == ["jump/a", "run/c"]
    assert [store[i].label for i in store.ids] == [0, 1]
    assert store.split("train") == [0] and store.split("test") == [1]
    assert [f["id"] for f in store.failures] == ["run/gone"]


def test_compiled_backbone_gives_the_same_features(videos, tmp_path):
    """--compile (torch.compile with frozen weights) matches eager; the last, partial batch is padded."""
    src, good = videos
    assert _extract(src, tmp_path / "eager", "--workers", "0") == 1  # the bad videos fail in both
    assert _extract(src, tmp_path / "compiled", "--workers", "0", "--compile") == 1
    eager, compiled = FeatureStore(tmp_path / "eager"), FeatureStore(tmp_path / "compiled")
    assert eager.ids == compiled.ids == good  # 18 views in batches of 4: the last batch holds 2
    for vid in good:
        a, b = eager[vid].features, compiled[vid].features
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-3 * np.abs(a).max())


def test_compile_failure_is_one_line(videos, tmp_path, capsys, monkeypatch):
    import catnet.features.extract as extract_module

    def broken(model):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  details...")
        return run

    monkeypatch.setattr(extract_module, "compile_for_inference", broken)
    assert _extract(videos[0], tmp_path / "s", "--workers", "0", "--compile") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("catnet extract: error: --compile failed (RuntimeError: InvalidCxxCompiler: No "
                       "working C++ compiler found); run without it")
    assert not any("Traceback" in line for line in err)
