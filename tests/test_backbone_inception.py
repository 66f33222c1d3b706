"""Inception-I3D: TF "SAME" padding, scale-free batch norm, shapes, checkpoint loading, and the real
Kinetics-400 weights classifying the two shared clips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catnet.backbones import build_backbone
from catnet.backbones.common import save_safetensors, weights_id
from catnet.backbones.i3d_inception import (
    BatchNorm3dNoScale,
    InceptionI3d,
    Unit3D,
    build_i3d_inception,
    max_pool_same,
    same_padding,
)
from catnet.errors import CatnetError
from catnet.utils.paths import read_labels
from catnet.video.clips import load_clips
from catnet.video.sampling import ClipSampling
from catnet.video.transforms import SpatialConfig


def test_same_padding_matches_tf_rule():
    # TF: out = ceil(n / s), total = max((out - 1) * s + k - n, 0), the odd pixel after.
    assert same_padding(224, 7, 2) == (2, 3)  # Conv3d_1a_7x7 spatially
    assert same_padding(64, 7, 2) == (2, 3)  # ... and in time
    assert same_padding(112, 3, 2) == (0, 1)  # MaxPool3d_2a_3x3
    assert same_padding(5, 3, 1) == (1, 1)
    assert same_padding(8, 2, 2) == (0, 0)
    assert same_padding(7, 2, 2) == (0, 1)


def test_same_conv_and_pool_against_hand_computation():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 4)
    unit = Unit3D(1, 1, kernel=(1, 1, 3), stride=(1, 1, 2), bn=False, relu=False)
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
        # windows [1, 2, 3] and [3, 4, pad 0]; PyTorch's symmetric padding would give [0+1+2, 2+3+4]
        assert unit(x).flatten().tolist() == [6.0, 7.0]
    # max-pool padding never wins: [-1, -2, -3] and [-3, -4, pad] -> -1, -3 (zero padding would give 0)
    assert max_pool_same(-x, (1, 1, 3), (1, 1, 2)).flatten().tolist() == [-1.0, -3.0]
    y = torch.arange(9.0).view(1, 1, 1, 3, 3)
    assert max_pool_same(y, (1, 3, 3), (1, 1, 1)).flatten().tolist() == [4, 5, 5, 7, 8, 8, 7, 8, 8]


def test_batchnorm_has_offset_but_no_scale():
    bn = BatchNorm3dNoScale(3)
    assert bn.weight is None and bn.eps == 1e-3
    assert set(bn.state_dict()) == {"bias", "running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(2, 3, 2, 2, 2)
    mean, var, beta = (t.view(1, 3, 1, 1, 1) for t in (bn.running_mean, bn.running_var, bn.bias))
    expected = (x - mean) / torch.sqrt(var + 1e-3) + beta
    torch.testing.assert_close(bn.eval()(x), expected)


def test_random_model_shapes_attributes_and_input_range():
    torch.manual_seed(0)
    model = build_i3d_inception(num_classes=5)
    assert (model.num_features, model.num_classes, model.labels) == (1024, 5, None)
    assert (model.default_clip_len, model.default_crop) == (64, 224)
    assert len(model.weights_id) == 12 and model.weights_id == weights_id(model)
    assert not model.training
    seen = {}
    # hooks must return None (a returned value would replace the module's input/output)
    model.conv3d_1a_7x7.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].clone()))
    model.mixed_5c.register_forward_hook(lambda m, args, out: seen.update(maps=out.shape))
    x = torch.rand(2, 3, 8, 40, 48)
    x[0] = 0.0
    x[1] = 1.0
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert seen["maps"] == (2, 1024, 1, 2, 2)  # T/8, H/32, W/32 rounded up (SAME padding)
    assert feats.shape == (2, 1024) and logits.shape == (2, 5)
    assert seen["input"][0].eq(-1).all() and seen["input"][1].eq(1).all()  # [0, 1] input is mapped to [-1, 1]
    torch.testing.assert_close(logits, model.forward_head(feats))
    headless = InceptionI3d(num_classes=0)
    assert headless.logits is None and headless.forward_head(feats) is feats
    with pytest.raises(CatnetError, match=r"\(B, 3, T, H, W\)"):
        model(torch.rand(1, 8, 32, 32))
    with pytest.raises(CatnetError, match="float clips"):
        model(torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8))


def test_pooling_and_logits_follow_deepmind_definition():
    """Logits = 2x7x7 stride-1 VALID avg-pool of Mixed_5c, 1x1x1 conv per time step, then mean over time."""
    torch.manual_seed(1)
    model = InceptionI3d(num_classes=3).eval()
    maps = torch.rand(2, 1024, 8, 7, 7)  # Mixed_5c of a 64 x 224 x 224 clip
    with torch.no_grad():
        pooled = F.avg_pool3d(maps, (2, 7, 7), stride=1)  # (2, 1024, 7, 1, 1)
        per_step = F.conv3d(pooled, model.logits.conv.weight, model.logits.conv.bias)
        expected = per_step.flatten(2).mean(-1)
        torch.testing.assert_close(model.forward_head(model.pool(maps)), expected)
        # features: inner time steps count twice as much as the two edge ones
        w = torch.tensor([1, 2, 2, 2, 2, 2, 2, 1.0]) / 14
        torch.testing.assert_close(model.pool(maps), (maps.mean((3, 4)) * w).sum(-1))
        # clips smaller than 16 x 224^2: the window shrinks to what is left
        small = torch.rand(1, 1024, 1, 2, 2)
        torch.testing.assert_close(model.pool(small), small.mean((2, 3, 4)))


def test_checkpoint_loading_and_errors(tmp_path, monkeypatch):
    torch.manual_seed(2)
    model = InceptionI3d(num_classes=4)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    loaded = build_i3d_inception(checkpoint=tmp_path / "m.pt")
    assert loaded.num_classes == 4 and loaded.weights_id == weights_id(model)
    assert (loaded.labels, loaded.weights_source) == (None, "checkpoint:m.pt")
    assert build_i3d_inception(checkpoint=tmp_path / "m.pt", num_classes=0).logits is None
    # safetensors with class names in the metadata, as `catnet finetune-backbone` saves them
    save_safetensors(model.state_dict(), tmp_path / "m.safetensors", {"labels": ["a", "b", "c", "d"]})
    named = build_i3d_inception(checkpoint=tmp_path / "m.safetensors")
    assert named.labels == ["a", "b", "c", "d"] and named.weights_id == loaded.weights_id
    assert build_i3d_inception(checkpoint=tmp_path / "m.safetensors", num_classes=2).labels is None

    with pytest.raises(CatnetError, match="checkpoint not found"):
        build_i3d_inception(checkpoint=tmp_path / "nope.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CatnetError, match="does not fit i3d_inception: missing"):
        build_i3d_inception(checkpoint=tmp_path / "other.pt")
    torch.save({"w": torch.zeros(1), "f": print}, tmp_path / "pickled.pt")  # needs a full unpickle
    with pytest.warns(UserWarning), pytest.raises(CatnetError, match="state dict of tensors"):
        build_i3d_inception(checkpoint=tmp_path / "pickled.pt")
    with pytest.raises(CatnetError, match="unknown option"):
        build_i3d_inception(depth=50)

    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(CatnetError, match="run `catnet weights fetch`"):
        build_i3d_inception(pretrained=True)


# ---------------------------------------------------------------------------------------------------------
# The real DeepMind weights


@pytest.fixture(scope="module")
def kinetics_i3d(pretrained_i3d):
    return build_backbone("i3d_inception", pretrained=True)


@pytest.mark.pretrained
def test_pretrained_attributes(kinetics_i3d, pretrained_i3d):
    m = kinetics_i3d
    assert (m.num_features, m.num_classes, m.default_clip_len, m.default_crop) == (1024, 400, 64, 224)
    assert m.labels == read_labels("kinetics400_deepmind_order.txt") and len(m.labels) == 400
    assert m.weights_id == weights_id(m) and m.weights_source == "deepmind-kinetics400"
    fresh_head = build_i3d_inception(pretrained=True, num_classes=10)
    assert fresh_head.labels is None and fresh_head.logits.conv.weight.shape[0] == 10
    assert torch.equal(fresh_head.mixed_5c.b3.conv.weight, m.mixed_5c.b3.conv.weight)


@pytest.mark.pretrained
@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("clip,label", [("v_CricketShot_g04_c01_rgb.gif", "playing cricket"),
                                        ("arm_wrestling_demo.mp4", "arm wrestling")])
def test_pretrained_recognises_shared_clips(kinetics_i3d, shared_dir, clip, label):
    # decode -> one 64-frame clip at stride 1 -> short side 256 -> centre 224 crop, per the video contract
    sampling = ClipSampling(num_clips=1, clip_len=kinetics_i3d.default_clip_len, stride=1)
    spatial = SpatialConfig(short_side=256, crop=kinetics_i3d.default_crop, num_crops=1)
    x = load_clips(shared_dir / "data" / "clips" / clip, sampling, spatial).views
    assert x.shape == (1, 3, 64, 224, 224)
    with torch.no_grad():
        feats = kinetics_i3d.forward_features(x)
        logits = kinetics_i3d.forward_head(feats)
    assert feats.shape == (1, 1024) and torch.isfinite(feats).all()
    probs = logits.softmax(-1)[0]
    assert kinetics_i3d.labels[int(probs.argmax())] == label
    assert probs.max() > 0.5


def test_onnx_export_matches_eager(tmp_path):
    """The dynamic SAME padding (-inf for pools) and the pooling window export as ONNX, dynamic batch."""
    import onnxruntime as ort

    from catnet.inference.export import export_backbone

    torch.manual_seed(3)
    model = build_i3d_inception(num_classes=0)
    path = export_backbone(model, "onnx", tmp_path / "i3d.onnx", frames=4, size=32)
    x = torch.rand(2, 3, 4, 32, 32)
    got = ort.InferenceSession(str(path)).run(None, {"video": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model.forward_features(x), rtol=1e-4, atol=1e-4)
