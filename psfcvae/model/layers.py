"""The building blocks both networks use: the Fourier positional encoding of the condition and the MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """γ(c) = [sin(2^0 π s c), cos(2^0 π s c), ..., sin(2^(L-1) π s c), cos(2^(L-1) π s c)]: [B, C] -> [B, 2 L C].

    With s = 1 (the spec) every band has period 2 in c, so c = -1 and c = +1, opposite
    edges of the field (and the nearest and farthest depth), get the same encoding;
    s = 0.5 keeps them apart.
    """

    def __init__(
        self,
        num_frequencies: int,
        scale: float = 1.0,
        cond_dim: int = 2,
        depth_frequencies: int | None = None,
        has_depth: bool | None = None,
        has_focus: bool = False,
    ):
        super().__init__()
        freqs = (2.0 ** torch.arange(num_frequencies)) * math.pi * scale  # [L]
        freqs = freqs[:, None].repeat(1, cond_dim)  # [L, C]
        has_depth = cond_dim == 3 if has_depth is None else has_depth
        limited = int(has_depth) + int(has_focus)  # the depth and focus codes are the last columns, in that order
        if limited and depth_frequencies is not None:
            # Only the lowest bands vary with depth (and focus): with a few grid depths (focus
            # settings), higher ones would oscillate between them. Zeroed bands give constant
            # features, so the network's input size stays 2 L C.
            freqs[depth_frequencies:, cond_dim - limited :] = 0.0
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = c[:, None, :] * self.freqs[None]  # [B, L, C]
        return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)  # [B, L*2*C]

    def out_dim(self, cond_dim: int) -> int:
        return 2 * self.freqs.shape[0] * cond_dim


def mlp(in_dim: int, hidden_dim: int, num_layers: int, out_dim: int) -> nn.Sequential:
    """num_layers hidden layers of width hidden_dim (SiLU), then a linear output layer."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.SiLU()]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)
