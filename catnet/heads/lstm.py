"""An LSTM over the clip sequence (the "ConvNet+LSTM" family of Table 3), last or mean hidden state -> FC.

Masked clips are skipped, not fed as zeros: the valid clips are first moved, in order, to the front of
the sequence (a scatter, so it exports with dynamic K), the LSTM runs over the whole padded sequence,
and because it is causal and unidirectional the outputs at the valid positions do not depend on the
padding. "last" reads the output at the last valid clip, "mean" averages the outputs of the valid clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from catnet.heads.common import HeadConfig, VideoHead, check_choice, check_positive, masked_mean

POOLINGS = ("last", "mean")


@dataclass
class LSTMConfig(HeadConfig):
    hidden_size: int = 512
    num_layers: int = 1
    pooling: str = "last"  # "last" hidden state or "mean" over the valid clips

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("hidden_size", self.hidden_size)
        check_positive("num_layers", self.num_layers)
        check_choice("pooling", self.pooling, POOLINGS)


def pack_valid_first(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the valid clips of each video to the front, keeping their order.

    Returns the reordered x and the number of valid clips per video (B,). Clip j goes to position
    (#valid before j) if valid, else (#valid in total + #invalid before j): a permutation per row.
    """
    m = mask.to(torch.long)
    count = m.sum(1, keepdim=True)
    pos = torch.where(mask, m.cumsum(1) - 1, count + (1 - m).cumsum(1) - 1)
    packed = torch.zeros_like(x).scatter(1, pos.unsqueeze(-1).expand_as(x), x)
    return packed, count.squeeze(1)


class LSTMHead(VideoHead):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = c = config
        self.lstm = nn.LSTM(c.in_dim, c.hidden_size, num_layers=c.num_layers, batch_first=True)
        self._init_classifier(c.hidden_size)

    def _features(self, x, mask):
        packed, count = pack_valid_first(x, mask)
        # Explicit zero states sized from x keep the batch dimension dynamic in the ONNX graph.
        h0 = x.new_zeros(self.config.num_layers, x.shape[0], self.config.hidden_size)
        out, _ = self.lstm(packed, (h0, h0))  # (B, K, H)
        if self.config.pooling == "last":
            # A video without valid clips reads position 0, the state after one zero input: finite.
            idx = (count - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
            v = out.gather(1, idx).squeeze(1)
        else:
            steps = torch.arange(out.shape[1], device=x.device).unsqueeze(0)
            v = masked_mean(out, steps < count.unsqueeze(1))
        return v, None, None
