"""``psf info``: a human summary of a grid file, and the noise figures it rests on."""

from __future__ import annotations

import json

import h5py
import numpy as np

from .shared.metrics import rel_l2
from .store import RAY_BUDGET_SCOPE, TRUNCATION_LIMIT, open_info, read_lit, traced_grid


def grid_speed(path) -> tuple[float, int] | None:
    """(grid PSFs/s of ray tracing, PSFs counted) from the finished grid blocks' times."""
    with h5py.File(path, "r", locking=False) as f:
        table, secs, done = f["blocks/table"][:], f["blocks/seconds"][:], f["blocks/done"][:].astype(bool)
    grid = done & (table[:, 0] == 0)
    n = int((table[grid, 3] - table[grid, 2]).sum())
    return (n / secs[grid].sum(), n) if n and secs[grid].sum() > 0 else None


def noise_floor(path) -> np.ndarray | None:
    """Per depth, mean relative L2 between a grid PSF and its independent re-trace
    at the same spp: [D], or None without noise points. Only finished blocks count."""
    with h5py.File(path, "r", locking=False) as f:
        idx = f["noise/index"][:]
        if idx.size == 0:
            return None
        grid = f["grid/psf"][:, idx]  # [D, S, 3, k, k]
        again = f["noise/psf"][:]
        ok = (grid.sum(axis=(-3, -2, -1)) > 0) & (again.sum(axis=(-3, -2, -1)) > 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # untraced blocks are all zeros
        err = rel_l2(again, grid)
    return np.array([np.nanmean(err[d][ok[d]]) if ok[d].any() else np.nan for d in range(len(err))])


def _devices(attrs) -> str:
    """The device(s) that traced the file: one name, or those of a merged file's shards."""
    names = json.loads(attrs["devices"]) if "devices" in attrs else [attrs["device"]]
    names = list(dict.fromkeys(str(n) for n in (names if isinstance(names, list) else [names])))
    return names[0] if len(names) == 1 else " + ".join(names) + " (shards)"


def _default_note(noise_points, grid_size: int) -> str:
    """Says when the noise points were the default chosen for this grid (fewer than 32 on a small one)."""
    from .config import NOISE_POINTS, default_noise_points

    if noise_points == default_noise_points(grid_size) and noise_points != NOISE_POINTS:
        return f" (the default for a {grid_size}x{grid_size} grid: all its points)"
    return ""


def _requested_budget(cfg: dict, attrs) -> str:
    """The ray_budget asked for, if any; a file from before it counted every depth's rays says so."""
    if cfg.get("ray_budget") is None:
        return ""
    per_depth = "" if attrs.get("ray_budget_scope") == RAY_BUDGET_SCOPE else " per depth (as it counted then)"
    return f"; requested ray_budget {cfg['ray_budget']:,}{per_depth}"


def _plan_note(attrs) -> str:
    """Says when num_depths auto chose the depths, and from what."""
    if "depth_plan" not in attrs:
        return ""
    plan = json.loads(attrs["depth_plan"])
    errs = ", ".join(f"{d}: {100 * e:.1f}%" for d, e in plan["errors"].items())
    return f"  (num_depths auto; pilot's error of interpolating in depth by number of depths {errs})"


def summary(path) -> str:
    info = open_info(path)
    a = info.attrs
    cfg = info.config
    lines = [
        f"file        {info.path}  (format {a['format']} v{a['schema_version']}, run {info.run_id})",
        f"lens        {a['lens_path']}  sha256 {a['lens_sha256'][:16]}…  "
        f"foclen {a.get('foclen_mm', float('nan')):.3f} mm",
        f"grid        {info.grid_size} x {info.grid_size} points, kernel_size {cfg['kernel_size']} px traced -> "
        f"kernel_size_small {info.kernel_size_small} px stored",
        f"depths [m]  {', '.join(f'{d:.4g}' for d in info.depths)}"
        + (f"  (focus {cfg['focus_m']} m)" if cfg.get("focus_m") else "")
        + _plan_note(a),
        f"spp         {info.spp} (grid), {info.heldout_spp} (held-out reference, two halves)",
        f"budget      {len(info.depths) * info.grid_size**2 * info.spp:,} rays per colour "
        f"({len(info.depths)} depths x grid size² x spp)" + _requested_budget(cfg, a),
        f"held-out    {info.n_heldout} points;  noise re-traces: {info.n_noise} grid points per depth"
        + _default_note(cfg.get("noise_points"), info.grid_size),
        f"blocks      {info.blocks_done}/{info.blocks_total} traced"
        + ("" if info.complete else "  (unfinished: run the same 'psf generate' again to resume)"),
        f"device      {_devices(a)}, seed {a['seed']}, started {a['started_at']}"
        + (f", finished {a['finished_at']}" if "finished_at" in a else "")
        + (f" ({a['trace_seconds']:.1f} s tracing)" if "trace_seconds" in a else ""),
    ]
    if info.shard is not None:
        lines.insert(
            1,
            f"shard       {info.shard[0]}/{info.shard[1]}: this file holds every {info.shard[1]}-th block; "
            f"merge with 'psf merge'",
        )
    elif "merged_from" in a:
        lines.insert(
            1,
            f"merged      from {len(json.loads(a['merged_from']))} shards"
            + (" (virtual datasets)" if a.get("virtual") else ""),
        )
    with h5py.File(path, "r", locking=False) as f:
        border = f["grid/border"][:]
        # PSFs whose block is done, less the dark points: they have no PSF to be truncated
        traced = traced_grid(f) & read_lit(f)["valid"].all(axis=-1)  # [D, P]
        speed = grid_speed(path)
        if speed is not None:
            lines.append(f"speed       {speed[0]:.2f} grid PSFs/s at spp {info.spp}")
        if traced.any():
            worst = border.max(axis=-1)[traced]
            lines.append(
                f"truncation  energy on the {cfg['kernel_size']}-px window border: mean {100 * worst.mean():.2f}%, "
                f"max {100 * worst.max():.2f}%, {int((worst > TRUNCATION_LIMIT).sum())} of {worst.size} lit PSFs above "
                f"{100 * TRUNCATION_LIMIT:g}%"
            )
        if info.n_heldout and f["blocks/done"][:].all():
            ref = rel_l2(f["heldout/psf_a"][:], f["heldout/psf_b"][:])  # NaN at dark points
            lit = np.isfinite(ref)
            lines.append(
                f"reference   held-out halves differ by {100 * ref[lit].mean():.2f}% (relative L2, mean"
                + (f" of {int(lit.sum())} lit points)" if not lit.all() else ")")
            )
    nf = noise_floor(path)
    if nf is not None:
        per = ", ".join(
            f"{d:.4g} m: " + ("not measured yet" if np.isnan(v) else f"{100 * v:.2f}%") for d, v in zip(info.depths, nf)
        )
        lines.append(f"noise floor two traces at spp {info.spp} differ by (relative L2) {per}")
    from .litfield import summary_lines

    lines += summary_lines(info)
    if info.complete and info.shard is None:
        from .symmetry import check_file

        check = check_file(path)
        verdict = "rotationally symmetric" if check.holds else "not rotationally symmetric"
        lines.append(f"symmetry    {verdict}: {check.describe()}")
        from .spacing import check_file as check_spacing

        lines.append(f"sampling    {check_spacing(path).describe()}")
    lines.append(f"versions    {', '.join(f'{k} {v}' for k, v in json.loads(a['versions']).items())}")
    return "\n".join(lines)
