"""`catnet export`: a trained head, or the backbone its features came from, as ONNX, a torch.export
program (.pt2) or TorchScript (deprecated).

The head is exported with dynamic batch B and clip count K (the attention softmax of Eq. 2 runs over
any K); input `features` (B, K, D) -> outputs `logits` (B, C) and, for attention heads, `alpha`
(B, N, K). The backbone takes `video` (B, 3, T, H, W) RGB in [0, 1] -> `features` (B, D), dynamic B.
Class names travel inside the file: ONNX metadata `catnet`, extra file `catnet.json` in a .pt2 archive
or a TorchScript file (`read_metadata`).

Exporters (docs/predict.md):
- onnx: `torch.export.export` (non-strict, dynamic shapes), then the dynamo-based ONNX translator
  (`torch.onnx.export(program, dynamo=True)`, needs onnxscript); the legacy TorchScript-based ONNX
  exporter is not used: the dynamo one handles every head and backbone.
- pt2: the same ExportedProgram, written by `torch.export.save`; load with `torch.export.load`.
- torchscript: `torch.jit.trace`, kept for C++/mobile users; torch.jit is deprecated upstream.
nn.LSTM's kernel is traced as a loop unrolled over the example's K, which torch.export refuses for a
dynamic K; `exportable` swaps each LSTM for `ScanLSTM`, the same recurrence as a scan higher-order op.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan  # torch.export's loop primitive; no public alias yet

from catnet.errors import CatnetError
from catnet.utils.io import atomic_write

FORMATS = ("onnx", "pt2", "torchscript")
DEPRECATED = {"torchscript": "torch.jit is deprecated upstream; prefer pt2 (torch.export) or onnx"}
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
OPSET = 18  # the dynamo-based exporter's lowest opset; onnxruntime >= 1.14 runs it
META_KEY, META_FILE = "catnet", "catnet.json"  # ONNX metadata key; extra file in .pt2 / TorchScript
# Example batch of the traced graphs: torch.export specialises a dimension whose example size is 1.
EXAMPLE_BATCH = 2


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


class ScanLSTM(nn.Module):
    """A batch-first, unidirectional nn.LSTM (shared parameters) as torch's `scan` over the sequence.

    Same gates (i, f, g, o) and call signature as nn.LSTM: `(x (B, K, D), (h0, c0)) -> (out, (h, c))`.
    torch.export keeps K symbolic through `scan`, and the ONNX translator turns it into a Scan node.
    Eval only: nn.LSTM's dropout between layers is not applied.
    """

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        if not lstm.batch_first or lstm.bidirectional or lstm.proj_size:
            raise CatnetError("only batch-first, unidirectional LSTMs without projections can be exported")
        self.lstm = lstm

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h0, c0 = state
        out, hs, cs = x, [], []
        for layer in range(self.lstm.num_layers):
            w_ih, w_hh = getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"weight_hh_l{layer}")
            bias = (getattr(self.lstm, f"bias_ih_l{layer}") + getattr(self.lstm, f"bias_hh_l{layer}")
                    if self.lstm.bias else None)
            gates_x = F.linear(out, w_ih, bias).transpose(0, 1)  # (K, B, 4H): the input part, all steps

            def step(carry, g, w_hh=w_hh):
                h, c = carry
                i, f, gg, o = (g + F.linear(h, w_hh)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                return (h, c), h.clone()  # scan's outputs may not alias its carry

            # clones: the head passes one tensor as both h0 and c0, and scan refuses aliased carries
            (h, c), ys = scan(step, (h0[layer].clone(), c0[layer].clone()), gates_x)
            out = ys.transpose(0, 1)
            hs.append(h)
            cs.append(c)
        return out, (torch.stack(hs), torch.stack(cs))


def exportable(module: nn.Module) -> nn.Module:
    """`module`, or a copy of it with every nn.LSTM replaced by a ScanLSTM (dynamic K under torch.export)."""
    if not any(isinstance(m, nn.LSTM) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LSTM):
                setattr(parent, name, ScanLSTM(child))
    return module


@torch.no_grad()
def _has_alpha(head: nn.Module) -> bool:
    in_dim = int(head.config.in_dim)
    return head.eval().forward_attention(torch.zeros(1, 2, in_dim)).get("alpha") is not None


def export_head(head: nn.Module, fmt: str, out: str | Path, classes: list[str] | None = None,
                example_clips: int = 6) -> Path:
    """Write `head` to `out`; returns the path. Example input (2, example_clips, D); B and K stay dynamic."""
    if example_clips < 2:
        raise CatnetError(f"example_clips must be >= 2 (a size-1 example fixes K), got {example_clips}")
    head.eval()  # a new Module starts in train mode; the exporters would switch dropout back on
    example = torch.randn(EXAMPLE_BATCH, example_clips, int(head.config.in_dim))
    has_alpha = HeadExport(head).has_alpha
    outputs = ["logits", "alpha"] if has_alpha else ["logits"]
    axes = {"features": {0: "batch", 1: "clips"}, "logits": {0: "batch"}}
    if has_alpha:
        axes["alpha"] = {0: "batch", 2: "clips"}
    # torchscript traces the original nn.LSTM (its trace keeps K dynamic); the others need the scan form
    model = HeadExport(head if fmt == "torchscript" else exportable(head)).eval()
    return _export(model, example, fmt, out, ["features"], outputs, axes, classes)


def export_backbone(backbone: nn.Module, fmt: str, out: str | Path, frames: int, size: int) -> Path:
    """Write the backbone's `forward_features`; example input (2, 3, frames, size, size), dynamic B."""
    example = torch.rand(EXAMPLE_BATCH, 3, frames, size, size)
    axes = {"video": {0: "batch"}, "features": {0: "batch"}}
    return _export(BackboneExport(backbone).eval(), example, fmt, out, ["video"], ["features"], axes, None)


def read_metadata(path: str | Path) -> dict:
    """The `catnet` metadata (inputs, outputs, classes) of a file written by `catnet export`."""
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            return json.loads(props[META_KEY])
        extra = {META_FILE: ""}
        if path.suffix == ".pt2":
            torch.export.load(str(path), extra_files=extra)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra[META_FILE])
    except Exception as e:  # any unreadable or foreign file: one line
        raise CatnetError(f"{path}: not a file written by catnet export ({type(e).__name__})") from None


def _export(model: nn.Module, example: torch.Tensor, fmt: str, out: str | Path, inputs: list[str],
            outputs: list[str], axes: dict, classes: list[str] | None) -> Path:
    if fmt not in FORMATS:
        raise CatnetError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    meta = json.dumps({"inputs": inputs, "outputs": outputs, "classes": classes})
    with torch.no_grad():
        if fmt == "torchscript":
            return atomic_write(out, lambda tmp: _write_torchscript(model, example, tmp, meta))
        program = _program(model, example, inputs[0], axes[inputs[0]])
        if fmt == "pt2":
            return atomic_write(out, lambda tmp: _write_pt2(program, tmp, meta))
        names = _symbol_names(program, axes[inputs[0]])
        return atomic_write(out, lambda tmp: _write_onnx(program, example, tmp, inputs, outputs, names, meta))


def _program(model: nn.Module, example: torch.Tensor, name: str, axes: dict[int, str]):
    """torch.export with the named axes dynamic (non-strict: traces the Python as it runs)."""
    dims = {axis: torch.export.Dim(label) for axis, label in axes.items()}
    what = type(getattr(model, "head", getattr(model, "backbone", model))).__name__
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, (example,), dynamic_shapes={name: dims}, strict=False)
    except Exception as e:  # a constraint violation or an untraceable op: name it in one line
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CatnetError(f"torch.export cannot export {what} with dynamic {', '.join(axes.values())}: "
                          f"{why}") from None


def _write_pt2(program, tmp: str, meta: str) -> None:
    with open(tmp, "wb") as f:  # a file object: torch.export.save would want a .pt2 name otherwise
        torch.export.save(program, f, extra_files={META_FILE: meta})


def _write_onnx(program, example: torch.Tensor, tmp: str, inputs: list[str], outputs: list[str],
                names: dict[str, str], meta: str) -> None:
    # The translator logs a warning per torchvision op it cannot register; catnet has none.
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, (example,), None, dynamo=True, opset_version=OPSET,
                                             input_names=inputs, output_names=outputs, verbose=False)
    finally:
        log.setLevel(level)
    onnx_program.save(tmp)
    proto = onnx.load(tmp)
    _name_dims(proto, names)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    onnx.save(proto, tmp)


def _symbol_names(program, axes: dict[int, str]) -> dict[str, str]:
    """torch.export's symbols for the dynamic input axes (s0, s1, ...) -> their names (batch, clips)."""
    user = [spec.arg.name for spec in program.graph_signature.input_specs
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    node = next(n for n in program.graph.nodes if n.name == user[0])
    return {str(node.meta["val"].shape[axis]): label for axis, label in axes.items()}


def _name_dims(proto, names: dict[str, str]) -> None:
    """Readable dynamic axes in the ONNX file: `batch`, `clips` rather than torch's `s97`, `s65`."""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _write_torchscript(model: nn.Module, example: torch.Tensor, tmp: str, meta: str) -> None:
    with warnings.catch_warnings():  # deprecated upstream (DEPRECATED), still what C++/mobile users load
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, tmp, _extra_files={META_FILE: meta})
