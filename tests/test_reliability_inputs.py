"""Bad stores and configs: refused with one clear line *before any work starts* (no run folder written,
no optimiser step taken). Complements tests/test_train.py and tests/test_evaluate.py, which cover the
empty-split, foreign-class and wrong-dim refusals of a well-formed store."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_train import cfg, make_store

from catnet.cli import main
from catnet.engine.evaluate import evaluate
from catnet.engine.runs import load_run
from catnet.engine.train import train
from catnet.errors import CatnetError
from catnet.features import FeatureStore
from catnet.features.store import read_shard_videos
from catnet.utils.io import file_digest
from catnet.video import ClipSampling, SpatialConfig, clip_times, sample_clips, train_view
from catnet.video import transforms as T

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_steps(monkeypatch):
    """Fails the test if training takes a single optimiser step."""
    def step(*a, **k):
        raise AssertionError("an optimiser step ran before the bad input was refused")

    monkeypatch.setattr(torch.optim.SGD, "step", step)


def _poison(store: FeatureStore, video_id: str, value: float) -> None:
    """Overwrite one value of one video in its shard (as bit rot or a buggy writer would)."""
    shard = next(p for p in store.shards if video_id in {r["id"] for r in read_shard_videos(p)})
    with safe_open(str(shard), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    row = [r["id"] for r in json.loads(meta["videos"])].index(video_id)
    tensors["features"][int(tensors["offsets"][row]) + 1, 3] = value
    save_file(tensors, str(shard), metadata=meta)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("split", ["train", "test"])
def test_nonfinite_features_refused_before_training(tmp_path, no_steps, value, split):
    store = make_store(tmp_path / "s")
    bad = store.ids[store.split(split)[-1]]  # the last video: met only at the end of an epoch
    _poison(store, bad, value)
    # with the test split validating (asked for), its features are read by training too
    val = {"val_split": "test"} if split == "test" else {}
    with pytest.raises(CatnetError, match=rf"non-finite .*{bad}"):
        train(cfg(store.root, tmp_path / "run", epochs=1, **val))
    assert not (tmp_path / "run").exists()


def test_nonfinite_features_refused_before_evaluating(tmp_path):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    bad = store.ids[store.split("test")[0]]
    _poison(store, bad, np.nan)
    head, info = load_run(tmp_path / "run")

    def forward(*a, **k):
        raise AssertionError("the head ran before the bad input was refused")

    head.forward = forward
    with pytest.raises(CatnetError, match=rf"non-finite .*{bad}"):
        evaluate(head, FeatureStore(store.root), "test", classes=info["classes"])


def test_extraction_records_nonfinite_features_as_a_failed_video(tmp_path, monkeypatch):
    """A backbone output beyond float16 range (stored as inf) or NaN fails that video, not the run."""
    from reliability_corpus import moving_square

    import catnet.backbones
    import catnet.features.extract
    from catnet.features.extract import ExtractConfig, extract
    from catnet.video.encode import write_video

    build = catnet.backbones.build_backbone

    def overflowing(*a, **k):
        model = build(*a, **k)
        real = model.forward_features

        def forward_features(x):  # bright videos overflow, as an unnormalised checkpoint might
            y = real(x)
            return torch.where(x.mean((1, 2, 3, 4), keepdim=True)[:, :, 0, 0, 0] > 0.9, y * 0 + 1e6, y)

        model.forward_features = forward_features
        return model

    monkeypatch.setattr(catnet.features.extract, "build_backbone", overflowing)
    frames = moving_square(8)
    write_video(tmp_path / "v" / "a" / "dark.mp4", frames)
    write_video(tmp_path / "v" / "a" / "bright.mp4", np.full_like(frames, 250))
    cfg = ExtractConfig(backbone="i3d_r50", pretrained=False,
                        sampling=ClipSampling(num_clips=2, clip_len=4, stride=2),
                        spatial=SpatialConfig(short_side=32, crop=32, num_crops=1), workers=0)
    result = extract(tmp_path / "v", tmp_path / "s", cfg, progress=False)
    assert (result.extracted, result.failed) == (1, 1)
    store = FeatureStore(tmp_path / "s")
    assert store.ids == ["a/dark"] and store.nonfinite_ids() == []
    assert [(f["id"], "non-finite" in f["reason"]) for f in store.failures] == [("a/bright", True)]


def test_shard_with_another_feature_width_is_refused_up_front(tmp_path, no_steps):
    store = make_store(tmp_path / "s")
    shard = store.shards[-1]
    with safe_open(str(shard), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    tensors["features"] = np.zeros((tensors["features"].shape[0], 5), np.float16)  # store says 8
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(CatnetError, match=r"5-d features.*8"):
        train(cfg(store.root, tmp_path / "run", epochs=1))
    with pytest.raises(CatnetError, match=r"5-d features.*8"):
        len(FeatureStore(store.root))


def test_label_outside_the_class_list_is_refused(tmp_path, no_steps):
    feats = [np.ones((2, 4), np.float32) * i for i in range(6)]
    store = FeatureStore.write_synthetic(tmp_path / "s", feats, [0, 1, 2, 0, 7, 1], ["a", "b", "c"],
                                         splits=["train"] * 5 + ["test"])
    with pytest.raises(CatnetError, match="without a valid label.*video000004"):
        train(cfg(store.root, tmp_path / "run", epochs=1))


def test_store_and_checkpoint_label_maps_disagree(tmp_path):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    renamed = make_store(tmp_path / "renamed")
    manifest = json.loads((renamed.root / "manifest.json").read_text())
    manifest["classes"] = ["class0", "class1", "zebra"]
    (renamed.root / "manifest.json").write_text(json.dumps(manifest))
    # eval: the run knows no 'zebra'; resume: the classes changed under the run
    assert main(["eval", str(tmp_path / "run"), "--store", str(renamed.root)]) == 2
    with pytest.raises(CatnetError, match="does not match the resumed run"):
        train(cfg(renamed.root, tmp_path / "run", epochs=2, resume=True))
    # the same names in another order are not a disagreement: labels are mapped by name
    shuffled = make_store(tmp_path / "shuffled")
    manifest = json.loads((shuffled.root / "manifest.json").read_text())
    manifest["classes"] = ["class1", "class0", "class2"]
    (shuffled.root / "manifest.json").write_text(json.dumps(manifest))
    head, info = load_run(tmp_path / "run")
    assert evaluate(head, shuffled.root, "test", classes=info["classes"])["n"] == len(shuffled.split("test"))


def test_empty_store_is_refused_by_train_and_eval(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    train(cfg(store.root, tmp_path / "run", epochs=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((store.root / "manifest.json").read_text())
    capsys.readouterr()
    assert main(["train", str(empty), "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert main(["eval", str(tmp_path / "run"), "--store", str(empty)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(": error: " in line for line in err), err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("text, match", [
    ("epochs: ten\n", "epochs.*int"),
    ("epochz: 10\n", "unknown TrainConfig key"),
    ("- a\n- b\n", "mapping"),
    ("epochs: [1\n", "invalid YAML"),
    ("lr: -1\n", "lr must be > 0"),
])
def test_bad_config_files_are_refused(tmp_path, capsys, text, match):
    store = make_store(tmp_path / "s")
    (tmp_path / "c.yaml").write_text(text)
    capsys.readouterr()
    config = str(tmp_path / "c.yaml")
    code = main(["train", str(store.root), "--out", str(tmp_path / "run"), "--config", config])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------- property tests (hypothesis)
# tests/test_sampling.py and tests/test_transforms.py cover indices, test-time crops and crop offsets;
# these add what they leave out: clip times for any fps, and random train views for any frame size.

clip_configs = st.builds(ClipSampling, num_clips=st.integers(1, 12), clip_len=st.integers(1, 40),
                         stride=st.integers(1, 8))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 100_000), cfg=clip_configs, fps=st.floats(1e-4, 480, allow_nan=False))
def test_clip_times_lie_inside_the_video_for_any_fps(n, cfg, fps):
    idx = sample_clips(n, cfg)
    times = clip_times(idx, fps)
    assert times.shape == (cfg.num_clips, 2) and np.isfinite(times).all()
    assert (times[:, 0] < times[:, 1]).all() and (np.diff(times[:, 0]) >= 0).all()
    assert times.min() >= 0 and times.max() <= n / fps * (1 + 1e-12)
    np.testing.assert_array_equal(clip_times(sample_clips(n, cfg), fps), times)  # deterministic


@settings(max_examples=40, deadline=None)
@given(h=st.integers(4, 80), w=st.integers(4, 80), t=st.integers(1, 3), crop=st.integers(1, 12),
       extra=st.integers(0, 20), seed=st.integers(0, 2**32 - 1))
def test_train_views_any_frame_size(h, w, t, crop, extra, seed):
    frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    cfg = SpatialConfig(short_side=crop + extra, crop=crop, num_crops=1, train_short=(crop, crop + extra))
    a = train_view(frames, cfg, np.random.default_rng(seed))
    assert a.shape == (3, t, crop, crop) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, train_view(frames, cfg, np.random.default_rng(seed)))  # seeded: reproducible
    views = T.test_views(frames, cfg)
    assert views.shape == (1, 3, t, crop, crop) and torch.equal(views, T.test_views(frames, cfg))


# ------------------------------------------------------------------------------------ small CLI fixes


def test_weights_fetch_never_ignores_an_explicit_source(tmp_path, monkeypatch, capfd):
    import pickle

    from catnet.backbones import i3d_inception_weights as weights

    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "home"))
    out = weights.converted_weights_path()
    out.parent.mkdir(parents=True)
    out.write_bytes(b"present")  # stands in for converted weights: never read when the source matches
    small = tmp_path / "small.ckpt"  # a checkpoint of another shape: converting it must fail
    small.write_bytes(pickle.dumps({"params": {"Conv3d_1a_7x7": {"Conv_0": {
        "kernel": np.zeros((7, 7, 7, 3, 8), np.float32)}}}}))
    sidecar = {"sha256": "x", "source_sha256": file_digest(small)}
    weights.sidecar_path().write_text(json.dumps(sidecar))
    capfd.readouterr()

    assert main(["weights", "fetch", "--source", "/nonexistent/i3d.tar.gz"]) == 2  # was: exit 0, ignored
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["catnet weights: error: source not found: /nonexistent/i3d.tar.gz"]

    assert main(["weights", "fetch", "--source", str(small)]) == 0  # the source the weights came from
    assert "already present" in capfd.readouterr().err and out.read_bytes() == b"present"

    other = tmp_path / "other.ckpt"
    other.write_bytes(small.read_bytes() + b"\n")  # another checkpoint: converted, not skipped
    assert main(["weights", "fetch", "--source", str(other)]) == 2
    assert "does not match Inception-I3D" in capfd.readouterr().err
    assert out.read_bytes() == b"present"  # a failed conversion leaves the present weights alone


def test_predict_reports_any_per_video_exception_and_goes_on(make_video, monkeypatch, capsys):
    from test_predict import shared_tiny_run

    from catnet.inference.predict import Predictor

    videos = [make_video(f"v{i}.mp4", frames=12, height=32, width=40, seed=i) for i in range(3)]
    real = Predictor.__call__

    def flaky(self, path, top_k=5):
        if str(path).endswith("v1.mp4"):
            raise RuntimeError("backbone blew up\nsecond line")
        return real(self, path, top_k=top_k)

    monkeypatch.setattr(Predictor, "__call__", flaky)
    run = shared_tiny_run()
    capsys.readouterr()
    code = main(["predict", *map(str, videos), "--checkpoint", str(run), "--json", "--clips", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [json.loads(line)["video"] for line in out.splitlines()] == [str(videos[0]), str(videos[2])]
    assert err.splitlines() == [f"catnet predict: error: {videos[1]}: RuntimeError: backbone blew up",
                                "catnet predict: 2 ok, 1 failed"]
