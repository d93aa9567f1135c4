"""The PNG figures of ``psf eval`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .images import display_scale, mosaic  # noqa: E402


def _rgb(img: np.ndarray) -> np.ndarray:
    """[3, H, W] -> [H, W, 3] for imshow."""
    return np.clip(np.moveaxis(img, 0, -1), 0, 1)


def grid_panels(path: Path, panels: dict[str, np.ndarray], n: int, depth_m: float, log: bool) -> None:
    """One row of N x N mosaics (ground truth, reconstructions, ..., absolute error).

    panels: name -> [n*n, 3, k, k]; the key "|error|" holds |prediction - truth| already
    divided by each truth PSF's peak, shown on the same scale as the PSFs.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9), squeeze=False)
    scale_note = "log, 3 decades" if log else "linear"
    im = None
    for ax, (name, psf) in zip(axes[0], panels.items()):
        if name == "|error|":
            err = psf.max(axis=1)  # [P, k, k]: worst channel
            if log:
                err = np.clip(1 + np.log10(np.clip(err, 1e-3, None)) / 3, 0, 1)
            k = err.shape[-1]
            tiles = err.reshape(n, n, k, k).transpose(0, 2, 1, 3).reshape(n * k, n * k)
            im = ax.imshow(tiles, cmap="magma", vmin=0, vmax=1)
        else:
            ax.imshow(_rgb(mosaic(psf, n, log=log)))
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        cb = fig.colorbar(im, ax=axes[0, -1], fraction=0.046, pad=0.04)
        cb.set_label("|error| / PSF peak" + (" (log)" if log else ""), fontsize=8)
    fig.suptitle(f"depth {depth_m:g} m: {n}x{n} grid, RGB, each PSF scaled to its own peak ({scale_note})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_circle(ax, radius_mm: float, sensor_mm: tuple[float, float]) -> None:
    """Outline the lit field on a field plot in normalised (x, y): the image circle of radius [mm] on a
    sensor of (width, height) [mm] is an ellipse there (x and y are scaled by the half-width and half-height)."""
    t = np.linspace(0, 2 * np.pi, 181)
    w, h = sensor_mm
    ax.plot(radius_mm * np.cos(t) / (w / 2), radius_mm * np.sin(t) / (h / 2), "--", c="tab:red", lw=0.8)


def error_maps(path: Path, xy: np.ndarray, errors: dict[str, np.ndarray], grid_xy: np.ndarray, circle=None) -> None:
    """Per method, held-out points over the field coloured by relative L2 error.

    circle: (radius [mm], sensor (width, height) [mm]) of the image circle to outline, or None."""
    names = list(errors)
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    vmax = float(np.percentile(np.concatenate(list(errors.values())), 95))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        ax.scatter(grid_xy[:, 0], grid_xy[:, 1], s=4, c="0.75", marker="+", linewidths=0.5)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=errors[name], cmap="viridis", vmin=0, vmax=vmax, s=22)
        if circle is not None:
            image_circle(ax, *circle)
        ax.set_title(f"{name}: mean {errors[name].mean():.3f}", fontsize=9)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04).set_label("relative L2", fontsize=8)
    fig.suptitle("held-out points (grey +: grid); error against the held-out reference", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def side_by_side(path: Path, psfs: dict[str, np.ndarray], labels: list[str], log: bool) -> None:
    """Rows: a few held-out points; columns: methods. psfs: name -> [R, 3, k, k]."""
    names = list(psfs)
    rows = len(labels)
    fig, axes = plt.subplots(rows, len(names), figsize=(2.1 * len(names), 2.1 * rows), squeeze=False)
    for j, name in enumerate(names):
        shown = display_scale(psfs[name], log)
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(_rgb(shown[i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def std_map(path: Path, std: np.ndarray, depth_m: float, grid_xy: np.ndarray) -> None:
    """The prior's standard deviation over the field at one depth: std [M, M] (row 0 = y +1)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(std, extent=(-1, 1, -1, 1), cmap="cividis")
    ax.scatter(grid_xy[:, 0], grid_xy[:, 1], s=4, c="w", marker="+", linewidths=0.5)
    fig.colorbar(im, ax=ax).set_label("prior std (RMS over z)", fontsize=8)
    ax.set_title(f"prior_std at {depth_m:g} m (white +: grid points)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
