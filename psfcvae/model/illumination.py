"""The illumination head: relative illumination and the lit field, learned beside the CVAE.

A small MLP on the condition c = (x, y[, d][, φ]) predicts, per point, the log relative
illumination of each channel and one logit for "lit" (all three channels of the point
hold a valid PSF in the grid file). For a rotationally symmetric (canonical-frame) model it
sees, as the CVAE's networks do, the code of ρ² in place of (x, y) (ρ the radius on the
sensor over the corner's): its illumination and lit field are then round, as the lens's
are. Given (x, y) instead, on LA1131's 3:2 sensor its logit called a test point dark that
gets 5.8% of the axis's light at a radius where grid points are lit: the point lies nearer a
dark grid point on the normalised grid than a lit one, though not in radius, and it was most
of the model's error over the field (docs/results.md, "The edge of the lit field").

It is trained on every grid point, dark ones included (they teach the logit), with the
log-illumination target only where a channel is valid (log 0 has no value). Illumination is
then exp(log) where the logit says lit, and 0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from psfcvae.model.frame import max_radius, polar
from psfcvae.model.layers import PositionalEncoding, mlp

HIDDEN = 64  # the illumination is a smooth function of the field: a small network is plenty
LAYERS = 2
FREQUENCIES = 3
PE_SCALE = 0.5  # as the CVAE's default: keeps c = -1 and c = +1 apart
# Bands that vary with depth and focus: the lowest alone, as the CVAE's default depth_frequencies. With all three,
# LA1131's head put 1.4-1.6 times the axis's light between its grid depths 0.5, 1 and 5 m where the lens gives 1.
DEPTH_FREQUENCIES = 1
LIT_BIAS = 3.0  # initial lit logit: sigmoid 0.95


class IlluminationHead(nn.Module):
    """cond [B, C] -> (log relative illumination [B, 3], lit logit [B])."""

    def __init__(self, cond_dim: int, has_depth: bool, has_focus: bool, field_scale: tuple[float, float] | None = None):
        """cond_dim: C, whose last columns are the depth's code (has_depth) and the focus's (has_focus); field_scale:
        the sensor's (half-width, half-height) over the longer for a canonical model, whose head sees
        (2ρ² - 1, c[2:]) (the ρ² code of CVAE._frame), None for one that sees c itself."""
        super().__init__()
        self.field_scale = None if field_scale is None else tuple(float(v) for v in field_scale)
        in_dim = cond_dim - 1 if self.field_scale else cond_dim
        self.pe = PositionalEncoding(
            FREQUENCIES, PE_SCALE, in_dim, DEPTH_FREQUENCIES, has_depth=has_depth, has_focus=has_focus
        )
        self.net = mlp(self.pe.out_dim(in_dim), HIDDEN, LAYERS, 4)
        with torch.no_grad():  # start at "lit, illumination 1": a short run must not call lit points dark
            self.net[-1].bias[:3] = 0.0
            self.net[-1].bias[3] = LIT_BIAS
        # Whether the training file had any dark point; without one, every point is lit, whatever the logit.
        self.register_buffer("any_dark", torch.zeros((), dtype=torch.bool))

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.field_scale:
            r, _ = polar(cond[:, :2], self.field_scale)
            rho = r / max_radius(self.field_scale)
            cond = torch.cat([(2.0 * rho * rho - 1.0)[:, None], cond[:, 2:]], dim=1)
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
