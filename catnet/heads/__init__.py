"""Video-level heads: clip features (B, K, D) + mask (B, K) -> logits (B, C).

    head = build_head("catnet", in_dim=2048, num_classes=400, num_heads=32, aggregation="concat")
    logits = head(x, mask)                       # (B, C)
    v, alpha, beta = head.forward_features(x, mask)  # V (B, F); alpha (B, N, K) | None; beta (B, N) | None
    logits = head.forward_head(v)                # dropout + classifier
    out = head.forward_attention(x, mask)        # {"logits", "alpha", "beta"}
    same = head_from_config(to_dict(head.config))  # what run.json stores

Names: `catnet`, `local`, `avgpool` and `linear` (the reference: the same model as avgpool) are presets of
one module (catnet.py, paper Table 1);
`attention_clusters`, `netvlad`, `lstm` are the aggregation baselines. The paper's Table 1-2 grids of
these are in catnet.experiments.variants.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catnet.config import from_dict, load_yaml
from catnet.errors import CatnetError
from catnet.heads.attention_clusters import AttentionClustersConfig, AttentionClustersHead
from catnet.heads.catnet import PRESETS, CATNetConfig, CATNetHead
from catnet.heads.common import HeadConfig, VideoHead, masked_softmax
from catnet.heads.lstm import LSTMConfig, LSTMHead
from catnet.heads.netvlad import NetVLADConfig, NetVLADHead

# name -> (config class, module class, preset options)
_REGISTRY: dict[str, tuple[type[HeadConfig], type[VideoHead], dict[str, Any]]] = {
    "catnet": (CATNetConfig, CATNetHead, PRESETS["catnet"]),
    "local": (CATNetConfig, CATNetHead, PRESETS["local"]),
    "avgpool": (CATNetConfig, CATNetHead, PRESETS["avgpool"]),
    "linear": (CATNetConfig, CATNetHead, PRESETS["linear"]),
    "attention_clusters": (AttentionClustersConfig, AttentionClustersHead, {}),
    "netvlad": (NetVLADConfig, NetVLADHead, {}),
    "lstm": (LSTMConfig, LSTMHead, {}),
}
HEADS: list[str] = list(_REGISTRY)

__all__ = [
    "HEADS",
    "AttentionClustersConfig",
    "CATNetConfig",
    "HeadConfig",
    "LSTMConfig",
    "NetVLADConfig",
    "VideoHead",
    "build_head",
    "head_config",
    "head_from_config",
    "load_head_preset",
    "masked_softmax",
]


def _lookup(name: str):
    if name not in _REGISTRY:
        raise CatnetError(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
    return _REGISTRY[name]


def head_config(name: str, in_dim: int, num_classes: int, **options: Any) -> HeadConfig:
    """The config `build_head` builds from these arguments, without building the module: `options`
    override the name's preset and the config defaults. Without a `logit_scale` option the head gets its
    own default (`default_logit_scale`), written into its config, so the run records the value it trained
    with."""
    config_cls, _, preset = _lookup(name)
    config = from_dict(config_cls, {**preset, **options, "name": name, "in_dim": in_dim,
                                    "num_classes": num_classes})
    if "logit_scale" not in options:
        config = dataclasses.replace(config, logit_scale=config.default_logit_scale())
    return config


def build_head(name: str, in_dim: int, num_classes: int, **options: Any) -> nn.Module:
    """A head by name, built from `head_config(name, in_dim, num_classes, **options)`."""
    return _build(_lookup(name)[1], head_config(name, in_dim, num_classes, **options))


def head_from_config(d: dict[str, Any]) -> nn.Module:
    """Rebuild a head from the plain dict of its config (`dataclasses.asdict(head.config)`). A dict
    without `logit_scale` (catnet 0.1) means 1.0, so old runs give the numbers they gave."""
    if not isinstance(d, dict) or "name" not in d:
        raise CatnetError("a head config must be a mapping with a 'name' key")
    config_cls, head_cls, preset = _lookup(d["name"])
    return _build(head_cls, from_dict(config_cls, {**preset, **d}))


# More parameters than this (4 GiB of float32) is a typo (--head-opt num_heads=1000000), not a head:
# refused before anything is allocated.
MAX_PARAMETERS = 2**30


def _build(head_cls: type[VideoHead], config) -> nn.Module:
    """The head, after counting its parameters on the meta device (no memory) against MAX_PARAMETERS."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in head_cls(config).parameters())
    except RuntimeError as e:  # a size past what torch can even describe ("storage size ... overflowed")
        if "overflow" not in str(e):
            raise
        count = None
    if count is None or count > MAX_PARAMETERS:
        size = "an uncountable number of" if count is None else f"{count:,}"
        raise CatnetError(f"a {config.name} head with these options would have {size} parameters "
                          f"(more than {MAX_PARAMETERS:,}): check num_heads / fc_dim / in_dim / num_classes")
    return head_cls(config)


def load_head_preset(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, options) from a YAML preset such as configs/heads/catnet.yaml, checked against the config."""
    data = load_yaml(path)
    name = data.pop("name", None)
    if name is None:
        raise CatnetError(f"head preset {path} has no 'name' key")
    if not isinstance(name, str):
        raise CatnetError(f"head preset {path}: 'name' must be a head name, got {name!r}")
    _lookup(name)
    build_head(name, 1, 1, **data)  # validates keys and values now rather than at training time
    return name, data
