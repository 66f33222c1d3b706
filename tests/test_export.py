"""Exported heads and backbones compute what the eager modules compute, for other batch/clip counts.

One export per head and format, then two (B, K) that differ from the example's (2, 6): onnxruntime
for ONNX (the dynamo-based exporter), `torch.export.load` for .pt2, `torch.jit.load` for TorchScript.
"""

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
from catnet.inference.export import ScanLSTM, export_head, exportable, read_metadata

D, C = 16, 5
HEADS = [("catnet", {"num_heads": 4}), ("local", {"num_heads": 4, "fc_norm": False}), ("avgpool", {}),
         ("attention_clusters", {"num_heads": 4}), ("netvlad", {"num_clusters": 4}),
         ("lstm", {"hidden_size": 8}), ("lstm", {"hidden_size": 8, "pooling": "mean", "num_layers": 2})]
HEAD_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(HEADS)]
SIZES = [(3, 9), (1, 2)]  # the example was (2, 6): more and fewer clips, a batch of one

# torch.jit is deprecated upstream; its format is still offered (marked deprecated).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")


@pytest.fixture
def tiny_run():
    return shared_tiny_run()


def _run_exported(path, fmt, x: torch.Tensor) -> list[np.ndarray]:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        model = torch.export.load(str(path)).module() if fmt == "pt2" else torch.jit.load(str(path))
        out = model(x)
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
@pytest.mark.parametrize("name,options", HEADS, ids=HEAD_IDS)
def test_head_export_matches_eager_with_other_batch_and_clips(tmp_path, fmt, name, options):
    torch.manual_seed(0)
    head = build_head(name, in_dim=D, num_classes=C, **options)
    path = export_head(head, fmt, tmp_path / f"head.{fmt}", classes=list("abcde"), example_clips=6)
    assert not head.training, "exported head must be left in eval mode (dropout off)"
    assert read_metadata(path)["classes"] == list("abcde")
    for b, k in SIZES:
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


def test_scan_lstm_equals_nn_lstm_in_eager():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 7, num_layers=2, batch_first=True).eval()
    x, h0 = torch.randn(3, 11, 5), torch.randn(2, 3, 7)
    c0 = torch.randn(2, 3, 7)
    with torch.no_grad():
        want, (wh, wc) = lstm(x, (h0, c0))
        got, (gh, gc) = ScanLSTM(lstm)(x, (h0, c0))
    for g, w in ((got, want), (gh, wh), (gc, wc)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_exportable_swaps_lstms_in_a_copy_only():
    head = build_head("lstm", in_dim=D, num_classes=C, hidden_size=8)
    copy = exportable(head)
    assert isinstance(head.lstm, torch.nn.LSTM) and isinstance(copy.lstm, ScanLSTM)
    other = build_head("catnet", in_dim=D, num_classes=C, num_heads=2)
    assert exportable(other) is other  # nothing to swap: no copy


def test_onnx_carries_classes_io_names_and_named_axes(tmp_path):
    head = build_head("catnet", in_dim=D, num_classes=C, num_heads=2)
    path = export_head(head, "onnx", tmp_path / "h.onnx", classes=list("vwxyz"))
    model = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["catnet"])
    assert meta == {"inputs": ["features"], "outputs": ["logits", "alpha"], "classes": list("vwxyz")}
    assert [i.name for i in model.graph.input] == ["features"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "clips", D]


def test_pt2_carries_classes_as_an_extra_file(tmp_path):
    head = build_head("avgpool", in_dim=D, num_classes=C)
    path = export_head(head, "pt2", tmp_path / "h.pt2", classes=list("vwxyz"))
    extra = {"catnet.json": ""}
    torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["catnet.json"])["classes"] == list("vwxyz")


@pytest.mark.parametrize("call,match", [
    (lambda head, out: export_head(head, "tflite", out), "unknown export format"),
    (lambda head, out: export_head(head, "pt2", out, example_clips=1), "example_clips"),
])
def test_refused_exports_are_clear_and_write_nothing(tmp_path, call, match):
    head = build_head("avgpool", in_dim=D, num_classes=C)
    with pytest.raises(CatnetError, match=match):
        call(head, tmp_path / "h.bin")
    assert not (tmp_path / "h.bin").exists()


def test_read_metadata_of_a_foreign_file_is_one_line(tmp_path):
    bad = tmp_path / "x.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CatnetError, match="not a file written by catnet export"):
        read_metadata(bad)


def test_cli_exports_a_runs_head_equal_to_eager_on_its_store(tiny_run, tmp_path, capsys):
    from catnet.engine.runs import load_run
    from catnet.features import FeatureStore

    out = tmp_path / "head.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    head, info = load_run(tiny_run)
    assert read_metadata(out)["classes"] == info["classes"]
    store = FeatureStore(tiny_run.parent / "store")
    x = torch.from_numpy(np.stack([store[i].features for i in range(2)])).float()  # B=2, K=9 views
    with torch.no_grad():
        ref = head.forward_attention(x)
    got = _run_exported(out, "onnx", x)
    np.testing.assert_allclose(got[0], ref["logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], ref["alpha"].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_cli_exports_the_runs_backbone_a_tiny_random_i3d_r50(tiny_run, tmp_path, fmt):
    """--part backbone rebuilds the run's i3d_r50 (random, 4 frames x 32 px) and exports it, dynamic B."""
    from catnet.inference.predict import Predictor

    out = tmp_path / f"backbone.{fmt}"
    assert main(["export", str(tiny_run), "--part", "backbone", "--format", fmt, "--out", str(out)]) == 0
    backbone = Predictor.from_run(tiny_run, profile="accurate").backbone
    for b in (3, 1):  # exported with batch 2
        x = torch.rand(b, 3, 4, 32, 32)
        with torch.no_grad():
            ref = backbone.forward_features(x).numpy()
        got = _run_exported(out, fmt, x)
        assert got[0].shape == (b, backbone.num_features)
        np.testing.assert_allclose(got[0], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flag", ["--frames", "--size"])
def test_cli_refuses_a_zero_backbone_example(tiny_run, tmp_path, capsys, flag):
    out = tmp_path / "backbone.onnx"
    argv = ["export", str(tiny_run), "--part", "backbone", "--format", "onnx", "--out", str(out), flag, "0"]
    assert main(argv) == 2
    assert "--frames and --size must be >= 1" in capsys.readouterr().err and not out.exists()


def test_cli_torchscript_is_marked_deprecated(tiny_run, tmp_path, capsys):
    out = tmp_path / "head.pt"
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "deprecated" in capsys.readouterr().err


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "not a catnet run" in capsys.readouterr().err
