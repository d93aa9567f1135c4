"""``psfcvae.evaluate(config)``: the model against ray-traced truth and the interpolation a
user would otherwise use, on the file's test points: held-out points it never trained on,
which did not choose the checkpoint either (training chooses best.pt on the validation points).

Three steps a reader can call alone: ``compute_metrics`` (every figure, metrics.json's
content, plus the arrays behind it), ``eval_figures.make_figures`` (the PNGs) and
``report.write_report`` (report.html); ``evaluate`` runs the three.

Methods, all on the same test points: the CVAE's prior mean and one prior sample;
nearest grid PSF; bilinear and bicubic (field) x linear (1/depth) x linear (1/focus);
eigen-PSF interpolation; for a rotationally symmetric model, bicubic of the grid averaged over
its mirror images (the grid the model's blend starts from). Ray tracing itself at the training
spp is measured on the file's re-traced grid subset. Errors are relative L2 against the
held-out reference, raw and noise-corrected (docs/metrics.md), overall, per grid depth, per
interval between grid depths, per radius band and, in a file of several focus settings, at and
between grid focus settings.
A checkpoint chosen on any of the test points is refused.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from psfcvae import checkpoint
from psfcvae.api.psfmodel import PSFModel, load_model
from psfcvae.evaluation import baselines, report
from psfcvae.evaluation import figures as eval_figures
from psfcvae.evaluation.metrics import (
    focus_groups,
    focus_json,
    focus_label,
    measured_points,
    rel_l2_corrected,
    spearman,
    summarize,
)
from psfcvae.optics import grid_optics
from psfcvae.training.data import lit_only
from psfgen.analysis.litfield import image_circle, radii
from psfgen.gridfile import KEPT_LIMIT, GridFile
from psfgen.plan.grid import RADIUS_BANDS, TEST, band_label, radius_band
from psfgen.shared import tempfiles
from psfgen.shared.configio import check_at_least, check_device, check_seed
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError, os_reason
from psfgen.shared.metrics import rel_l2
from psfgen.shared.provenance import now, versions

log = logging.getLogger(__name__)

INTERPOLATION = ("nearest", "bilinear", "bicubic", "eigen-psf")  # name prefixes of the baselines
# Bicubic interpolation of the grid averaged over its mirror images (baselines.mirror_averaged), the grid the blend
# starts from: scored for a rotationally symmetric (canonical) model, whose lens has those symmetries.
MIRRORED = "bicubic (mirror-averaged)"
TABLE = "cvae prior mean (table)"  # the model's prior mean through model.tabulate()
# the network's prior mean at the point itself: without the blend (psfcvae/api/blend.py) and, for a model over
# focus, without answering from its grid focus settings (blend.refocused)
NETWORK = "cvae network alone"


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

    def validate(self) -> None:  # called by psfgen.configio.build, the one loader of every config
        check_at_least(self, 1, "eigen_components", "side_by_side")
        check_seed(self)
        check_device(self)


def _model_speed(model, device, focus_m=None, n: int = 4096, repeats: int = 3, table=None) -> float:
    """PSFs/s of the prior-mean path, batched, on ``device``: the network's at focus_m [m] (None: a single-focus
    model), or ``table``'s (a PSFTable at one focus, CPU)."""
    model.to(device)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    lo, hi = model.depth_range
    d = np.full(n, np.sqrt(lo * hi))
    focus = {} if focus_m is None or table is not None else {"focus_m": focus_m}
    model = table if table is not None else model
    model.psf(x[:16], y[:16], d[:16], allow_dark=True, **focus)  # warm-up; random points may fall outside the lit field
    best = np.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.psf(x, y, d, allow_dark=True, **focus)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


@dataclass
class EvalArrays:
    """The arrays behind the metrics, for the figures (and for a reader's own plots).

    grid [F*D, P, 3, k, k] training PSFs on the file's planes p = f*D + d, coords [P, 2], depths [D] m,
    focus [F] m ([nan]: a single-focus file); heldout: the lit test points, as GridFile.heldout gives them
    (coords [M, 2], depth [M] m, at_grid_depth [M], focus [M] m, at_grid_focus [M], psf_a, psf_b, ref
    [M, 3, k, k]); preds: method -> [M, 3, k, k]; corrected: method -> [M] per-point noise-corrected error;
    recon, prior: the model's posterior reconstruction and prior mean of the grid [F*D, P, 3, k, k];
    eigen: the eigen-PSF baseline fitted to the grid; lit [F*D, P]: grid points that hold a PSF;
    circle: (image-circle radius [mm], sensor (width, height) [mm]) where part of the field is dark, else None.
    """

    grid: np.ndarray
    coords: np.ndarray
    depths: np.ndarray
    heldout: dict
    focus: np.ndarray = field(default_factory=lambda: np.array([np.nan]))
    preds: dict = field(default_factory=dict)
    corrected: dict = field(default_factory=dict)
    recon: np.ndarray | None = None
    prior: np.ndarray | None = None
    eigen: baselines.EigenPSF | None = None
    lit: np.ndarray | None = None
    circle: tuple | None = None
    table: object | None = None  # the model's PSFTable (canonical models; one of them over focus), scored as TABLE

    @property
    def multi_focus(self) -> bool:
        """Several focus settings: the model takes focus_m and the points are grouped by focus."""
        return len(self.focus) > 1

    @property
    def plane_depth(self) -> np.ndarray:
        """[F*D] m: each plane's depth."""
        return np.tile(self.depths, len(self.focus))

    @property
    def plane_focus(self) -> np.ndarray:
        """[F*D] m: each plane's focus (nan in a single-focus file)."""
        return np.repeat(self.focus, len(self.depths))

    def plane_label(self, p: int) -> str:
        """'2 m', or '2 m, focus 0.5 m' in a file of several focus settings."""
        depth = f"{self.plane_depth[p]:g} m"
        return f"{depth}, focus {focus_label(self.plane_focus[p])}" if self.multi_focus else depth

    def model_focus(self, focus_m):
        """What the model takes as focus_m: the value(s) [m] in a multi-focus file, None in a single-focus one
        (its model knows one focus)."""
        return focus_m if self.multi_focus else None


def evaluate(cfg: EvalConfig, extra_figures: list | None = None) -> dict:
    """Compute every figure, write metrics.json, the PNGs and report.html into cfg.out.

    extra_figures: (title, png, caption) appended to the report; png is PNG bytes, a path
    or a matplotlib figure. Returns the metrics (metrics.json's content) plus "table".
    """
    info = GridFile.open(cfg.data)
    info.require_complete()
    if info.n_part("test") == 0:
        raise InputError(
            f"{cfg.data} has no held-out set (no test points); regenerate it with 'psf generate --heldout 40'"
        )
    model = None
    device = resolve_device(cfg.device)
    if cfg.checkpoint is not None:
        model = load_model(cfg.checkpoint)
        checkpoint.check_same_data(model.info, info, f"checkpoint {cfg.checkpoint}")
        check_selection(model.info["selection"], info, cfg.checkpoint)
        model.to(device)
    out = Path(cfg.out)
    # Everything goes to a temporary directory made before the work, which then replaces --out whole: an
    # unwritable --out is said at once, and a failure or kill -9 never leaves new figures beside old metrics.
    try:
        with tempfiles.replacing_dir(out, "--out", _ours, mark="metrics.json") as tmp:
            result, arrays = compute_metrics(cfg, info, model)
            figures = eval_figures.make_figures(result, arrays, tmp, model, cfg.log_scale, cfg.side_by_side, cfg.seed)
            (tmp / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
            report.write_report(result, tmp, figures, extra_figures or [])
    except OSError as exc:  # a full disk, a file size limit: the previous --out is untouched
        raise InputError(f"cannot write the evaluation into {out}: {os_reason(exc)}; {out} is as it was") from None
    log.info("wrote %s", out / "report.html")
    result["table"] = format_table(result)
    return result


def _ours(name: str) -> bool:
    """A name psf eval writes into --out: its figures, metrics.json and report.html."""
    return name.endswith(".png") or name in ("metrics.json", "report.html")


def compute_metrics(cfg: EvalConfig, info: GridFile, model: PSFModel | None) -> tuple[dict, EvalArrays]:
    """Every method's held-out errors, ray tracing's, the model's grid fit, speed and uncertainty.

    Returns (metrics: the content of metrics.json, arrays: what they were computed from).
    """
    grid, coords = info.grid_psfs(), info.coords  # [F*D, P, 3, k, k] (checked), [P, 2]
    ho_all = info.heldout("test")  # the validation points chose the checkpoint: never scored here
    # The PSF metrics use lit points only: a dark point has no PSF to measure against.
    arrays = EvalArrays(
        grid=grid,
        coords=coords,
        depths=info.depths,
        focus=info.focus,
        heldout=split_heldout(ho_all, info.path),
        lit=info.lit,  # [F*D, P]: a dark grid point has no PSF
    )
    arrays.circle = lit_circle(info, coords, arrays.lit)
    ho, depths = arrays.heldout, info.depths
    eigen = baselines.EigenPSF(arrays.grid, depths, info.grid_size, cfg.eigen_components, focus=info.focus)
    arrays.eigen = eigen
    arrays.preds = _predictions(model, arrays, info.grid_size, cfg.seed)
    if model is not None and model.net.canonical:  # what model.tabulate() gives a user: a method of its own
        arrays.preds[TABLE], arrays.table = _tabulated(model, arrays)

    methods = _heldout_errors(arrays)
    ref = ho["ref"]
    ref_noise = (
        np.sqrt(((ho["psf_a"] - ho["psf_b"]) ** 2).reshape(len(ref), -1).sum(1))
        / 2
        / np.sqrt((ref**2).reshape(len(ref), -1).sum(1))
    )
    result = {
        "created_at": now(),
        "versions": versions(),
        "data": {
            "path": info.path,
            "run_id": info.run_id,
            "lens_sha256": info.lens_sha256,
            "grid_size": info.grid_size,
            "depths_m": [float(d) for d in depths],
            "focus_m": [focus_json(f) for f in info.focus],
            "spp": info.spp,
            "heldout_spp": info.heldout_spp,
            "n_heldout": info.n_heldout,
            "n_test": info.n_part("test"),
            "n_validation": info.n_part("validation"),
            "heldout_from": info.heldout_from,
        },
        "protocol": protocol(info, model),
        "optics": optics(info),
        "checkpoint": None
        if model is None
        else {
            "path": cfg.checkpoint,
            "step": model.info["step"],
            "data_fingerprint": model.info["data_fingerprint"],
            "config": model.info["config"],
            "frame": model.net.args.frame,
            "selection": {k: v for k, v in model.info["selection"].items() if k != "points"}
            | {"n_points": len(model.info["selection"]["points"])},
            "blend": None
            if model.blend is None
            else {
                "radius_bands": [float(r) for r in RADIUS_BANDS],
                "network_weight": [float(w) for w in model.blend.weights],
                "validation_points": [int(n) for n in model.blend.points],
                "smooth": float(model.blend.smooth),
                "detail": float(model.blend.detail),
                "sigma_per_m": None if math.isinf(model.blend.sigma) else float(model.blend.sigma),
                "description": model.blend.describe(),
            },
        },
        "heldout": methods,
        "heldout_groups": groups_of(arrays),
        "raytrace_at_training_spp": _raytrace(info, arrays),
        "reference_noise": summarize(ref_noise),
        "eigen_explained_variance": eigen.explained,
        "speed_psfs_per_s": {
            f"raytrace (file provenance, device {', '.join(info.devices)}, spp {info.spp})": info.grid_speed()[0]
        },
        "heldout_dark": int((~ho_all["lit"]).sum()),
    }
    if model is not None:
        result["illumination"] = illumination_error(model, ho_all, arrays.model_focus(ho_all["focus"]))
        _model_metrics(result, arrays, model, info.grid_size)
    result["headline"] = headline(result)
    return result, arrays


def heldout_groups(heldout: dict, depths: np.ndarray, focus=None) -> dict[str, dict[str, np.ndarray]]:
    """The groups the test points are scored in, by kind: {"depth": {name: mask [M]}, "radius band": {...}
    [, "focus": {...}]}.

    depth: all, at and between grid depths, at each grid depth, between each two neighbouring grid depths;
    radius band: r = sqrt(x² + y²) in RADIUS_BANDS (psfgen/plan/grid.py); focus, only where the file has several
    focus settings focus [F] m: all, at and between grid focus settings, at each, between each two neighbouring
    ones (heldout's focus [M] m and at_grid_focus [M]). Empty groups are left out."""
    at, depth_m = heldout["at_grid_depth"], heldout["depth"]
    by_depth = {"all": np.ones(len(depth_m), bool), "at grid depths": at, "between grid depths": ~at}
    for d in depths:
        by_depth[f"at {d:g} m"] = at & np.isclose(depth_m, d)
    for lo, hi in zip(depths[:-1], depths[1:]):
        by_depth[f"between {lo:g} and {hi:g} m"] = ~at & (depth_m > lo) & (depth_m < hi)
    band = radius_band(heldout["coords"])
    by_band = {band_label(b): band == b for b in range(len(RADIUS_BANDS) - 1)}
    kinds = [("depth", by_depth), ("radius band", by_band)]
    if focus is not None and len(focus) > 1:
        kinds.append(("focus", _focus_groups(heldout, np.asarray(focus))))
    return {kind: {g: m for g, m in groups.items() if m.any()} for kind, groups in kinds}


def _focus_groups(heldout: dict, focus: np.ndarray) -> dict[str, np.ndarray]:
    """{name: mask [M]}: all, at and between grid focus settings, at each focus [F] m, between each two."""
    at, focus_m = heldout["at_grid_focus"], heldout["focus"]
    groups = {"all": np.ones(len(focus_m), bool), "at grid focus": at, "between grid focus": ~at}
    for name, _, lo, hi in focus_groups(focus):  # the file's own values, inf included
        groups[name] = at & (focus_m == lo) if lo == hi else ~at & (focus_m > lo) & (focus_m < hi)
    return groups


def groups_of(arrays: EvalArrays) -> dict[str, list[str]]:
    """metrics.json's heldout_groups: the names of the groups of each kind, in order."""
    return {kind: list(g) for kind, g in heldout_groups(arrays.heldout, arrays.depths, arrays.focus).items()}


def _heldout_errors(arrays: EvalArrays) -> dict:
    """{method: {group: {"raw": stats, "corrected": stats + "pooled"}}} over heldout_groups' groups (all, per
    depth, per radius band, per focus); fills ``arrays.corrected`` [M] per method on the way."""
    ho = arrays.heldout
    kinds = heldout_groups(ho, arrays.depths, arrays.focus).values()
    groups = {g: m for kind in kinds for g, m in kind.items()}
    methods = {}
    for name, pred in arrays.preds.items():
        raw = rel_l2(pred, ho["ref"])
        arrays.corrected[name], _ = rel_l2_corrected(pred, ho["psf_a"], ho["psf_b"])
        methods[name] = {}
        for g, mask in groups.items():
            if mask.any():
                _, pooled = rel_l2_corrected(pred[mask], ho["psf_a"][mask], ho["psf_b"][mask])
                methods[name][g] = {
                    "raw": summarize(raw[mask]),
                    "corrected": {**summarize(arrays.corrected[name][mask]), "pooled": pooled},
                }
    return methods


def _tabulated(model: PSFModel, arrays: EvalArrays) -> tuple[np.ndarray, object]:
    """The model's prior mean through model.tabulate() at the held-out points: (PSFs [M, 3, k, k], the table of
    the last focus). A table holds one focus: a multi-focus model is tabulated at each focus the points hold, one
    table at a time (each may be hundreds of MiB)."""
    ho = arrays.heldout
    (x, y), depth_m, focus_m = ho["coords"].T, ho["depth"], ho["focus"]
    out = np.zeros_like(ho["ref"])
    table = None
    for f in np.unique(focus_m) if arrays.multi_focus else [None]:
        at = np.ones(len(x), bool) if f is None else focus_m == f
        table = None  # the previous focus's table goes before the next is built
        table = model.tabulate() if f is None else model.tabulate(focus_m=float(f))  # held on the CPU
        R, A, D = table.shape
        log.info(
            "tabulated the prior mean%s: %d radii x %d angles x %d depths, %.0f MiB",
            "" if f is None else f" at focus {focus_label(f)}",
            *(R, A, D, table.nbytes / 2**20),
        )
        psf, _ = table.psf(x[at], y[at], depth_m[at], allow_extrapolation=True, allow_dark=True)
        out[at] = psf.numpy()
    return out, table


def _predictions(model, arrays: EvalArrays, n: int, seed: int) -> dict[str, np.ndarray]:
    """method -> its PSFs [M, 3, k, k] at the held-out points (coords, depth [m], focus [m]) of ``arrays``."""
    ho = arrays.heldout
    (x, y), depth_m = ho["coords"].T, ho["depth"]
    preds: dict[str, np.ndarray] = {}
    if model is not None:
        torch.manual_seed(seed)
        focus = arrays.model_focus(ho["focus"])
        # allow_dark: a lit point the model calls dark gets zeros, which the metrics count as a 100% error.
        for name, mode in (("cvae prior mean", "mean"), ("cvae prior sample", "sample")):
            psf, _ = model.psf(x, y, depth_m, focus_m=focus, mode=mode, allow_extrapolation=True, allow_dark=True)
            preds[name] = psf.cpu().numpy()
        if not model.answers_with_network:  # what the blend and refocusing add: the network alone
            cond = model.conditions(x, y, depth_m, focus, allow_extrapolation=True)
            preds[NETWORK] = model._decode(cond, model._lit(cond), "mean", 1, blend=False).cpu().numpy()
    where = (x, y, depth_m, arrays.focus, ho["focus"])
    preds["nearest"] = baselines.nearest(arrays.grid, arrays.depths, n, *where)
    preds["bicubic"] = baselines.bicubic(arrays.grid, arrays.depths, n, *where)
    preds["bilinear"] = baselines.bilinear(arrays.grid, arrays.depths, n, *where)
    if model is not None and model.net.canonical:  # the lens is rotationally symmetric: its mirror images too
        sx, sy = model.net.args.field_scale
        mirrored = baselines.mirror_averaged(arrays.grid, n, square=sx == sy)
        preds[MIRRORED] = baselines.bicubic(mirrored, arrays.depths, n, *where)
    preds[f"eigen-psf ({arrays.eigen.components})"] = arrays.eigen(x, y, depth_m, ho["focus"])
    return preds


def _raytrace(info: GridFile, arrays: EvalArrays) -> dict:
    """Ray tracing at the training spp, from the re-traced grid subset on every plane: two independent traces
    of the same point differ by sqrt(2) times the error of one of them. "pooled" sums the squared norms over
    points before the ratio, as the held-out pooled figure does. Groups: all, at each grid depth (over every
    focus) and, in a file of several focus settings, at each focus (over every depth)."""
    noise_idx, noise = info.noise_index, info.noise()["psf"]  # [S], [F*D, S, 3, k, k]
    if not len(noise_idx):
        return {}
    lit = arrays.lit[:, noise_idx]  # [F*D, S]
    pair = [(noise[p][lit[p]], arrays.grid[p, noise_idx][lit[p]]) for p in range(len(lit))]
    one = [rel_l2(a, b) / np.sqrt(2) for a, b in pair]  # per plane [S_lit]

    def stats(planes):
        num = sum(((pair[p][0].astype(np.float64) - pair[p][1]) ** 2).sum() for p in planes)
        den = sum((pair[p][1].astype(np.float64) ** 2).sum() for p in planes)
        return {**summarize(np.concatenate([one[p] for p in planes])), "pooled": float(np.sqrt(num / den / 2))}

    planes = np.arange(len(lit))
    out = {"all": stats(planes)}
    out.update({f"at {d:g} m": stats(planes[arrays.plane_depth == d]) for d in arrays.depths})
    if arrays.multi_focus:
        out.update({f"at focus {focus_label(f)}": stats(planes[arrays.plane_focus == f]) for f in arrays.focus})
    return out


def _model_metrics(result: dict, arrays: EvalArrays, model: PSFModel, n: int) -> None:
    """The CVAE on its own grid, its speed and whether its uncertainty points at its errors."""
    grid, coords = arrays.grid, arrays.coords
    both = [
        model.net.predict_grid(
            grid[p],
            model.conditions(
                coords[:, 0],
                coords[:, 1],
                np.full(n * n, arrays.plane_depth[p]),
                focus_m=arrays.model_focus(arrays.plane_focus[p]),
            ),
        )
        for p in range(len(grid))
    ]
    arrays.recon, arrays.prior = np.stack([b[0] for b in both]), np.stack([b[1] for b in both])  # [F*D, P, 3, k, k]
    lit = arrays.lit  # [F*D, P]: dark points have no PSF
    result["grid_vs_training_psfs"] = {
        key: summarize(np.concatenate([rel_l2(p, g)[ok] for p, g, ok in zip(pred, grid, lit)]))
        for key, pred in (("posterior reconstruction", arrays.recon), ("prior mean", arrays.prior))
    }
    device = next(model.net.parameters()).device
    speeds = result["speed_psfs_per_s"]
    focus = arrays.model_focus(arrays.focus[len(arrays.focus) // 2])  # the middle focus setting
    speeds["cvae prior mean (cpu)"] = _model_speed(model, torch.device("cpu"), focus)
    if arrays.table is not None:
        speeds["cvae prior mean, table (cpu)"] = _model_speed(model, torch.device("cpu"), table=arrays.table)
        net, tab = arrays.preds["cvae prior mean"], arrays.preds[TABLE]  # the lit held-out points
        result["tabulated"] = {
            "shape": list(arrays.table.shape),
            "mib": arrays.table.nbytes / 2**20,
            "deviation_from_model": float(np.sqrt(((tab - net) ** 2).sum() / (net**2).sum())),
        }
    if torch.cuda.is_available():
        speeds["cvae prior mean (cuda)"] = _model_speed(model, torch.device("cuda"), focus)
    model.to(device)
    ho = arrays.heldout
    (x, y), focus = ho["coords"].T, arrays.model_focus(ho["focus"])
    std = model.prior_std(x, y, ho["depth"], focus_m=focus, allow_extrapolation=True).cpu().numpy()
    raw = rel_l2(arrays.preds["cvae prior mean"], ho["ref"])
    corrected = arrays.corrected["cvae prior mean"]
    result["uncertainty"] = {
        "spearman_prior_std_vs_error": spearman(std, raw),
        "spearman_prior_std_vs_corrected_error": spearman(std, corrected),
    }


def headline(result: dict) -> dict:
    """The page's first table and sentence: every method's pooled noise-corrected error on all test points
    (best first), the method the sentence names ("named": the prior mean, what the API returns; the best
    interpolation without a model), and the sentence comparing it with the best interpolation and with tracing.

    "points_lower": the best interpolation's error minus the CVAE's, in percentage points of the figures as the
    sentence shows them (one decimal), so that the sentence adds up; negative where the CVAE is worse."""
    pooled = {name: m["all"]["corrected"]["pooled"] for name, m in result["heldout"].items()}
    ranked = sorted(pooled, key=pooled.get)
    interp = [name for name in ranked if name.startswith(INTERPOLATION)]
    rt = result.get("raytrace_at_training_spp", {}).get("all", {}).get("pooled")
    best = interp[0]
    label = f"eigen-PSF, {best[len('eigen-psf (') : -1]} components" if best.startswith("eigen-psf (") else best
    cvae = pooled.get("cvae prior mean")
    named = best if cvae is None else "cvae prior mean"
    whose = "its" if cvae is None else "the CVAE's"
    trace = (
        f"; tracing the point at the training spp: {100 * rt:.1f}% ({whose} error is {pooled[named] / rt:.1f}× that)"
        if rt
        else ""
    )
    out = {
        "pooled": {name: pooled[name] for name in ranked},
        "named": named,  # bold in the report: the figure the sentence quotes, never a random prior sample's
        "best_interpolation": best,
        "raytrace": rt,
    }
    b = round(100 * pooled[best], 1)
    if cvae is None:
        out["sentence"] = f"Best interpolation: {label} {b:.1f}%{trace}."
        return out
    c = round(100 * cvae, 1)
    points = round(b - c, 1)
    out["points_lower"] = points
    change = f"{abs(points):.1f} points {'lower' if points > 0 else 'higher'}" if points else "the same to 0.1 points"
    out["sentence"] = f"CVAE {c:.1f}% against the best interpolation's {b:.1f}% ({label}): {change}{trace}."
    return out


def optics(info: GridFile) -> dict:
    """The physical context of the file: lens, wavelengths, sensor, kernel pitch, truncation of lit PSFs."""
    lens = json.loads(info.lens_json)
    geometry = grid_optics(info)
    size, res = geometry["sensor_size_mm"], geometry["sensor_res"]
    kept = info.light_kept()
    at = {"x": kept.xy[0], "y": kept.xy[1], "depth_m": kept.depth_m, "channel": "RGB"[kept.channel]}
    return {
        "lens_path": info.lens_path,
        "lens_description": str(lens.get("info", "")),
        "lens_sha256": info.lens_sha256,
        "focal_length_mm": info.foclen_mm,
        "wavelengths_um_rgb": [float(w) for w in info.wvln],
        "sensor_size_mm": size,
        "sensor_resolution_px": res,
        "sensor_pixel_um": 1000.0 * size[0] / res[0],
        "traced_kernel_px": info.kernel_size,
        "kernel_px": info.kernel_size_small,
        "kernel_pitch_um": 1000.0 * geometry["kernel_pitch_mm"],
        # A lit grid PSF is truncated when a channel keeps under KEPT_LIMIT of its valid rays in the traced window.
        "truncation": {
            "kept_limit": KEPT_LIMIT,
            "truncated": kept.below,
            "dark_by_window": kept.dark,
            "total": kept.total,
            "mean_kept": kept.mean if kept.total else None,
            "worst_kept": kept.worst,
            "worst_at": at if kept.total else None,
        },
    }


def split_heldout(heldout: dict, path: str) -> dict:
    """The lit test points (dark ones have no PSF to measure against), logging how many were left out."""
    lit, n_dark = lit_only(heldout)
    if n_dark:
        log.info(
            "%d of %d test points are dark (outside the lit field): left out of the PSF metrics",
            n_dark,
            len(heldout["lit"]),
        )
    if len(lit["depth"]) == 0:
        raise InputError(f"every test point of {path} is dark (outside the lens's lit field): nothing to measure")
    return lit


def check_selection(selection: dict, info: GridFile, path: str) -> None:
    """Refuse a checkpoint chosen on any of the points this file's test part holds (a checkpoint chosen on
    another file's split, or on all of its held-out points): its error there would be the very figure that
    chose it. selection: the checkpoint's record (psfcvae/training/loop.py selection())."""
    used = {tuple(p) for p in selection["points"]}
    test = np.column_stack([info.heldout_coords, info.heldout_depth])[info.heldout_part == TEST]
    seen = sum(tuple(p) in used for p in test.tolist())
    if seen:
        raise InputError(
            f"checkpoint {path} was chosen on {seen} of the {len(test)} test points of {info.path} (by its "
            f"{selection['part']} points' {selection['metric']}): their error would not be an honest test; score it "
            "on a file with other test points, or retrain on this file (best.pt is then chosen on its validation "
            "points)"
        )


def protocol(info: GridFile, model: PSFModel | None) -> dict:
    """Which points are scored and which chose the checkpoint: metrics.json's ``protocol`` and the report's line."""
    n_test, n_val = info.n_part("test"), info.n_part("validation")
    if model is None:
        said = f"test points: {n_test}; the file's {n_val} validation points are left to choosing checkpoints"
    else:
        said = f"test points: {n_test}, never seen in training nor used to choose this checkpoint"
    return {"scored": "test", "test_points": n_test, "validation_points": n_val, "statement": said}


def illumination_error(model, heldout: dict, focus_m=None) -> dict:
    """The model's relative illumination against the traced one (mean of the two halves) on every held-out
    point: absolute error on the lit points, and how often the model's lit/dark decision agrees. focus_m: the
    points' focus [M] m for a multi-focus model, None for a single-focus one."""
    (x, y), depth_m = heldout["coords"].T, heldout["depth"]
    pred = model.illumination(x, y, depth_m, focus_m=focus_m, allow_extrapolation=True).cpu().numpy()  # [M, 3]
    lit = heldout["lit"]
    err = np.abs(pred - heldout["illumination"])[lit].ravel()
    return {
        "n": int(len(lit)),
        "n_lit": int(lit.sum()),
        "abs_error": summarize(err),
        "lit_agreement": float(((pred.sum(axis=1) > 0) == lit).mean()),
    }


def lit_circle(info, coords: np.ndarray, lit: np.ndarray) -> tuple[float, tuple[float, float]] | None:
    """(image-circle radius [mm], sensor (width, height) [mm]) at the middle depth of the middle focus, None when
    all is lit. coords [P, 2]: the grid's field points; lit [F*D, P]: which of them hold a PSF."""
    size = info.sensor_size_mm
    bounds = image_circle(radii(coords, size)[0], lit[info.plane(info.n_focus // 2, len(info.depths) // 2)])
    return None if bounds is None else (0.5 * (bounds[0] + bounds[1]), size)


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
    """The headline sentence and the readable table of test-point errors (percent), the same figures as
    metrics.json; under 100 columns."""
    labels = {"all": "all", "at grid depths": "grid depths", "between grid depths": "between"}
    groups = [g for g in labels if any(g in m for m in result["heldout"].values())]
    head = f"{'method':24s}" + "".join(f"{labels[g]:>14s}" for g in groups) + f"{'all, raw':>12s}"
    lines = [
        *textwrap.wrap(result["headline"]["sentence"], 99),
        "",
        "Test-point relative L2 error, %: noise-corrected pooled (docs/metrics.md), and the raw mean",
        result["protocol"]["statement"],
        f"scored: {measured_points(result)}, reference at spp {result['data']['heldout_spp']}",
        *_blend_line(result),
        head,
        "-" * len(head),
    ]
    for name, m in result["heldout"].items():
        cells = "".join(f"{100 * m[g]['corrected']['pooled']:14.2f}" if g in m else f"{'—':>14s}" for g in groups)
        lines.append(f"{name:24s}{cells}{100 * m['all']['raw']['mean']:12.2f}")
    rt = result.get("raytrace_at_training_spp", {})
    if rt:
        figure = rt["all"].get("pooled", rt["all"]["mean"])
        lines.append(
            f"{'tracing, spp ' + str(result['data']['spp']):24s}{100 * figure:14.2f}  (grid points, re-traced subset)"
        )
    lines += _group_lines(result, "by radius r = √(x²+y²)", result["heldout_groups"]["radius band"])
    if "focus" in result["heldout_groups"]:
        focus = [g for g in result["heldout_groups"]["focus"] if g != "all"]
        for start in range(0, len(focus), 5):  # five columns fit in 100
            lines += _group_lines(result, "by focus distance", focus[start : start + 5])
    lines.append("")
    lines.append(f"reference's own noise: {100 * result['reference_noise']['mean']:.2f}% (mean)")
    lines += textwrap.wrap("units: " + "; ".join(f"{k}: {v}" for k, v in report.units(result["optics"])), 99)
    if result.get("heldout_dark"):
        lines.append(f"dark test points left out (outside the lit field): {result['heldout_dark']}")
    if "illumination" in result:
        il = result["illumination"]
        mean = il["abs_error"].get("mean", float("nan"))
        lines.append(f"illumination, model vs traced: mean |error| {mean:.3f} over {il['n_lit']} lit points;")
        lines.append(f"  lit/dark agreement {100 * il['lit_agreement']:.0f}% of {il['n']} points")
    speeds = result["speed_psfs_per_s"]
    trace = next(iter(speeds.values()))  # the file's ray tracing comes first
    for k, v in speeds.items():
        ratio = ""
        if k.startswith("cvae") and trace > 0:
            times = v / trace
            ratio = (f" ({times:,.0f}x" if times >= 10 else f" ({times:.2g}x") + " the file's ray tracing)"
        lines.append(f"speed: {k}: {v:,.1f} PSFs/s{ratio}")
    if "tabulated" in result:
        t = result["tabulated"]
        lines.append(
            f"table: {' x '.join(map(str, t['shape']))} (radii x angles x depths), {t['mib']:.0f} MiB; "
            f"{100 * t['deviation_from_model']:.2f}% from model.psf at the test points"
        )
    if "uncertainty" in result:
        rho = result["uncertainty"]["spearman_prior_std_vs_error"]
        lines.append(f"rank correlation of prior_std with the prior-mean error: {rho:+.2f}")
    return "\n".join(lines)


def _blend_line(result: dict) -> list[str]:
    """The model's blend with its grid (psfcvae/api/blend.py), one wrapped line; none without a model."""
    ck = result["checkpoint"]
    if ck is None:
        return []
    said = f"blend: {ck['blend']['description']}" if ck["blend"] else "blend: none, the network alone"
    return textwrap.wrap(said, 99)


def _group_lines(result: dict, title: str, groups: list[str]) -> list[str]:
    """A blank line and one table of every method's pooled error [%] in each of ``groups`` (columns), ray
    tracing's where it has the group, and the test points in each."""
    head = f"{title:24s}" + "".join(f"{_column(g):>15s}" for g in groups)
    lines = ["", head, "-" * len(head)]
    cell = lambda m, g: f"{100 * m[g]['corrected']['pooled']:15.2f}" if g in m else f"{'—':>15s}"  # noqa: E731
    for name, m in result["heldout"].items():
        lines.append(f"{name:24s}" + "".join(cell(m, g) for g in groups))
    rt = {g: {"corrected": {"pooled": v["pooled"]}} for g, v in result.get("raytrace_at_training_spp", {}).items()}
    if any(g in rt for g in groups):
        lines.append(f"{'tracing, spp ' + str(result['data']['spp']):24s}" + "".join(cell(rt, g) for g in groups))
    counts = next(iter(result["heldout"].values()))
    return lines + [f"{'test points':24s}" + "".join(f"{counts[g]['raw']['n']:15d}" for g in groups)]


def _column(group: str) -> str:
    """A group's name as a column of the text table: 'at focus 0.5 m' -> '0.5 m', 'between focus 2 m and ∞' ->
    '2 m–∞', 'at grid focus' -> 'grid focus'; other names as they are."""
    if group in ("at grid focus", "between grid focus"):
        return group.removeprefix("at ").replace("between grid focus", "between")
    return group.removeprefix("at focus ").removeprefix("between focus ").replace(" and ", "–")
