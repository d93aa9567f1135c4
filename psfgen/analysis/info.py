"""``psf info``: a human summary of a grid file, and the noise figures it rests on."""

from __future__ import annotations

import json

import numpy as np

from psfgen.analysis.litfield import summary_lines
from psfgen.analysis.spacing import check_file as check_spacing
from psfgen.analysis.symmetry import check_file as check_symmetry
from psfgen.config import NOISE_POINTS, default_noise_points
from psfgen.gridfile import FORMAT, KEPT_LIMIT, LENS_FORMATS, SCHEMA_VERSION, GridFile, focus_text
from psfgen.shared.metrics import rel_l2


def noise_floor(grid: GridFile) -> np.ndarray | None:
    """Per plane (depth at a focus), mean relative L2 between a grid PSF and its independent re-trace
    at the same spp: [F*D], or None without noise points. Only finished blocks count."""
    if grid.n_noise == 0:
        return None
    again = grid.noise()["psf"]  # [F*D, S, 3, k, k]
    err = []
    for d in range(grid.n_planes):
        here = grid.grid_psf(d)[grid.noise_index]
        ok = (here.sum(axis=(-3, -2, -1)) > 0) & (again[d].sum(axis=(-3, -2, -1)) > 0)  # untraced: all zeros
        err.append(rel_l2(again[d][ok], here[ok]).mean() if ok.any() else np.nan)
    return np.array(err)


def _default_note(noise_points, grid_size: int) -> str:
    """Says when the noise points were the default chosen for this grid (fewer than 32 on a small one)."""
    if noise_points == default_noise_points(grid_size) and noise_points != NOISE_POINTS:
        return f" (the default for a {grid_size}x{grid_size} grid: all its points)"
    return ""


def _requested_budget(cfg: dict) -> str:
    """The ray_budget asked for, if any."""
    return "" if cfg.get("ray_budget") is None else f"; requested ray_budget {cfg['ray_budget']:,}"


def _errors_text(plan: dict) -> str:
    """A pilot's errors by count, '3: 10.5%, 5: 3.1%, ...' (errors: JSON {count: error})."""
    errors = plan.get("errors", {})
    return ", ".join(f"{n}: {100 * e:.1f}%" for n, e in errors.items() if isinstance(e, (int, float)))


def _plan_note(grid: GridFile) -> str:
    """Says when num_depths auto chose the depths, and from what."""
    if grid.depth_plan is None:
        return ""
    errs = _errors_text(grid.depth_plan)
    # Over several focus settings the pilot ran at the nearest and the farthest: say which one's count won.
    at, focus = "", grid.depth_plan.get("focus_m")
    if grid.n_focus > 1 and isinstance(focus, (int, float)):
        at = f" at focus {focus_text(focus)}, the larger count of the nearest and farthest focus"
    return f"  (num_depths auto{at}; pilot's error of interpolating in depth by number of depths {errs})"


def focus_plan_lines(grid: GridFile) -> list[str]:
    """Says when num_focus auto chose the focus settings, and from what: one line, or none when it did not."""
    plan = grid.focus_plan
    if plan is None:
        return []
    at = ", ".join(f"{d:.4g}" for d in plan.get("depths_m", []) if isinstance(d, (int, float)))
    return [
        f"focus plan  num_focus auto: {plan['num_focus']} focus settings; pilot's error of interpolating in focus "
        f"(at {at} m) by number of focus settings {_errors_text(plan)}"
    ]


def focus_line(grid: GridFile) -> str:
    """The focus settings: where the lens file puts the sensor, or those traced, and how the held-out points
    sit among them."""
    if grid.n_focus == 1 and np.isnan(grid.focus[0]):
        return "focus       the lens file's sensor position (no focus_m)"
    values = ", ".join(f"{f:.4g}" for f in grid.focus)
    text = f"focus [m]   {values}: each refocused as DeepLens does (the sensor moves), every depth at each"
    if grid.n_focus > 1:
        text += f"; {grid.n_focus} x {len(grid.depths)} = {grid.n_planes} planes"
        if grid.n_heldout:
            between = int((~grid.heldout_at_grid_focus).sum())
            text += f"; held-out: {grid.n_heldout - between} at a grid focus, {between} between"
    return text


def lens_lines(grid: GridFile) -> list[str]:
    """What was read of the lens file: its format, surfaces and glasses (from the normalised JSON DeepLens wrote
    of it), and the sensor with where its size and resolution came from."""
    surfaces = json.loads(grid.lens_json).get("surfaces", [])
    glasses = sorted({str(s.get("mat2", "air")).lower() for s in surfaces} - {"air"})
    (w, h), (cols, rows) = grid.sensor_size_mm, grid.sensor_res
    origin = grid.sensor_from
    where = (
        f"both from {origin['size']}"
        if origin.get("size") == origin.get("res")
        else f"size from {origin.get('size')}, resolution from {origin.get('res')}"
    )
    return [
        f"read        {LENS_FORMATS[grid.lens_format]} file: {len(surfaces)} surfaces, "
        f"glasses {', '.join(glasses) or 'none'}",
        f"sensor      {w:.4g} x {h:.4g} mm, {cols} x {rows} px ({1000 * w / cols:.3g} um pixels): {where}",
    ]


def summary(path) -> str:
    grid = GridFile.open(path)
    cfg = grid.config
    n, depths = grid.grid_size, grid.depths
    devices = grid.devices[0] if len(grid.devices) == 1 else " + ".join(grid.devices) + " (shards)"
    lines = [
        f"file        {grid.path}  (format {FORMAT} v{SCHEMA_VERSION}, run {grid.run_id})",
        f"lens        {grid.lens_path}  sha256 {grid.lens_sha256[:16]}…  foclen {grid.foclen_mm:.3f} mm",
        *lens_lines(grid),
        f"grid        {n} x {n} points, kernel_size {grid.kernel_size} px traced -> "
        f"kernel_size_small {grid.kernel_size_small} px stored"
        + (" (kernel_size auto: the pilot's side)" if grid.window_plan is not None else "")
        + f"; kernel pitch {1000 * grid.kernel_pitch_mm:.3g} um",
        f"depths [m]  {', '.join(f'{d:.4g}' for d in depths)}" + _plan_note(grid),
        focus_line(grid),
        *focus_plan_lines(grid),
        f"spp         {grid.spp} (grid), {grid.heldout_spp} (held-out reference, two halves)",
        f"budget      {grid.n_planes * n**2 * grid.spp:,} rays per colour "
        + (
            f"({len(depths)} depths x grid size² x spp)"
            if grid.n_focus == 1
            else f"({grid.n_focus} focus settings x {len(depths)} depths x grid size² x spp)"
        )
        + _requested_budget(cfg),
        f"held-out    {grid.n_heldout} points ({grid.n_part('validation')} validation, {grid.n_part('test')} test);  "
        f"noise re-traces: {grid.n_noise} grid points per {'depth' if grid.n_focus == 1 else 'plane'}"
        + _default_note(cfg.get("noise_points"), n),
        f"blocks      {grid.blocks_done}/{grid.blocks_total} traced"
        + ("" if grid.complete else "  (unfinished: run the same 'psf generate' again to resume)"),
        f"device      {devices}, seed {grid.seed}, started {grid.started_at}"
        + (f", finished {grid.finished_at}" if grid.finished_at else "")
        + (f" ({grid.trace_seconds:.1f} s tracing)" if grid.trace_seconds is not None else ""),
    ]
    if grid.shard is not None:
        k, count = grid.shard
        lines.insert(1, f"shard       {k}/{count}: this file holds every {count}-th block; merge with 'psf merge'")
    elif grid.merged_from is not None:
        lines.insert(
            1, f"merged      from {len(grid.merged_from)} shards" + (" (virtual datasets)" if grid.virtual else "")
        )
    speed = grid.grid_speed()
    if speed is not None:
        lines.append(f"speed       {speed[0]:.2f} grid PSFs/s at spp {grid.spp}")
    kept = grid.light_kept()  # the lit PSFs whose block is done: a dark point has no PSF to be truncated
    if kept.total:
        lines.append(
            f"light kept  valid rays inside the {kept.window_px}-px traced window: mean {100 * kept.mean:.2f}%, "
            f"min {100 * kept.worst:.2f}% ({kept.where()}), {kept.below} of {kept.total} lit PSFs below "
            f"{100 * KEPT_LIMIT:g}% (truncated)"
            + (f", {kept.dark} of them stored as dark: too few of their rays in the window" if kept.dark else "")
        )
    if grid.n_heldout and grid.done.all():
        held = grid.heldout()
        ref = rel_l2(held["psf_a"], held["psf_b"])  # NaN at dark points
        lit = np.isfinite(ref)
        lines.append(
            f"reference   held-out halves differ by {100 * ref[lit].mean():.2f}% (relative L2, mean"
            + (f" of {int(lit.sum())} lit points)" if not lit.all() else ")")
        )
    nf = noise_floor(grid)
    if nf is not None:
        per = ", ".join(
            f"{grid.plane_label(p)}: " + ("not measured yet" if np.isnan(v) else f"{100 * v:.2f}%")
            for p, v in enumerate(nf)
        )
        lines.append(f"noise floor two traces at spp {grid.spp} differ by (relative L2) {per}")
    lines += summary_lines(grid)
    if grid.complete and grid.shard is None:
        check = check_symmetry(grid)
        verdict = "rotationally symmetric" if check.holds else "not rotationally symmetric"
        lines.append(f"symmetry    {verdict}: {check.describe()}")
        lines.append(f"sampling    {check_spacing(grid).describe()}")
    lines.append(f"versions    {', '.join(f'{k} {v}' for k, v in grid.versions.items())}")
    return "\n".join(lines)
