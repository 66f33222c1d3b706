"""ResNet-50 I3D: the clip feature extractor r(·; θ1) of the paper's Eq. (1) (Sec. 4.1, "ResNet-50 I3D").

The architecture is the I3D ResNet of the Non-local / PySlowFast / PyTorchVideo family:

    conv1   5x7x7, stride (1, 2, 2)            -> 64 ch
    pool1   max 1x3x3, stride (1, 2, 2)
    res2    3 bottlenecks, 3x1x1 first conv in every block       -> 256 ch
    pool2   max 2x1x1, stride (2, 1, 1)         (halves time)
    res3    4 bottlenecks, 3x1x1 in blocks (1, 0, 1, 0)           -> 512 ch,  spatial stride 2
    res4    6 bottlenecks, 3x1x1 in blocks (1, 0, 1, 0, 1, 0)     -> 1024 ch, spatial stride 2
    res5    3 bottlenecks, 3x1x1 in blocks (0, 1, 0)              -> 2048 ch, spatial stride 2

so 32 x 224 x 224 input frames give a 16 x 7 x 7 res5 map, averaged into the 2048-d clip feature x_i.
The spatial stride sits on the 1x3x3 conv of a bottleneck, as in all three reference codebases.
`variant="mmaction2"` adds MMAction2's temporal strides of 2 in conv1 and pool1 (32 frames -> 4 x 7 x 7).

Parameter names follow torchvision's 2-D ResNet (conv1, bn1, layer1.0.conv1, ..., fc), which makes
ImageNet inflation a 1:1 key match; checkpoints.py maps the other codebases' names onto them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catnet.backbones.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipBackbone,
    InputNormalize,
    PretrainedConfig,
    check_state_fits,
    iter_named_pairs,
    save_safetensors,
    weights_id,
)
from catnet.backbones.i3d_resnet_formats import KINETICS400_LABELS, import_weights, inflate_resnet2d
from catnet.config import from_dict
from catnet.errors import CatnetError
from catnet.utils.amp import amp_dtype, autocast
from catnet.utils.paths import catnet_home

# 1 = the block's first conv is 3x1x1 ("inflated"), 0 = 1x1x1; stages res2..res5.
I3D_INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (conv1, pool1) temporal strides of each codebase's I3D ResNet-50
VARIANTS = {"pytorchvideo": (1, 1), "slowfast": (1, 1), "mmaction2": (2, 2)}


@dataclass
class I3DResNetConfig:
    """Everything needed to rebuild the network; saved in the metadata of converted weights."""

    layers: tuple[int, ...] = STAGE_BLOCKS[50]
    # Temporal kernel of each block's first conv (3 or 1), per stage; None = the I3D pattern above.
    temporal_kernels: tuple[tuple[int, ...], ...] | None = None
    stem_kernel_t: int = 5
    stem_stride_t: int = 1
    pool1_stride_t: int = 1
    pool2: bool = True  # temporal 2x1x1 max-pool after res2
    num_classes: int = 0  # 0 = no classifier; forward() then returns the pooled features
    dropout: float = 0.5  # before the classifier, training only
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input statistics on the [0, 1] scale
    std: tuple[float, float, float] = IMAGENET_STD
    amp_dtype: str | None = None  # "bfloat16" / "float16": run the trunk under torch.autocast

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise CatnetError(f"i3d_r50: layers must be 4 positive block counts, got {self.layers}")
        if self.temporal_kernels is None:
            if self.layers != STAGE_BLOCKS[50]:
                raise CatnetError("i3d_r50: give temporal_kernels for a non-ResNet-50 depth")
            self.temporal_kernels = tuple(tuple(3 if f else 1 for f in stage) for stage in I3D_INFLATE)
        self.temporal_kernels = tuple(tuple(int(k) for k in stage) for stage in self.temporal_kernels)
        if tuple(len(s) for s in self.temporal_kernels) != self.layers:
            raise CatnetError(f"i3d_r50: temporal_kernels {self.temporal_kernels} do not match "
                              f"layers {self.layers}")
        if any(k % 2 == 0 or k < 1 for s in self.temporal_kernels for k in s) or self.stem_kernel_t % 2 == 0:
            raise CatnetError("i3d_r50: temporal kernel sizes must be odd")
        if self.stem_stride_t < 1 or self.pool1_stride_t < 1 or self.num_classes < 0:
            raise CatnetError("i3d_r50: strides must be >= 1 and num_classes >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise CatnetError(f"i3d_r50: dropout must be in [0, 1), got {self.dropout}")
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        amp_dtype(self.amp_dtype)  # validates the name


class Bottleneck3d(nn.Module):
    """1x1x1 (or kt x1x1) -> 1x3x3 (spatial stride) -> 1x1x1, with a projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, kernel_t: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv3d(in_channels, width, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                               bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class I3DResNet(ClipBackbone):
    """I3D ResNet on (B, 3, T, H, W) RGB in [0, 1]; see the module docstring for the layout."""

    def __init__(self, cfg: I3DResNetConfig | None = None):
        super().__init__()
        cfg = cfg or I3DResNetConfig()
        self.config = cfg
        self.normalize = InputNormalize(cfg.mean, cfg.std)
        kt = cfg.stem_kernel_t
        self.conv1 = nn.Conv3d(3, 64, (kt, 7, 7), stride=(cfg.stem_stride_t, 2, 2), padding=(kt // 2, 3, 3),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(cfg.pool1_stride_t, 2, 2), padding=(0, 1, 1))
        self.pool2 = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1)) if cfg.pool2 else nn.Identity()
        in_channels = 64
        for i, kernels in enumerate(cfg.temporal_kernels):
            width = 64 * 2**i
            blocks = [Bottleneck3d(in_channels if j == 0 else width * 4, width,
                                   stride=2 if (i > 0 and j == 0) else 1, kernel_t=k)
                      for j, k in enumerate(kernels)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width * 4
        self.num_features = in_channels
        self.num_classes = cfg.num_classes
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else None
        self._amp_dtype = amp_dtype(cfg.amp_dtype)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init: He for convs, unit BN, small classifier; `generator` makes it reproducible."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01, generator=generator)
                nn.init.zeros_(m.bias)

    @property
    def min_frames(self) -> int:
        """Fewest input frames the temporal strides and pool2 allow."""
        for t in range(1, 1025):
            t_pool1 = ((t - 1) // self.config.stem_stride_t) // self.config.pool1_stride_t + 1
            if t_pool1 >= (2 if self.config.pool2 else 1):
                return t
        raise AssertionError("unreachable for sane strides")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 3:
            raise CatnetError(f"i3d_r50 expects clips of shape (B, 3, T, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise CatnetError(f"i3d_r50 expects float RGB in [0, 1], got {x.dtype} (divide uint8 by 255)")
        if x.shape[2] < self.min_frames:
            raise CatnetError(f"i3d_r50 needs at least {self.min_frames} frames per clip, got {x.shape[2]}")

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """res5 feature map (B, 2048, T', H', W') of clips in [0, 1]."""
        self._check_input(x)
        with autocast(x.device.type, self._amp_dtype):
            x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
            x = self.pool2(self.layer1(x))
            return self.layer4(self.layer3(self.layer2(x)))

    @property
    def pretrained_cfg(self) -> PretrainedConfig:
        """Sec. 4.1's Kinetics clips (32 frames at stride 4, 224 crops) and these weights' statistics."""
        kinetics = self.num_classes == 400 and self.labels is not None
        return PretrainedConfig(clip_len=32, stride=4, crop=224, short_side=256, mean=self.config.mean,
                                std=self.config.std, labels=KINETICS400_LABELS if kinetics else None)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2048) clip features -> class logits, or the features when there is no classifier."""
        if self.fc is None:
            return features
        return self.fc(self.dropout(features))

    def conv_bn_pairs(self) -> Iterator[tuple[nn.Module, str, str]]:
        """(parent, conv, bn) attribute triples, for `common.optimize_for_inference`'s BN folding."""
        yield from iter_named_pairs(self, [("conv1", "bn1")])
        for m in self.modules():
            if isinstance(m, Bottleneck3d):
                yield from iter_named_pairs(m, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
                if m.downsample is not None:
                    yield from iter_named_pairs(m.downsample, [("0", "1")])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (0 removes it), e.g. to fine-tune on another dataset."""
        like = next(self.parameters())  # the new classifier on the model's device and dtype
        self.fc = None if num_classes <= 0 else \
            nn.Linear(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        self.num_classes = self.config.num_classes = num_classes
        self.labels = None


def pretrained_path() -> Path:
    """Where `pretrained=True` looks for i3d_r50 weights (made by `convert_checkpoint`)."""
    return catnet_home() / "weights" / "i3d_r50.safetensors"


def i3d_r50(pretrained: bool = False, checkpoint: str | Path | None = None, **options) -> I3DResNet:
    """The paper's ResNet-50 I3D (D = 2048), in eval mode.

    pretrained: load `pretrained_path()` (no download: convert a checkpoint there first).
    checkpoint: a PyTorchVideo, PySlowFast or MMAction2 I3D-R50 checkpoint, a 2-D torchvision/timm ResNet-50
      (ImageNet-inflated), or weights saved by catnet; the format is detected from the keys.
    options: I3DResNetConfig fields, plus `variant` ("pytorchvideo" | "slowfast" | "mmaction2": sets the
      conv1/pool1 temporal strides), `labels` (class names), `seed` (reproducible random init).
    """
    if pretrained and checkpoint is not None:
        raise CatnetError("i3d_r50: give either pretrained=True or a checkpoint, not both")
    if pretrained:
        checkpoint = pretrained_path()
        if not checkpoint.is_file():
            raise CatnetError(f"no converted i3d_r50 weights at {checkpoint}; pass checkpoint=PATH (a "
                              "PyTorchVideo, PySlowFast or MMAction2 I3D-R50 file) or convert one there")
    options = dict(options)
    labels, seed = options.pop("labels", None), options.pop("seed", None)
    variant = options.pop("variant", None)
    if variant is not None:
        if variant not in VARIANTS:
            raise CatnetError(f"i3d_r50: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        options.setdefault("stem_stride_t", VARIANTS[variant][0])
        options.setdefault("pool1_stride_t", VARIANTS[variant][1])
    known = {f.name for f in dataclasses.fields(I3DResNetConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CatnetError(f"i3d_r50: unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known | {'labels', 'seed', 'variant'}))}")

    if checkpoint is None:
        model = I3DResNet(from_dict(I3DResNetConfig, options))
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        model.init_weights(gen)
    else:
        model = load_i3d_r50_weights(checkpoint, options)
    if labels is not None:
        labels = [str(n) for n in labels]
        if len(labels) != model.num_classes:
            raise CatnetError(f"i3d_r50: {len(labels)} labels for {model.num_classes} classes")
        model.labels = labels
    model.weights_id = weights_id(model)
    return model.eval()


# ------------------------------------------------------------------------------ loading / saving


def load_i3d_r50_weights(path: str | Path, options: Mapping[str, Any]) -> I3DResNet:
    """An I3DResNet carrying the weights in `path`; `options` (config fields) override what the file implies.

    A different `num_classes` keeps the trunk and starts a fresh classifier (fine-tuning); explicit
    `mean`/`std` replace the normalisation the weights came with.
    """
    imported = import_weights(path)
    model = I3DResNet(from_dict(I3DResNetConfig, {**imported.config, **options}))
    state = imported.state_dict
    if imported.format == "resnet2d":
        state = inflate_resnet2d(state, model.state_dict())
    if imported.config.get("num_classes", 0) != model.num_classes:  # a new (or no) classifier
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if model.fc is not None:
            nn.init.normal_(model.fc.weight, std=0.01)
            nn.init.zeros_(model.fc.bias)
    own = model.state_dict()
    state = {**{k: own[k] for k in own if k.startswith(("fc.", "normalize.")) and k not in state}, **state}
    _load_strict(model, state, path)
    if imported.format == "resnet2d":  # ImageNet weights: the config's (ImageNet's unless overridden)
        model.normalize.set(model.config.mean, model.config.std)
    elif "mean" in options or "std" in options:  # the one not overridden stays the checkpoint's
        mean = tuple(options["mean"]) if "mean" in options else tuple(model.normalize.mean.flatten().tolist())
        std = tuple(options["std"]) if "std" in options else tuple(model.normalize.std.flatten().tolist())
        model.normalize.set(mean, std)
        model.config.mean, model.config.std = mean, std
    else:
        model.config.mean = tuple(model.normalize.mean.flatten().tolist())
        model.config.std = tuple(model.normalize.std.flatten().tolist())
    if imported.labels is not None and len(imported.labels) == model.num_classes:
        model.labels = list(imported.labels)
    model.weights_source = f"{imported.format}:{Path(path).name}"
    return model


def _load_strict(model: I3DResNet, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    check_state_fits(model.state_dict(), state, f"checkpoint {source} does not fit i3d_r50")
    model.load_state_dict(state)


def save_weights(model: I3DResNet, path: str | Path) -> Path:
    """Write an i3d_r50's weights, config and labels as safetensors (atomically); reload with checkpoint=path.

    The weights must be unfolded (save before `optimize_for_inference`).
    """
    if any(isinstance(m, nn.Identity) for name, m in model.named_modules()
           if name.endswith(("bn1", "bn2", "bn3"))):
        raise CatnetError("cannot save a BN-folded model; save the weights before optimize_for_inference")
    meta = {"catnet_backbone": "i3d_r50", "config": json.dumps(dataclasses.asdict(model.config))}
    if getattr(model, "labels", None):
        meta["labels"] = json.dumps(list(model.labels))
    return save_safetensors(model.state_dict(), path, meta)


def convert_checkpoint(src: str | Path, dst: str | Path, **options) -> Path:
    """Convert any supported checkpoint into catnet i3d_r50 safetensors (e.g. for pretrained=True)."""
    return save_weights(i3d_r50(checkpoint=src, **options), dst)
