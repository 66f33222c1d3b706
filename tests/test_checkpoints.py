"""Checkpoint import: MMAction2 / PySlowFast layouts, safe loading, catnet's own format, clear errors.

MMAction2 and PySlowFast cannot be installed here, so their I3D ResNet-50 is re-stated below as a plain
functional forward over a state dict in *their* parameter names, written from their published code
(mmaction/models/backbones/resnet3d.py + heads/i3d_head.py; slowfast/models/{stem,resnet,head}_helper.py
+ video_model_builder.py with MODEL.ARCH i3d). Our import of that state dict must compute the same.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from catnet.backbones import build_backbone
from catnet.backbones.common import load_checkpoint_file, read_safetensors_metadata
from catnet.backbones.i3d_resnet import convert_checkpoint, save_weights
from catnet.backbones.i3d_resnet_formats import detect_format, import_weights
from catnet.errors import CatnetError

STAGES = (3, 4, 6, 3)
I3D_KT = ((3, 3, 3), (3, 1, 3, 1), (3, 1, 3, 1, 3, 1), (1, 3, 1))  # temporal kernel of each block's conv a

# Source names: stem (conv, bn), block i,j -> (a, a_bn, b, b_bn, c, c_bn, shortcut, shortcut_bn), classifier.
MMACTION2 = dict(
    stem=("backbone.conv1.conv", "backbone.conv1.bn"),
    block=lambda i, j: tuple(f"backbone.layer{i + 1}.{j}.{n}" for n in (
        "conv1.conv", "conv1.bn", "conv2.conv", "conv2.bn", "conv3.conv", "conv3.bn",
        "downsample.conv", "downsample.bn")),
    fc="cls_head.fc_cls",
)
SLOWFAST = dict(
    stem=("s1.pathway0_stem.conv", "s1.pathway0_stem.bn"),
    block=lambda i, j: tuple(f"s{i + 2}.pathway0_res{j}.{n}" for n in (
        "branch2.a", "branch2.a_bn", "branch2.b", "branch2.b_bn", "branch2.c", "branch2.c_bn",
        "branch1", "branch1_bn")),
    fc="head.projection",
)


def source_state_dict(names: dict, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Random I3D-R50 weights under a codebase's names and shapes (BN stats random too)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: tuple[int, int, int]) -> None:
        fan_in = cin * k[0] * k[1] * k[2]
        sd[f"{name}.weight"] = torch.randn(cout, cin, *k, generator=g) * (2.0 / fan_in) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = torch.rand(c, generator=g) * 0.5 + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) * 0.5 + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv(names["stem"][0], 64, 3, (5, 7, 7))
    bn(names["stem"][1], 64)
    cin = 64
    for i, n in enumerate(STAGES):
        width = 64 * 2**i
        for j in range(n):
            a, a_bn, b, b_bn, c, c_bn, sc, sc_bn = names["block"](i, j)
            conv(a, width, cin, (I3D_KT[i][j], 1, 1))
            bn(a_bn, width)
            conv(b, width, width, (1, 3, 3))
            bn(b_bn, width)
            conv(c, width * 4, width, (1, 1, 1))
            bn(c_bn, width * 4)
            if j == 0:
                conv(sc, width * 4, cin, (1, 1, 1))
                bn(sc_bn, width * 4)
            cin = width * 4
    sd[f"{names['fc']}.weight"] = torch.randn(num_classes, 2048, generator=g) * 0.05
    sd[f"{names['fc']}.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return sd


def reference_forward(sd: dict[str, torch.Tensor], names: dict, x: torch.Tensor, stem_stride_t: int,
                      pool1_stride_t: int) -> torch.Tensor:
    """The source network, functionally: conv1 (kt//2, 3, 3)-padded, pool1 1x3x3 pad (0, 1, 1), stride on
    the 1x3x3 conv and on the projection shortcut, 2x1x1 max-pool after res2, global average + fc."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    def conv(t: torch.Tensor, p: str, stride=1, padding=0) -> torch.Tensor:
        return F.conv3d(t, sd[f"{p}.weight"], stride=stride, padding=padding)

    stem, stem_bn = names["stem"]
    kt = sd[f"{stem}.weight"].shape[2]
    x = F.relu(bn(conv(x, stem, (stem_stride_t, 2, 2), (kt // 2, 3, 3)), stem_bn))
    x = F.max_pool3d(x, (1, 3, 3), (pool1_stride_t, 2, 2), (0, 1, 1))
    for i, n in enumerate(STAGES):
        for j in range(n):
            a, a_bn, b, b_bn, c, c_bn, sc, sc_bn = names["block"](i, j)
            s = 2 if i > 0 and j == 0 else 1
            kt = sd[f"{a}.weight"].shape[2]
            out = F.relu(bn(conv(x, a, 1, (kt // 2, 0, 0)), a_bn))
            out = F.relu(bn(conv(out, b, (1, s, s), (0, 1, 1)), b_bn))
            out = bn(conv(out, c), c_bn)
            shortcut = bn(conv(x, sc, (1, s, s)), sc_bn) if f"{sc}.weight" in sd else x
            x = F.relu(out + shortcut)
        if i == 0:
            x = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))
    return F.linear(x.mean(dim=(2, 3, 4)), sd[f"{names['fc']}.weight"], sd[f"{names['fc']}.bias"])


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)


def test_mmaction2_checkpoint_matches_its_reference_forward(tmp_path):
    sd = source_state_dict(MMACTION2, num_classes=4, seed=0)
    path = tmp_path / "i3d_mmaction2.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": sd}, path)
    model = build_backbone("i3d_r50", checkpoint=path)
    assert model.weights_source.startswith("mmaction2") and model.num_classes == 4
    assert (model.conv1.stride[0], model.maxpool.stride[0]) == (2, 2)  # MMAction2's temporal strides
    x = torch.rand(2, 3, 10, 64, 32)
    # MMAction2 normalises [0, 255] pixels with ImageNet statistics on that scale
    mm = _normalize(x * 255, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    with torch.inference_mode():
        assert_close(model(x), reference_forward(sd, MMACTION2, mm, stem_stride_t=2, pool1_stride_t=2))


def test_mmaction2_config_in_checkpoint_meta_sets_the_strides(tmp_path):
    sd = source_state_dict(MMACTION2, num_classes=400, seed=1)
    path = tmp_path / "i3d.pth"
    config = "model = dict(backbone=dict(type='ResNet3d', conv1_stride_t=1, pool1_stride_t=1, depth=50))"
    torch.save({"meta": {"config": config}, "state_dict": sd}, path)
    model = build_backbone("i3d_r50", checkpoint=path)
    assert (model.conv1.stride[0], model.maxpool.stride[0]) == (1, 1)
    assert model.num_classes == 400 and len(model.labels) == 400 and model.labels[0] == "abseiling"
    x = torch.rand(1, 3, 4, 32, 32)
    mm = _normalize(x * 255, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    with torch.inference_mode():
        assert_close(model(x), reference_forward(sd, MMACTION2, mm, stem_stride_t=1, pool1_stride_t=1))


def test_slowfast_checkpoint_matches_its_reference_forward(tmp_path):
    sd = source_state_dict(SLOWFAST, num_classes=3, seed=2)
    path = tmp_path / "I3D_8x8_R50.pyth"
    cfg = "MODEL:\n  ARCH: i3d\n  NUM_CLASSES: 3\nRESNET:\n  DEPTH: 50\n"  # PySlowFast saves cfg.dump()
    torch.save({"epoch": 196, "model_state": sd, "optimizer_state": {}, "cfg": cfg}, path)
    assert import_weights(path).format == "slowfast"
    model = build_backbone("i3d_r50", checkpoint=path)
    x = torch.rand(2, 3, 4, 64, 32)
    sf = _normalize(x, (0.45,) * 3, (0.225,) * 3)
    with torch.inference_mode():
        # PySlowFast's head softmaxes in eval mode; the logits before it are what we return
        assert_close(model(x), reference_forward(sd, SLOWFAST, sf, stem_stride_t=1, pool1_stride_t=1))


def test_slowfast_rejects_non_local_and_two_pathway_weights(tmp_path):
    sd = source_state_dict(SLOWFAST, num_classes=3, seed=3)
    nl = dict(sd, **{"s3.pathway0_nonlocal1.conv_theta.weight": torch.zeros(256, 512, 1, 1, 1)})
    torch.save({"model_state": nl}, tmp_path / "nl.pyth")
    with pytest.raises(CatnetError, match="no place for.*nonlocal"):
        build_backbone("i3d_r50", checkpoint=tmp_path / "nl.pyth")
    with pytest.raises(CatnetError, match="two-pathway"):
        detect_format({"s1.pathway0_stem.conv.weight": torch.zeros(1),
                       "s1.pathway1_stem.conv.weight": torch.zeros(1)})


_side_effects: list[str] = []


def _record(tag: str) -> str:
    _side_effects.append(tag)
    return tag


class _Payload:
    """Pickles as a call to `_record`: a full-pickle load would run it."""

    def __reduce__(self) -> tuple[Callable, tuple]:
        return _record, ("ran",)


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "ckpt.pt"
    weights = {"w": torch.arange(6.0).view(2, 3)}
    torch.save({"state_dict": weights, "logger": _Payload()}, path)
    with pytest.warns(UserWarning, match="ignored non-tensor"):
        obj = load_checkpoint_file(path)
    assert _side_effects == []  # the payload was never called
    assert torch.equal(obj["state_dict"]["w"], weights["w"])
    assert type(obj["logger"]).__module__ == "catnet.opaque"

    raw = tmp_path / "raw.pkl"  # a plain pickle (e.g. a Caffe2 blob file) is refused, not unpickled
    raw.write_bytes(pickle.dumps({"w": _Payload()}, protocol=2))
    with pytest.raises(CatnetError, match="weights-only|cannot read"):
        load_checkpoint_file(raw)
    assert _side_effects == []


def test_bad_files_and_layouts_are_one_line_errors(tmp_path):
    with pytest.raises(CatnetError, match="not found"):
        build_backbone("i3d_r50", checkpoint=tmp_path / "missing.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CatnetError, match="cannot read safetensors"):
        build_backbone("i3d_r50", checkpoint=tmp_path / "junk.safetensors")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CatnetError, match="unrecognised checkpoint layout"):
        build_backbone("i3d_r50", checkpoint=tmp_path / "other.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CatnetError, match="state dict of tensors"):
        build_backbone("i3d_r50", checkpoint=tmp_path / "empty.pth")


def test_catnet_safetensors_round_trip_keeps_weights_config_and_labels(tmp_path):
    sd = source_state_dict(MMACTION2, num_classes=2, seed=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "mm.pth")  # DDP prefix
    src = build_backbone("i3d_r50", checkpoint=tmp_path / "mm.pth", labels=["open", "close"])
    out = save_weights(src, tmp_path / "i3d_r50.safetensors")
    back = build_backbone("i3d_r50", checkpoint=out)
    assert back.weights_source.startswith("catnet") and back.weights_id == src.weights_id
    assert back.labels == ["open", "close"] and back.conv1.stride[0] == 2  # config travels in metadata
    assert torch.equal(back.normalize.std, src.normalize.std)
    x = torch.rand(1, 3, 6, 32, 32)
    with torch.inference_mode():
        assert torch.equal(back(x), src(x))
    meta = read_safetensors_metadata(out)
    assert meta["catnet_backbone"] == "i3d_r50" and json.loads(meta["labels"]) == ["open", "close"]


def test_num_classes_option_swaps_or_drops_the_classifier(tmp_path, monkeypatch):
    sd = source_state_dict(SLOWFAST, num_classes=5, seed=5)
    torch.save({"model_state": sd}, tmp_path / "sf.pyth")
    full = build_backbone("i3d_r50", checkpoint=tmp_path / "sf.pyth")
    trunk = build_backbone("i3d_r50", checkpoint=tmp_path / "sf.pyth", num_classes=0)
    fresh = build_backbone("i3d_r50", checkpoint=tmp_path / "sf.pyth", num_classes=7)
    x = torch.rand(1, 3, 4, 32, 32)
    with torch.inference_mode():
        assert torch.equal(trunk(x), full.forward_features(x))
        assert fresh(x).shape == (1, 7) and fresh.labels is None
    # convert_checkpoint writes what pretrained=True loads
    monkeypatch.setenv("CATNET_HOME", str(tmp_path / "home"))
    from catnet.backbones.i3d_resnet import pretrained_path

    convert_checkpoint(tmp_path / "sf.pyth", pretrained_path())
    assert build_backbone("i3d_r50", pretrained=True).weights_id == full.weights_id
