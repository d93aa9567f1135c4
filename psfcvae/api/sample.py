"""``psf sample``: PSFs from a checkpoint at given points or on a dense map, to a file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from psfcvae.api.psfmodel import load_model
from psfcvae.evaluation.metrics import focus_json
from psfcvae.images import mosaic
from psfgen.gridfile import focus_text
from psfgen.shared import tempfiles
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError, os_reason
from psfgen.shared.tempfiles import make_parent

CHUNK = 4096  # PSFs evaluated at once: bounds the decoder's transient memory


def sample_psfs(
    checkpoint,
    out,
    points,
    grid_m,
    depth_m,
    mode,
    allow_extrapolation=False,
    device="auto",
    overwrite: bool = False,
    units: str = "coords",
    focus_m=None,
) -> Path:
    """Write PSFs [B, 3, k, k] (or [M*M, ...] for a map, row-major, row 0 at y = +1), each channel summing to 1.

    points [B, 2] in ``units``: "coords" (normalised x, y in [-1, 1]), "height_mm" (image heights on the sensor
    [mm]) or "angle_deg" (field angles [deg]); PSFModel.coords_at_height / coords_at_angle convert them.
    .npz: psf, coords [B, 2] (x, y in [-1, 1]), height_mm [B, 2] (where their chief rays land [mm]), angle_deg
    [B, 2], depth_m [m] (the model's only depth when none is given), focus_m [m] (the focus the model was given:
    inf allowed; nan for a single-focus model's own), mode, checkpoint;
    .h5: the same plus the model's step and data fingerprint; .npy: the array alone, in the
    order of --coords (a map: row-major from the top-left corner, x = -1, y = +1);
    .png: display-scaled RGB, an M x M mosaic for a map or a single row for points, captioned.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    make_parent(out, "--out")  # before the work: a path that cannot be written is said at once
    model = load_model(checkpoint, resolve_device(device))
    if grid_m is not None:
        k = model.net.args.kernel_size_small
        need, ram = grid_m**2 * 3 * k * k * 4 * 2, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > ram / 2:
            raise InputError(
                f"--grid {grid_m} makes {grid_m**2} PSFs, about {need / 2**30:.1f} GiB with their copies; "
                f"this machine has {ram / 2**30:.1f} GiB: choose a smaller --grid"
            )
        lin = np.linspace(-1, 1, grid_m) if grid_m > 1 else np.zeros(1)
        gx, gy = np.meshgrid(lin, lin[::-1])
        points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    given = points
    if units == "height_mm":
        points = np.stack(
            model.coords_at_height(points[:, 0], points[:, 1], depth_m, focus_m, allow_extrapolation), axis=1
        )
    elif units == "angle_deg":
        points = np.stack(model.coords_at_angle(points[:, 0], points[:, 1], allow_extrapolation), axis=1)
    used_depth = float(depth_m) if depth_m is not None else model.depth_range[0]  # the depth the model was given
    used = (used_depth, float(focus_m) if focus_m is not None else model.focus_range[0])  # and its focus
    psf, illum = _psfs_and_illumination(
        model, points, depth_m, focus_m, mode, allow_extrapolation, dark_ok=grid_m is not None
    )
    physical = {
        "height_mm": np.stack(
            model.height_at(points[:, 0], points[:, 1], used_depth, focus_m, allow_extrapolation), axis=1
        ),
        "angle_deg": np.stack(model.angle_at(points[:, 0], points[:, 1]), axis=1),
    }
    caption = (units, points if grid_m is not None or units == "coords" else given)
    try:
        with tempfiles.replacing(out) as tmp:  # a failed write leaves the old --out, never a fragment
            _write(tmp, out.suffix, psf, illum, points, physical, caption, grid_m, used, mode, checkpoint, model)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {os_reason(exc)}") from None
    return out


def _write(tmp: Path, suffix: str, psf, illum, points, physical, caption, grid_m, used, mode, checkpoint,
           model) -> None:  # fmt: skip
    """The PSFs in the format of ``suffix`` into the temporary file ``tmp``; physical: {height_mm, angle_deg} [B, 2]
    of the points; caption: (units, the points as given) for a PNG; used: (depth, focus) [m] the model was given."""
    used_depth, used_focus = used
    with open(tmp, "wb") if suffix in (".npy", ".npz") else contextlib.nullcontext(tmp) as f:
        if suffix == ".npy":
            np.save(f, psf)
        elif suffix == ".npz":
            np.savez(  # illumination [B, 3]: relative to the axis; 0 where dark
                f,
                psf=psf,
                illumination=illum,
                coords=points,
                **physical,
                depth_m=used_depth,
                focus_m=used_focus,
                mode=mode,
                checkpoint=str(checkpoint),
            )
        elif suffix == ".h5":
            with h5py.File(tmp, "w") as h5:
                h5["psf"] = psf
                h5["coords"] = points
                for key, value in physical.items():
                    h5[key] = value
                h5.attrs["depth_m"] = used_depth  # [m]: the depth the model was given
                h5.attrs["focus_m"] = used_focus  # [m]: and its focus (inf allowed; nan: the lens file's own)
                h5.attrs["mode"] = mode
                h5.attrs["checkpoint"] = str(checkpoint)
                fp = model.info["data_fingerprint"]  # strict JSON: its focus as metrics.json writes one (inf, nan)
                fp = {**fp, "focus": [focus_json(f) for f in fp["focus"]]}
                h5.attrs["model"] = json.dumps({"step": model.info["step"], "data_fingerprint": fp}, allow_nan=False)
                h5["illumination"] = illum  # [B, 3], relative to the axis at the same depth; 0 where dark
        else:
            if grid_m is not None:
                img = mosaic(psf, grid_m)  # [3, H, W]
            else:  # one row of kernels
                img = np.concatenate([mosaic(p[None], 1) for p in psf], axis=2)
            tiles = Image.fromarray((np.moveaxis(img, 0, -1) * 255).astype(np.uint8)).resize(
                (img.shape[2] * 8, img.shape[1] * 8), Image.NEAREST
            )
            caption = _caption(*caption, grid_m, used, mode, model.net.args.kernel_size_small)
            _captioned(tiles, caption).save(tmp, format="PNG")


def _caption(units: str, points, grid_m, used, mode: str, k: int) -> list[str]:
    """The lines under a PNG: what each tile is, where it is in the field, at which depth (and focus)."""
    depth_m, focus_m = used
    depth = f"depth {depth_m:g} m" + (f", focused at {focus_text(focus_m)}" if not np.isnan(focus_m) else "")
    what = "prior mean" if mode == "mean" else "one prior sample"
    lines = [f"psf sample: {what}, {depth}, {k}x{k} px per PSF, each PSF scaled to its own peak"]
    if grid_m is not None:
        lines.append(f"{grid_m}x{grid_m} map of the field: x -1 (left) to +1 (right), y +1 (top) to -1 (bottom)")
        lines.append("field coordinates: +-1 = the sensor's edges")
    else:
        where = " ".join(f"({x:.3g}, {y:.3g})" for x, y in points[:12]) + (" ..." if len(points) > 12 else "")
        what = {"coords": "field points (x, y)", "height_mm": "image heights (x, y) [mm]", "angle_deg": "field angles "
                "(x, y) [deg]"}[units]  # fmt: skip
        lines.append(f"{what}, left to right: {where}")
    return lines


def _captioned(tiles, lines: list[str]):
    """``tiles`` (a PIL image) above ``lines`` of text, on a canvas wide enough for both."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(tiles)
    widths = [draw.textlength(line, font=font) for line in lines]
    line_h = 14
    width = max(tiles.width, int(max(widths)) + 8)
    canvas = Image.new("RGB", (width, tiles.height + line_h * len(lines) + 6), (255, 255, 255))
    canvas.paste(tiles, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, tiles.height + 3 + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def _psfs_and_illumination(model, points, depth_m, focus_m, mode, allow_extrapolation, dark_ok: bool):
    """(psf [B, 3, k, k] numpy, illumination [B, 3] numpy), in chunks.

    dark_ok: a dense map covers the whole sensor, dark corners included: zeros there. Points
    asked for one by one (--coords) must be lit.
    """
    psf, illum = [], []
    for i in range(0, len(points), CHUNK):
        x, y = points[i : i + CHUNK, 0], points[i : i + CHUNK, 1]
        out, light, lit = model.psf_and_illumination(
            x, y, depth_m, focus_m, mode=mode, allow_extrapolation=allow_extrapolation
        )
        if not dark_ok and not bool(lit.all()):
            j = int((~lit).nonzero()[0, 0])
            raise InputError(
                f"{int((~lit).sum())} of the --coords points lie outside the lens's lit field, e.g. "
                f"({x[j]:g}, {y[j]:g}) at --depth {depth_m}: no light reaches the sensor there, so there "
                "is no PSF; leave them out (a --grid map shows them as zeros)"
            )
        psf.append(out.cpu().numpy())
        illum.append(light.cpu().numpy())
    return np.concatenate(psf), np.concatenate(illum)
