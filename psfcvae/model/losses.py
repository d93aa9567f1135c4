"""The three loss terms of the CVAE, each a plain function of tensors."""

from __future__ import annotations

import torch


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [B] with weights [B] (0 or 1: dark points weigh 0); 0 when every weight is 0."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def recon_loss(psf_hat: torch.Tensor, psf: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(K̂, K) over all pixels and channels: psf, psf_hat [B, 3, k, k] -> scalar.

    weight [B]: each PSF's weight (0 leaves a dark point out); None: all count, the spec's MSE.
    """
    if weight is None:
        return torch.mean((psf_hat - psf) ** 2)
    return weighted_mean(((psf_hat - psf) ** 2).flatten(1).mean(1), weight)


def kl_loss(mu_q, logvar_q, mu_p, logvar_p, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q(z|K,c) || p(z|c)) for diagonal Gaussians, summed over z, averaged over the batch.

    -0.5 * sum[1 + log σ²_q - log σ²_p - (σ²_q + (μ_q - μ_p)²) / σ²_p]; all inputs [B, Z];
    weight [B] as in recon_loss.
    """
    kl = -0.5 * (1 + logvar_q - logvar_p - (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp())
    return weighted_mean(kl.sum(dim=1), weight)


def smooth_loss(mu_p: torch.Tensor, pair_src: torch.Tensor, mu_p_nbr: torch.Tensor) -> torch.Tensor:
    """Mean over neighbour pairs of ||μ_p(c_i) - μ_p(c_j)||².

    mu_p: [B, Z] prior means of the batch; pair_src: [Q] index into the batch of each
    pair's first point; mu_p_nbr: [Q, Z] prior means at each pair's neighbour. No pairs: 0.
    """
    if pair_src.numel() == 0:
        return mu_p.new_zeros(())
    return ((mu_p[pair_src] - mu_p_nbr) ** 2).sum(dim=1).mean()
