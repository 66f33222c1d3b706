"""Pure key maps for I3D ResNet-50 checkpoints of the public codebases -> catnet's i3d_r50 names.

Nothing here builds a model: `i3d_resnet.py` loads what `import_weights` returns (and saves weights back).

Formats, detected from the parameter names (wrappers like {"model_state": ...}, {"state_dict": ...} and
"module."/"model." prefixes are peeled off first):

  pytorchvideo  blocks.0.conv.weight, blocks.1.res_blocks.0.branch2.conv_a.weight, blocks.6.proj.weight
                (create_resnet: the parameter-free temporal pool is blocks.2, so the head is blocks.6)
  slowfast      s1.pathway0_stem.conv.weight, s2.pathway0_res0.branch2.a.weight, head.projection.weight
  mmaction2     backbone.conv1.conv.weight, backbone.layer1.0.conv1.bn.weight, cls_head.fc_cls.weight
  resnet2d      torchvision / timm 2-D ResNet-50 (conv1.weight is 4-D): ImageNet inflation
  catnet        our own names (conv1.weight is 5-D), e.g. safetensors written by `save_weights`

Architecture facts that weights cannot show (temporal strides, the temporal pool after res2, input
normalisation) come from the format: PyTorchVideo/PySlowFast use strides 1 and mean 0.45 / std 0.225 on
[0, 1]; MMAction2's I3D configs use conv1/pool1 temporal strides 2 and ImageNet statistics on [0, 255].
Temporal kernel sizes, depth and classifier size are read from the weight shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from catnet.backbones.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINETICS_MEAN,
    KINETICS_STD,
    MMACTION2_MEAN,
    MMACTION2_STD,
    load_checkpoint_file,
    read_safetensors_metadata,
)
from catnet.errors import CatnetError
from catnet.utils.paths import read_labels

FORMATS = ("catnet", "pytorchvideo", "slowfast", "mmaction2", "resnet2d")
KINETICS400_LABELS = "kinetics400_deepmind_order.txt"  # alphabetical, the order all three codebases use
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class ImportedWeights:
    """A state dict in catnet's i3d_r50 names (2-D torchvision names for `resnet2d`) and what it implies."""

    state_dict: dict[str, torch.Tensor]
    format: str
    config: dict[str, Any] = field(default_factory=dict)  # I3DResNetConfig fields known from the source
    labels: list[str] | None = None


# ------------------------------------------------------------------------------------ reading files


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the rest of the checkpoint) from the usual wrappers around a state dict."""
    extras: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor)
                                                            for v in inner.values()):
                extras = {k: v for k, v in obj.items() if k != key}
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CatnetError("checkpoint does not hold a state dict of tensors")
    state = dict(obj)
    for prefix in ("module.", "model."):  # DDP and Lightning wrappers
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, extras


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """Which codebase's names `state` uses (one of FORMATS)."""
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "catnet" if state["conv1.weight"].dim() == 5 else "resnet2d"
    if "blocks.0.conv.weight" in state:
        return "pytorchvideo"
    if "s1.pathway0_stem.conv.weight" in state:
        if any(k.startswith("s1.pathway1_") for k in state):
            raise CatnetError("this is a two-pathway SlowFast checkpoint, not an I3D ResNet-50")
        return "slowfast"
    if "backbone.conv1.conv.weight" in state:
        return "mmaction2"
    sample = ", ".join(sorted(state)[:4])
    raise CatnetError(f"unrecognised checkpoint layout (keys like {sample}); expected PyTorchVideo, "
                      "PySlowFast, MMAction2, torchvision/timm ResNet-50 or catnet i3d_r50 weights")


# ------------------------------------------------------------------------------- key conversion


def _rename(state: Mapping[str, torch.Tensor], rules: list[tuple[str, str]], fmt: str
            ) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to every key; unknown keys are an error."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise CatnetError(f"{fmt} checkpoint has weights i3d_r50 has no place for (non-local blocks, another "
                          f"architecture?): {', '.join(unknown[:3])}{more}")
    return out


_BRANCH2_PTV = [("conv_a", "conv1"), ("norm_a", "bn1"), ("conv_b", "conv2"), ("norm_b", "bn2"),
                ("conv_c", "conv3"), ("norm_c", "bn3")]
_BRANCH2_SF = [("a", "conv1"), ("a_bn", "bn1"), ("b", "conv2"), ("b_bn", "bn2"),
               ("c", "conv3"), ("c_bn", "bn3")]


def from_pytorchvideo(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PyTorchVideo `create_resnet` names -> catnet names, and whether there is a pool after res2."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.res_blocks\.", k))})
    if len(stages) != 4:
        raise CatnetError(f"pytorchvideo checkpoint has {len(stages)} residual stages, i3d_r50 needs 4")
    rules = [(r"blocks\.0\.conv\.(\w+)", r"conv1.\1"), (r"blocks\.0\.norm\.(\w+)", r"bn1.\1"),
             (r"blocks\.\d+\.proj\.(weight|bias)", r"fc.\1")]
    for layer, b in enumerate(stages, start=1):
        block = rf"blocks\.{b}\.res_blocks\.(\d+)\."
        rules += [(block + r"branch1_conv\.(\w+)", rf"layer{layer}.\1.downsample.0.\2"),
                  (block + r"branch1_norm\.(\w+)", rf"layer{layer}.\1.downsample.1.\2")]
        rules += [(block + rf"branch2\.{src}\.(\w+)", rf"layer{layer}.\1.{dst}.\2")
                  for src, dst in _BRANCH2_PTV]
    # The I3D temporal max-pool after res2 is a parameter-free entry of `blocks`: a gap in the numbering.
    return _rename(state, rules, "pytorchvideo"), {"pool2": stages[1] - stages[0] > 1}


def from_slowfast(state: Mapping[str, torch.Tensor], extras: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PySlowFast `ResNet` (MODEL.ARCH i3d) names -> catnet names; the arch comes from a saved cfg if any."""
    rules = [(r"s1\.pathway0_stem\.conv\.(\w+)", r"conv1.\1"), (r"s1\.pathway0_stem\.bn\.(\w+)", r"bn1.\1"),
             (r"head\.projection\.(weight|bias)", r"fc.\1")]
    for layer in range(1, 5):
        block = rf"s{layer + 1}\.pathway0_res(\d+)\."
        rules += [(block + r"branch1\.(\w+)", rf"layer{layer}.\1.downsample.0.\2"),
                  (block + r"branch1_bn\.(\w+)", rf"layer{layer}.\1.downsample.1.\2")]
        rules += [(block + rf"branch2\.{src}\.(\w+)", rf"layer{layer}.\1.{dst}.\2")
                  for src, dst in _BRANCH2_SF]
    config: dict[str, Any] = {}
    arch = _slowfast_arch((extras or {}).get("cfg"))
    if arch is not None:  # PySlowFast's _POOL1: a 2x1x1 pool after res2 only for these archs
        config["pool2"] = arch in ("i3d", "c2d")
    return _rename(state, rules, "slowfast"), config


def _slowfast_arch(cfg: Any) -> str | None:
    if isinstance(cfg, str):
        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("MODEL"), Mapping):
        arch = cfg["MODEL"].get("ARCH")
        return arch if isinstance(arch, str) else None
    return None


def from_mmaction2(state: Mapping[str, torch.Tensor], extras: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MMAction2 `ResNet3d` + `I3DHead` names -> catnet names, with the temporal strides of its configs."""
    rules = [(r"backbone\.conv1\.conv\.(\w+)", r"conv1.\1"), (r"backbone\.conv1\.bn\.(\w+)", r"bn1.\1"),
             (r"backbone\.(layer\d)\.(\d+)\.conv(\d)\.conv\.(\w+)", r"\1.\2.conv\3.\4"),
             (r"backbone\.(layer\d)\.(\d+)\.conv(\d)\.bn\.(\w+)", r"\1.\2.bn\3.\4"),
             (r"backbone\.(layer\d)\.(\d+)\.downsample\.conv\.(\w+)", r"\1.\2.downsample.0.\3"),
             (r"backbone\.(layer\d)\.(\d+)\.downsample\.bn\.(\w+)", r"\1.\2.downsample.1.\3"),
             (r"cls_head\.fc_cls\.(weight|bias)", r"fc.\1")]
    # ResNet3d's defaults (and the i3d_r50 configs): conv1_stride_t=2, pool1_stride_t=2, with_pool2=True.
    config: dict[str, Any] = {"stem_stride_t": 2, "pool1_stride_t": 2, "pool2": True}
    meta = (extras or {}).get("meta")
    # mmcv-era checkpoints embed their config file as meta["config"], mmengine-era ones as meta["cfg"]
    text = (meta.get("config") or meta.get("cfg")) if isinstance(meta, Mapping) else None
    if isinstance(text, str):  # the embedded config beats ResNet3d's defaults
        for name, key in (("conv1_stride_t", "stem_stride_t"), ("pool1_stride_t", "pool1_stride_t")):
            if m := re.search(rf"\b{name}\s*=\s*(\d+)", text):
                config[key] = int(m.group(1))
        if m := re.search(r"\bwith_pool2\s*=\s*(True|False)", text):
            config["pool2"] = m.group(1) == "True"
    return _rename(state, rules, "mmaction2"), config


def inflate_resnet2d(state2d: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """ImageNet inflation (Carreira & Zisserman): a k x k kernel becomes t x k x k, each slice w2d / t.

    `target` is the 3-D model's state dict (for shapes). A static clip then gives every 3-D conv the
    response of its 2-D original. BN statistics are copied; the 2-D classifier (fc) is dropped.
    """
    out, missing = {}, []
    for key, want in target.items():
        if key.startswith(("fc.", "normalize.")):
            continue
        src = state2d.get(key)
        if src is None:
            if key.endswith("num_batches_tracked"):  # timm checkpoints omit it
                out[key] = want.clone()
                continue
            missing.append(key)
            continue
        if want.dim() == 5 and src.dim() == 4:
            t = want.shape[2]
            src = src.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
        if src.shape != want.shape:
            raise CatnetError(f"2-D ResNet weight {key} has shape {tuple(src.shape)}, i3d_r50 needs "
                              f"{tuple(want.shape)} (is this a ResNet-50?)")
        out[key] = src.to(want.dtype)
    if missing:
        raise CatnetError(f"2-D ResNet checkpoint lacks {len(missing)} weights i3d_r50 needs, e.g. "
                          f"{missing[0]} (a deep-stem ResNet-50d or another architecture?)")
    return out


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """I3DResNetConfig fields that the shapes of a catnet-named 3-D state dict determine."""
    if state["conv1.weight"].shape[:2] != (64, 3):
        shape = tuple(state["conv1.weight"].shape)
        raise CatnetError(f"i3d_r50 needs a 3-channel, 64-filter conv1; got {shape}")
    kernels = []
    for i in range(1, 5):
        n = 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1)
        if n == 0:
            raise CatnetError(f"checkpoint has no layer{i} blocks")
        kernels.append(tuple(int(state[f"layer{i}.{j}.conv1.weight"].shape[2]) for j in range(n)))
    return {"layers": tuple(len(k) for k in kernels), "temporal_kernels": tuple(kernels),
            "stem_kernel_t": int(state["conv1.weight"].shape[2]),
            "num_classes": int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0}


def import_weights(path: str | Path) -> ImportedWeights:
    """Read any supported checkpoint file into catnet i3d_r50 names (see the module docstring)."""
    path = Path(path)
    state, extras = unwrap_state_dict(load_checkpoint_file(path))
    fmt = detect_format(state)
    config: dict[str, Any] = {}
    labels = None
    if fmt == "catnet":
        meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
        if "config" in meta:
            config = {k: v for k, v in json.loads(meta["config"]).items() if k not in ("mean", "std")}
        if "labels" in meta:
            labels = json.loads(meta["labels"])
    elif fmt == "resnet2d":
        return ImportedWeights(state, fmt, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    else:
        if fmt == "pytorchvideo":
            state, config = from_pytorchvideo(state)
        elif fmt == "slowfast":
            state, config = from_slowfast(state, extras)
        else:
            state, config = from_mmaction2(state, extras)
        mean, std = (MMACTION2_MEAN, MMACTION2_STD) if fmt == "mmaction2" else (KINETICS_MEAN, KINETICS_STD)
        state["normalize.mean"] = torch.tensor(mean).view(1, 3, 1, 1, 1)
        state["normalize.std"] = torch.tensor(std).view(1, 3, 1, 1, 1)
    config.update(infer_config(state))
    if labels is None and config["num_classes"] == 400 and fmt != "catnet":
        labels = read_labels(KINETICS400_LABELS)
    return ImportedWeights(state, fmt, config, labels)
