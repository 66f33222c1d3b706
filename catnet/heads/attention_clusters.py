"""Attention Clusters (Long et al., CVPR 2018), the baseline closest to CATNet's local attention.

Each of the N attention units pools the clips exactly as Eqs. 2-3 do (the same linear attention, so the
comparison isolates the diversity operation). The difference is the "shifting operation" that replaces
CATNet's FC-Norm: a learnable *scalar* weight and bias per unit, o_i = w_i * y_i + b_i, then
o_i / (sqrt(N) ||o_i||_2); the N outputs are concatenated and classified by one FC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from catnet.heads.catnet import LocalAttention
from catnet.heads.common import NORMALISED_SCALE, HeadConfig, VideoHead, check_positive, l2_normalize_heads


@dataclass
class AttentionClustersConfig(HeadConfig):
    num_heads: int = 32  # attention units; same N as CATNet's default for a like-for-like comparison

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("num_heads", self.num_heads)

    def default_logit_scale(self) -> float:
        return NORMALISED_SCALE  # the concatenation of the N normalised units has norm 1


class Shift(nn.Module):
    """o_i = w_i * y_i + b_i with scalars w_i, b_i, then L2-normalised and scaled by 1/sqrt(N)."""

    def __init__(self, num_heads: int):
        super().__init__()
        # Identity at init; training moves each unit's features to its own place on the sphere.
        self.weight = nn.Parameter(torch.ones(num_heads))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return l2_normalize_heads(self.weight[:, None] * y + self.bias[:, None])


class AttentionClustersHead(VideoHead):
    def __init__(self, config: AttentionClustersConfig):
        super().__init__()
        self.config = c = config
        self.local = LocalAttention(c.in_dim, c.num_heads)
        self.shift = Shift(c.num_heads)
        self._init_classifier(c.num_heads * c.in_dim)

    def _features(self, x, mask):
        y, alpha = self.local(x, mask)
        return self.shift(y).flatten(1), alpha, None
