"""Blur an image through the lens, every pixel with its own PSF from the model.

    import psfcvae
    model = psfcvae.load_model("runs/v1/best.pt")
    blurred = psfcvae.render(model, image, depth=2.0)      # image [3, H, W] linear light

Geometry (docs/render.md): the image covers the sensor, or the field window ``field =
(x0, x1, y0, y1)`` of it, in DeepLens's normalised coordinates (x right, y up, +-1 at the
sensor edges). Pixel (i, j) has its centre at x = x0 + (j + 1/2)(x1 - x0)/W, y = y1 - (i +
1/2)(y1 - y0)/H, so row 0 is the top of the field, as in DeepLens's ``point_source_grid``.
The model's kernel pixel has the pitch of psfcvae/optics.py; each kernel is resampled to
the image's pixel pitch with exact pixel-overlap weights (psfgen/trace/resample.py's rule, about
the kernel's centre), which keeps its energy. The blur is a gather,
out(p) = sum_u K_p(u) img(p - u), DeepLens's ``conv_psf`` orientation with K_p the kernel
of output pixel p; the scene beyond the image edge is its mirror image (DeepLens pads so too).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from psfcvae.optics import model_optics
from psfcvae.rendering.imageio import checked_depth
from psfgen.shared.errors import InputError
from psfgen.trace.resample import overlap_matrix

log = logging.getLogger(__name__)

TILE_BYTES = 256 * 2**20  # transient memory of one tile's kernels and patches (the render's working set)
PSF_CHUNK = 8192  # model PSFs evaluated at once

# The widest kernel at the image's pitch [px]: beyond, one tile's patches outgrow memory (a field window far
# smaller than the sensor magnifies the kernel).
MAX_KERNEL_PX = 1024


def resample_matrix(k: int, pitch_in: float, pitch_out: float) -> np.ndarray:
    """A: [m, k], m odd. A[i, j] = fraction of input pixel j inside output pixel i.

    Output pixel i covers [c + (i - h - 1/2) r, c + (i - h + 1/2) r) in input pixel units,
    r = pitch_out / pitch_in, c = k / 2 the kernel's centre, h = (m - 1) / 2; m is the
    smallest odd size that covers the whole kernel, so every column sums to 1 (energy kept).
    """
    r = pitch_out / pitch_in
    h = max(0, math.ceil(k / (2 * r) - 0.5))
    return overlap_matrix(k / 2 + (np.arange(2 * h + 1) - h - 0.5) * r, r, k)


def pixel_coords(h: int, w: int, field=(-1.0, 1.0, -1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Normalised field positions of the pixel centres: x [w] (left to right), y [h] (top to bottom)."""
    x0, x1, y0, y1 = field
    return x0 + (np.arange(w) + 0.5) * (x1 - x0) / w, y1 - (np.arange(h) + 0.5) * (y1 - y0) / h


def model_kernels(model, allow_extrapolation: bool = False):
    """kernel_fn(x [N], y [N], depth_m [N]) -> [N, 3, k, k] at the model's pitch, times the relative illumination.

    A dark point's kernel is zero and a dim one's sums to its illumination, so vignetting
    shows in the image.
    """

    def kernel_fn(x, y, d):
        psf, light, _ = model.psf_and_illumination(x, y, d, allow_extrapolation=allow_extrapolation)
        return psf * light[:, :, None, None].to(psf.dtype)

    return kernel_fn


def render(
    model,
    image: torch.Tensor,
    depth,
    *,
    psf_every: int = 1,
    field=(-1.0, 1.0, -1.0, 1.0),
    depth_levels: int = 16,
    allow_extrapolation: bool = False,
    progress: bool = False,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """The image seen through the lens: [3, H, W], same units as ``image``.

    image: [3, H, W] linear light (not sRGB-encoded). depth: object depth [m], a number or
    [H, W] (a depth map: each pixel blurred with the PSF of its own depth). psf_every S > 1
    evaluates the model every S pixels (and, with a depth map, at ``depth_levels`` depths
    uniform in 1/depth over the map's range) and interpolates the kernels between.
    """
    optics = model_optics(model)
    h, w = _checked_image(image)
    depth_t = _checked_depth(model, depth, (h, w), allow_extrapolation)
    return render_with(
        model_kernels(model, allow_extrapolation),
        image.to(model.device),
        depth_t,
        optics,
        psf_every=psf_every,
        field=field,
        depth_levels=depth_levels,
        progress=progress,
        tile_bytes=tile_bytes,
    )


def render_with(
    kernel_fn,
    image: torch.Tensor,
    depth,
    optics: dict,
    *,
    psf_every: int = 1,
    field=(-1.0, 1.0, -1.0, 1.0),
    depth_levels: int = 16,
    progress: bool = False,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """:func:`render` with any kernel source: kernel_fn(x, y, depth_m) -> [N, 3, k, k] at optics' pitch.

    depth: a float [m] or a float64 tensor [H, W] [m], already checked.
    """
    if psf_every < 1:
        raise InputError(f"{{psf_every}} must be at least 1, got {psf_every}", {"psf_every": "psf_every"})
    x0, x1, y0, y1 = field
    if not (-1 <= x0 < x1 <= 1 and -1 <= y0 < y1 <= 1):
        raise InputError(f"field window {tuple(field)} must be x0 < x1, y0 < y1 within [-1, 1]")
    _, h, w = image.shape
    k, pitch = optics["kernel_size_small"], optics["kernel_pitch_mm"]
    sw, sh = optics["sensor_size_mm"]
    px, py = sw * (x1 - x0) / 2 / w, sh * (y1 - y0) / 2 / h  # an image pixel [mm]
    span = k * pitch / min(px, py)  # the kernel's width in image pixels
    if not span <= MAX_KERNEL_PX:
        raise InputError(
            f"{{field}} {tuple(field)} over {w}x{h} pixels makes a pixel {1000 * min(px, py):.3g} um wide and the "
            f"{k}-px kernel {span:.3g} pixels across (at most {MAX_KERNEL_PX}); widen the field or use fewer pixels",
            {"field": "field window"},
        )
    ax = torch.as_tensor(resample_matrix(k, pitch, px), dtype=torch.float32, device=image.device)
    ay = torch.as_tensor(resample_matrix(k, pitch, py), dtype=torch.float32, device=image.device)
    my, mx = ay.shape[0], ax.shape[0]
    padded = _mirror_pad(image, my // 2, mx // 2)
    src = _KernelSource(kernel_fn, h, w, field, depth, psf_every, depth_levels, image.device)
    per_pixel = 4 * (3 * my * mx * 3 + 3 * k * k * 10)  # bytes: kernels, patches, product; interpolation terms
    t = max(8, int(math.sqrt(tile_bytes / per_pixel)) // psf_every * psf_every or psf_every)
    tiles = [(r, c) for r in range(0, h, t) for c in range(0, w, t)]
    log.info(
        "render %dx%d: kernels %dx%d image px, tiles of %d px, %d tiles, PSF every %d px",
        w,
        h,
        mx,
        my,
        t,
        len(tiles),
        psf_every,
    )
    out = torch.empty_like(image)
    for r0, c0 in tqdm(tiles, desc="render", unit="tile", disable=not progress, leave=False):
        r1, c1 = min(r0 + t, h), min(c0 + t, w)
        ker = ay @ src.kernels(r0, r1, c0, c1) @ ax.T  # [T, 3, my, mx] at the image's pitch
        patches = F.unfold(padded[None, :, r0 : r1 + my - 1, c0 : c1 + mx - 1], (my, mx))  # [1, 3*my*mx, T]
        weights = ker.flip(-2, -1).reshape(-1, 3 * my * mx).T  # patch[a] = img(p + a - c): K(u) pairs with a = c - u
        out[:, r0:r1, c0:c1] = (patches[0] * weights).reshape(3, my * mx, -1).sum(1).reshape(3, r1 - r0, c1 - c0)
    return out


class _KernelSource:
    """The model-pitch kernels [T, 3, k, k] of a tile's pixels, per pixel or interpolated between nodes."""

    def __init__(self, kernel_fn, h, w, field, depth, every, levels, device):
        self.fn, self.every, self.device = kernel_fn, every, device
        self.x, self.y = pixel_coords(h, w, field)
        self.depth = depth if isinstance(depth, torch.Tensor) else None
        self.d0 = float(depth) if self.depth is None else None
        if self.depth is not None and float(self.depth.min()) == float(self.depth.max()):
            self.d0, self.depth = float(self.depth.min()), None  # one plane: no depth interpolation needed
        self.nodes_r = _nodes(h, every)
        self.nodes_c = _nodes(w, every)
        if self.depth is not None and every > 1:
            inv = 1.0 / self.depth
            self.levels = np.linspace(float(inv.min()), float(inv.max()), max(2, levels))  # [L] 1/m

    def _eval(self, x, y, d) -> torch.Tensor:
        parts = [
            self.fn(x[i : i + PSF_CHUNK], y[i : i + PSF_CHUNK], d[i : i + PSF_CHUNK])
            for i in range(0, len(x), PSF_CHUNK)
        ]
        return torch.cat(parts).to(self.device, torch.float32)

    def kernels(self, r0, r1, c0, c1) -> torch.Tensor:
        ii, jj = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        if self.every == 1:
            d = np.full(ii.size, self.d0) if self.depth is None else self.depth[r0:r1, c0:c1].reshape(-1).numpy()
            return self._eval(self.x[jj.ravel()], self.y[ii.ravel()], d)
        return self._interpolated(r0, r1, c0, c1)

    def _interpolated(self, r0, r1, c0, c1) -> torch.Tensor:
        """Bilinear in the pixel grid between nodes (and linear in 1/depth between levels)."""
        (ra, rb, wr), (ca, cb, wc) = _brackets(self.nodes_r, r0, r1), _brackets(self.nodes_c, c0, c1)
        nr = self.nodes_r[ra.min() : rb.max() + 1]
        nc = self.nodes_c[ca.min() : cb.max() + 1]
        if self.depth is None:
            levels = np.array([1.0 / self.d0])
            la = lb = np.zeros((r1 - r0, c1 - c0), dtype=int)
            wl = np.zeros((r1 - r0, c1 - c0))
        else:  # only the levels this tile's depths fall between: a plane needs one or two
            la, lb, wl = _level_brackets(self.levels, 1.0 / self.depth[r0:r1, c0:c1].numpy())
            lb = np.where(wl > 0, lb, la)
            first = la.min()
            levels, la, lb = self.levels[first : lb.max() + 1], la - first, lb - first
        gi, gj, gl = np.meshgrid(nr, nc, np.arange(len(levels)), indexing="ij")
        node = self._eval(self.x[gj.ravel()], self.y[gi.ravel()], 1.0 / levels[gl.ravel()])
        node = node.reshape(len(nr), len(nc), len(levels), *node.shape[1:])
        base_r, base_c = ra.min(), ca.min()
        ra, rb, ca, cb = ra - base_r, rb - base_r, ca - base_c, cb - base_c
        ri, ci = ra[:, None], ca[None, :]
        rj, cj = rb[:, None], cb[None, :]
        out = 0
        for rsel, wrow in ((ri, 1 - wr[:, None]), (rj, wr[:, None])):
            for csel, wcol in ((ci, 1 - wc[None, :]), (cj, wc[None, :])):
                for lsel, wlev in ((la, 1 - wl), (lb, wl)):
                    wgt = torch.as_tensor((wrow * wcol * wlev).reshape(-1), dtype=torch.float32, device=self.device)
                    rr, cc = np.broadcast_to(rsel, la.shape).ravel(), np.broadcast_to(csel, la.shape).ravel()
                    out = out + wgt[:, None, None, None] * node[rr, cc, lsel.ravel()]
        return out


def _nodes(n: int, every: int) -> np.ndarray:
    """Pixel indices where the model is evaluated: 0, S, 2S, ... and the last pixel."""
    return np.unique(np.append(np.arange(0, n, every), n - 1))


def _brackets(nodes: np.ndarray, a: int, b: int):
    """For pixels a..b-1: (index of the node at or before, index of the node after, weight of the latter)."""
    p = np.arange(a, b)
    lo = np.clip(np.searchsorted(nodes, p, side="right") - 1, 0, len(nodes) - 1)
    hi = np.minimum(lo + 1, len(nodes) - 1)
    span = np.maximum(nodes[hi] - nodes[lo], 1)
    return lo, hi, np.where(hi > lo, (p - nodes[lo]) / span, 0.0)


def _level_brackets(levels: np.ndarray, inv: np.ndarray):
    """As _brackets, for inverse depths inv [h, w] between uniform levels [L]."""
    step = levels[1] - levels[0]
    if step <= 0:
        return np.zeros(inv.shape, int), np.zeros(inv.shape, int), np.zeros(inv.shape)
    f = np.clip((inv - levels[0]) / step, 0, len(levels) - 1)
    lo = np.minimum(np.floor(f).astype(int), len(levels) - 2)
    return lo, lo + 1, f - lo


def _mirror_pad(image: torch.Tensor, py: int, px: int) -> torch.Tensor:
    """[3, H + 2 py, W + 2 px]: mirrored like DeepLens's conv_psf; edge pixels repeated where the image is smaller."""
    mode = "reflect" if py < image.shape[1] and px < image.shape[2] else "replicate"
    return F.pad(image[None], (px, px, py, py), mode=mode)[0]


def _checked_image(image) -> tuple[int, int]:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise InputError(f"image must be a tensor [3, H, W] (RGB, linear light), got {shape}")
    if not torch.isfinite(image).all():
        raise InputError("image holds NaN or infinite values")
    return int(image.shape[1]), int(image.shape[2])


def _checked_depth(model, depth, shape, allow_extrapolation: bool):
    """A float [m] or a float64 tensor [H, W] [m], inside the model's trained depths unless extrapolating."""
    if isinstance(depth, (int, float, np.floating, np.integer)):
        d = float(depth)
        if not (math.isfinite(d) and d > 0):
            raise InputError(f"depth must be a positive, finite number of metres, got {depth}")
        lo_d = hi_d = d
    else:
        depth = checked_depth(depth.detach().cpu() if isinstance(depth, torch.Tensor) else depth, shape, "depth map")
        lo_d, hi_d = float(depth.min()), float(depth.max())
        d = depth
    lo, hi = model.depth_range
    if not allow_extrapolation and (lo_d < lo * (1 - 1e-9) or hi_d > hi * (1 + 1e-9)):
        what = f"{lo_d:g} m" if lo_d == hi_d else f"{lo_d:g}-{hi_d:g} m"
        raise InputError(
            f"depth {what} is outside the depths the model was trained on, {lo:g}-{hi:g} m "
            "({allow_extrapolation} to go beyond)",
            {"allow_extrapolation": "allow_extrapolation=True"},
        )
    return d
