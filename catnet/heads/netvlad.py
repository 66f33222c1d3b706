"""NetVLAD pooling over clips (Arandjelovic et al., CVPR 2016; used for video by ActionVLAD).

Each clip is softly assigned to C learnable cluster centres, a_c(x_j) = softmax_c(w_c^T x_j + b_c); the
video is described by the assignment-weighted residuals V_c = sum_j a_c(x_j) (x_j - c_c). Each V_c is
L2-normalised (intra-normalisation), the concatenation is L2-normalised again (global normalisation),
then classified by one FC. Masked clips get zero assignment, so they contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from catnet.heads.common import NORM_EPS, NORMALISED_SCALE, HeadConfig, VideoHead, check_positive


@dataclass
class NetVLADConfig(HeadConfig):
    num_clusters: int = 64  # as in NetVLAD and ActionVLAD

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("num_clusters", self.num_clusters)

    def default_logit_scale(self) -> float:
        return NORMALISED_SCALE  # the descriptor is globally L2-normalised


class NetVLAD(nn.Module):
    def __init__(self, in_dim: int, num_clusters: int):
        super().__init__()
        self.assign = nn.Linear(in_dim, num_clusters)
        # Centres on the scale of the default Linear init; training moves them to the features.
        self.centers = nn.Parameter(torch.randn(num_clusters, in_dim) / in_dim**0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.assign(x), dim=-1) * mask.unsqueeze(-1).to(x.dtype)  # (B, K, C)
        v = torch.einsum("bkc,bkd->bcd", a, x) - a.sum(1).unsqueeze(-1) * self.centers
        v = F.normalize(v, dim=-1, eps=NORM_EPS)  # intra-normalisation
        return F.normalize(v.flatten(1), dim=-1, eps=NORM_EPS)  # global normalisation


class NetVLADHead(VideoHead):
    def __init__(self, config: NetVLADConfig):
        super().__init__()
        self.config = c = config
        self.vlad = NetVLAD(c.in_dim, c.num_clusters)
        self._init_classifier(c.num_clusters * c.in_dim)

    def _features(self, x, mask):
        return self.vlad(x, mask), None, None
