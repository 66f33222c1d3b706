"""Prediction profiles (predict.PROFILES), the optimised / compiled / bf16 backbone, and refusing NaN."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_predict import MeanColour, shared_tiny_run, write_tiny_video

from catnet.cli import main
from catnet.errors import CatnetError
from catnet.inference import runtime
from catnet.inference.predict import DEFAULT_PROFILE, PROFILES, Predictor, fit_budget, resolve
from catnet.video import ClipSampling, SpatialConfig

# The pretrained I3D's own layout (Predictor.pretrained): 10 clips x 64 frames, 3 x 224 crops.
I3D = dict(sampling=ClipSampling(num_clips=10, clip_len=64, stride=1),
           spatial=SpatialConfig(short_side=256, crop=224, num_crops=3))


def test_profile_table_has_fast_as_the_default():
    assert DEFAULT_PROFILE == "fast" and set(PROFILES) >= {"fast", "accurate"}


def test_accurate_is_the_papers_setting_for_the_pretrained_i3d():
    got = resolve("accurate", **I3D)
    s, sp = got["sampling"], got["spatial"]
    assert (s.num_clips, s.clip_len, s.stride, sp.num_crops, sp.crop) == (10, 64, 1, 3, 224)
    assert got["precision"] == "fp32" and got["compile"] is False


def test_accurate_for_a_run_is_its_own_extraction_settings_times_three_crops():
    run = dict(sampling=ClipSampling(num_clips=7, clip_len=16, stride=2),
               spatial=SpatialConfig(short_side=128, crop=112, num_crops=1))
    got = resolve("accurate", **run)
    s, sp = got["sampling"], got["spatial"]
    got = (s.num_clips, s.clip_len, s.stride, sp.num_crops, sp.crop, sp.short_side)
    assert got == (7, 16, 2, 3, 112, 128)


def test_fast_caps_frames_and_explicit_flags_override_it():
    got = resolve("fast", **I3D)
    p = PROFILES["fast"]
    # the budget (4 views of 32 frames at 224 px) gives the pretrained I3D 4 clips x 1 crop ...
    assert (got["sampling"].num_clips, got["spatial"].num_crops) == (4, 1)
    assert got["sampling"].clip_len == min(p.max_frames, 64) and got["precision"] == p.precision
    # ... and a run on 10 clips of 16 frames at 112 px all of its clips, with 3 crops
    small = resolve("fast", sampling=ClipSampling(10, 16, 4), spatial=SpatialConfig(128, 112, 1))
    got = (small["sampling"].num_clips, small["spatial"].num_crops, small["sampling"].clip_len)
    assert got == (10, 3, 16)
    assert fit_budget(p.budget, 10, 64, 224, 1) == (2, 1)  # --frames 64: 2 clips fit
    assert fit_budget(p.budget, 10, 256, 224, 1) == (1, 1)  # never fewer than one view
    over = resolve("fast", **I3D, num_clips=2, num_crops=3, clip_len=8)
    assert (over["sampling"].num_clips, over["spatial"].num_crops, over["sampling"].clip_len) == (2, 3, 8)
    short = resolve("fast", sampling=ClipSampling(3, 4, 2), spatial=SpatialConfig(40, 32, 3))
    assert short["sampling"].clip_len == 4  # never more frames than the model's clips


@pytest.mark.parametrize("kwargs,match", [({"num_crops": 2}, "--crops"), ({"num_clips": 0}, "--clips"),
                                          ({"clip_len": -1}, "--frames")])
def test_bad_overrides_are_one_line_errors(kwargs, match):
    with pytest.raises(CatnetError, match=match):
        resolve("fast", **I3D, **kwargs)


def test_unknown_profile_is_refused():
    with pytest.raises(CatnetError, match="unknown profile"):
        resolve("turbo", **I3D)


def test_bf16_falls_back_to_fp32_with_a_note_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda: (False, "this CPU has no AVX512-BF16 or AMX"))
    assert runtime.effective_precision("bf16") == ("fp32", "bf16 asked for, running fp32: this CPU has "
                                                           "no AVX512-BF16 or AMX")
    assert runtime.effective_precision("fp32") == ("fp32", None)
    predictor = Predictor(MeanColour(), ["a"], ClipSampling(2, 4, 1), SpatialConfig(40, 32, 1),
                          head=_head(3, 1), precision="bf16")
    assert "fp32" in predictor.describe() and "bf16 asked for" in predictor.describe()


def test_verbose_prints_the_profile_and_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bf16_supported", lambda: (False, "no bf16 here"))
    video, run = write_tiny_video(tmp_path / "v.mp4", frames=30), shared_tiny_run()
    capsys.readouterr()
    assert main(["predict", str(video), "--checkpoint", str(run), "--verbose", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["clips"]) == 3  # the tiny run's own 3 clips fit fast's budget
    assert "profile fast:" in err and "running fp32: no bf16 here" in err


def test_the_optimised_backbone_is_exact_and_folded():
    """Predictor's backbone is BN-folded and channels-last (optimize_for_inference), equal to the
    eager model to float rounding."""
    from catnet.backbones import build_backbone

    torch.manual_seed(0)
    plain = build_backbone("i3d_r50").eval()
    reference = build_backbone("i3d_r50").eval()
    reference.load_state_dict(plain.state_dict())
    predictor = Predictor(plain, [f"c{i}" for i in range(400)], ClipSampling(2, 4, 2),
                          SpatialConfig(40, 32, 1), head=_head(2048, 400))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in predictor.backbone.modules())
    x = torch.rand(3, 3, 4, 32, 32)
    with torch.no_grad():
        want = reference.forward_features(x)
    got = predictor.runner.features(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_inductor_cache_goes_under_catnet_home_unless_the_user_set_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(runtime.INDUCTOR_ENV, raising=False)
    assert runtime.use_inductor_cache() == tmp_path / "home" / "inductor"
    assert (tmp_path / "home" / "inductor").is_dir()
    monkeypatch.setenv(runtime.INDUCTOR_ENV, str(tmp_path / "mine"))
    assert runtime.use_inductor_cache() == tmp_path / "mine"  # the user's own is kept


@pytest.mark.slow
def test_compiled_backbone_matches_eager_and_fills_the_cache(tmp_path, monkeypatch):
    """compile=True: torch.compile (inductor, frozen weights) with the cache in $CATNET_HOME/inductor."""
    from catnet.backbones import build_backbone

    monkeypatch.setenv("CATNET_HOME", str(tmp_path))
    monkeypatch.delenv(runtime.INDUCTOR_ENV, raising=False)
    torch.manual_seed(0)
    backbone = build_backbone("i3d_r50")
    eager = Predictor(backbone, ["a"], ClipSampling(2, 4, 2), SpatialConfig(40, 32, 1), head=_head(2048, 1))
    x = torch.rand(3, 3, 4, 32, 32)  # 3 views with batch 2: one full and one padded batch
    want = eager.runner.features(x)
    compiled = runtime.BackboneRunner(eager.backbone, batch_size=2, compile=True, optimize=False)
    got = compiled.features(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert any((tmp_path / "inductor").rglob("*")), "nothing cached under $CATNET_HOME/inductor"


def _head(in_dim: int, classes: int):
    from catnet.heads import build_head

    torch.manual_seed(0)
    return build_head("avgpool", in_dim=in_dim, num_classes=classes)


def _nan_run(tmp_path):
    """The tiny run, with one tensor of its head's checkpoints set to NaN."""
    run = tmp_path / "nan-run"
    shutil.copytree(shared_tiny_run(), run)
    for ckpt in (run / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, weights_only=True)
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))
        torch.save(state, ckpt)
    return run


def test_a_run_with_nan_weights_is_refused_in_one_line(tmp_path, capsys):
    video = write_tiny_video(tmp_path / "v.mp4")
    assert main(["predict", str(video), "--checkpoint", str(_nan_run(tmp_path)), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "NaN" not in out
    assert len(err.strip().splitlines()) == 1 and "non-finite weights" in err


class NanBackbone(MeanColour):
    def forward_features(self, x):
        return x.mean(dim=(2, 3, 4)) * float("nan")


def test_non_finite_scores_are_an_error_never_nan_in_the_output(tmp_path):
    video = write_tiny_video(tmp_path / "v.mp4")
    predictor = Predictor(NanBackbone(), ["a", "b"], ClipSampling(2, 4, 1), SpatialConfig(40, 32, 1),
                          head=_head(3, 2))
    with pytest.raises(CatnetError, match="non-finite scores"):
        predictor(video)


@pytest.mark.slow
@pytest.mark.pretrained
@pytest.mark.shared
def test_fast_and_accurate_agree_on_the_real_clips(pretrained_i3d, shared_dir):
    """The `fast` profile keeps the top-1 of `accurate` (the paper's 10 x 3 views, 64 frames) on the two
    real clips of ../shared, and both give the clips' known Kinetics-400 labels."""
    known = {"v_CricketShot_g04_c01_rgb.gif": "playing cricket", "arm_wrestling_demo.mp4": "arm wrestling"}
    fast, accurate = Predictor.pretrained(profile="fast"), Predictor.pretrained(profile="accurate")
    for video in sorted((shared_dir / "data" / "clips").iterdir()):
        a, f = accurate(video, top_k=1), fast(video, top_k=1)
        assert f.predictions[0][0] == a.predictions[0][0], (video.name, f.predictions, a.predictions)
        if video.name in known:
            assert a.predictions[0][0] == known[video.name], (video.name, a.predictions)
        assert np.isfinite(f.predictions[0][1]) and np.isfinite(a.predictions[0][1])
