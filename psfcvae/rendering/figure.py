"""Patch-wise rendering (what DeepLens does with a PSF map) and the chart figure for ``psf eval``'s report."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from deeplens.imgsim.psf import conv_psf_map

from psfcvae import plots
from psfcvae.optics import model_optics
from psfcvae.rendering.chart import resolution_chart
from psfcvae.rendering.imageio import linear_to_srgb
from psfcvae.rendering.quality import psnr, ssim
from psfcvae.rendering.render import render, resample_matrix
from psfgen.gridfile import GridFile, focus_text
from psfgen.shared.errors import InputError

log = logging.getLogger(__name__)


def patchwise_render(image: torch.Tensor, psf_map: torch.Tensor, pitch_mm: float, sensor_mm) -> torch.Tensor:
    """DeepLens's ``conv_psf_map``: the image [3, H, W] cut into gh x gw patches, each convolved with
    its own kernel of psf_map [gh, gw, 3, k, k] (pitch_mm per kernel pixel; row 0 at the top of the
    field), after resampling the kernels to the image's pitch (the image covers the sensor, sensor_mm)."""

    _, h, w = image.shape
    k = psf_map.shape[-1]
    ay = torch.as_tensor(resample_matrix(k, pitch_mm, sensor_mm[1] / h), dtype=torch.float32)
    ax = torch.as_tensor(resample_matrix(k, pitch_mm, sensor_mm[0] / w), dtype=torch.float32)
    kernels = ay @ psf_map.float().cpu() @ ax.T
    return conv_psf_map(image.cpu()[None], kernels)[0]


def grid_psf_map(data: str | Path, depth_m: float, focus_m: float | None = None) -> torch.Tensor:
    """The grid file's traced PSFs at the grid depth depth_m [m] and (a file over several focus settings) the grid
    focus focus_m [m]: [N, N, 3, k, k], row 0 at y = +1, each channel summing to its relative illumination (0 where
    dark), as the model's kernels do."""
    grid = GridFile.open(data)
    hit = np.flatnonzero(np.isclose(grid.depths, depth_m, rtol=1e-6))
    if hit.size == 0:
        raise InputError(f"{depth_m:g} m is not a depth of {data} ({', '.join(f'{d:g}' for d in grid.depths)} m)")
    f = 0
    if grid.n_focus > 1:
        at = np.flatnonzero(np.isclose(grid.focus, np.inf if focus_m is None else focus_m, rtol=1e-6))
        if focus_m is None or at.size == 0:
            raise InputError(f"focus {focus_m} m is not a focus setting of {data}")
        f = int(at[0])
    p = grid.plane(f, int(hit[0]))
    light = grid.illumination[p] * grid.valid[p]  # [P, 3]
    psf = grid.grid_psf(p) * light[:, :, None, None].astype(np.float32)
    n = math.isqrt(psf.shape[0])
    return torch.from_numpy(psf.reshape(n, n, *psf.shape[1:]))


def chart_figure(
    model,
    out_png: str | Path,
    depth_m: float,
    data: str | Path | None = None,
    size: int = 128,
    psf_every: int = 4,
    focus_m: float | None = None,
) -> dict:
    """PNG: the resolution chart, rendered by the model per pixel (at focus_m [m] for a model over several focus
    settings), beside DeepLens's patch-wise rendering with the grid file's traced PSFs (when ``data`` is given and
    depth_m and focus_m are among its grid's) and their difference. Returns {"png", "psnr_db", "ssim"} (model
    against patch-wise; None without it)."""
    optics = model_optics(model)
    sw, sh = optics["sensor_size_mm"]
    # The chart covers the sensor with square pixels (size rows): DeepLens's patch-wise
    # convolution takes one square kernel per patch, which needs one pitch in x and y.
    chart = resolution_chart(size, max(1, round(size * sw / sh)))
    blurred = render(model, chart, depth_m, focus_m=focus_m, psf_every=psf_every).cpu()
    where = f"{depth_m:g} m" + ("" if focus_m is None else f", focus {focus_text(focus_m)}")
    panels = [("chart (sharp)", chart), (f"model, per pixel ({where})", blurred)]
    scores = {"psnr_db": None, "ssim": None}
    if data is not None:
        grid = grid_psf_map(data, depth_m, focus_m)
        patch = patchwise_render(chart, grid, optics["kernel_pitch_mm"], optics["sensor_size_mm"])
        panels += [
            (f"patch-wise, {grid.shape[0]}x{grid.shape[1]} traced PSFs", patch),
            ("|model - patch-wise| x 4", (blurred - patch).abs() * 4),
        ]
        scores = {"psnr_db": psnr(blurred, patch), "ssim": ssim(blurred, patch)}
    fig = plots.figure(3.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(linear_to_srgb(img).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plots.save(fig, out_png, dpi=100)
    return {"png": str(out_png), **scores}
