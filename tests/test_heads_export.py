"""Heads survive torch.export, TorchScript tracing and ONNX (run by onnxruntime) with dynamic B and K.

ONNX goes through torch.export and the dynamo-based translator, as `catnet export` does; the LSTM head is
exported through `catnet.inference.export.exportable` (nn.LSTM -> ScanLSTM, which keeps K dynamic).

Each graph is built from one (B, K) and checked against eager PyTorch on other sizes, with a partial
mask, so a shape or a mask branch baked in at export time would show up as a mismatch or an error.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from catnet.heads import build_head
from catnet.inference.export import exportable

D, C = 8, 5
VARIANTS = [
    ("catnet", {"num_heads": 3}),
    ("catnet", {"num_heads": 3, "aggregation": "sum", "per_head_fc": True}),
    ("local", {"num_heads": 3, "fc_norm": False}),
    ("avgpool", {}),
    ("attention_clusters", {"num_heads": 3}),
    ("netvlad", {"num_clusters": 4}),
    ("lstm", {"hidden_size": 6}),
    ("lstm", {"hidden_size": 6, "pooling": "mean"}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)]

# Other sizes than the example's (2, 5): more and fewer clips, batch of one.
SIZES = [(3, 9), (1, 2), (4, 5)]


def make(name, options):
    torch.manual_seed(0)
    return build_head(name, D, C, **options).eval()


def example():
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return x, mask


def inputs(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, D, generator=g)
    mask = torch.rand(b, k, generator=g) > 0.3
    mask[:, 0] = True
    return x, mask


def export_program(module):
    batch, clips = torch.export.Dim("batch", max=1024), torch.export.Dim("clips", max=4096)
    dims = {0: batch, 1: clips}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(exportable(module), example(), dynamic_shapes={"x": dims, "mask": dims},
                                   strict=False)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.export's note on nn.LSTM's _flat_weights
def test_nn_lstm_alone_cannot_keep_k_dynamic():
    """Why `exportable` exists: torch.export unrolls nn.LSTM over the example's K (a documented limit)."""
    head = make("lstm", {"hidden_size": 6})
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("clips")}
    with pytest.raises(Exception, match="clips"):
        torch.export.export(head, example(), dynamic_shapes={"x": dims, "mask": dims}, strict=False)


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_torch_export_dynamic_shapes(name, options):
    head = make(name, options)
    exported = export_program(head).module()
    for i, (b, k) in enumerate(SIZES):
        x, mask = inputs(b, k, i)
        torch.testing.assert_close(exported(x, mask), head(x, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_torchscript_trace_dynamic_shapes(name, options):
    head = make(name, options)
    with torch.no_grad():
        traced = torch.jit.trace(head, example(), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)  # the saved file, not just the in-memory trace, must work
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for i, (b, k) in enumerate(SIZES):
        x, mask = inputs(b, k, i)
        torch.testing.assert_close(loaded(x, mask), head(x, mask), atol=1e-4, rtol=1e-4)


def onnx_session(module, names_out):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # one warning per torchvision op otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(export_program(module), example(), None, dynamo=True, opset_version=18,
                                    input_names=["x", "mask"], output_names=names_out, verbose=False)
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_onnx_matches_eager_dynamic_shapes(name, options):
    head = make(name, options)
    session = onnx_session(head, ["logits"])
    for i, (b, k) in enumerate(SIZES):
        x, mask = inputs(b, k, i)
        (out,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        np.testing.assert_allclose(out, head(x, mask).detach().numpy(), atol=1e-4, rtol=1e-4)


class _WithAttention(torch.nn.Module):
    """forward_attention as a tuple, the form an exported graph returns."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, mask):
        out = self.head.forward_attention(x, mask)
        return out["logits"], out["alpha"], out["beta"]


def test_onnx_attention_outputs():
    # eval() on the wrapper too: the exporter restores the wrapper's mode recursively, which would
    # otherwise switch the head back to training mode (dropout on).
    wrapped = _WithAttention(make("catnet", {"num_heads": 3})).eval()
    session = onnx_session(wrapped, ["logits", "alpha", "beta"])
    x, mask = inputs(3, 7, 0)
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    want = [t.detach().numpy() for t in wrapped(x, mask)]
    assert got[1].shape == (3, 3, 7) and got[2].shape == (3, 3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
