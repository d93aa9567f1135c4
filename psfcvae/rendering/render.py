"""Blur an image through the lens, every pixel with its own PSF from the model.

    import psfcvae
    model = psfcvae.load_model("runs/v1/best.pt")
    blurred = psfcvae.render(model, image, depth=2.0)      # image [3, H, W] linear light
    refocused = psfcvae.render(model, image, depth_map, focus_m=0.8)  # a model over focus: focused at 0.8 m

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
from psfcvae.rendering.lowrank import DEFAULT_ERROR, Basis, convolve_weighted
from psfgen.gridfile import focus_text
from psfgen.shared.errors import InputError
from psfgen.trace.resample import overlap_matrix

log = logging.getLogger(__name__)

TILE_BYTES = 256 * 2**20  # transient memory of one tile's kernels and patches (the render's working set)
PSF_CHUNK = 8192  # model PSFs evaluated at once

# The widest kernel at the image's pitch [px]: beyond, one tile's patches outgrow memory (a field window far
# smaller than the sensor magnifies the kernel).
MAX_KERNEL_PX = 1024
AUTO_EXACT_MAX_PX = 15  # method "auto": kernels up to this width [px] at the image's pitch are gathered exactly
NODE_STEP = 0.02  # the fast path's PSF nodes: at most this far apart in normalised field units (1% of the width)
BASIS_SAMPLES = 4096  # with a PSF at every pixel, a tile's basis is found from at most about this many
TILE_KERNELS = 1  # the fast path's tiles are this many kernel widths wide (fast_tile)


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


def model_kernels(model, allow_extrapolation: bool = False, focus_m=None):
    """kernel_fn(x [N], y [N], depth_m [N]) -> [N, 3, k, k] at the model's pitch, times the relative illumination,
    with the camera focused at focus_m [m] (None: a single-focus model's own).

    A dark point's kernel is zero and a dim one's sums to its illumination, so vignetting
    shows in the image.
    """

    def kernel_fn(x, y, d):
        psf, light, _ = model.psf_and_illumination(x, y, d, focus_m, allow_extrapolation=allow_extrapolation)
        return psf * light[:, :, None, None].to(psf.dtype)

    return kernel_fn


def table_kernels(table, allow_extrapolation: bool = False):
    """As :func:`model_kernels`, from a ``PSFTable`` (psfcvae/api/table.py) at its own focus: no network runs."""

    def kernel_fn(x, y, d):
        psf, light, _ = table.psf_and_illumination(x, y, d, allow_extrapolation=allow_extrapolation)
        return psf * light[:, :, None, None]

    return kernel_fn


def render(
    model,
    image: torch.Tensor,
    depth,
    *,
    focus_m=None,
    method: str = "auto",
    error: float = DEFAULT_ERROR,
    rank: int | None = None,
    psf_every: int | None = None,
    field=(-1.0, 1.0, -1.0, 1.0),
    depth_levels: int = 16,
    allow_extrapolation: bool = False,
    table=None,
    progress: bool = False,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """The image seen through the lens: [3, H, W], same units as ``image``.

    image: [3, H, W] linear light (not sRGB-encoded). depth: object depth [m], a number or
    [H, W] (a depth map: each pixel blurred with the PSF of its own depth). focus_m: the distance
    the camera is focused at [m], inf allowed, as ``model.psf`` takes it (a model over focus needs
    it; with a depth map, a refocused photograph).

    method: "exact" gathers every pixel with its own kernel (cost H·W·m², m the kernel's width
    at the image's pitch); "fast" is the low-rank expansion (psfcvae/rendering/lowrank.py), per
    tile of one kernel width K basis kernels whose relative L2 error on the tile's kernels is at
    most ``error`` (rank: a fixed K instead), and K FFT convolutions; "auto" is "fast" where the
    kernel is wider than AUTO_EXACT_MAX_PX at the image's pitch, else "exact".

    psf_every S > 1 evaluates the PSFs every S pixels (and, with a depth map, at
    ``depth_levels`` depths uniform in 1/depth over the map's range) and interpolates the
    kernels (or, on the fast path, their weights: the same thing) between. None: 1 on the
    exact path, on the fast path a node every NODE_STEP of the field (auto_every).
    table: a ``PSFTable`` of the model at focus_m (``model.tabulate(focus_m=...)``): the PSFs from it, not the network.
    """
    optics = model_optics(model)
    h, w = _checked_image(image)
    focus = model._focus(focus_m, 1, allow_extrapolation)  # checked as model.psf checks it: [1] m or None
    focus_m = None if focus is None else float(focus[0])
    if table is not None and table.focus_m != focus_m:
        raise InputError(
            f"the table is at focus {_focus_text(table.focus_m)}, not at {{focus_m}} {_focus_text(focus_m)}; "
            "tabulate the model at that focus",
            {"focus_m": "focus_m"},
        )
    depth_t = _checked_depth(model, depth, (h, w), allow_extrapolation, focus_m)
    if table is not None:
        fn = table_kernels(table, allow_extrapolation)
    else:
        fn = model_kernels(model, allow_extrapolation, focus_m)
    return render_with(
        fn,
        image.to(model.device),
        depth_t,
        optics,
        method=method,
        error=error,
        rank=rank,
        psf_every=psf_every,
        field=field,
        depth_levels=depth_levels,
        progress=progress,
        tile_bytes=tile_bytes,
        source="table" if table is not None else "network",
    )


def _focus_text(focus_m: float | None) -> str:
    return "(the model's own)" if focus_m is None else focus_text(focus_m)


def auto_every(w: int, h: int, field) -> int:
    """The fast path's node spacing [px]: the largest S with S pixels at most NODE_STEP of the field."""
    step = min((field[1] - field[0]) / w, (field[3] - field[2]) / h)  # one pixel in normalised field units
    return max(1, int(NODE_STEP / step))


def render_with(
    kernel_fn,
    image: torch.Tensor,
    depth,
    optics: dict,
    *,
    method: str = "auto",
    error: float = DEFAULT_ERROR,
    rank: int | None = None,
    psf_every: int | None = None,
    field=(-1.0, 1.0, -1.0, 1.0),
    depth_levels: int = 16,
    progress: bool = False,
    tile_bytes: int = TILE_BYTES,
    source: str = "kernel_fn",
) -> torch.Tensor:
    """:func:`render` with any kernel source: kernel_fn(x, y, depth_m) -> [N, 3, k, k] at optics' pitch.

    depth: a float [m] or a float64 tensor [H, W] [m], already checked. rank: a fixed K for the
    fast path instead of the one ``error`` asks for. source: what the PSFs come from, for the log.
    """
    if method not in ("auto", "fast", "exact"):
        raise InputError(f"{{method}} must be auto, fast or exact, got {method!r:.40}", {"method": "method"})
    if not (isinstance(error, (int, float)) and 0 < error < 1):
        raise InputError(f"{{error}} must be between 0 and 1, got {error!r:.40}", {"error": "error"})
    if psf_every is not None and psf_every < 1:
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
    ay_np, ax_np = resample_matrix(k, pitch, py), resample_matrix(k, pitch, px)
    my, mx = ay_np.shape[0], ax_np.shape[0]
    fast = method == "fast" or (method == "auto" and max(my, mx) > AUTO_EXACT_MAX_PX)
    every = psf_every or (auto_every(w, h, field) if fast else 1)
    src = _KernelSource(kernel_fn, h, w, field, depth, every, depth_levels, image.device)
    where = f"render {w}x{h} px of {1000 * px:.3g} x {1000 * py:.3g} um: kernel {mx}x{my} px at the image's pitch"
    nodes = f"PSFs every {every} px from the {source}"
    padded = _mirror_pad(image, my // 2, mx // 2)
    if fast:
        out, ranks, errors, tile = _render_fast(src, ay_np, ax_np, error, rank, padded, h, w, progress)
        log.info(
            "%s, fast low-rank K=%d-%d (mean %.1f) in %d tiles of %d px, kernel error <= %.2g%% (asked %.2g%%), %s",
            where,
            min(ranks),
            max(ranks),
            sum(ranks) / len(ranks),
            len(ranks),
            tile,
            100 * max(errors),
            100 * error,
            nodes,
        )
        return out
    log.info("%s, exact per-pixel gather, %s", where, nodes)
    ay = torch.as_tensor(ay_np, dtype=torch.float32, device=image.device)
    ax = torch.as_tensor(ax_np, dtype=torch.float32, device=image.device)
    per_pixel = 4 * (3 * my * mx * 3 + 3 * k * k * 10)  # bytes: kernels, patches, product; interpolation terms
    t = max(8, int(math.sqrt(tile_bytes / per_pixel)) // every * every or every)
    tiles = [(r, c) for r in range(0, h, t) for c in range(0, w, t)]
    out = torch.empty_like(image)
    with _bar(tiles, progress) as bar:
        for r0, c0 in bar:
            r1, c1 = min(r0 + t, h), min(c0 + t, w)
            ker = ay @ src.kernels(r0, r1, c0, c1) @ ax.T  # [T, 3, my, mx] at the image's pitch
            patches = F.unfold(padded[None, :, r0 : r1 + my - 1, c0 : c1 + mx - 1], (my, mx))  # [1, 3*my*mx, T]
            weights = ker.flip(-2, -1).reshape(-1, 3 * my * mx).T  # patch[a] = img(p + a - c): K(u) pairs, a = c - u
            out[:, r0:r1, c0:c1] = (patches[0] * weights).reshape(3, my * mx, -1).sum(1).reshape(3, r1 - r0, c1 - c0)
    return out


def _bar(tiles: list, progress: bool) -> tqdm:
    """The tiles' progress bar, used as a context manager: an error inside closes it, and it leaves no line, so the
    one Error: line stands alone."""
    return tqdm(tiles, desc="render", unit="tile", disable=not progress, leave=False)


def fast_tile(my: int, mx: int) -> int:
    """The fast path's tile side [px]: TILE_KERNELS kernel widths (at least 64 px).

    Each tile has its own basis, from the kernels of its own pixels: the smaller the tile, the
    fewer basis kernels it needs (K falls about as the tile's side), but the more its FFTs pay
    for the halo of half a kernel on each side; cost ∝ (t + m)² K(t) / t², least near t ≈ m..2m."""
    return max(64, TILE_KERNELS * max(my, mx))


def _render_fast(src, ay, ax, error, rank, padded, h, w, progress):
    """The low-rank expansion, tile by tile, each tile with its own basis; its FFTs span the tile and a halo
    of half a kernel. Returns (image [3, H, W], K per tile, kernel error per tile, tile side)."""
    my, mx = ay.shape[0], ax.shape[0]
    t = fast_tile(my, mx)
    th, tw = math.ceil(h / math.ceil(h / t)), math.ceil(w / math.ceil(w / t))  # equal tiles: no thin strip
    tiles = [(r, c) for r in range(0, h, th) for c in range(0, w, tw)]
    out = torch.empty(padded.shape[0], h, w, dtype=padded.dtype, device=padded.device)
    ranks, errors = [], []
    with _bar(tiles, progress) as bar:
        for r0, c0 in bar:
            r1, c1 = min(r0 + th, h), min(c0 + tw, w)
            basis, weights = src.expansion(r0, r1, c0, c1, lambda psf: Basis(psf, ay, ax, error, rank))
            part = padded[:, r0 : r1 + my - 1, c0 : c1 + mx - 1]
            out[:, r0:r1, c0:c1] = convolve_weighted(part, basis.kernels, weights)
            ranks.append(basis.rank)
            errors.append(basis.error)
    return out, ranks, errors, max(th, tw)


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
        if self.depth is not None:
            inv = 1.0 / self.depth
            self.levels = np.linspace(float(inv.min()), float(inv.max()), max(2, levels))  # [L] 1/m

    def _eval(self, x, y, d, project=None) -> torch.Tensor:
        """kernel_fn at the points, PSF_CHUNK at a time; project: applied to each chunk (the fast path's weights)."""
        project = project or (lambda v: v)
        parts = [
            project(self.fn(x[i : i + PSF_CHUNK], y[i : i + PSF_CHUNK], d[i : i + PSF_CHUNK]).to(torch.float32))
            for i in range(0, len(x), PSF_CHUNK)
        ]
        return torch.cat(parts).to(self.device, torch.float32)

    def kernels(self, r0, r1, c0, c1) -> torch.Tensor:
        if self.every == 1:
            return self._eval(*self._pixels(r0, r1, c0, c1))
        (x, y, d), terms = self._corners(r0, r1, c0, c1)
        node = self._eval(x, y, d)
        return sum(wgt[:, None, None, None] * node[idx] for idx, wgt in terms)

    def expansion(self, r0, r1, c0, c1, make_basis):
        """(basis, weights [K, 3, th, tw]) for a tile: make_basis(kernels [N, 3, k, k]) -> Basis, from the tile's
        own kernels (its nodes', or with a PSF at every pixel a sub-grid of them); weights[k]: the weight of basis
        kernel k at each pixel of the tile."""
        th, tw = r1 - r0, c1 - c0
        if self.every == 1:
            x, y, d = self._pixels(r0, r1, c0, c1)
            pick = np.arange(0, len(x), max(1, len(x) // BASIS_SAMPLES))
            basis = make_basis(self._eval(x[pick], y[pick], d[pick]))
            vals = self._eval(x, y, d, project=basis.weights)  # [T, 3, K]
        else:
            (x, y, d), terms = self._corners(r0, r1, c0, c1)
            kernels = self._eval(x, y, d)
            basis = make_basis(kernels)
            node = basis.weights(kernels).to(self.device).flatten(1)  # [n, 3K]
            vals = sum(wgt[:, None] * node.index_select(0, idx) for idx, wgt in terms)  # [T, 3K]
        return basis, vals.reshape(th, tw, 3, -1).permute(3, 2, 0, 1).contiguous()

    def _pixels(self, r0, r1, c0, c1):
        """(x, y, depth) of each pixel of the tile, row-major."""
        ii, jj = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        d = np.full(ii.size, self.d0) if self.depth is None else self.depth[r0:r1, c0:c1].reshape(-1).numpy()
        return self.x[jj.ravel()], self.y[ii.ravel()], d

    def _corners(self, r0, r1, c0, c1):
        """The nodes around a tile's pixels: ((x, y, depth) of the nodes, [(node index [T], weight [T])]).

        Bilinear in the pixel grid between nodes (and linear in 1/depth between levels); terms whose
        weights are all zero (the second level of a single plane) are left out."""
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
        points = (self.x[gj.ravel()], self.y[gi.ravel()], 1.0 / levels[gl.ravel()])
        ra, rb, ca, cb = ra - ra.min(), rb - ra.min(), ca - ca.min(), cb - ca.min()
        terms = []
        for rsel, wrow in ((ra[:, None], 1 - wr[:, None]), (rb[:, None], wr[:, None])):
            for csel, wcol in ((ca[None, :], 1 - wc[None, :]), (cb[None, :], wc[None, :])):
                for lsel, wlev in ((la, 1 - wl), (lb, wl)):
                    wgt = (wrow * wcol * wlev).reshape(-1)
                    if not wgt.any():
                        continue
                    idx = (np.broadcast_to(rsel, la.shape) * len(nc) + np.broadcast_to(csel, la.shape)) * len(
                        levels
                    ) + lsel
                    terms.append(
                        (
                            torch.as_tensor(idx.reshape(-1), device=self.device),
                            torch.as_tensor(wgt, dtype=torch.float32, device=self.device),
                        )
                    )
        return points, terms


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


def _checked_depth(model, depth, shape, allow_extrapolation: bool, focus_m=None):
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
    # The model's own checks on the extreme depths (a condition that overflows, far beyond the trained range), before
    # any tile is drawn: one PSF each.
    model.psf(np.zeros(2), np.zeros(2), np.array([lo_d, hi_d]), focus_m, allow_extrapolation=allow_extrapolation)
    return d
