"""i3d_r50: architecture, the backbone contract, PyTorchVideo equivalence, inflation, inference helpers."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from catnet.backbones import build_backbone, list_backbones
from catnet.backbones.common import KINETICS_MEAN, KINETICS_STD, optimize_for_inference
from catnet.backbones.i3d_resnet import I3DResNet, I3DResNetConfig
from catnet.errors import CatnetError

# PyTorchVideo's hub i3d_r50 = create_resnet with these settings (pytorchvideo/models/hub/resnet.py).
PTV_I3D_R50 = dict(
    stem_conv_kernel_size=(5, 7, 7),
    stage1_pool=nn.MaxPool3d,
    stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)],
                              [(1, 1, 1), (3, 1, 1)]),
)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random BN affine + statistics and classifier (convs keep their random init), so that a wrong
    mapping of any tensor changes the output; cheap, as only the small tensors are drawn."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point() or name.startswith("normalize.") or t.dim() > 2:
                continue
            if name.endswith(("running_var", "weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


@pytest.fixture(scope="module")
def model() -> I3DResNet:
    torch.manual_seed(0)
    return randomize_(build_backbone("i3d_r50"), 1)


def test_registry_lists_both_backbones_and_rejects_unknown():
    assert {"i3d_r50", "i3d_inception"} <= set(list_backbones())
    with pytest.raises(CatnetError, match="unknown backbone"):
        build_backbone("resnet9000")
    with pytest.raises(CatnetError, match="unknown option"):
        build_backbone("i3d_r50", depth_multiplier=2)


def test_contract_attributes_and_features(model):
    assert (model.num_features, model.num_classes, model.labels) == (2048, 0, None)
    assert (model.default_clip_len, model.default_crop) == (32, 224)
    assert len(model.weights_id) == 12 and int(model.weights_id, 16) >= 0  # short hex hash
    x = torch.rand(2, 3, 4, 64, 32)
    with torch.inference_mode():
        feats = model(x)  # no classifier: forward gives the features
        fmap = model.forward_map(x[1:])
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert fmap.shape == (1, 2048, 2, 2, 1)  # time halved once (pool2), space / 32
    assert_close(fmap.mean(dim=(2, 3, 4)), feats[1:])  # pooled map; eval mode is batch-independent
    assert feats.std(0).mean() > 0  # clips give different features


def test_res5_is_16x7x7_for_32x224_and_mmaction2_strides():
    x = torch.empty(1, 3, 32, 224, 224, device="meta")
    with torch.device("meta"):  # shapes only: no memory, no compute
        assert I3DResNet().forward_map(x).shape == (1, 2048, 16, 7, 7)
        mm = I3DResNet(I3DResNetConfig(stem_stride_t=2, pool1_stride_t=2))
        assert mm.forward_map(x).shape == (1, 2048, 4, 7, 7)
    m = I3DResNet()
    kernels = [[b.conv1.kernel_size[0] for b in getattr(m, f"layer{i}")] for i in range(1, 5)]
    assert kernels == [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]]
    assert m.conv1.kernel_size == (5, 7, 7) and m.conv1.stride == (1, 2, 2)
    assert m.maxpool.kernel_size == (1, 3, 3) and m.maxpool.stride == (1, 2, 2)
    # the spatial stride sits on the 1x3x3 conv, never on the temporal 1x1 one
    assert m.layer2[0].conv2.stride == (1, 2, 2) and m.layer2[0].conv1.stride == (1, 1, 1)
    assert sum(p.numel() for p in m.parameters()) == 27_223_872  # as PyTorchVideo i3d_r50 without its head


def test_classifier_labels_seed_and_bad_input():
    a = build_backbone("i3d_r50", num_classes=3, labels=["a", "b", "c"], seed=7)
    b = build_backbone("i3d_r50", num_classes=3, seed=7)
    assert a.weights_id == b.weights_id != build_backbone("i3d_r50", num_classes=3, seed=8).weights_id
    assert a.labels == ["a", "b", "c"] and a.num_classes == 3
    with torch.inference_mode():
        assert a(torch.rand(2, 3, 4, 32, 32)).shape == (2, 3)
    with pytest.raises(CatnetError, match="labels"):
        build_backbone("i3d_r50", num_classes=2, labels=["x"])
    for bad, msg in ((torch.rand(1, 8, 3, 32, 32), "shape"), (torch.rand(3, 8, 32, 32), "shape"),
                     (torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8), "float"),
                     (torch.rand(1, 3, 1, 32, 32), "at least 2 frames")):
        with pytest.raises(CatnetError, match=msg):
            a.forward_features(bad)
    with pytest.raises(CatnetError, match="variant"):
        build_backbone("i3d_r50", variant="caffe2")
    with pytest.raises(CatnetError, match="pretrained=True or a checkpoint"):
        build_backbone("i3d_r50", pretrained=True, checkpoint="x.pt")


def test_pretrained_without_converted_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CATNET_HOME", str(tmp_path))
    with pytest.raises(CatnetError, match="no converted i3d_r50 weights"):
        build_backbone("i3d_r50", pretrained=True)


def _import_pytorchvideo_resnet():
    """pytorchvideo's create_resnet, with inert stand-ins for the two imports it needs but we lack.

    models/head.py imports torchvision.ops.RoIAlign (detection heads only) and models/weight_init.py
    imports fvcore's init helpers; neither runs here (all weights are overwritten), and torchvision
    cannot be installed in this environment.
    """
    pytest.importorskip("pytorchvideo", reason="pip install --no-deps pytorchvideo==0.1.5")
    stubs = {"torchvision": {}, "torchvision.ops": {"RoIAlign": object}, "fvcore": {}, "fvcore.nn": {},
             "fvcore.nn.weight_init": {"c2_msra_fill": lambda m: None, "c2_xavier_fill": lambda m: None}}
    with pytest.MonkeyPatch.context() as mp:
        for name, attrs in stubs.items():
            if name not in sys.modules:
                mod = types.ModuleType(name)
                mod.__dict__.update(attrs)
                mp.setitem(sys.modules, name, mod)
        from pytorchvideo.models.resnet import create_resnet
    return create_resnet


def test_pytorchvideo_i3d_r50_checkpoint_gives_the_same_outputs(tmp_path):
    """Gold standard: PyTorchVideo's own i3d_r50 on random weights vs. our import of its checkpoint."""
    create_resnet = _import_pytorchvideo_resnet()
    # head pool = the whole res5 map of a 4 x 64 x 32 clip, as (4, 7, 7) is for the released 8 x 224 x 224
    ptv = create_resnet(**PTV_I3D_R50, model_num_class=5, head_pool_kernel_size=(2, 2, 1), dropout_rate=0.0)
    randomize_(ptv, 2).eval()
    assert "blocks.6.proj.weight" in ptv.state_dict() and "blocks.1.res_blocks.0.branch2.conv_a.weight" in \
        ptv.state_dict()
    path = tmp_path / "I3D_8x8_R50.pyth"
    torch.save({"model_state": ptv.state_dict(), "epoch": 3}, path)  # the released .pyth layout

    ours = build_backbone("i3d_r50", checkpoint=path)
    assert ours.weights_source.startswith("pytorchvideo") and ours.num_classes == 5
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ptv.parameters())
    x = torch.rand(2, 3, 4, 64, 32)
    mean, std = torch.tensor(KINETICS_MEAN), torch.tensor(KINETICS_STD)
    xn = (x - mean.view(1, 3, 1, 1, 1)) / std.view(1, 3, 1, 1, 1)
    with torch.inference_mode():
        want_map = xn
        for block in ptv.blocks[:-1]:
            want_map = block(want_map)
        assert_close(ours.forward_map(x), want_map)
        assert_close(ours(x), ptv(xn))


def test_imagenet_inflation_from_torchvision_layout(tmp_path):
    ref = I3DResNet()
    g = torch.Generator().manual_seed(0)
    sd2d = {}
    for k, v in ref.state_dict().items():
        if k.startswith("normalize."):
            continue
        shape = v.shape[:2] + v.shape[3:] if v.dim() == 5 else v.shape
        sd2d[k] = torch.rand(shape, generator=g) + 0.1 if v.is_floating_point() else v.clone()
    sd2d["fc.weight"], sd2d["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    # our names are torchvision's / timm's resnet50 names (facts of those libraries)
    tv_names = {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias"}
    assert tv_names <= set(sd2d)
    del sd2d["bn1.num_batches_tracked"]  # timm checkpoints omit these
    path = tmp_path / "resnet50.pth"
    torch.save(sd2d, path)

    m = build_backbone("i3d_r50", checkpoint=path)
    assert m.weights_source.startswith("resnet2d") and m.num_classes == 0
    w3, w2 = m.layer1[0].conv1.weight, sd2d["layer1.0.conv1.weight"]
    assert w3.shape[2] == 3 and torch.allclose(w3, w2.unsqueeze(2).expand_as(w3) / 3)
    assert torch.allclose(m.conv1.weight.sum(2), sd2d["conv1.weight"], atol=1e-6)
    assert torch.equal(m.layer3[5].bn2.running_var, sd2d["layer3.5.bn2.running_var"])
    assert torch.allclose(m.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    # a static clip gets the 2-D response in frames the temporal padding does not reach
    frame = torch.rand(1, 3, 32, 32)
    clip = frame.unsqueeze(2).expand(1, 3, 9, 32, 32)
    with torch.no_grad():
        y3 = m.conv1(clip)[:, :, 2:-2]
        y2 = F.conv2d(frame, sd2d["conv1.weight"], stride=2, padding=3)
    assert_close(y3, y2.unsqueeze(2).expand_as(y3))


def test_optimize_for_inference_keeps_outputs_and_weights_id(model):
    x = torch.rand(1, 3, 4, 32, 32)
    with torch.inference_mode():
        want = model(x)
    fast = optimize_for_inference(copy.deepcopy(model))
    assert not any(isinstance(mod, nn.BatchNorm3d) for mod in fast.modules())  # every BN folded
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert fast.weights_id == model.weights_id
    with torch.inference_mode():
        assert_close(fast(x), want, rel=1e-3)


def test_bf16_autocast_forward_on_cpu(model):
    x = torch.rand(1, 3, 4, 32, 32)
    amp = copy.deepcopy(model)
    amp._amp_dtype = torch.bfloat16
    with torch.inference_mode():
        want, got = model(x), amp(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert F.cosine_similarity(got, want).item() > 0.98
    with pytest.raises(CatnetError, match="autocast dtype"):
        build_backbone("i3d_r50", amp_dtype="int8")


def test_overriding_only_the_mean_keeps_the_checkpoints_std(tmp_path):
    from catnet.backbones.i3d_resnet import i3d_r50, save_weights

    path = save_weights(i3d_r50(mean=(0.45,) * 3, std=(0.225,) * 3, seed=0), tmp_path / "r50.safetensors")
    r = i3d_r50(checkpoint=path, mean=(0.5, 0.5, 0.5))
    assert r.normalize.mean.flatten().tolist() == [0.5] * 3
    assert r.normalize.std.flatten().tolist() == pytest.approx([0.225] * 3)
    assert r.config.std == pytest.approx((0.225,) * 3)


def test_reset_classifier_keeps_the_models_dtype():
    from catnet.heads import build_head

    head = build_head("catnet", in_dim=8, num_classes=3, num_heads=2).double()
    head.reset_classifier(5)
    assert head.classifier.weight.dtype == torch.float64
    assert head(torch.randn(2, 4, 8, dtype=torch.float64)).shape == (2, 5)
    backbone = build_backbone("i3d_r50", num_classes=4).double()
    backbone.reset_classifier(6)
    assert backbone.fc.weight.dtype == torch.float64
