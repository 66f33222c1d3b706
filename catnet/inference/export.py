"""`catnet export`: a trained head, or the backbone its features came from, as ONNX or TorchScript.

The head is exported with dynamic batch B and clip count K (the attention softmax of Eq. 2 runs over
any K); inputs `features` (B, K, D) -> outputs `logits` (B, C) and, for attention heads, `alpha`
(B, N, K). The backbone takes `video` (B, 3, T, H, W) RGB in [0, 1] -> `features` (B, D), dynamic B.
Class names travel inside the file (ONNX metadata `classes`, TorchScript extra file `classes.json`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from catnet.errors import CatnetError
from catnet.utils.io import atomic_write

FORMATS = ("onnx", "torchscript")
OPSET = 17


class HeadExport(nn.Module):
    """forward_attention as plain tensors: (logits,) or (logits, alpha) — exporters want no dicts."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.has_alpha = _has_alpha(head)

    def forward(self, features: torch.Tensor):
        out = self.head.forward_attention(features)
        return (out["logits"], out["alpha"]) if self.has_alpha else (out["logits"],)


class BackboneExport(nn.Module):
    """forward_features only: the exported backbone feeds a head, as in `catnet extract`."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(video)


@torch.no_grad()
def _has_alpha(head: nn.Module) -> bool:
    in_dim = int(head.config.in_dim)
    return head.eval().forward_attention(torch.zeros(1, 2, in_dim)).get("alpha") is not None


def export_head(head: nn.Module, fmt: str, out: str | Path, classes: list[str] | None = None,
                example_clips: int = 6) -> Path:
    """Write `head` to `out`; returns the path. Example input (2, example_clips, D); B and K stay dynamic."""
    wrapper = HeadExport(head).eval()  # a new Module starts in train mode; the exporter restores it
    example = torch.randn(2, example_clips, int(head.config.in_dim))
    outputs = ["logits", "alpha"] if wrapper.has_alpha else ["logits"]
    axes = {"features": {0: "batch", 1: "clips"}, "logits": {0: "batch"}}
    if wrapper.has_alpha:
        axes["alpha"] = {0: "batch", 2: "clips"}
    return _export(wrapper, example, fmt, out, ["features"], outputs, axes, classes)


def export_backbone(backbone: nn.Module, fmt: str, out: str | Path, frames: int, size: int) -> Path:
    """Write the backbone's `forward_features`; example input (1, 3, frames, size, size), dynamic B."""
    example = torch.rand(1, 3, frames, size, size)
    axes = {"video": {0: "batch"}, "features": {0: "batch"}}
    return _export(BackboneExport(backbone).eval(), example, fmt, out, ["video"], ["features"], axes, None)


def _export(model: nn.Module, example: torch.Tensor, fmt: str, out: str | Path, inputs: list[str],
            outputs: list[str], axes: dict, classes: list[str] | None) -> Path:
    if fmt not in FORMATS:
        raise CatnetError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    meta = json.dumps({"inputs": inputs, "outputs": outputs, "classes": classes})

    def write_onnx(tmp: str) -> None:
        # The torch.export-based exporter needs onnxscript; the TorchScript-based one is enough here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes)
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "catnet", meta
        onnx.save(proto, tmp)

    def write_torchscript(tmp: str) -> None:
        with warnings.catch_warnings():  # torch.jit is deprecated, but still what C++/mobile users load
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, tmp, _extra_files={"catnet.json": meta})

    with torch.no_grad():
        return atomic_write(out, write_onnx if fmt == "onnx" else write_torchscript)
