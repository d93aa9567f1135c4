"""``psf render``: a PNG (and optionally a depth map) through the model to a PNG of the same bit depth."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from psfcvae.api.psfmodel import load_model
from psfcvae.rendering.imageio import (
    linear_to_srgb,
    read_depth_map,
    read_image,
    srgb_to_linear,
    write_image,
)
from psfcvae.rendering.render import render
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError
from psfgen.shared.tempfiles import make_parent

log = logging.getLogger(__name__)


def render_file(
    checkpoint,
    image,
    out,
    depth_m=None,
    depth_map=None,
    *,
    srgb: bool = True,
    psf_every: int = 1,
    field: str | None = None,
    device: str = "auto",
    allow_extrapolation: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Read ``image`` (PNG, 8/16 bit), blur it at depth_m [m] or per pixel at depth_map (.npy metres,
    16-bit PNG millimetres), write ``out`` at the input's bit depth. srgb: the PNG is sRGB-encoded
    (decoded to linear light before the blur, encoded after); False: its values are linear already.
    field: 'x0,x1,y0,y1', the part of the sensor the image covers. Everything is checked before
    anything is written; an existing ``out`` is kept unless overwrite."""
    out = Path(out)
    if (depth_m is None) == (depth_map is None):
        raise InputError("give either --depth (metres) or --depth-map (a file)")
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the output is a PNG; name it .png")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; choose another --out or pass --overwrite to replace it")
    make_parent(out, "--out")  # before the work: a path that cannot be written is said at once
    window = parse_field(field)
    img, bits = read_image(image)
    depth = depth_m if depth_map is None else read_depth_map(depth_map, tuple(img.shape[1:]))
    if depth_map is None and not 0 < depth_m < math.inf:
        raise InputError(f"--depth must be a positive, finite number of metres, got {depth_m}")
    model = load_model(checkpoint, resolve_device(device))
    linear = srgb_to_linear(img) if srgb else img
    t0 = time.perf_counter()
    blurred = render(
        model,
        linear,
        depth,
        psf_every=psf_every,
        field=window,
        allow_extrapolation=allow_extrapolation,
        progress=progress,
    )
    log.info("rendered %dx%d in %.1f s", img.shape[2], img.shape[1], time.perf_counter() - t0)
    return write_image(out, linear_to_srgb(blurred) if srgb else blurred, bits)


def parse_field(text: str | None) -> tuple[float, float, float, float]:
    """'x0,x1,y0,y1' -> the field window; None -> the whole sensor."""
    if text is None:
        return (-1.0, 1.0, -1.0, 1.0)
    try:
        v = tuple(float(p) for p in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 4 or not (-1 <= v[0] < v[1] <= 1 and -1 <= v[2] < v[3] <= 1):
        raise InputError(f"--field {text!r}: expected 'x0,x1,y0,y1' with x0 < x1 and y0 < y1 in [-1, 1]")
    return v
