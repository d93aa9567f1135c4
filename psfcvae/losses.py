"""The three loss terms of the CVAE, each a plain function of tensors."""

from __future__ import annotations

import torch


def recon_loss(psf_hat: torch.Tensor, psf: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """MSE(K̂, K) over all pixels and channels: psf, psf_hat [B, 3, k, k] -> scalar.

    relative: each PSF's squared error over its own squared norm, ||K̂ - K||² / ||K||² (the
    square of the evaluation metric), averaged over the batch and divided by the number of
    values 3 k², so that it equals the MSE for a PSF of unit norm. Sharp and broad PSFs then
    weigh alike; with plain MSE a sharp PSF (large ||K||) dominates the batch.
    """
    if not relative:
        return torch.mean((psf_hat - psf) ** 2)
    err = ((psf_hat - psf) ** 2).flatten(1).sum(1) / (psf**2).flatten(1).sum(1).clamp_min(1e-12)
    return err.mean() / psf[0].numel()


def kl_loss(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(q(z|K,c) || p(z|c)) for diagonal Gaussians, summed over z, averaged over the batch.

    -0.5 * sum[1 + log σ²_q - log σ²_p - (σ²_q + (μ_q - μ_p)²) / σ²_p]; all inputs [B, Z].
    """
    kl = -0.5 * (1 + logvar_q - logvar_p - (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp())
    return kl.sum(dim=1).mean()


def smooth_loss(mu_p: torch.Tensor, pair_src: torch.Tensor, mu_p_nbr: torch.Tensor) -> torch.Tensor:
    """Mean over neighbour pairs of ||μ_p(c_i) - μ_p(c_j)||².

    mu_p: [B, Z] prior means of the batch; pair_src: [Q] index into the batch of each
    pair's first point; mu_p_nbr: [Q, Z] prior means at each pair's neighbour. No pairs: 0.
    """
    if pair_src.numel() == 0:
        return mu_p.new_zeros(())
    return ((mu_p[pair_src] - mu_p_nbr) ** 2).sum(dim=1).mean()
