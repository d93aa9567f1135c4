"""The conditional VAE of docs/design.md: encoder q(z|K,c), learned prior p(z|c), decoder p(K|z,c)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from psfcvae.model.frame import canonical_side, max_radius, polar, rotate_sample
from psfcvae.model.illumination import IlluminationHead, illumination_loss
from psfcvae.model.layers import PositionalEncoding, mlp
from psfcvae.model.losses import kl_loss, recon_loss, smooth_loss, weighted_mean

LOGVAR_BOUND = 10.0  # log σ² is kept in (-10, 10): σ between 0.007 and 150, never 0 or inf
NORM_EPS = 1e-8  # added to each channel's sum before normalising
# Canonical frame: how the decoder's fine kernel is interpolated when rotated into the field;
# bilinear spreads each fine pixel of a sharp PSF over its neighbours (docs/symmetry.md).
ROTATION = "bicubic"
# Canonical frame: σ [stored px] of the Gaussian that smooths the decoder's fine kernel in log space (its
# logits, before softplus). The training PSFs fix each stored pixel's sum at a few angles only, not how
# it is spread over the fine pixels; left free, that spread is speckle, which other angles integrate
# differently (docs/symmetry.md). A smooth logit field keeps every Gaussian spot, however sharp.
LOG_BLUR = 0.5


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network (stored in every checkpoint)."""

    kernel_size_small: int = 15  # PSF side [px]: the grid file's stored kernel side
    # c = (x, y[, d][, φ]): d the inverse depth mapped to [-1, 1] (when the file has several depths), φ the
    # inverse focus distance mapped to [-1, 1] (when it has several focus settings: has_focus).
    cond_dim: int = 2
    latent_dim: int = 128
    hidden_dim: int = 512
    num_layers: int = 4
    num_frequencies: int = 10
    pe_scale: float = 1.0  # c is multiplied by this before the encoding (1.0: the spec)
    depth_frequencies: int | None = None  # bands used for d (the rest are held constant); None: all
    depth_min: float = 1.0  # [m] nearest training depth: d = +1
    depth_max: float = 1.0  # [m] farthest training depth: d = -1
    has_focus: bool = False  # the condition's last column is the focus code φ
    focus_min: float = 1.0  # [m] nearest training focus: φ = +1
    focus_max: float = 1.0  # [m] farthest training focus (inf allowed): φ = -1
    # With depth and focus: inverse, the networks see d; defocus, they see the code of 1/depth - 1/focus instead
    # (_defocus). The condition c itself, what the API, the data and the table build, is (x, y, d, φ) either way.
    focus_code: str = "inverse"
    recon_weight: float = 1.0
    kl_weight: float = 1e-4
    smooth_weight: float = 1e-3
    prior_recon_weight: float = 0.0  # weight of MSE(decode(μ_p(c), c), K): trains the prior-mean path itself
    # The frame the networks see (psfcvae/model/frame.py). cartesian: the spec, c = (x, y[, d]).
    # canonical: a rotationally symmetric lens; the networks see (r²[, d]), the decoder draws
    # the PSF at (r, 0) on a kernel `supersample` times finer than kernel_size_small, even in x
    # plus r times odd in x (regular on the axis, docs/symmetry.md), which is rotated by
    # θ = atan2(y, x) (bicubically: ROTATION) into the field and integrated over the kernel_size_small² pixels.
    frame: str = "cartesian"
    supersample: int = 3  # canonical kernel pixels per stored pixel (per axis)
    scale_weight: float = 0.0  # weight of mean(log(sum of the decoder's channel before normalisation)²)
    field_scale: tuple[float, float] = (1.0, 1.0)  # sensor half-width, half-height over the longer one
    # The weight of the illumination head's loss (psfcvae/model/illumination.py): the head, an addition
    # to the spec's networks, is part of every model.
    illumination_weight: float = 1.0

    @property
    def has_depth(self) -> bool:
        """Whether the condition holds the depth code d (after x, y)."""
        return self.cond_dim - int(self.has_focus) == 3


@dataclass
class ModelOutput:
    """Named loss terms (one TensorBoard tag each) and what produced them."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    smooth: torch.Tensor
    recon_prior: torch.Tensor  # MSE of the prior-mean path (0 unless prior_recon_weight > 0)
    scale: torch.Tensor  # mean squared log of the decoder's per-channel sums before normalisation
    psf_hat: torch.Tensor  # [B, 3, k, k]
    mu_q: torch.Tensor  # [B, Z]
    mu_p: torch.Tensor  # [B, Z]
    illum: torch.Tensor | None = None  # the illumination head's loss (None when forward() got no targets)


def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """G [n, n]: G @ x @ G.T convolves x [..., n, n] with a normalised Gaussian of σ ``sigma`` px, edges replicated."""
    half = int(math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    src = (torch.arange(n)[:, None] + t.long()[None, :]).clamp(0, n - 1)  # [n, taps]: the pixel each tap reads
    return torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, src, g.expand(n, -1).contiguous()).float()


def bounded_logvar(raw: torch.Tensor) -> torch.Tensor:
    return LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)


class CVAE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        if args.frame not in ("cartesian", "canonical"):
            raise ValueError(f"frame must be cartesian or canonical, got {args.frame!r}")
        self.canonical = args.frame == "canonical"
        enc_dim = args.cond_dim - 1 if self.canonical else args.cond_dim  # (x, y) -> r
        self.pe = PositionalEncoding(
            args.num_frequencies,
            args.pe_scale,
            enc_dim,
            args.depth_frequencies,
            has_depth=args.has_depth,
            has_focus=args.has_focus,
        )
        pe_dim = self.pe.out_dim(enc_dim)
        k_dim = 3 * args.kernel_size_small**2
        # The canonical kernel covers the k x k window at any rotation, `supersample` times finer.
        k = args.kernel_size_small
        self.out_side = args.supersample * canonical_side(k) if self.canonical else k
        Z = args.latent_dim
        self.encoder = mlp(k_dim + pe_dim, args.hidden_dim, args.num_layers, 2 * Z)  # -> μ_q, log σ²_q
        self.prior = mlp(pe_dim, args.hidden_dim, args.num_layers, 2 * Z)  # -> μ_p, log σ²_p
        # A canonical kernel is mirror-symmetric in y: the decoder draws its upper half (and the axis row),
        # as the part even in x (the columns x >= 0) and the part odd in x (x > 0): as many values.
        out_dim = 3 * ((self.out_side + 1) // 2) * self.out_side if self.canonical else k_dim
        self.decoder = mlp(Z + pe_dim, args.hidden_dim, args.num_layers, out_dim)
        scale = tuple(args.field_scale) if self.canonical else None
        self.illumination = IlluminationHead(args.cond_dim, args.has_depth, args.has_focus, scale)
        if self.canonical:
            S, h = self.out_side, (self.out_side + 1) // 2
            g = blur_matrix(S, LOG_BLUR * args.supersample)
            # The rows below the axis are the mirror images of those above: fold their weights onto them.
            rows = g[:h, :h].index_add(1, S - 1 - torch.arange(h, S), g[:h, h:])
            self.register_buffer("blur_cols", g, persistent=False)
            self.register_buffer("blur_rows", rows, persistent=False)

    def _frame(self, cond: torch.Tensor):
        """Model-space cond [B, C] = (x, y[, d]) -> (what the networks see [B, C'], angle θ [B] or None,
        radius ρ [B] or None).

        canonical: ρ = r / (radius of the sensor corner), in [0, 1], and θ. The networks see ρ²
        mapped to [-1, 1], not ρ: a PSF field smooth in (x, y) is, on the x axis, a function
        of ρ² plus ρ times an odd one (``_draw``), and an N x N grid's points are spread evenly
        in ρ², not in ρ.
        """
        if self.args.focus_code == "defocus" and self.args.has_depth and self.args.has_focus:
            cond = self._defocus(cond)
        if not self.canonical:
            return cond, None, None
        scale = tuple(self.args.field_scale)
        r, theta = polar(cond[:, :2], scale)
        rho = r / max_radius(scale)
        code = (2.0 * rho * rho - 1.0)[:, None]
        return torch.cat([code, cond[:, 2:]], dim=1), theta, rho

    def _defocus(self, cond: torch.Tensor) -> torch.Tensor:
        """(x, y, d, φ) -> (x, y, δ, φ), δ the code of 1/depth - 1/focus [1/m] in [-1, 1] over the training range
        (+1 at the nearest depth and the farthest focus). d and φ are linear in 1/depth and 1/focus, so δ is a fixed
        linear map of them: the defocus the lens sees, up to its scale, on one input."""
        a = self.args
        lo_d, hi_d = 1.0 / a.depth_max, 1.0 / a.depth_min
        lo_f, hi_f = 1.0 / a.focus_max, 1.0 / a.focus_min  # 1/inf = 0
        inv_d = lo_d + 0.5 * (cond[:, 2] + 1.0) * (hi_d - lo_d)
        inv_f = lo_f + 0.5 * (cond[:, 3] + 1.0) * (hi_f - lo_f)
        low, high = lo_d - hi_f, hi_d - lo_f  # the defocus range over the training depths and focus settings
        delta = 2.0 * (inv_d - inv_f - low) / (high - low) - 1.0
        return torch.cat([cond[:, :2], delta[:, None], cond[:, 3:]], dim=1)

    # --- the three networks -------------------------------------------------------------
    def encode(self, psf: torch.Tensor, cond: torch.Tensor):
        """q(z|K,c): psf [B, 3, k, k], cond [B, C] -> μ_q, log σ²_q [B, Z].

        canonical: the encoder sees the PSF turned back by -θ to the +x axis.
        """
        enc, theta, _ = self._frame(cond)
        if theta is not None:
            psf = rotate_sample(psf, -theta, self.args.kernel_size_small, q=1)
        mu, raw = self.encoder(torch.cat([psf.flatten(1), self.pe(enc)], dim=1)).chunk(2, dim=1)
        return mu, bounded_logvar(raw)

    def prior_params(self, cond: torch.Tensor):
        """p(z|c): cond [B, C] -> μ_p, log σ²_p [B, Z]."""
        mu, raw = self.prior(self.pe(self._frame(cond)[0])).chunk(2, dim=1)
        return mu, bounded_logvar(raw)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """p(K|z,c): z [B, Z], cond [B, C] -> K̂ [B, 3, k, k], non-negative, each channel sums to 1.

        canonical: the decoder draws the PSF at (r, 0), mirror-symmetric about the x axis as
        a coaxial lens makes it (and about the y axis too at r = 0: ``_draw``), on the fine
        canonical kernel; it is rotated by θ, cropped to
        the k x k window and normalised, which is also what DeepLens does to rays that land
        outside its window.
        """
        return self._decode(z, cond)[0]

    def _decode(self, z: torch.Tensor, cond: torch.Tensor):
        """(K̂ [B, 3, k, k], log of each channel's sum before normalisation [B, 3])."""
        enc, theta, rho = self._frame(cond)
        out = self._draw(z, enc, rho)
        log_sum = torch.log(out.sum(dim=(-2, -1)) + NORM_EPS)
        if theta is not None:
            k = self.args.kernel_size_small
            out = rotate_sample(out, theta, k, q=self.args.supersample, out_extent=canonical_side(k), mode=ROTATION)
        return out / (out.sum(dim=(-2, -1), keepdim=True) + NORM_EPS), log_sum

    def canonical_kernel(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The decoder's fine kernel at (r, 0), before rotation: [B, 3, S, S], each channel sums to 1."""
        if not self.canonical:
            raise ValueError("a cartesian model has no canonical kernel")
        enc, _, rho = self._frame(cond)
        out = self._draw(z, enc, rho)
        return out / (out.sum(dim=(-2, -1), keepdim=True) + NORM_EPS)

    def _draw(self, z: torch.Tensor, enc: torch.Tensor, rho: torch.Tensor | None) -> torch.Tensor:
        """The decoder's non-negative kernel before normalisation: [B, 3, S, S] (S = k when cartesian).

        canonical (rho [B], the radius over the corner's): softplus(blur(E + ρ·O)), with E even
        and O odd in x, both functions of (z, ρ²), and blur the Gaussian of σ LOG_BLUR. The PSF
        at (-r, 0) is the PSF at (r, 0) mirrored in x; drawn so, the kernel is even in x at
        r = 0 and its odd part (coma) grows from 0 linearly, as a field smooth through the
        axis must. A kernel drawn from r alone is not: between the axis and the grid's
        innermost radius (0.2 on an 8 x 8 grid) it extrapolates, a shifted and lopsided kernel
        at r = 0 that θ turns any way.
        """
        S = self.out_side
        raw = self.decoder(torch.cat([z, self.pe(enc)], dim=1))
        if not self.canonical:
            return F.softplus(raw).view(-1, 3, S, S)
        h = (S + 1) // 2  # rows from y = +max down to the axis; columns from the axis to x = +max
        raw = raw.view(-1, 3, h, S)
        even, odd = raw[..., :h], raw[..., h:]  # columns outward from the axis: x >= 0 (even), x > 0 (odd)
        even = torch.cat([even[..., S % 2 :].flip(-1), even], dim=-1)  # columns run along +x
        mid = [torch.zeros_like(odd[..., :1])] if S % 2 else []  # an odd part is 0 on the centre column
        odd = torch.cat([-odd.flip(-1), *mid, odd], dim=-1)
        logits = even + rho[:, None, None, None] * odd
        logits = self.blur_rows @ logits @ self.blur_cols.T
        top = F.softplus(logits)
        return torch.cat([top, top.flip(-2)[:, :, S % 2 :]], dim=-2)  # rows run along -y: the flip mirrors y -> -y

    # --- training -----------------------------------------------------------------------
    def forward(self, psf, cond, pair_src=None, pair_cond=None, lit=None, illum=None, valid=None) -> ModelOutput:
        """psf [B, 3, k, k], cond [B, C]; pair_src [Q] (batch index), pair_cond [Q, C] (neighbour).

        lit [B] float (1 lit, 0 dark) weighs the PSF terms, None: all lit; illum, valid [B, 3]:
        the illumination head's targets (every point of the batch, dark ones too).
        """
        mu_q, logvar_q = self.encode(psf, cond)
        z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()  # reparameterisation
        psf_hat, log_sum = self._decode(z, cond)
        mu_p, logvar_p = self.prior_params(cond)
        recon = recon_loss(psf_hat, psf, lit)
        kl = kl_loss(mu_q, logvar_q, mu_p, logvar_p, lit)
        if pair_src is not None and pair_src.numel() > 0:
            mu_nbr, _ = self.prior_params(pair_cond)
            smooth = smooth_loss(mu_p, pair_src, mu_nbr)
        else:
            smooth = psf.new_zeros(())
        a = self.args
        scale = weighted_mean((log_sum**2).mean(dim=1), lit) if lit is not None else (log_sum**2).mean()
        if a.prior_recon_weight > 0:
            prior_hat, prior_log_sum = self._decode(mu_p, cond)
            recon_prior = recon_loss(prior_hat, psf, lit)
            prior_scale = (
                weighted_mean((prior_log_sum**2).mean(dim=1), lit) if lit is not None else (prior_log_sum**2).mean()
            )
            scale = 0.5 * (scale + prior_scale)
        else:
            recon_prior = psf.new_zeros(())
        loss = (
            a.recon_weight * recon
            + a.kl_weight * kl
            + a.smooth_weight * smooth
            + a.prior_recon_weight * recon_prior
            + a.scale_weight * scale
        )
        illum_term = None
        if illum is not None:
            illum_term = illumination_loss(self.illumination, cond, illum, valid)
            loss = loss + a.illumination_weight * illum_term
        return ModelOutput(loss, recon, kl, smooth, recon_prior, scale, psf_hat, mu_q, mu_p, illum_term)

    # --- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, psf, cond) -> torch.Tensor:
        """The posterior path with z = μ_q: [B, 3, k, k]."""
        mu_q, _ = self.encode(psf, cond)
        return self.decode(mu_q, cond)

    @torch.no_grad()
    def sample_from_prior(self, coords: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """PSFs at conditions ``coords`` [B, C]: z ~ p(z|c) (or z = μ_p with mean=True) -> [B, 3, k, k]."""
        mu_p, logvar_p = self.prior_params(coords)
        z = mu_p if mean else mu_p + torch.randn_like(mu_p) * (0.5 * logvar_p).exp()
        return self.decode(z, coords)

    @torch.no_grad()
    def predict_grid(self, psf, cond: torch.Tensor, chunk: int = 4096):
        """Posterior reconstruction (z = μ_q) and prior mean of many PSFs, in chunks.

        psf: [N, 3, k, k] numpy, cond: [N, C] on the model's device -> two numpy [N, 3, k, k].
        """
        recon, prior = [], []
        for lo in range(0, len(psf), chunk):
            p = torch.as_tensor(psf[lo : lo + chunk], device=cond.device)
            c = cond[lo : lo + chunk]
            recon.append(self.reconstruct(p, c).cpu().numpy())
            prior.append(self.sample_from_prior(c, mean=True).cpu().numpy())
        return np.concatenate(recon), np.concatenate(prior)

    def condition(self, xy, depth_m, focus_m=None) -> torch.Tensor:
        """cond [B, C] of field points xy [B, 2] at depths depth_m [B] and focus distances focus_m [B] (inf
        allowed; read only by a model with has_focus) in metres: (x, y[, d][, φ])."""
        device = self.prior[0].weight.device
        xy = torch.as_tensor(np.asarray(xy), dtype=torch.float32, device=device)
        cols = [xy]
        if self.args.has_depth:
            # torch.tensor copies: depth_m may be a read-only view
            cols.append(self.depth_code(torch.tensor(np.asarray(depth_m, dtype=np.float64), device=device)).float())
        if self.args.has_focus:
            cols.append(self.focus_code(torch.tensor(np.asarray(focus_m, dtype=np.float64), device=device)).float())
        if len(cols) == 1:
            return xy
        return torch.cat([cols[0], *(c[:, None] for c in cols[1:])], dim=1)

    def depth_code(self, depth_m: torch.Tensor) -> torch.Tensor:
        """Depth [m] -> d in [-1, 1], linear in 1/depth: +1 at depth_min, -1 at depth_max."""
        a = self.args
        if a.depth_max == a.depth_min:
            return torch.zeros_like(depth_m)
        lo, hi = 1.0 / a.depth_max, 1.0 / a.depth_min
        return 2.0 * (1.0 / depth_m - lo) / (hi - lo) - 1.0

    def depth_of(self, d: torch.Tensor) -> torch.Tensor:
        """The inverse of depth_code: d in [-1, 1] -> depth [m] (depth_min for a model of one depth)."""
        a = self.args
        lo, hi = 1.0 / a.depth_max, 1.0 / a.depth_min
        return 1.0 / (lo + 0.5 * (d.double() + 1.0) * (hi - lo))

    def focus_of(self, phi: torch.Tensor) -> torch.Tensor:
        """The inverse of focus_code: φ in [-1, 1] -> focus distance [m] (inf where 1/focus is 0)."""
        a = self.args
        lo, hi = 1.0 / a.focus_max, 1.0 / a.focus_min
        return 1.0 / (lo + 0.5 * (phi.double() + 1.0) * (hi - lo))

    def focus_code(self, focus_m: torch.Tensor) -> torch.Tensor:
        """Focus distance [m] (inf allowed) -> φ in [-1, 1], linear in 1/focus: +1 at focus_min, -1 at focus_max."""
        a = self.args
        lo, hi = 1.0 / a.focus_max, 1.0 / a.focus_min  # 1/inf = 0
        if hi == lo:
            return torch.zeros_like(focus_m)
        return 2.0 * (1.0 / focus_m - lo) / (hi - lo) - 1.0
