"""``psfcvae.evaluate(config)``: the model against ray-traced truth and the interpolation a
user would otherwise use, on held-out points it never trained on.

Methods, all on the same held-out points: the CVAE's prior mean and one prior sample;
nearest grid PSF; bilinear (field) x linear (1/depth); eigen-PSF interpolation. Ray
tracing itself at the training spp is measured on the file's re-traced grid subset.
Errors are relative L2 against the held-out reference, raw and noise-corrected
(docs/metrics.md), overall, per grid depth, and at depths between grid depths.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from psfgen.errors import InputError
from psfgen.info import grid_speed
from psfgen.lens import resolve_device
from psfgen.provenance import now, versions
from psfgen.store import open_info, require_complete

from . import baselines, checkpoint, plots
from .api import load_model
from .data import check_grid_content, lit_only, read_heldout, read_lit
from .metrics import rel_l2, rel_l2_corrected, spearman, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    data: str  # grid HDF5 file with a held-out set
    out: str  # output directory
    checkpoint: str | None = None  # None: baselines only
    eigen_components: int = 32  # K of the eigen-PSF baseline
    log_scale: bool = False  # PSF images on a log scale
    side_by_side: int = 6  # held-out points shown side by side
    device: str = "auto"
    seed: int = 0  # for the prior samples


def _model_speed(model, device, n: int = 4096, repeats: int = 3) -> float:
    """PSFs/s of the prior-mean path, batched, on ``device``."""
    model.to(device)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    lo, hi = model.depth_range
    d = np.full(n, np.sqrt(lo * hi))
    model.psf(x[:16], y[:16], d[:16], allow_dark=True)  # warm-up; random points may fall outside the lit field
    best = np.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.psf(x, y, d, allow_dark=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def evaluate(cfg: EvalConfig) -> dict:
    """Compute every figure, write metrics.json, the PNGs and report.html into cfg.out."""
    info = open_info(cfg.data)
    require_complete(info)
    check_grid_content(info.path)
    if info.n_heldout == 0:
        raise InputError(f"{cfg.data} has no held-out set; regenerate it with 'psf generate --heldout M' (M > 0)")
    model = None
    device = resolve_device(cfg.device)
    if cfg.checkpoint is not None:
        model = load_model(cfg.checkpoint)
        checkpoint.check_same_data(model.info, info, f"checkpoint {cfg.checkpoint}")
        model.to(device)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {out}: {exc.strerror}") from None

    with h5py.File(info.path, "r", locking=False) as f:
        grid = f["grid/psf"][:]  # [D, P, 3, k, k]
        coords = f["grid/coords"][:]
        noise_idx, noise = f["noise/index"][:], f["noise/psf"][:]
    ho_all = read_heldout(info.path)
    ho = split_heldout(ho_all, info.path)  # the PSF metrics: lit points only
    depths, n = info.depths, info.grid_size
    ref = ho["ref"]
    x, y, z = ho["coords"][:, 0], ho["coords"][:, 1], ho["depth"]

    # --- predictions on the held-out points ----------------------------------------------
    eigen = baselines.EigenPSF(grid, depths, n, cfg.eigen_components)
    preds: dict[str, np.ndarray] = {}
    if model is not None:
        torch.manual_seed(cfg.seed)
        # allow_dark: a lit point the model calls dark gets zeros, which the metrics count as a 100% error.
        preds["cvae prior mean"] = model.psf(x, y, z, mode="mean", allow_extrapolation=True,
                                             allow_dark=True)[0].cpu().numpy()
        preds["cvae prior sample"] = model.psf(x, y, z, mode="sample", allow_extrapolation=True,
                                               allow_dark=True)[0].cpu().numpy()
    preds["nearest"] = baselines.nearest(grid, depths, n, x, y, z)
    preds["bicubic"] = baselines.bicubic(grid, depths, n, x, y, z)
    preds["bilinear"] = baselines.bilinear(grid, depths, n, x, y, z)
    preds[f"eigen-psf ({eigen.components})"] = eigen(x, y, z)

    groups = {"all": np.ones(len(z), bool), "at grid depths": ho["at_grid_depth"], "between grid depths": ~ho["at_grid_depth"]}
    for d in depths:
        groups[f"at {d:g} m"] = ho["at_grid_depth"] & np.isclose(z, d)
    methods = {}
    per_point = {}
    for name, pred in preds.items():
        raw = rel_l2(pred, ref)
        corr, _ = rel_l2_corrected(pred, ho["psf_a"], ho["psf_b"])
        per_point[name] = raw
        methods[name] = {}
        for g, mask in groups.items():
            if not mask.any():
                continue
            _, pooled = rel_l2_corrected(pred[mask], ho["psf_a"][mask], ho["psf_b"][mask])
            methods[name][g] = {"raw": summarize(raw[mask]), "corrected": {**summarize(corr[mask]), "pooled": pooled}}

    # Ray tracing at the training spp: two independent traces of the same grid points
    # differ by sqrt(2) times the error of one of them.
    raytrace = {}
    if len(noise_idx):
        pair_err = np.stack([rel_l2(noise[d], grid[d, noise_idx]) for d in range(len(depths))])  # [D, S]
        one = pair_err / np.sqrt(2)  # NaN at dark grid points: no PSF
        raytrace = {"all": summarize(one[np.isfinite(one)])}
        raytrace.update({f"at {d:g} m": summarize(one[i][np.isfinite(one[i])]) for i, d in enumerate(depths)})
    ref_noise = np.sqrt(((ho["psf_a"] - ho["psf_b"]) ** 2).reshape(len(z), -1).sum(1)) / 2 / np.sqrt((ref**2).reshape(len(z), -1).sum(1))

    result = {
        "created_at": now(),
        "versions": versions(),
        "data": {"path": info.path, "run_id": info.run_id, "lens_sha256": info.attrs["lens_sha256"], "grid_size": n,
                 "depths_m": [float(d) for d in depths], "spp": info.spp, "heldout_spp": info.heldout_spp,
                 "n_heldout": info.n_heldout},
        "checkpoint": None if model is None else {"path": cfg.checkpoint, "step": model.info["step"],
                                                  "data_fingerprint": model.info["data_fingerprint"],
                                                  "config": model.info["config"], "frame": model.net.args.frame},
        "heldout": methods,
        "raytrace_at_training_spp": raytrace,
        "reference_noise": summarize(ref_noise),
        "eigen_explained_variance": eigen.explained,
        "speed_psfs_per_s": {"raytrace (file provenance, device " + info.attrs["device"] + f", spp {info.spp})": grid_speed(info.path)[0]},
        "heldout_dark": int((~ho_all["lit"]).sum()),
    }
    if model is not None and model.net.illumination is not None:
        result["illumination"] = illumination_error(model, ho_all)

    # --- the CVAE on the grid itself; speed; uncertainty -----------------------------------
    if model is not None:
        grid_eval = {}
        both = [model.net.predict_grid(grid[d], model.conditions(coords[:, 0], coords[:, 1], np.full(n * n, depths[d])))
                for d in range(len(depths))]
        recon_all, prior_all = np.stack([b[0] for b in both]), np.stack([b[1] for b in both])  # [D, P, 3, k, k]
        lit = read_lit(info.path)["valid"].all(axis=-1)  # [D, P]: dark grid points have no PSF to compare with
        for key, pred in (("posterior reconstruction", recon_all), ("prior mean", prior_all)):
            grid_eval[key] = summarize(np.concatenate([rel_l2(pred[d], grid[d])[lit[d]] for d in range(len(depths))]))
        result["grid_vs_training_psfs"] = grid_eval
        speeds = result["speed_psfs_per_s"]
        speeds["cvae prior mean (cpu)"] = _model_speed(model, torch.device("cpu"))
        if torch.cuda.is_available():
            speeds["cvae prior mean (cuda)"] = _model_speed(model, torch.device("cuda"))
        model.to(device)
        std = model.prior_std(x, y, z, allow_extrapolation=True).cpu().numpy()
        corr_err, _ = rel_l2_corrected(preds["cvae prior mean"], ho["psf_a"], ho["psf_b"])
        result["uncertainty"] = {"spearman_prior_std_vs_error": spearman(std, per_point["cvae prior mean"]),
                                 "spearman_prior_std_vs_corrected_error": spearman(std, corr_err)}

    # --- figures ---------------------------------------------------------------------------
    images = []
    log_scale = cfg.log_scale
    for d in range(len(depths)):
        panels = {"ground truth": grid[d]}
        if model is not None:
            torch.manual_seed(cfg.seed + d)
            cond = model.conditions(coords[:, 0], coords[:, 1], np.full(n * n, depths[d]))
            panels["posterior recon"] = recon_all[d]
            panels["prior mean"] = prior_all[d]
            panels["prior sample"] = model.net.sample_from_prior(cond).cpu().numpy()
            shown = prior_all[d]
        else:
            shown = eigen(coords[:, 0], coords[:, 1], np.full(n * n, depths[d]))
            panels["eigen-psf"] = shown
        peak = np.maximum(grid[d].max(axis=(-3, -2, -1), keepdims=True), 1e-12)  # 0 at a dark point
        panels["|error|"] = np.abs(shown - grid[d]) / peak
        name = f"grid_depth{d}_{depths[d]:g}m.png"
        plots.grid_panels(out / name, panels, n, depths[d], log_scale)
        images.append((name, f"Grid at {depths[d]:g} m: ground truth and the model's reconstructions; |error| is of the "
                       + ("prior mean" if model is not None else "eigen-PSF") + ", relative to each PSF's peak."))
    plots.error_maps(out / "error_maps.png", ho["coords"], per_point, coords, circle=lit_circle(info))
    images.append(("error_maps.png", "Relative L2 error (raw) of each method at each held-out point."))
    pick = np.linspace(0, len(z) - 1, min(cfg.side_by_side, len(z))).astype(int)
    sbs = {"reference": ref[pick]}
    if model is not None:
        sbs["cvae"] = preds["cvae prior mean"][pick]
    sbs["bilinear"] = preds["bilinear"][pick]
    labels = [f"({x[i]:+.2f}, {y[i]:+.2f}) {z[i]:.2f} m" for i in pick]
    plots.side_by_side(out / "side_by_side.png", sbs, labels, log_scale)
    images.append(("side_by_side.png", "Held-out points: the ray-traced reference, the CVAE's prior mean and bilinear interpolation."))
    if model is not None:
        m = 64
        lin = np.linspace(-1, 1, m)
        gx, gy = np.meshgrid(lin, lin[::-1])
        mid = float(depths[len(depths) // 2])
        std_map = model.prior_std(gx.ravel(), gy.ravel(), np.full(m * m, mid)).cpu().numpy().reshape(m, m)
        plots.std_map(out / "prior_std.png", std_map, mid, coords)
        images.append(("prior_std.png", "The prior's standard deviation over the field: the model's own uncertainty."))

    (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    table = format_table(result)
    (out / "report.html").write_text(report_html(result, table, out, images))
    log.info("wrote %s", out / "report.html")
    result["table"] = table
    return result


def split_heldout(heldout: dict, path: str) -> dict:
    """The lit held-out points (dark ones have no PSF to measure against), logging how many were left out."""
    lit, n_dark = lit_only(heldout)
    if n_dark:
        log.info("%d of %d held-out points are dark (outside the lit field): left out of the PSF metrics",
                 n_dark, len(heldout["lit"]))
    if len(lit["depth"]) == 0:
        raise InputError(f"every held-out point of {path} is dark (outside the lens's lit field): nothing to measure")
    return lit


def illumination_error(model, heldout: dict) -> dict:
    """The model's relative illumination against the traced one (mean of the two halves) on every held-out
    point: absolute error on the lit points, and how often the model's lit/dark decision agrees."""
    (x, y), z = heldout["coords"].T, heldout["depth"]
    pred = model.illumination(x, y, z, allow_extrapolation=True).cpu().numpy()  # [M, 3]
    lit = heldout["lit"]
    err = np.abs(pred - heldout["illumination"])[lit].ravel()
    return {"n": int(len(lit)), "n_lit": int(lit.sum()), "abs_error": summarize(err),
            "lit_agreement": float(((pred.sum(axis=1) > 0) == lit).mean())}


def lit_circle(info) -> tuple[float, tuple[float, float]] | None:
    """(image-circle radius [mm], sensor (width, height) [mm]) at the middle depth, None when all is lit."""
    from psfgen.litfield import image_circle, radii
    from psfgen.symmetry import sensor_size_mm

    size = sensor_size_mm(info.attrs)
    with h5py.File(info.path, "r", locking=False) as f:
        coords = f["grid/coords"][:]
    lit = read_lit(info.path)["valid"].all(axis=-1)[len(info.depths) // 2]
    bounds = image_circle(radii(coords, size)[0], lit)
    return None if bounds is None or size is None else (0.5 * (bounds[0] + bounds[1]), size)


def _json_safe(value):
    """NaN and inf become null: JSON has no token for them (a Spearman of too few points is NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def format_table(result: dict) -> str:
    """The readable table of held-out errors (percent), the same figures as metrics.json."""
    groups = [g for g in ("all", "at grid depths", "between grid depths") if any(g in m for m in result["heldout"].values())]
    head = f"{'method':24s}" + "".join(f"{g + ' (corr.)':>29s}" for g in groups) + f"{'all, raw mean':>15s}"
    lines = [
        f"Held-out relative L2 error, % — corrected = noise-corrected pooled (docs/metrics.md); "
        f"{result['data']['n_heldout']} points, reference at spp {result['data']['heldout_spp']}",
        head,
        "-" * len(head),
    ]
    for name, m in result["heldout"].items():
        cells = "".join(f"{100 * m[g]['corrected']['pooled']:29.2f}" if g in m else f"{'—':>29s}" for g in groups)
        lines.append(f"{name:24s}{cells}{100 * m['all']['raw']['mean']:15.2f}")
    rt = result.get("raytrace_at_training_spp", {})
    if rt:
        lines.append(f"{'ray tracing, spp ' + str(result['data']['spp']):24s}{100 * rt['all']['mean']:29.2f}"
                     "   (grid points, from the re-traced subset)")
    lines.append(f"reference's own noise: {100 * result['reference_noise']['mean']:.2f}% (mean)")
    if result.get("heldout_dark"):
        lines.append(f"dark held-out points left out (outside the lit field): {result['heldout_dark']}")
    if "illumination" in result:
        il = result["illumination"]
        mean = il["abs_error"].get("mean", float("nan"))
        lines.append(f"illumination (model vs traced, relative to the axis): mean |error| {mean:.3f} over "
                     f"{il['n_lit']} lit points; lit/dark agreement {100 * il['lit_agreement']:.0f}% of {il['n']}")
    for k, v in result["speed_psfs_per_s"].items():
        lines.append(f"speed: {k}: {v:,.1f} PSFs/s")
    if "uncertainty" in result:
        lines.append(f"rank correlation of prior_std with the prior-mean error: {result['uncertainty']['spearman_prior_std_vs_error']:+.2f}")
    return "\n".join(lines)


def report_html(result: dict, table: str, out: Path, images: list[tuple[str, str]]) -> str:
    """One self-contained page: the table, the per-depth figures and every image, embedded."""
    rows = []
    for name, m in result["heldout"].items():
        for g, s in m.items():
            c, r = s["corrected"], s["raw"]
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(g)}</td><td>{c['n']}</td>"
                        f"<td>{100 * c['pooled']:.2f}</td><td>{100 * c['mean']:.2f}</td><td>{100 * c['median']:.2f}</td>"
                        f"<td>{100 * c['p95']:.2f}</td><td>{100 * r['mean']:.2f}</td></tr>")
    figs = []
    for name, caption in images:
        data = base64.b64encode((out / name).read_bytes()).decode()
        figs.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)} <code>{html.escape(name)}</code></figcaption></figure>")
    ck = result["checkpoint"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>psf-cvae evaluation</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,td:nth-child(2){{text-align:left}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>psf-cvae evaluation</h1>
<p>Data <code>{html.escape(result['data']['path'])}</code> (run {result['data']['run_id']}, {result['data']['grid_size']}×{result['data']['grid_size']} grid,
depths {', '.join(f'{d:g}' for d in result['data']['depths_m'])} m, spp {result['data']['spp']});
checkpoint {html.escape(ck['path']) + ' at step ' + str(ck['step']) if ck else '— (baselines only)'}; {result['created_at']}.</p>
<h2>Summary</h2><pre>{html.escape(table)}</pre>
<h2>Held-out errors (relative L2, %)</h2>
<p>"pooled" is the noise-corrected estimate to quote; per-point corrected values are clipped at 0 and noisy; "raw" compares
with the noisy reference directly. See <code>docs/metrics.md</code>.</p>
<table><tr><th>method</th><th>points</th><th>n</th><th>pooled (corr.)</th><th>mean (corr.)</th><th>median (corr.)</th><th>p95 (corr.)</th><th>mean (raw)</th></tr>
{''.join(rows)}</table>
<h2>Figures</h2>
{''.join(figs)}
</body></html>
"""
