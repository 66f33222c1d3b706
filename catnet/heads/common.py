"""Pieces every video-level head shares: the base config, input checks and masking helpers.

All heads take clip features `x` (B, K, D) and an optional boolean `mask` (B, K), True = valid clip.
Masking is done with `torch.where` and finite fills only, never with Python branches on values, so
every head stays traceable by torch.export and the ONNX exporter with dynamic B and K.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catnet.errors import CatnetError

# Small enough to never matter for real features, large enough to keep fp16 away from 0/0.
NORM_EPS = 1e-6
# The radius the classifier's input is scaled to when the representation is L2-normalised (NormFace /
# L2-constrained softmax; docs/heads.md, "Logit scale"): logit gaps of ln(p (C - 2) / (1 - p)) are then
# reachable for every usual label set.
NORMALISED_SCALE = 16.0


@dataclass
class HeadConfig:
    """Fields every head has. Subclasses add their own options."""

    name: str
    in_dim: int
    num_classes: int
    # Dropout on the video representation, just before the classifier. The paper does not say; 0.5 is
    # the usual value for classifiers on I3D features (I3D, Non-local) and helps the small datasets.
    dropout: float = 0.5
    # logits = W (logit_scale * V) + b. build_head fills each head's own default (`default_logit_scale`,
    # docs/heads.md "Logit scale"); 1.0 here is what a config without the key (catnet 0.1 runs) meant.
    logit_scale: float = 1.0
    # Standardise each clip feature by a per-dimension mean and std held as buffers (input_mean,
    # input_std) before anything else; `catnet train` fills them from its training split.
    standardize: bool = False

    def __post_init__(self) -> None:
        if self.in_dim < 1:
            raise CatnetError(f"head in_dim must be >= 1, got {self.in_dim}")
        if self.num_classes < 1:
            raise CatnetError(f"head num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise CatnetError(f"head dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.logit_scale, (int, float)) and math.isfinite(self.logit_scale)
                and self.logit_scale > 0):
            raise CatnetError(f"head logit_scale must be a finite number > 0, got {self.logit_scale!r}")

    def default_logit_scale(self) -> float:
        """The scale `build_head` gives this head when none is asked for: 1 (its classifier sees raw
        features); heads with L2-normalised representations override it."""
        return 1.0


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CatnetError(f"head option {key} must be one of {', '.join(choices)}; got {value!r}")


def check_positive(key: str, value: int) -> None:
    if value < 1:
        raise CatnetError(f"head option {key} must be >= 1, got {value}")


class VideoHead(nn.Module):
    """Base class of every head: clip features (B, K, D) + mask (B, K) -> video representation V -> logits.

    - `forward_features(x, mask)` -> (V (B, num_features), alpha (B, N, K) | None, beta (B, N) | None);
    - `forward_head(V)` -> logits (B, C): dropout, then the linear classifier, both owned here;
    - `forward(x, mask)` = forward_head(forward_features(x, mask)[0]); `forward_attention` returns all three
      as a dict; `reset_classifier(n)` swaps in a fresh n-way classifier (transfer, Sec. 4.3).
    Subclasses build their pooling, then call `_init_classifier(num_features)` (last, so the random
    initialisation order stays pooling-then-classifier), and implement `_features(x, mask)`, which gets
    `x` with masked clips zeroed (no garbage or NaN in padding can leak into a valid output) and a bool
    `mask` of shape (B, K).
    """

    config: HeadConfig

    def _init_classifier(self, num_features: int) -> None:
        self.num_features = num_features
        self.drop = Dropout(self.config.dropout)
        self.classifier = nn.Linear(num_features, self.config.num_classes)
        if self.config.standardize:  # buffers: saved with the weights, exported with the graph
            self.register_buffer("input_mean", torch.zeros(self.config.in_dim))
            self.register_buffer("input_std", torch.ones(self.config.in_dim))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-dimension mean and std of the clip features (the training split's)."""
        if not self.config.standardize:
            raise CatnetError("this head was built without standardize=True")
        with torch.no_grad():
            self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def _features(self, x: torch.Tensor, mask: torch.Tensor):
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """(V, alpha | None, beta | None): the video representation before dropout and the classifier,
        the local attention of Eq. 2 and the global attention of Eq. 6 (None for heads without them)."""
        norm = (self.input_mean, self.input_std) if self.config.standardize else None
        return self._features(*prepare_inputs(x, mask, self.config.in_dim, norm))

    def forward_head(self, v: torch.Tensor) -> torch.Tensor:
        v = self.drop(v)
        if self.config.logit_scale != 1.0:
            v = v * self.config.logit_scale
        return self.classifier(v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask)[0])

    def forward_attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Logits plus the local attention alpha (B, N, K) and global attention beta (B, N), or None."""
        v, alpha, beta = self.forward_features(x, mask)
        return {"logits": self.forward_head(v), "alpha": alpha, "beta": beta}

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised `num_classes`-way classifier; everything before it is kept."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        old = self.classifier.weight
        self.classifier = nn.Linear(self.num_features, num_classes).to(device=old.device, dtype=old.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout, with a faster mask on CPU.

    PyTorch's CPU dropout draws its mask with bernoulli_, several times slower than uniform draws compared
    with p: a visible share of a CPU step on the 65k-wide concatenation (Eq. 8; docs/benchmarks.md). Same
    distribution and scaling; other devices keep the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or torch.jit.is_tracing():
            return super().forward(x)
        keep = torch.rand_like(x) >= self.p
        return x * keep / (1.0 - self.p)


def prepare_inputs(
    x: torch.Tensor, mask: torch.Tensor | None, in_dim: int,
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes (static checks only, so tracing is unaffected), standardise by `norm` = (mean, std)
    when given, and zero the masked clips (after standardising, so padding stays exactly zero)."""
    if x.dim() != 3:
        raise CatnetError(f"head input must be clip features (B, K, D), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise CatnetError(f"head expects {in_dim}-d clip features, got {x.shape[-1]}-d")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        if mask.shape != x.shape[:2]:
            raise CatnetError(f"mask must have shape (B, K) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
    if norm is not None:
        x = (x - norm[0].to(x.dtype)) / norm[1].to(x.dtype)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` restricted to `mask`; masked entries get exactly 0.

    Masked scores are replaced by the dtype's most negative finite value rather than -inf, so a
    fully-masked row gives a row of zeros instead of 0/0 = NaN.
    """
    fill = torch.full((), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
    probs = torch.softmax(torch.where(mask, scores, fill), dim=dim)
    return probs * mask.to(probs.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` (B, K, D) over the valid clips; zeros for a video without any."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def l2_normalize_heads(y: torch.Tensor) -> torch.Tensor:
    """y_i / (sqrt(N) ||y_i||_2) for each head i of y (B, N, D): Eq. (4)'s normalisation.

    The sqrt(N) makes the concatenation of the N heads unit-norm as a whole.
    """
    return F.normalize(y, dim=-1, eps=NORM_EPS) / math.sqrt(y.shape[-2])


def clip_weights(alpha, num_clips: int) -> np.ndarray:
    """The per-clip weight of the paper's Fig. 6: sum_i alpha_ij over the N heads (Eq. 2), summed over the
    crops of each clip (views are clip-major, v = k * crops + c): (N, V) -> (K,) float64.

    Reports show it as is; `catnet predict` shows each clip's share of the total.
    """
    w = np.asarray(alpha.float().cpu() if isinstance(alpha, torch.Tensor) else alpha, dtype=np.float64).sum(0)
    crops = max(1, w.shape[0] // max(1, num_clips))
    return w[: num_clips * crops].reshape(num_clips, crops).sum(1)
