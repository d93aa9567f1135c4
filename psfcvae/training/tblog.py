"""What ``psf train`` shows in TensorBoard beyond its plain scalars: the dashboard layout,
side-by-side comparison images and the hyper-parameters.

Every tag is documented in README.md ("TensorBoard"). The spec's tags stay as they are;
this module adds a custom-scalars layout (TensorBoard's CUSTOM SCALARS tab), two comparison
images and the run's hyper-parameters written into the run itself (not a second run).
"""

from __future__ import annotations

import numpy as np
from torch.utils.tensorboard.summary import hparams as hparams_summary

from psfcvae.images import display_scale, mosaic

LOSSES = ["loss_all", "loss_recon", "loss_kl", "loss_smooth", "loss_recon_prior", "loss_scale"]
# val_points_*: the file's validation points (a quarter of its held-out set), which choose best.pt; the test
# points are psf eval's alone and never shown here.
VALIDATION_MSE = ["val_mse", "val_prior_mse", "val_points_mse"]
VALIDATION_REL = ["val_points_rel_l2"]
BLENDED = "val_blended_rel_l2"  # the same for the network blended with its grid (a run with a blend)
OPTIMISATION = ["learning_rate", "grad_norm"]
ILLUMINATION = ["loss_illumination", "val_points_illumination_abs"]  # the illumination head

# Comparison images are upsampled (nearest) until the narrower one is at least this wide:
# a 15-px kernel in a 4x4 mosaic is 63 px, too small to read at TensorBoard's native size.
READABLE_PX = 512


def layout(blended: bool = True) -> dict:
    """The custom-scalars layout: losses, validation errors and optimisation, one chart per group (blended: the
    run fits a blend and logs val_blended_rel_l2)."""
    return {
        "losses": {
            # One chart per term: they differ by orders of magnitude (MSE ~1e-4, KL ~1-100).
            "total loss (weighted sum)": ["Multiline", ["loss_all"]],
            "reconstruction MSE: posterior and prior-mean paths (unweighted)": [
                "Multiline",
                ["loss_recon", "loss_recon_prior"],
            ],
            "KL(q || p) (unweighted)": ["Multiline", ["loss_kl"]],
            "smoothness of the prior mean (unweighted)": ["Multiline", ["loss_smooth"]],
            "decoder scale penalty (unweighted)": ["Multiline", ["loss_scale"]],
            "illumination head: log-illumination and lit/dark terms (unweighted)": ["Multiline", ILLUMINATION[:1]],
        },
        "validation": {
            "MSE on the grid (posterior recon, prior mean) and the validation points": ["Multiline", VALIDATION_MSE],
            "validation points: relative L2 of the prior mean, the network (chooses best.pt) and blended (the API)": [
                "Multiline",
                VALIDATION_REL + [BLENDED] * blended,
            ],
            "validation points: relative illumination, mean |model - traced|": ["Multiline", ILLUMINATION[1:]],
        },
        "optimisation": {
            "learning rate": ["Multiline", ["learning_rate"]],
            "gradient norm": ["Multiline", ["grad_norm"]],
        },
    }


def start(writer, blended: bool) -> None:
    """Once per run (again on resume: the layout is idempotent); blended: the run fits a blend."""
    writer.add_custom_scalars(layout(blended))


def _upsample(img: np.ndarray, width: int) -> np.ndarray:
    """[3, H, W] -> [3, fH, fW], f the smallest integer making fW >= ``width`` (nearest)."""
    f = max(1, -(-width // img.shape[-1]))
    return img.repeat(f, axis=-2).repeat(f, axis=-1)


def _row(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """[3, H, W] images of equal height side by side, white gaps: -> [3, H, sum W + gaps]."""
    h = panels[0].shape[1]
    sep = np.ones((3, h, gap), dtype=np.float32)
    parts = []
    for i, p in enumerate(panels):
        parts += ([sep] if i else []) + [p.astype(np.float32)]
    return np.concatenate(parts, axis=-1)


def grid_comparison(gt: np.ndarray, recon: np.ndarray, prior: np.ndarray, n: int) -> np.ndarray:
    """Tag ``val_psf_compare``: ground truth | posterior reconstruction | prior mean of one depth.

    gt, recon, prior: [n*n, 3, k, k] -> [3, H, W] in [0, 1], each PSF scaled to its own peak.
    """
    return _row([_upsample(mosaic(p, n), READABLE_PX // 2) for p in (gt, recon, prior)])


def _strip(psf: np.ndarray, gap: int = 1) -> np.ndarray:
    """[R, 3, k, k] -> [3, k, R*(k+gap)-gap]: one row of kernels, each scaled to its own peak."""
    x = display_scale(psf)
    k = x.shape[-1]
    out = np.full((3, k, len(x) * (k + gap) - gap), 0.25, dtype=np.float32)  # grey gaps
    for i, p in enumerate(x):
        out[:, :, i * (k + gap) : i * (k + gap) + k] = p
    return out


def heldout_comparison(ref: np.ndarray, pred: np.ndarray, count: int = 8) -> np.ndarray:
    """Tag ``val_points_compare``: top row the validation points' reference, bottom row the prior mean.

    ref, pred: [M, 3, k, k]; ``count`` points spread over the held-out set -> [3, H, W] in [0, 1].
    """
    pick = np.linspace(0, len(ref) - 1, min(count, len(ref))).astype(int)
    top, bottom = _strip(ref[pick]), _strip(pred[pick])
    img = np.concatenate([top, np.ones((3, 1, top.shape[-1]), np.float32), bottom], axis=1)
    return _upsample(img, READABLE_PX)


def write_hparams(writer, hparams: dict, metrics: dict) -> None:
    """The HParams tab, written into the run itself, pointing at scalars the run already logs.

    ``SummaryWriter.add_hparams`` would open a second run ("hparams") holding one-point
    copies of the final metrics; here the metrics named are the run's own tags (e.g.
    val_points_rel_l2), whose last value the HParams tab shows.
    """
    exp, ssi, sei = hparams_summary(hparams, dict.fromkeys(metrics, 0.0))
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
