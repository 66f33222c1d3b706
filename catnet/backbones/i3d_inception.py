"""Inception-I3D (Carreira & Zisserman, 2017): the Kinetics-400 RGB network, reproduced exactly.

This is the clip feature extractor r(·; θ1) of the paper's Eq. (1): one clip I_i (B, 3, L, H, W) in [0, 1]
-> one 1024-d feature x_i. It mirrors DeepMind's `kinetics-i3d` TensorFlow graph so that the converted
checkpoint (`catnet weights fetch`) gives the same logits:

- every convolution and max-pool uses TensorFlow "SAME" padding, which is asymmetric (the extra pixel goes
  after) and depends on the input size, so it is computed per call; max-pools pad with -inf, i.e. padding
  never wins the max (TF and flax ignore padded positions);
- batch norm is Sonnet v1's: eps 1e-3, a learned offset beta and *no* scale (gamma fixed to 1);
- the input is mapped from [0, 1] to [-1, 1] inside the model;
- the Logits endpoint is a 2×7×7 stride-1 VALID average pool, dropout, a 1×1×1 conv with bias, then the mean
  over the remaining time steps.

Module names follow the TF endpoints in lower case (`conv3d_1a_7x7`, `mixed_4f`, ...); inside an Inception
block `b0`, `b1a`/`b1b`, `b2a`/`b2b`, `b3` are Branch_0..3 (a = the 1×1×1 reduction, b = the 3×3×3 conv).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from catnet.backbones.common import (
    ClipBackbone,
    PretrainedConfig,
    check_state_fits,
    load_checkpoint_file,
    read_safetensors_metadata,
    weights_id,
)
from catnet.backbones.i3d_resnet_formats import unwrap_state_dict
from catnet.errors import CatnetError
from catnet.utils.paths import catnet_home, read_labels

NUM_FEATURES = 1024
KINETICS_CLASSES = 400
LABEL_FILE = "kinetics400_deepmind_order.txt"
WEIGHTS_NAME = "i3d_inception_kinetics400_rgb"
# DeepMind trained on 64 consecutive frames of 25 fps Kinetics video, 224 crops of a 256 short side,
# RGB mapped to [-1, 1] (the model does it: mean = std = 0.5 on the [0, 1] scale).
KINETICS_CFG = PretrainedConfig(clip_len=64, stride=1, crop=224, short_side=256, mean=(0.5, 0.5, 0.5),
                                std=(0.5, 0.5, 0.5), labels=LABEL_FILE, fps=25.0)


def converted_weights_path() -> Path:
    """Where `catnet weights fetch` puts the converted Kinetics-400 weights (may not exist yet)."""
    return catnet_home() / "weights" / f"{WEIGHTS_NAME}.safetensors"

# (branch_0, branch_1 reduce, branch_1, branch_2 reduce, branch_2, branch_3) output channels per block.
_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one dimension: output ceil(size / stride), the odd pixel padded after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    """Pad a (B, C, T, H, W) tensor so that a VALID conv/pool with `kernel`, `stride` acts as TF "SAME"."""
    pads: list[int] = []
    # F.pad lists dimensions last-first: (W_before, W_after, H_before, H_after, T_before, T_after).
    dims = zip(reversed(x.shape[2:]), reversed(_triple(kernel)), reversed(_triple(stride)), strict=True)
    for size, k, s in dims:
        pads.extend(same_padding(int(size), k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    # -inf padding: a padded position never wins, as in TF/flax where padding is excluded from the max.
    return F.max_pool3d(pad_same(x, kernel, stride, value=float("-inf")), _triple(kernel), _triple(stride))


class BatchNorm3dNoScale(nn.BatchNorm3d):
    """Sonnet v1 batch norm as trained in I3D: learned offset beta, no scale (gamma is fixed to 1).

    `affine=False` removes gamma; beta is added back as `bias`, which `F.batch_norm` accepts on its own.
    The momentum is flax/Sonnet's decay 0.999 expressed the PyTorch way (1 - 0.999).
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 1e-3):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(num_features))


class Unit3D(nn.Module):
    """SAME-padded Conv3d -> (no-scale batch norm) -> (ReLU), DeepMind's building block."""

    def __init__(self, in_ch: int, out_ch: int, kernel=1, stride=1, *, bn: bool = True, relu: bool = True,
                 bias: bool = False):
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        self.conv = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = BatchNorm3dNoScale(out_ch) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(pad_same(x, self.kernel, self.stride))))


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1×1×1 | 1×1×1→3×3×3 | 1×1×1→3×3×3 | maxpool→1×1×1."""

    def __init__(self, in_ch: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        self.b0 = Unit3D(in_ch, w0)
        self.b1a, self.b1b = Unit3D(in_ch, w1a), Unit3D(w1a, w1b, 3)
        self.b2a, self.b2b = Unit3D(in_ch, w2a), Unit3D(w2a, w2b, 3)
        self.b3 = Unit3D(in_ch, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.b0(x),
            self.b1b(self.b1a(x)),
            self.b2b(self.b2a(x)),
            self.b3(max_pool_same(x, 3, 1)),
        ], dim=1)


class InceptionI3d(ClipBackbone):
    """Inception-I3D on RGB clips (B, 3, T, H, W) in [0, 1].

    `forward_features` -> (B, 1024): the Logits endpoint's pooled input, i.e. Mixed_5c's output average-pooled
    by a 2×7×7 stride-1 VALID window (shrunk to the map for clips of <= 8 frames or <= 192 pixels) and then
    averaged over every remaining position (t, h, w). For a 224² crop that is a mean over time of the 2×7×7
    window averages, so the two edge time steps of Mixed_5c weigh half as much as the inner ones.
    `forward` -> (B, num_classes) = the logits conv applied to those features, which by linearity equals
    DeepMind's mean over time of the per-step logits.
    """

    pretrained_cfg = KINETICS_CFG

    def __init__(self, num_classes: int = KINETICS_CLASSES, drop_rate: float = 0.0):
        super().__init__()
        self.num_features = NUM_FEATURES
        self.num_classes = num_classes

        self.conv3d_1a_7x7 = Unit3D(3, 64, 7, 2)
        self.conv3d_2b_1x1 = Unit3D(64, 64)
        self.conv3d_2c_3x3 = Unit3D(64, 192, 3)
        blocks, in_ch = {}, 192
        for name, widths in _BLOCKS.items():
            blocks[name] = InceptionBlock(in_ch, widths)
            in_ch = blocks[name].out_channels
        # Registered one by one (not a ModuleDict) so state-dict keys read `mixed_4f.b1b.conv.weight`.
        for name, block in blocks.items():
            self.add_module(name, block)
        assert in_ch == NUM_FEATURES
        self.dropout = nn.Dropout(drop_rate)
        self.logits = self._classifier(num_classes)
        self._init_weights()

    @staticmethod
    def _classifier(num_classes: int) -> Unit3D | None:
        return Unit3D(NUM_FEATURES, num_classes, bn=False, relu=False, bias=True) if num_classes > 0 else None

    def _init_weights(self) -> None:
        # He init keeps activations at unit scale through ~60 convs. PyTorch's default shrinks them by ~2.5x
        # per layer, down to subnormal floats that make a random-weight forward pass ~10x slower on CPU.
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m is not getattr(self.logits, "conv", None):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c's feature map (B, 1024, ceil(T/8), ceil(H/32), ceil(W/32))."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise CatnetError(f"i3d_inception expects clips shaped (B, 3, T, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise CatnetError(f"i3d_inception expects float clips in [0, 1], got {x.dtype}")
        x = x * 2.0 - 1.0  # the network was trained on RGB in [-1, 1]
        x = self.conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = self.conv3d_2c_3x3(self.conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        x = self.mixed_3c(self.mixed_3b(x))
        x = max_pool_same(x, 3, 2)  # MaxPool3d_4a_3x3
        for name in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, 2, 2)  # MaxPool3d_5a_2x2
        return self.mixed_5c(self.mixed_5b(x))

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        """Mixed_5c maps -> (B, 1024): Logits' 2x7x7 stride-1 average pool, then the mean of what is left."""
        # int(): exporters trace shapes as tensors; T, H, W are fixed per export, only B is dynamic
        window = tuple(min(k, int(s)) for k, s in zip((2, 7, 7), maps.shape[2:], strict=True))
        return F.avg_pool3d(maps, window, stride=1).mean(dim=(2, 3, 4))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1024) features -> (B, num_classes) logits (features unchanged when there is no classifier)."""
        if self.logits is None:
            return features
        return self.logits(self.dropout(features)[:, :, None, None, None]).flatten(1)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh `num_classes`-way classifier (0 removes it); the DeepMind init of the logits conv."""
        like = next(self.parameters())  # the new classifier on the model's device and dtype
        self.logits = self._classifier(num_classes)
        if self.logits is not None:
            self.logits.to(device=like.device, dtype=like.dtype)
        self.num_classes = num_classes
        self.labels = None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file (never a full pickle)."""
    try:
        return unwrap_state_dict(load_checkpoint_file(path))[0]
    except CatnetError as e:
        if str(path) in str(e):
            raise
        raise CatnetError(f"{path}: {e}") from None


def _load_into(model: InceptionI3d, state: dict[str, torch.Tensor], source: Path, keep_head: bool) -> None:
    """Strict load of `state`; with keep_head=False the classifier is left as initialised and not loaded."""
    own = {k: v for k, v in model.state_dict().items() if keep_head or not k.startswith("logits.")}
    if not keep_head:
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    check_state_fits(own, state, f"checkpoint {source} does not fit i3d_inception")
    model.load_state_dict(state, strict=keep_head)


def _saved_labels(path: Path, num_classes: int) -> list[str] | None:
    """Class names stored in a safetensors checkpoint's metadata (as `catnet finetune-backbone` writes)."""
    if path.suffix != ".safetensors":
        return None
    try:
        labels = json.loads(read_safetensors_metadata(path).get("labels", "null"))
    except ValueError:
        return None
    ok = isinstance(labels, list) and len(labels) == num_classes > 0
    return [str(n) for n in labels] if ok else None


def build_i3d_inception(pretrained: bool = False, checkpoint: str | Path | None = None,
                        num_classes: int | None = None, drop_rate: float = 0.0, **options) -> InceptionI3d:
    """Inception-I3D, random or with weights, in eval mode.

    pretrained: DeepMind's Kinetics-400 RGB weights converted by `catnet weights fetch` (labels attached).
    checkpoint: a state dict of this model (safetensors or weights-only torch file).
    num_classes: classifier size; default 400 (pretrained/random) or the checkpoint's. A value different from
      the weights' keeps the backbone and starts a fresh classifier; 0 drops it (forward = features).
    drop_rate: dropout before the classifier (training only; DeepMind trained with keep_prob 0.5).
    """
    if options:
        raise CatnetError(f"i3d_inception: unknown option(s) {', '.join(sorted(options))}")
    if pretrained and checkpoint is not None:
        raise CatnetError("i3d_inception: give either pretrained=True or a checkpoint, not both")

    state, source = None, None
    if pretrained:
        source = converted_weights_path()
        if not source.is_file():
            raise CatnetError(f"pretrained Inception-I3D weights not found at {source}; "
                              "run `catnet weights fetch` first")
    elif checkpoint is not None:
        source = Path(checkpoint)
    if source is not None:
        state = load_state_dict_file(source)

    ckpt_classes = 0
    if state is not None and "logits.conv.weight" in state:
        ckpt_classes = state["logits.conv.weight"].shape[0]
    if num_classes is None:
        num_classes = ckpt_classes if checkpoint is not None else KINETICS_CLASSES
    if num_classes < 0:
        raise CatnetError(f"i3d_inception: num_classes must be >= 0, got {num_classes}")

    model = InceptionI3d(num_classes=num_classes, drop_rate=drop_rate)
    if state is not None:
        keep_head = num_classes == ckpt_classes
        _load_into(model, state, source, keep_head)
        if pretrained:
            model.weights_source = "deepmind-kinetics400"
            if keep_head and num_classes == KINETICS_CLASSES:
                model.labels = read_labels(LABEL_FILE)
        else:
            model.weights_source = f"checkpoint:{source.name}"
            if keep_head:
                model.labels = _saved_labels(source, num_classes)
    model.weights_id = weights_id(model)
    return model.eval()
