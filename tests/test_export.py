"""Exported heads and backbones compute what the eager modules compute, for other batch/clip counts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_predict import shared_tiny_run

from catnet.cli import main
from catnet.errors import CatnetError
from catnet.heads import build_head
from catnet.inference.export import export_head

D, C = 16, 5

# torch.jit is deprecated upstream but is the TorchScript format this verb promises.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")


@pytest.fixture
def tiny_run():
    return shared_tiny_run()


def _run_exported(path, fmt, x: torch.Tensor) -> list[np.ndarray]:
    if fmt == "onnx":
        name = ort.InferenceSession(str(path)).get_inputs()[0].name
        return ort.InferenceSession(str(path)).run(None, {name: x.numpy()})
    with torch.no_grad():
        out = torch.jit.load(str(path))(x)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name,options", [("catnet", {"num_heads": 4}), ("avgpool", {}),
                                          ("netvlad", {"num_clusters": 4})])
def test_head_export_matches_eager_with_other_batch_and_clips(tmp_path, fmt, name, options):
    torch.manual_seed(0)
    head = build_head(name, in_dim=D, num_classes=C, **options)
    path = export_head(head, fmt, tmp_path / f"head.{fmt}", classes=list("abcde"), example_clips=6)
    assert not head.training, "exported head must be left in eval mode (dropout off)"
    for b, k in [(3, 9), (1, 2)]:  # the example was (2, 6)
        x = torch.randn(b, k, D)
        with torch.no_grad():
            ref = head.forward_attention(x)
        got = _run_exported(path, fmt, x)
        np.testing.assert_allclose(got[0], ref["logits"].numpy(), atol=1e-4, rtol=0)
        if ref["alpha"] is None:
            assert len(got) == 1
        else:
            assert got[1].shape == (b, 4, k)
            np.testing.assert_allclose(got[1], ref["alpha"].numpy(), atol=1e-4, rtol=0)


def test_onnx_carries_classes_and_io_names(tmp_path):
    head = build_head("catnet", in_dim=D, num_classes=C, num_heads=2)
    path = export_head(head, "onnx", tmp_path / "h.onnx", classes=list("vwxyz"))
    model = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["catnet"])
    assert meta == {"inputs": ["features"], "outputs": ["logits", "alpha"], "classes": list("vwxyz")}
    assert [i.name for i in model.graph.input] == ["features"]


def test_unknown_format_is_a_clear_error(tmp_path):
    head = build_head("avgpool", in_dim=D, num_classes=C)
    with pytest.raises(CatnetError, match="unknown export format"):
        export_head(head, "tflite", tmp_path / "h.bin")
    assert not (tmp_path / "h.bin").exists()


def test_cli_exports_a_runs_head_equal_to_eager_on_its_store(tiny_run, tmp_path, capsys):
    from catnet.engine.runs import load_run
    from catnet.features import FeatureStore

    out = tmp_path / "head.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    head, info = load_run(tiny_run)
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["catnet"])
    assert meta["classes"] == info["classes"]
    store = FeatureStore(tiny_run.parent / "store")
    x = torch.from_numpy(np.stack([store[i].features for i in range(2)])).float()  # B=2, K=9 views
    with torch.no_grad():
        ref = head.forward_attention(x)
    got = _run_exported(out, "onnx", x)
    np.testing.assert_allclose(got[0], ref["logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], ref["alpha"].numpy(), atol=1e-4, rtol=0)


def test_cli_exports_the_runs_backbone_a_tiny_random_i3d_r50(tiny_run, tmp_path):
    """--part backbone rebuilds the run's i3d_r50 (random, 4 frames x 32 px) and exports it, dynamic B."""
    from catnet.inference.predict import Predictor

    out = tmp_path / "backbone.onnx"
    assert main(["export", str(tiny_run), "--part", "backbone", "--format", "onnx", "--out", str(out)]) == 0
    backbone = Predictor.from_run(tiny_run).backbone
    x = torch.rand(3, 3, 4, 32, 32)  # exported with batch 1
    with torch.no_grad():
        ref = backbone.forward_features(x).numpy()
    got = _run_exported(out, "onnx", x)
    assert got[0].shape == (3, backbone.num_features)
    np.testing.assert_allclose(got[0], ref, atol=1e-4, rtol=0)


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "not a catnet run" in capsys.readouterr().err
