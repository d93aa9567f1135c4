"""The illumination head: relative illumination and the lit field, learned beside the CVAE.

A small MLP on the same condition c = (x, y[, d]) predicts, per point, the log relative
illumination of each channel and one logit for "lit" (all three channels of the point
hold a valid PSF in the grid file). It is trained on every grid point, dark ones
included (they teach the logit), with the log-illumination target only where a channel
is valid (log 0 has no value). Illumination is then exp(log) where the logit says lit,
and 0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from psfcvae.model.layers import PositionalEncoding, mlp

HIDDEN = 64  # the illumination is a smooth function of the field: a small network is plenty
LAYERS = 2
FREQUENCIES = 3
PE_SCALE = 0.5  # as the CVAE's default: keeps c = -1 and c = +1 apart
LIT_BIAS = 3.0  # initial lit logit: sigmoid 0.95


class IlluminationHead(nn.Module):
    """cond [B, C] -> (log relative illumination [B, 3], lit logit [B])."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.pe = PositionalEncoding(FREQUENCIES, PE_SCALE, cond_dim)
        self.net = mlp(self.pe.out_dim(cond_dim), HIDDEN, LAYERS, 4)
        with torch.no_grad():  # start at "lit, illumination 1": a short run must not call lit points dark
            self.net[-1].bias[:3] = 0.0
            self.net[-1].bias[3] = LIT_BIAS
        # Whether the training file had any dark point; without one, every point is lit, whatever the logit.
        self.register_buffer("any_dark", torch.zeros((), dtype=torch.bool))

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(self.pe(cond))
        return out[:, :3], out[:, 3]

    @torch.no_grad()
    def predict(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(illumination [B, 3], 1 on axis, 0 where dark; lit [B] bool)."""
        log_illum, logit = self(cond)
        lit = (logit > 0) | ~self.any_dark
        return log_illum.exp() * lit[:, None], lit


def illumination_loss(
    head: IlluminationHead, cond: torch.Tensor, illum: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """BCE of the lit logit + MSE of the log illumination on valid channels.

    cond [B, C]; illum [B, 3] relative illumination; valid [B, 3] bool (enough rays for a PSF).
    """
    log_illum, logit = head(cond)
    lit = valid.all(dim=1).float()
    bce = F.binary_cross_entropy_with_logits(logit, lit)
    w = valid.float()
    target = torch.log(illum.clamp_min(1e-6))
    mse = ((log_illum - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)
    return bce + mse
