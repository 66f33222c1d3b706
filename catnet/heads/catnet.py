"""CATNet's video-level head (paper Section 3, Eqs. 2-8) and its Table-1 ablations as configurations.

    clip features x_1..x_K ─► local attention (Eqs. 2-3) ─► FC-Norm (Eq. 4) ─► global attention (Eqs. 5-6)
                           ─► aggregation: summation (Eq. 7) or concatenation (Eq. 8) ─► dropout ─► FC

Table-1 rows are presets of this one module (see `PRESETS`): `avgpool` = one head with uniform attention
and no FC-Norm (the mean of the clip features), `local` = local attention with or without FC-Norm and no
global attention, `catnet` = everything; `linear` = the same model as avgpool, named as the reference.

Where the paper is ambiguous, the choice and its alternative option:
- Eq. 4 says "a FC layer": one FC shared by all heads (default, N-independent parameter count);
  `per_head_fc=True` gives every head its own FC.
- Eq. 4's FC width is not given: `fc_dim=None` keeps D.
- Eqs. 5-8 write y_i' while Eq. 4 defines the normalised Y'. We feed the normalised features
  (`global_features="normalized"`): the global module takes "the self-attention features", i.e. the
  local module's output, and with raw y_i' the normalisation of Eq. 4 would never reach the classifier.
  `global_features="raw"` uses the un-normalised FC outputs in Eqs. 5-8 instead.
- Without global attention (the `local` rows) heads are combined as if all beta_i = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from catnet.heads.common import (
    NORMALISED_SCALE,
    HeadConfig,
    VideoHead,
    check_choice,
    check_positive,
    l2_normalize_heads,
    masked_softmax,
)

ATTENTIONS = ("learned", "uniform")
AGGREGATIONS = ("concat", "sum")
GLOBAL_FEATURES = ("normalized", "raw")


@dataclass
class CATNetConfig(HeadConfig):
    num_heads: int = 32  # N; the paper's default (Sec. 4.1)
    attention: str = "learned"  # "uniform": alpha_ij = 1/K, i.e. mean pooling (the avgpool baseline)
    fc_norm: bool = True  # Eq. 4
    per_head_fc: bool = False  # Eq. 4 with one FC per head instead of one shared FC
    fc_dim: int | None = None  # width of the Eq. 4 FC; None = in_dim
    global_attention: bool = True  # Eqs. 5-6
    global_features: str = "normalized"  # which y_i' Eqs. 5-8 use: "normalized" (Eq. 4 output) or "raw"
    aggregation: str = "concat"  # "concat" (Eq. 8, paper default) or "sum" (Eq. 7)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("num_heads", self.num_heads)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("global_features", self.global_features, GLOBAL_FEATURES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.fc_dim is not None:
            check_positive("fc_dim", self.fc_dim)

    @property
    def feature_dim(self) -> int:
        """Width of each head's output y_i' (or y_i without FC-Norm)."""
        return (self.fc_dim or self.in_dim) if self.fc_norm else self.in_dim

    def default_logit_scale(self) -> float:
        """NORMALISED_SCALE when the classifier sees Eq. 4's normalised heads (V of norm 1 for concat;
        at most 1/sqrt(N) for sum, hence x sqrt(N)); 1/sqrt(N) when it sees N concatenated raw heads, Eq.
        4's 1/sqrt(N) without the L2 norm; else 1. Why: docs/heads.md, "Logit scale"."""
        n = self.num_heads
        if self.fc_norm and self.global_features == "normalized":
            return NORMALISED_SCALE * (math.sqrt(n) if self.aggregation == "sum" else 1.0)
        return 1.0 / math.sqrt(n) if self.aggregation == "concat" else 1.0


# Table-1 rows as option presets; build_head(name, ...) starts from these and applies the user's options.
# avgpool is a linear classifier on the mean of frozen clip features, a linear probe: no dropout, since on
# a linear model input dropout is a second L2 penalty on top of the recipe's weight decay (docs/heads.md,
# "Dropout"). The attention heads, not linear in their parameters, keep the config's 0.5.
AVGPOOL = {"num_heads": 1, "attention": "uniform", "fc_norm": False, "global_attention": False,
           "dropout": 0.0}
PRESETS: dict[str, dict] = {
    "catnet": {},
    "local": {"global_attention": False},
    "avgpool": AVGPOOL,
    # the reference every attention head must beat, by its own name: the same model as avgpool
    "linear": AVGPOOL,
}


class LocalAttention(nn.Module):
    """N attention heads over the K clips.

    alpha_ij = softmax_j(x_j^T w_i) (Eq. 2), y_i = sum_j alpha_ij x_j (Eq. 3).
    """

    def __init__(self, in_dim: int, num_heads: int):
        super().__init__()
        # No bias: a per-head constant added to every x_j^T w_i cancels in the softmax.
        self.score = nn.Linear(in_dim, num_heads, bias=False)

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """alpha (B, N, K) of Eq. 2 alone."""
        return masked_softmax(self.score(x).transpose(1, 2), mask.unsqueeze(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.weights(x, mask)
        return alpha @ x, alpha  # y (B, N, D), alpha (B, N, K)


class FCNorm(nn.Module):
    """Eq. 4: y_i' = FC(y_i), then y_i' / (sqrt(N) ||y_i'||_2). Returns (raw y', normalised Y')."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, per_head: bool):
        super().__init__()
        self.per_head = per_head
        if per_head:
            self.weight = nn.Parameter(torch.empty(num_heads, out_dim, in_dim))
            self.bias = nn.Parameter(torch.empty(num_heads, out_dim))
            # Same init as nn.Linear, per head.
            bound = 1.0 / math.sqrt(in_dim)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_head:
            y = torch.einsum("bnd,nod->bno", y, self.weight) + self.bias
        else:
            y = self.fc(y)
        return y, l2_normalize_heads(y)

    def pooled(self, alpha: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as forward(alpha @ x) for the shared FC, computed as alpha @ (x W^T) + b.

        The FC is linear, so FC(sum_j alpha_ij x_j) = sum_j alpha_ij (W x_j) + b for any alpha (Eqs. 3-4).
        The FC then runs on the K clips instead of the N heads: K*D*D instead of N*D*D multiply-adds, the
        bulk of the head's arithmetic (docs/benchmarks.md section 4).
        """
        y = alpha @ nn.functional.linear(x, self.fc.weight) + self.fc.bias
        return y, l2_normalize_heads(y)


class GlobalAttention(nn.Module):
    """G = mean_i y_i' (Eq. 5), beta_i = sigmoid(w^T [y_i'; G]) (Eq. 6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim, 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        g = y.mean(dim=1, keepdim=True).expand_as(y)
        return torch.sigmoid(self.fc(torch.cat([y, g], dim=-1))).squeeze(-1)  # (B, N)


def aggregate(y: torch.Tensor, beta: torch.Tensor | None, how: str) -> torch.Tensor:
    """Video representation V from head features y (B, N, D) and global weights beta (B, N).

    "sum": V = sum_i beta_i y_i / sum_i beta_i (Eq. 7), width D;
    "concat": V = [beta_1 y_1, ..., beta_N y_N] (Eq. 8), width N*D. beta=None means all beta_i = 1.
    """
    if beta is None:
        beta = y.new_ones(y.shape[:2])
    weighted = beta.unsqueeze(-1) * y
    if how == "concat":
        return weighted.flatten(1)
    # beta_i = sigmoid(...) > 0, so the clamp only guards against underflow.
    return weighted.sum(1) / beta.sum(1, keepdim=True).clamp(min=1e-12)


class CATNetHead(VideoHead):
    """Cascade multi-head attention head; `config` selects the Table-1/2 variant."""

    def __init__(self, config: CATNetConfig):
        super().__init__()
        self.config = c = config
        n, d = c.num_heads, c.feature_dim
        self.local = LocalAttention(c.in_dim, n) if c.attention == "learned" else None
        self.fc_norm = FCNorm(c.in_dim, d, n, c.per_head_fc) if c.fc_norm else None
        self.global_att = GlobalAttention(d) if c.global_attention else None
        self._init_classifier(n * d if c.aggregation == "concat" else d)

    def _features(self, x: torch.Tensor, mask: torch.Tensor):
        """(V, alpha | None, beta | None) for zero-padded x and bool mask."""
        c = self.config
        if self.local is not None:
            alpha = weights = self.local.weights(x, mask)
        else:
            # Uniform attention = the masked mean, shared by all N heads; not reported as attention.
            uniform = x.new_zeros(x.shape[0], c.num_heads, x.shape[1])
            weights, alpha = masked_softmax(uniform, mask.unsqueeze(1)), None
        if self.fc_norm is not None:
            if self._fc_before_pooling(x.shape[1]):
                raw, normed = self.fc_norm.pooled(weights, x)
            else:
                raw, normed = self.fc_norm(weights @ x)  # Eq. 3, then Eq. 4
            y = normed if c.global_features == "normalized" else raw
        else:
            y = weights @ x  # Eq. 3
        beta = self.global_att(y) if self.global_att is not None else None
        return aggregate(y, beta, c.aggregation), alpha, beta

    def _fc_before_pooling(self, num_clips: int) -> bool:
        """Run Eq. 4's shared FC on the K clips rather than the N heads when that is cheaper.

        Traced or exported graphs always take the heads-first order, so they never depend on K.
        """
        if self.config.per_head_fc or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return num_clips < self.config.num_heads
