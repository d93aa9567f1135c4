"""The figures of ``psf eval``: PNGs in the output directory, drawn from compute_metrics' arrays.

``make_figures`` returns (file name, title, caption) per figure, in the report's order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from psfcvae import plots
from psfcvae.evaluation.metrics import focus_groups, focus_json, focus_label
from psfcvae.rendering.figure import chart_figure
from psfgen.gridfile import focus_text
from psfgen.shared.errors import InputError

logger = logging.getLogger(__name__)

SPREAD_SAMPLES = 16  # prior samples per held-out point for the per-pixel spread
BAND_FIGURE = "error_by_band.png"  # the report shows it on its first screen, beside the headline table


def make_figures(
    result: dict, arrays, out: Path, model=None, log: bool = False, rows: int = 6, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Write the PNGs into ``out``; arrays: evaluate.EvalArrays; model: PSFModel or None."""
    figures = [band_figure(result, out), heldout_figure(result, arrays, out, model, log, rows, seed)]
    figures.append(error_map_figure(result, arrays, out))
    figures += grid_figures(arrays, out, model is not None, log)
    if model is not None:
        figures.append(std_figure(arrays, out, model))
        try:
            figures.append(render_figure(result, arrays, out, model))
        except InputError as exc:  # an old file without the sensor's geometry: the report goes on without it
            logger.warning("no rendered-chart figure: %s", exc)
    return figures


def render_figure(result, arrays, out: Path, model) -> tuple[str, str, str]:
    """The lens on an image: a resolution chart blurred by the model, every pixel with its own PSF,
    beside DeepLens's patch-wise rendering with the file's traced grid PSFs (psf render, docs/render.md)."""

    depth = float(arrays.depths[len(arrays.depths) // 2])
    focus = None if len(model.focus) == 1 else float(model.focus[len(model.focus) // 2])  # the middle grid focus
    n = int(round(np.sqrt(len(arrays.coords))))
    scores = chart_figure(model, out / "render_chart.png", depth, data=result["data"]["path"], focus_m=focus)
    result["render_chart"] = {
        "depth_m": depth,
        "focus_m": focus_json(focus),
        "psnr_db_vs_patchwise": scores["psnr_db"],
        "ssim_vs_patchwise": scores["ssim"],
    }
    return (
        "render_chart.png",
        "The lens on an image",
        f"A procedural resolution chart at {depth:g} m"
        + ("" if focus is None else f" (focus {focus_text(focus)})")
        + " covering the sensor, blurred by the model with every pixel's "
        f"own PSF and relative illumination (psf render, kernels evaluated every 4 pixels), beside DeepLens's "
        f"patch-wise rendering with the file's {n}x{n} traced PSFs (one PSF per patch) and their difference; "
        f"PSNR {scores['psnr_db']:.1f} dB, SSIM {scores['ssim']:.3f} between the two. docs/render.md compares both "
        "with a densely traced reference.",
    )


def band_figure(result: dict, out: Path) -> tuple[str, str, str]:
    """Where the error is: the pooled test-point error [%] per radius band, per depth group and (several focus
    settings) per focus group, of the method the headline names and of the best interpolation, with ray tracing at
    the training spp where the file measured it (all re-traced grid points on the left, each grid depth and each
    grid focus in the other panels). Drawn from ``result`` alone."""
    h, errors = result["headline"], result["heldout"]
    shown = list(dict.fromkeys([h["named"], h["best_interpolation"]]))
    bands = result["heldout_groups"]["radius band"]
    depths = result["data"]["depths_m"]
    order = [f"at {depths[0]:g} m"]  # at each grid depth and between each two, nearest first
    ticks = [f"{depths[0]:g}"]
    for lo, hi in zip(depths[:-1], depths[1:]):
        order += [f"between {lo:g} and {hi:g} m", f"at {hi:g} m"]
        ticks += [f"{lo:g}–{hi:g}", f"{hi:g}"]
    kept = [i for i, g in enumerate(order) if g in result["heldout_groups"]["depth"]]
    order, ticks = [order[i] for i in kept], [ticks[i] for i in kept]
    count = next(iter(errors.values()))
    rt = result.get("raytrace_at_training_spp", {})
    panels = [bands, order]
    focus = _focus_order(result)
    if focus:
        panels.append(focus[0])

    fig = plots.figure(7.6 + 3.2 * (len(panels) - 2), 2.7)
    axes = fig.subplots(1, len(panels), sharey=True, width_ratios=[max(len(g), 1) for g in panels])
    left, right = axes[:2]
    for ax, groups in zip(axes, panels):
        for name, style in zip(shown, ("-o", "--s")):
            ax.plot(
                range(len(groups)),
                [100 * errors[name][g]["corrected"]["pooled"] for g in groups],
                style,
                label=name,
                lw=1.5,
                ms=5,
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xlim(-0.4, len(groups) - 0.6)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", lw=0.4, alpha=0.5)
    left.set_xticklabels([f"{b.removeprefix('r ')}\n{count[b]['raw']['n']} pts" for b in bands])
    left.set_xlabel("radius r = √(x² + y²) (√2: the corners)", fontsize=8)
    left.set_ylabel("test-point error [%]", fontsize=8)
    right.set_xticklabels([f"{t}\n{count[g]['raw']['n']} pts" for t, g in zip(ticks, order)])
    right.set_xlabel("depth [m]: at a grid depth, or between two", fontsize=8)
    spp = result["data"]["spp"]
    if "all" in rt:
        left.axhline(
            100 * rt["all"]["pooled"],
            c="0.5",
            ls=":",
            lw=1.2,
            label=f"ray tracing, spp {spp}: all re-traced grid points",
        )
    for ax, groups, what in zip(axes[1:], panels[1:], ("per grid depth", "per grid focus")):
        traced = [i for i, g in enumerate(groups) if g in rt]
        if traced:
            ax.plot(
                traced,
                [100 * rt[groups[i]]["pooled"] for i in traced],
                "x",
                c="0.4",
                ms=6,
                mew=1.5,
                label=f"ray tracing, spp {spp}: {what}",
            )
    if focus:
        axes[2].set_xticklabels([f"{t}\n{count[g]['raw']['n']} pts" for t, g in zip(focus[1], focus[0])])
        axes[2].set_xlabel("focus [m]: at a grid focus, or between two", fontsize=8)
    left.set_ylim(bottom=0)
    handles = {lab: hd for ax in axes for hd, lab in zip(*ax.get_legend_handles_labels())}
    # two columns: four entries in one row overflow the figure's width once a name is long
    fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncols=2, fontsize=7, frameon=False)
    plots.save(fig, out / BAND_FIGURE)
    return (
        BAND_FIGURE,
        "Where: the error by radius and depth" + (" and focus" if focus else ""),
        "Pooled noise-corrected error on the test points of each radius band (left) and at each grid depth or "
        + ("between two (middle)" if focus else "between two (right)")
        + (", at each grid focus or between two (right)" if focus else "")
        + f", of {' and '.join(shown)}; pts: test points in the group. Grey: ray tracing at the training spp, "
        "measured on re-traced grid points (all of them on the left, per grid depth"
        + (" and per grid focus" if focus else "")
        + " in the others).",
    )


def _focus_order(result: dict) -> tuple[list[str], list[str]] | None:
    """(the focus groups at each grid focus and between each two, nearest first; their tick labels), None in a
    single-focus file."""
    if "focus" not in result["heldout_groups"]:
        return None
    focus = [np.inf if f == "inf" else f for f in result["data"]["focus_m"]]
    kept = [(name, tick) for name, tick, _, _ in focus_groups(focus) if name in result["heldout_groups"]["focus"]]
    return [name for name, _ in kept], [tick for _, tick in kept]


def _peak_relative(diff: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """[R, 3, k, k] -> [R, k, k]: the worst channel of |diff|, over each reference's peak."""
    peak = ref.max(axis=(-3, -2, -1), keepdims=True)
    return (np.abs(diff) / np.where(peak > 0, peak, 1.0)).max(axis=1)


def heldout_figure(result, arrays, out: Path, model, log: bool, rows: int, seed: int) -> tuple[str, str, str]:
    """Rows: held-out points from the model's best to its worst; reference | model | best interpolation
    | |model error| | spread of the model's prior samples."""
    ho, preds, corr = arrays.heldout, arrays.preds, arrays.corrected
    best = result["headline"]["best_interpolation"]
    main = "cvae prior mean" if model is not None else best
    order = np.argsort(corr[main])
    pick = order[np.linspace(0, len(order) - 1, min(rows, len(order))).astype(int)]
    ref = ho["ref"][pick]
    psfs = {"reference (traced)": ref, main: preds[main][pick]}
    if best != main:
        psfs[best] = preds[best][pick]
    notes = {name: [f"error {100 * corr[name][i]:.1f}%" for i in pick] for name in psfs if name in corr}
    maps = {f"|{main} - reference|": _peak_relative(preds[main][pick] - ref, ref)}
    if model is not None:
        xy, d, focus = ho["coords"][pick], ho["depth"][pick], arrays.model_focus(ho["focus"][pick])
        torch.manual_seed(seed)
        draws, _ = model.psf(
            *(xy[:, 0], xy[:, 1], d),
            focus_m=focus,
            mode="sample",
            n_samples=SPREAD_SAMPLES,
            allow_extrapolation=True,
            allow_dark=True,
        )  # [R, S, 3, k, k]
        draws = draws.cpu().numpy()
        maps[f"spread of {SPREAD_SAMPLES} prior samples"] = _peak_relative(draws.std(axis=1), ref)
    labels = [f"({x:+.2f}, {y:+.2f})\n{depth:.2f} m" for (x, y), depth in zip(ho["coords"][pick], ho["depth"][pick])]
    if arrays.multi_focus:
        labels = [f"{label}, focus {focus_label(f)}" for label, f in zip(labels, ho["focus"][pick])]
    fig = plots.heldout_panels(psfs, notes, labels, maps, log)
    _one_map_scale(fig, maps, log)
    plots.save(fig, out / "heldout.png")
    caption = (
        f"Test points the model never saw, from its best to its worst ({len(pick)} of {len(corr[main])}). "
        "Each tile's error is its noise-corrected relative L2; the map columns are per pixel, over the "
        "reference's peak, worst colour channel"
        + (
            ", the |error| and the spread on one colour scale from 0, so their sizes compare; the spread is the "
            "per-pixel standard deviation of PSFs drawn from the prior at that point."
            if model is not None
            else ", from 0."
        )
    )
    return "heldout.png", "The model where it was not trained", caption


def _one_map_scale(fig, maps: dict[str, np.ndarray], log: bool) -> None:
    """Put the map columns of plots.heldout_panels (the |error| and the spread, both over the reference's peak) on
    one colour scale, their colourbars with them: on scales of their own a spread 40x smaller than the error looks
    as large. maps: name -> [R, k, k]."""
    norm = plots.value_norm(log, plots.error_scale(np.concatenate([m.ravel() for m in maps.values()])))
    for ax in fig.axes:
        for im in ax.get_images():
            if im.get_array().ndim == 2:  # a map; the PSF tiles are RGB [k, k, 3]
                im.set_norm(norm)


def error_map_figure(result, arrays, out: Path) -> tuple[str, str, str]:
    """Per method and depth, held-out points coloured by their error."""
    ho = arrays.heldout
    names = [
        n
        for n in result["heldout"]
        if not n.startswith(("cvae prior sample", "cvae prior mean (table)", "cvae network alone"))
    ]
    groups = {f"at {d:g} m": ho["at_grid_depth"] & np.isclose(ho["depth"], d) for d in arrays.depths}
    groups["between grid depths"] = ~ho["at_grid_depth"]
    pooled = {
        (n, g): 100 * result["heldout"][n][g]["corrected"]["pooled"]
        for n in names
        for g in groups
        if g in result["heldout"][n]
    }
    errors = {n: 100 * arrays.corrected[n] for n in names}
    fig = plots.error_maps(ho["coords"], errors, groups, pooled, arrays.coords, circle=arrays.circle)
    plots.save(fig, out / "error_maps.png")
    return (
        "error_maps.png",
        "Where each method errs, per depth",
        "Test points over the field, one row per grid depth and one for the points between grid depths, "
        "coloured by the per-point noise-corrected error; each title gives the pooled error of that row."
        + (
            " The dashed ellipse is the image circle: outside it the lens lights no PSF (dark points are left out)."
            if arrays.circle is not None
            else ""
        ),
    )


def grid_figures(arrays, out: Path, has_model: bool, log: bool) -> list[tuple[str, str, str]]:
    """Per plane (grid depth, at each grid focus): ground truth, the model's posterior reconstruction and prior
    mean, |error|."""
    figures = []
    n = int(round(np.sqrt(len(arrays.coords))))
    for p, (depth, focus) in enumerate(zip(arrays.plane_depth, arrays.plane_focus)):
        truth = arrays.grid[p]
        if has_model:
            panels = {"ground truth": truth, "posterior recon": arrays.recon[p], "prior mean": arrays.prior[p]}
            shown = arrays.prior[p]
        else:
            shown = arrays.eigen(arrays.coords[:, 0], arrays.coords[:, 1], np.full(n * n, depth), focus)
            panels = {"ground truth": truth, f"eigen-psf ({arrays.eigen.components})": shown}
        # A dark grid point has no PSF: it shows as black in every panel and has no error (not 1/0).
        lit = arrays.lit[p]  # [P]
        panels = {k: v * lit[:, None, None, None] for k, v in panels.items()}
        peak = np.where(lit, truth.max(axis=(-3, -2, -1)), 1.0)[:, None, None, None]
        panels["|error|"] = np.abs(shown - truth) / peak * lit[:, None, None, None]
        f, d = divmod(p, len(arrays.depths))
        name = f"grid_depth{d}_{depth:g}m.png"
        if arrays.multi_focus:
            name = f"grid_focus{f}_{'inf' if np.isinf(focus) else f'{focus:g}m'}_depth{d}_{depth:g}m.png"
        plots.save(plots.grid_panels(panels, n, float(depth), log), out / name)
        figures.append(
            (
                name,
                f"The training grid at {arrays.plane_label(p)}",
                "The PSFs the model trained on (ground truth), its reconstruction of them through the encoder "
                "(posterior recon), the PSF it gives from position alone (prior mean), and the |error| of "
                + ("the prior mean" if has_model else "the eigen-PSF")
                + " over each PSF's peak"
                + ("; black tiles are dark grid points (no light: no PSF)." if not lit.all() else "."),
            )
        )
    return figures


def std_figure(arrays, out: Path, model, m: int = 64) -> tuple[str, str, str]:
    """The prior's spread over the field at every grid depth (at the middle grid focus)."""
    lin = np.linspace(-1, 1, m)
    gx, gy = np.meshgrid(lin, lin[::-1])
    focus = arrays.model_focus(arrays.focus[len(arrays.focus) // 2])
    std = [
        model.prior_std(gx.ravel(), gy.ravel(), np.full(m * m, float(d)), focus_m=focus).cpu().numpy().reshape(m, m)
        for d in arrays.depths
    ]
    plots.save(plots.std_maps(std, [float(d) for d in arrays.depths], arrays.coords), out / "prior_std.png")
    return (
        "prior_std.png",
        "How unsure the model is, over the field",
        "The model's own uncertainty at each grid depth"
        + (f" at focus {focus_label(arrays.focus[len(arrays.focus) // 2])}" if arrays.multi_focus else "")
        + ": the RMS standard deviation of its prior p(z|c) over the "
        "latent dimensions, on one scale from 0. Where it is high the model's PSFs vary more from draw to draw.",
    )
