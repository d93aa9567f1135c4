"""The PNG figures of ``psf eval``.

Each function returns a ``matplotlib.figure.Figure`` on an Agg canvas and ``save`` writes
it: no pyplot state and no backend switch, so importing psfcvae leaves a notebook's
matplotlib as it was. matplotlib is imported inside the functions that draw.

Field coordinates throughout: (x, y) in [-1, 1], ±1 at the sensor's edges, x to the right,
y up (row 0 of a grid mosaic is y = +1), as in docs/dataset.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from psfcvae.images import display_scale, mosaic

LOG_DECADES = 3  # --log-scale shows values from 10^-3 of the peak to the peak
ERROR_PERCENTILE = 99  # |error| colour scales end at this percentile of the values shown


def figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas: no pyplot state, the caller's backend untouched."""

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi)


def _rgb(img: np.ndarray) -> np.ndarray:
    """[3, H, W] -> [H, W, 3] for imshow."""
    return np.clip(np.moveaxis(img, 0, -1), 0, 1)


def value_norm(log: bool, vmax: float = 1.0):
    """Colour normalisation of a quantity that starts at 0: linear from 0, or LOG_DECADES decades
    below vmax, whose colourbar ticks then read the real values (10^-3 ... 1)."""

    vmax = float(vmax) if vmax > 0 else 1.0
    return LogNorm(vmax * 10.0**-LOG_DECADES, vmax, clip=True) if log else Normalize(0.0, vmax)


def error_scale(values: np.ndarray) -> float:
    """The top of an |error| colour scale: the ERROR_PERCENTILE-th percentile (so a few
    outliers do not turn the rest black), never 0."""
    top = float(np.percentile(values, ERROR_PERCENTILE)) if np.size(values) else 0.0
    return top if top > 0 else 1.0


def psf_colourbar(fig, ax, log: bool) -> None:
    """A grey colourbar for PSF mosaics: the RGB tiles show each PSF over its own peak."""

    sm = ScalarMappable(norm=value_norm(log), cmap="gray")
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02).set_label("PSF value / its peak (per tile)", fontsize=8)


def _field_axes(ax, xlabel: bool = True, ylabel: bool = True) -> None:
    ax.set_xlabel("field x" if xlabel else "", fontsize=8)
    ax.set_ylabel("field y" if ylabel else "", fontsize=8)
    ax.tick_params(labelsize=7)


def mosaic_extent(n: int, k: int, gap: int = 1) -> tuple[float, float, float, float]:
    """imshow extent of an n x n mosaic of k-px tiles so that tile centres sit at their field (x, y)."""
    e = 1.0 + (k / 2) * (2.0 / (n - 1)) / (k + gap)
    return (-e, e, -e, e)


def grid_panels(panels: dict[str, np.ndarray], n: int, depth_m: float, log: bool):
    """One row of N x N mosaics of one grid depth (ground truth, the model, ..., |error|).

    panels: name -> [n*n, 3, k, k]; the key "|error|" holds |prediction - truth| already
    divided by each truth PSF's peak ([n*n, 3, k, k]); it is shown as the worst channel,
    on its own scale (ERROR_PERCENTILE-th percentile, stated on its colourbar).
    """
    fig = figure(3.3 * len(panels) + 1.2, 3.7)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    k = next(iter(panels.values())).shape[-1]
    extent = mosaic_extent(n, k)
    for j, (ax, (name, psf)) in enumerate(zip(axes, panels.items())):
        if name == "|error|":
            err = psf.max(axis=1)  # [P, k, k]: worst channel
            tiles = np.pad(err.reshape(n, n, k, k), ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=np.nan)
            tiles = tiles.transpose(0, 2, 1, 3).reshape(n * (k + 1), n * (k + 1))[:-1, :-1]
            top = error_scale(err)
            im = ax.imshow(tiles, cmap="magma", norm=value_norm(log, top), extent=extent, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(
                f"|error| / PSF peak (scale ends at its {ERROR_PERCENTILE}th pct.)", fontsize=8
            )
        else:
            ax.imshow(_rgb(mosaic(psf, n, log=log)), extent=extent, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        _field_axes(ax, ylabel=j == 0)
    psf_colourbar(fig, axes[-2] if "|error|" in panels and len(axes) > 1 else axes[-1], log)
    fig.suptitle(
        f"depth {depth_m:g} m: the {n}x{n} training grid, RGB, each PSF scaled to its own peak "
        f"({'log, %d decades' % LOG_DECADES if log else 'linear'})",
        fontsize=10,
    )
    return fig


def image_circle(ax, radius_mm: float, sensor_mm: tuple[float, float]) -> None:
    """Outline the lit field on a field plot in normalised (x, y): the image circle of radius [mm] on a
    sensor of (width, height) [mm] is an ellipse there (x and y are scaled by the half-width and half-height)."""
    t = np.linspace(0, 2 * np.pi, 181)
    w, h = sensor_mm
    ax.plot(radius_mm * np.cos(t) / (w / 2), radius_mm * np.sin(t) / (h / 2), "--", c="tab:red", lw=0.8)


def error_maps(
    xy: np.ndarray,
    errors: dict[str, np.ndarray],
    groups: dict[str, np.ndarray],
    pooled: dict[tuple[str, str], float],
    grid_xy: np.ndarray,
    circle=None,
):
    """Held-out points over the field coloured by each method's error, one row per depth group.

    xy: [M, 2] field points; errors: method -> [M] per-point noise-corrected relative L2 [%];
    groups: row label -> [M] bool mask; pooled: (method, row label) -> pooled error [%] (titles);
    circle: (image-circle radius [mm], sensor (width, height) [mm]) to outline, or None.
    """
    names, rows = list(errors), [g for g, m in groups.items() if m.any()]
    top = error_scale(np.concatenate(list(errors.values())))
    fig = figure(3.0 * len(names) + 0.8, 2.8 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(names), squeeze=False)
    sc = None
    for i, g in enumerate(rows):
        mask = groups[g]
        for j, name in enumerate(names):
            ax = axes[i, j]
            ax.scatter(grid_xy[:, 0], grid_xy[:, 1], s=4, c="0.75", marker="+", linewidths=0.5)
            sc = ax.scatter(xy[mask, 0], xy[mask, 1], c=errors[name][mask], cmap="viridis", vmin=0, vmax=top, s=22)
            if circle is not None:
                image_circle(ax, *circle)
            ax.set_title(f"{name}, {g}: {pooled[(name, g)]:.1f}%", fontsize=8)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            _field_axes(ax, xlabel=i == len(rows) - 1, ylabel=j == 0)
    fig.colorbar(sc, ax=axes, fraction=0.02, pad=0.01).set_label(
        f"per-point noise-corrected relative L2 [%] (scale ends at the {ERROR_PERCENTILE}th pct.)", fontsize=8
    )
    fig.suptitle(
        "held-out points (grey +: grid points); titles: the pooled error of that method and depth", fontsize=10
    )
    return fig


def heldout_panels(
    psfs: dict[str, np.ndarray], notes: dict[str, list[str]], labels: list[str], maps: dict[str, np.ndarray], log: bool
):
    """Held-out points, one per row: PSF columns (reference, model, best baseline) then map columns.

    psfs: name -> [R, 3, k, k]; notes: name -> R tile captions (e.g. each tile's error);
    maps: name -> [R, k, k] non-negative maps relative to the reference's peak (|error|, the
    prior samples' per-pixel std), each column on its own scale from 0.
    """
    R = len(labels)
    cols = list(psfs) + list(maps)
    fig = figure(2.0 * len(cols) + 1.6, 2.0 * R + 0.6)
    axes = fig.subplots(R, len(cols), squeeze=False)
    for j, name in enumerate(cols):
        if name in psfs:
            shown, im = display_scale(psfs[name], log), None
        else:
            top = error_scale(maps[name])
        for i in range(R):
            ax = axes[i, j]
            if name in psfs:
                ax.imshow(_rgb(shown[i]), interpolation="nearest")
            else:
                im = ax.imshow(maps[name][i], cmap="magma", norm=value_norm(log, top), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if name in notes:
                ax.set_xlabel(notes[name][i], fontsize=7, labelpad=1)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
        if im is not None:
            fig.colorbar(im, ax=axes[:, j], fraction=0.08, pad=0.02, shrink=0.6).set_label(
                f"/ reference peak ({ERROR_PERCENTILE}th pct.)", fontsize=7
            )
    psf_colourbar(fig, axes[:, len(psfs) - 1], log)
    return fig


def std_maps(std: list[np.ndarray], depths: list[float], grid_xy: np.ndarray):
    """The model's own uncertainty over the field at each depth, on one scale from 0.

    std: per depth [m, m] (row 0 = y +1) of PSFModel.prior_std; depths [m].
    """
    fig = figure(3.2 * len(std) + 1.0, 3.4)
    axes = fig.subplots(1, len(std), squeeze=False)[0]
    top = max(float(s.max()) for s in std)
    im = None
    for j, (ax, s, d) in enumerate(zip(axes, std, depths)):
        im = ax.imshow(s, extent=(-1, 1, -1, 1), cmap="cividis", vmin=0, vmax=top)
        ax.scatter(grid_xy[:, 0], grid_xy[:, 1], s=4, c="w", marker="+", linewidths=0.5, clip_on=False)
        ax.set_title(f"{d:g} m", fontsize=9)
        _field_axes(ax, ylabel=j == 0)
    fig.colorbar(im, ax=axes, fraction=0.046, pad=0.02).set_label("prior spread (RMS σ of p(z|c))", fontsize=8)
    fig.suptitle("how unsure the model is of its own PSF, over the field (white +: grid points)", fontsize=10)
    return fig
