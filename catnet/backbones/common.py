"""What every backbone shares: the `ClipBackbone` contract, input normalisation, weight hashing, safe
loading, inference tuning (BN folding, channels-last, torch.compile).

Each backbone takes float RGB in [0, 1] and normalises internally with the statistics its weights were
trained with (they travel in the state dict as buffers), so callers never need to know which codebase a
checkpoint came from.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from catnet.errors import CatnetError, unpickling_refused
from catnet.utils.io import atomic_write

# Per-channel RGB statistics on the [0, 1] scale.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PyTorchVideo / PySlowFast Kinetics models: mean 0.45, std 0.225 on [0, 1] for every channel.
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
# MMAction2 normalises [0, 255] pixels with ImageNet statistics given on that scale.
MMACTION2_MEAN = tuple(v / 255.0 for v in (123.675, 116.28, 103.53))
MMACTION2_STD = tuple(v / 255.0 for v in (58.395, 57.12, 57.375))



@dataclass(frozen=True)
class PretrainedConfig:
    """How a backbone's weights were trained, hence how to feed them: clip sampling, crop and input
    statistics. `catnet predict` builds its default sampling from it instead of hard-coding one."""

    clip_len: int  # frames per clip
    stride: int  # frame stride inside a clip
    crop: int  # square crop side (pixels)
    short_side: int  # test-time resize of the short side before cropping
    mean: tuple[float, float, float]  # on the [0, 1] scale, applied inside the model
    std: tuple[float, float, float]
    labels: str | None = None  # class-name file shipped in catnet/labels, for a classifier that has one
    fps: float | None = None  # frame rate of the training videos, when known


class ClipBackbone(nn.Module):
    """The contract of every backbone r(·; θ1) (Eq. 1): float RGB clips (B, 3, T, H, W) in [0, 1] in.

    - `forward_map(x)` -> the last feature map (B, D, T', H', W') (what timm calls forward_features);
    - `forward_features(x)` -> the pooled clip feature (B, D), the x_i of Eq. 1 that the heads consume;
    - `forward_head(features)` -> logits (B, num_classes), or the features when there is no classifier;
    - `forward(x)` = forward_head(forward_features(x)); `reset_classifier(n)` swaps the classifier.
    Attributes: num_features (D), num_classes, labels, weights_id (hash of the loaded weights),
    weights_source, pretrained_cfg (PretrainedConfig).
    """

    num_features: int
    num_classes: int
    pretrained_cfg: PretrainedConfig

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[str] | None = None
        self.weights_id = ""
        self.weights_source = "random"

    @property
    def default_clip_len(self) -> int:
        return self.pretrained_cfg.clip_len

    @property
    def default_crop(self) -> int:
        return self.pretrained_cfg.crop

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature map -> (B, D): the mean over time and space."""
        return maps.mean(dim=(2, 3, 4))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_map(x)).float()

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError


class InputNormalize(nn.Module):
    """(x - mean) / std per RGB channel of a (B, 3, T, H, W) clip in [0, 1].

    mean/std are persistent buffers, so they are saved with (and restored from) the weights.
    """

    def __init__(self, mean: Iterable[float] = IMAGENET_MEAN, std: Iterable[float] = IMAGENET_STD):
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise CatnetError(f"normalisation needs 3 means and 3 positive stds, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))

    def set(self, mean: Iterable[float], std: Iterable[float]) -> None:
        self.mean.copy_(torch.tensor(tuple(mean)).view(1, 3, 1, 1, 1))
        self.std.copy_(torch.tensor(tuple(std)).view(1, 3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return ", ".join(f"{v:.4g}" for v in t.flatten().tolist())

        return f"mean=({fmt(self.mean)}), std=({fmt(self.std)})"


def weights_id(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Short content hash (12 hex digits) of a state dict: names, dtypes, shapes and values.

    Memory layout does not matter (tensors are made contiguous first), so channels-last copies of the
    same weights hash alike. Feature-store manifests record it to tie features to the weights.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------- safe loading


class _Opaque:
    """Inert stand-in for a class or function a checkpoint names but we refuse to import or call.

    Training frameworks pickle their own objects (loggers, configs, numpy scalars) next to the weights;
    the weights-only unpickler builds these stand-ins instead, so nothing from the file ever runs.
    """

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def _opaque_globals(names: Iterable[str]) -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[-1], (_Opaque,), {"__module__": "catnet.opaque"}), name)
            for name in names]


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a checkpoint without ever running pickled code.

    `.safetensors` -> dict of tensors. Anything else goes through `torch.load(weights_only=True)`; objects
    of classes the weights-only unpickler does not allow (framework bookkeeping beside the weights) are
    replaced by inert `_Opaque` stand-ins, and the tensors come back untouched.
    """
    path = Path(path)
    if not path.is_file():
        raise CatnetError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # any parse failure means a bad file
            raise CatnetError(f"cannot read safetensors file {path}: {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    except Exception as e:
        raise CatnetError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: nothing more we can safely do
        unsafe = []
    if not unsafe:
        raise unpickling_refused(path, first_error)
    try:
        with torch.serialization.safe_globals(_opaque_globals(unsafe)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # e.g. os.system: blocked even as an inert stand-in
        raise unpickling_refused(path, e) from None
    except Exception as e:
        raise CatnetError(f"cannot read {path} as a weights-only checkpoint: {_first_line(e)}") from None
    warnings.warn(f"{path.name}: ignored non-tensor objects of type(s) {', '.join(sorted(unsafe))}",
                  stacklevel=2)
    return obj


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CatnetError(f"cannot read safetensors file {path}: {_first_line(e)}") from None


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: dict | None = None) -> Path:
    """Atomically write tensors (+ JSON-encoded metadata values) as safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# ------------------------------------------------------------------------------ inference speed-ups


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> None:
    """Fold an eval-mode BatchNorm that directly follows `conv` into the conv's weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    new_bias = (bias - bn.running_mean) * scale + bn.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def optimize_for_inference(model: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Make a backbone cheaper to run for feature extraction; returns the same (modified) model.

    - fold_bn: merges each BatchNorm into the conv before it, for models that list those pairs through a
      `conv_bn_pairs()` method yielding (parent module, conv attribute, bn attribute); the BN becomes
      nn.Identity. Training after this is wrong (no BN), hence also `eval()`.
    - channels_last: stores 5-D weights channels-last-3d; oneDNN / cuDNN then keep activations in that
      layout, which is usually faster for 3D convs on CPU and on tensor cores.
    `weights_id` is unchanged: it names the weights that were loaded, not their folded form.
    """
    model.eval()
    if fold_bn and hasattr(model, "conv_bn_pairs"):
        for parent, conv_name, bn_name in list(model.conv_bn_pairs()):
            bn = getattr(parent, bn_name)
            if isinstance(bn, nn.Identity):  # already folded
                continue
            fold_conv_bn(getattr(parent, conv_name), bn)
            setattr(parent, bn_name, nn.Identity())
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return model


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def compile_for_inference(model: nn.Module) -> nn.Module:
    """`model.forward_features` through torch.compile (inductor) with weight freezing, for inference.

    Freezing lets inductor treat the weights as constants: conv weights are pre-packed for oneDNN and
    the ReLU / residual add / pooling around each conv are fused into generated code (speed-ups and the
    one-off compile cost per input shape: docs/benchmarks.md). Needs a C++ compiler for CPU code. Call
    it on the result of `optimize_for_inference`.
    """
    return torch.compile(_Features(model.eval()), options={"freezing": True}, dynamic=False)


def iter_named_pairs(parent: nn.Module, pairs: Iterable[tuple[str, str]]
                     ) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, conv, bn) triples for the `pairs` of attribute names that exist on `parent`."""
    for conv, bn in pairs:
        if hasattr(parent, conv) and hasattr(parent, bn):
            yield parent, conv, bn


def check_state_fits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """One-line CatnetError "`what`: missing ...; unexpected ...; wrong shape ..." for the keys of `state`
    that do not fit `own`; `what` says which file and which model ("checkpoint X does not fit i3d_r50")."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if keys]
        raise CatnetError(f"{what}: {'; '.join(parts)}")
