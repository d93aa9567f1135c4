"""Relative illumination from DeepLens's own ray validity, and the lit/dark decision.

DeepLens's ``psf_geometric`` traces ``spp`` rays per point into the entrance pupil, keeps
those still valid at the sensor (not blocked by an aperture or a lens rim, not totally
reflected), bins the ones inside the ``ks`` window and divides by their number.
``trace_counted`` repeats those steps and keeps two counts per channel: the valid rays
(how much of the point's light reaches the sensor) and the valid rays inside the window
(what the PSF is made of). It traces the primary wavelength first, and that channel is bit for
bit DeepLens's ``psf`` at that wavelength with the same random state (tested), except at
points whose chief ray is blocked (below). The chief ray found in that bundle centres the
other two channels as well, where DeepLens's ``psf_rgb`` searches it again for red and for
blue (at the primary wavelength, in a fresh bundle of 8192 rays each; the three centres
agree up to the search's sampling): 2 x 8192 extra rays a point, more than the PSF's own
3 x spp below spp ~5000 (benchmarks/bench_generate.py measures the time saved).

The relative illumination of a point and channel is (valid rays / launched rays) over the
same fraction for the on-axis point at the same depth: the mechanical vignetting (rays
lost on apertures and rims), not the cos⁴ fall-off of the pupil's solid angle (rays are
launched into the pupil whatever its apparent size). Rays outside the window are not
vignetting but truncation, measured apart: ``kept`` is the share of a channel's valid rays
inside the window (``grid/kept``); the rays beyond it count as light here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from deeplens.config import EPSILON, SPP_CALC
from deeplens.imgsim import forward_integral
from deeplens.utils import diff_float

from psfgen.trace.lens import deeplens_notes

log = logging.getLogger(__name__)

# A channel PSF is valid (enough light for a meaningful PSF) with at least this many rays,
# and at least 1% of those launched. Why: a 15x15 PSF binned from n rays has a Monte Carlo
# error of roughly sqrt(pixels hit / n); at 100 rays that is already ~100% for a PSF spread
# over ~100 pixels, and a point getting under 1% of the axis's light contributes under 1%
# of the image there, so its shape hardly matters to a rendering (which scales it by the
# illumination).
MIN_RAYS = 100
MIN_FRACTION = 0.01
# What trace_counted traces, as a version that enters a run's identity (run_id), so that a file is never
# resumed by a tracer that would put other PSFs beside its own. 2: one chief-ray search per point
# centres all three colours (1 searched it for each colour, as DeepLens's psf_rgb does).
TRACER_VERSION = 2


def min_rays(spp: int) -> int:
    """Valid rays a channel PSF needs at ``spp`` launched rays: max(100, ceil(spp / 100))."""
    return max(MIN_RAYS, int(np.ceil(MIN_FRACTION * spp)))


def trace_counted(lens, xy: np.ndarray, depth_m: np.ndarray, spp: int, ks: int, on_channel=None):
    """(psf, valid, window) of :func:`trace_with_chief`, without the centres."""
    return trace_with_chief(lens, xy, depth_m, spp, ks, on_channel)[:3]


def trace_with_chief(lens, xy: np.ndarray, depth_m: np.ndarray, spp: int, ks: int, on_channel=None):
    """Ray-trace RGB PSFs as DeepLens ``psf_geometric`` does for each colour, keeping the valid-ray counts.

    xy: [B, 2] normalised field coordinates; depth_m: [B] object depths [m].
    Returns (psf [B, 3, ks, ks] float32, each channel sums to 1, or 0 with no ray in the window;
    valid [B, 3] float64: rays valid at the sensor, of ``spp`` launched;
    window [B, 3] float64: those of them inside the ks window;
    chief [B, 2] float64: where the point's chief ray lands on the sensor [mm], x right and y up as the PSFs
    are stored (DeepLens's flipped image), the origin on the axis (chief_landing); where a stop blocks it, the
    primary wavelength's window centre (the centroid of its valid rays, see _binned)).
    on_channel: called with no argument after each of the three colours (a progress bar's tick).
    """
    out = [None] * 3
    for c, ray, centre in _bundles(lens, xy, depth_m, spp):
        out[c] = _binned(lens, ray, centre, spp, ks)
        if on_channel is not None:
            on_channel()
    # After the PSFs: its rays leave theirs as DeepLens's psf_rgb draws them.
    with torch.no_grad(), deeplens_notes(log, logging.WARNING):
        chief, found = chief_landing(lens, _objects(lens, xy, depth_m))
    psfs, valid, window, centres = zip(*out)
    primary = list(lens.wvln_rgb).index(lens.primary_wvln)
    chief = torch.where(found[:, None], chief, centres[primary].to(chief.dtype))
    return torch.stack(psfs, dim=-3), torch.stack(valid, dim=-1), torch.stack(window, dim=-1), chief.double()


def _objects(lens, xy: np.ndarray, depth_m: np.ndarray) -> torch.Tensor:
    """The object points [B, 3] [mm] of normalised field points xy [B, 2] at depths depth_m [B] [m], placed as
    DeepLens's point_source_grid places them (z negative)."""
    points = np.concatenate([xy, -1000.0 * depth_m[:, None]], axis=1)  # DeepLens z [mm], negative
    points = torch.as_tensor(points, dtype=lens.dtype, device=lens.device)
    sensor_w, sensor_h = lens.sensor_size
    scale = lens.calc_scale(points[:, 2])
    return torch.stack([points[:, 0] * scale * sensor_w / 2, points[:, 1] * scale * sensor_h / 2, points[:, 2]], dim=-1)


def _bundles(lens, xy: np.ndarray, depth_m: np.ndarray, spp: int):
    """Yield (channel, its bundle of ``spp`` rays a point traced to the sensor, the chief-ray centres [B, 2] [mm]) for
    the three colours, the primary wavelength first: DeepLens GeoLens.psf_geometric, step for step, but one chief-ray
    search per point. xy: [B, 2] normalised field coordinates; depth_m: [B] object depths [m]."""
    obj = _objects(lens, xy, depth_m)
    channels = list(lens.wvln_rgb)
    # The primary wavelength first: its bundle gives the chief ray that centres all three channels.
    order = sorted(range(3), key=lambda c: channels[c] != lens.primary_wvln)
    centre = None
    with torch.no_grad(), deeplens_notes(log, logging.WARNING):
        for c in order:
            ray = lens.sample_from_points(points=obj, num_rays=spp, wvln=channels[c])
            ray.is_coherent = False
            ray = lens.trace2sensor(ray)
            if centre is None:
                # DeepLens's psf_rgb searches it again for each colour; one search serves all three.
                reuse = ray if channels[c] == lens.primary_wvln and spp >= SPP_CALC else None
                centre = lens.psf_center(obj, method="chief_ray", ray=reuse)
            yield c, ray, centre


def ray_offsets(lens, xy: np.ndarray, depth_m: np.ndarray, spp: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each traced ray lands, as the window rule sees it: its Chebyshev distance [px] from the chief-ray centre
    and from the valid rays' centroid (the centre ``_binned`` falls back on), inf for a ray not valid at the sensor.
    A ks window holds a ray when its distance is below ks/2 - 0.5 px (DeepLens's forward_integral, less 0.001 px).

    xy: [B, 2] normalised field coordinates; depth_m: [B] object depths [m].
    Returns (chief, centroid): [B, 3, spp] float64 each."""
    chief, centroid = [None] * 3, [None] * 3
    for c, ray, centre in _bundles(lens, xy, depth_m, spp):
        flipped = ray.flip_xy()
        hit, valid = flipped.o[..., :2], flipped.is_valid > 0  # [B, spp, 2] mm, [B, spp]
        v = valid.unsqueeze(-1).to(hit.dtype)
        mean = (hit * v).sum(-2) / v.sum(-2).clamp_min(1)  # [B, 2]
        for into, at in ((chief, centre), (centroid, mean)):
            dist = (hit - at.to(hit.dtype).unsqueeze(-2)).abs().amax(dim=-1) / lens.pixel_size  # [B, spp] px
            into[c] = torch.where(valid, dist, torch.inf).double().cpu().numpy()
    return np.stack(chief, axis=1), np.stack(centroid, axis=1)


# The chief ray, found among CHIEF_RAYS rays through the central CHIEF_PUPIL of the entrance pupil's radius: the
# ray DeepLens picks from a PSF's own bundle (the one nearest the stop's centre) is up to 1/sqrt(spp) of the pupil
# off it and lands up to 3.6 px (spp 2000), 2 px (8192) away at the default lens's corners; these land within
# 0.15 px of the chief ray of a bundle of 2^20 rays, for 1-2% of a grid PSF's rays.
CHIEF_RAYS = 256
CHIEF_PUPIL = 0.02


def chief_landing(lens, obj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the chief rays of the object points obj [B, 3] [mm] land on the sensor [B, 2] [mm], in the stored
    PSFs' orientation; found [B] bool, False where a stop blocks it)."""
    ray = lens.sample_from_points(points=obj, num_rays=CHIEF_RAYS, wvln=lens.primary_wvln, scale_pupil=CHIEF_PUPIL)
    chief = lens.calc_chief_ray(ray=lens.trace2sensor(ray))
    return -chief.o[..., 0, :2], chief.is_valid[..., 0].bool()


def _binned(lens, ray, centre: torch.Tensor, spp: int, ks: int):
    """One colour's (psf [B, ks, ks] summing to 1 or 0, valid rays [B], rays in the window [B], the window's
    centre [B, 2] [mm]) from its bundle traced to the sensor and the chief-ray centres [B, 2] [mm]."""
    flipped = ray.flip_xy()
    psf = forward_integral(flipped, ps=lens.pixel_size, ks=ks, pointc=centre)  # [B, ks, ks], rays
    total = torch.sum(psf, dim=(-2, -1), keepdim=True)
    lost = (total[:, 0, 0] < min_rays(spp)) & (ray.is_valid.sum(dim=-1) >= min_rays(spp))
    if lost.any():
        # The chief ray is blocked (a stop vignettes it): DeepLens then centres the window
        # on the pinhole image, and the light that does arrive lands outside it. Those
        # points are centred on their valid rays' centroid instead (DeepLens's own choice
        # when no centre is given), so a lit point is never stored as dark.
        v = flipped.is_valid.unsqueeze(-1)
        centroid = (flipped.o[..., :2] * v).sum(-2) / v.sum(-2).clamp_min(1)
        centre = torch.where(lost[:, None], centroid.to(centre.dtype), centre)
        psf = forward_integral(flipped, ps=lens.pixel_size, ks=ks, pointc=centre)
        total = torch.sum(psf, dim=(-2, -1), keepdim=True)
    # bilinear binning splits each ray over 4 pixels: the window's sum is still a count
    psf = diff_float(psf / (total + EPSILON))
    return psf, ray.is_valid.sum(dim=-1).double(), total[:, 0, 0].double(), centre


def axis_fraction(lens, depths: np.ndarray, spp: int, ks: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid-ray fraction, fraction inside the ks window) of the on-axis point at each depth [m]: [D, 3] x 2."""
    rays, window = [], []
    for depth in np.asarray(depths, dtype=np.float64):  # one point at a time: memory as one held-out point's
        _, r, w = trace_counted(lens, np.zeros((1, 2)), np.array([depth]), spp, ks)
        rays.append(r[0].cpu().numpy())
        window.append(w[0].cpu().numpy())
    return np.stack(rays) / spp, np.stack(window) / spp


def axis_at(depths: np.ndarray, axis: np.ndarray, depth_m: np.ndarray) -> np.ndarray:
    """The on-axis fraction at depths ``depth_m`` [B]: linear in 1/depth between grid depths,
    held constant beyond them (held-out points between grid depths): [B, 3]."""
    inv, order = 1.0 / np.asarray(depths), np.argsort(1.0 / np.asarray(depths))
    q = 1.0 / np.asarray(depth_m, dtype=np.float64)
    return np.stack([np.interp(q, inv[order], axis[order, c]) for c in range(3)], axis=-1)


def relative(rays: np.ndarray, window: np.ndarray, spp: int, axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(illumination [B, 3] float32, valid [B, 3] bool) from the counts ``rays`` and ``window`` [B, 3] of
    ``trace_counted`` and the on-axis fraction ``axis`` [B, 3]: valid when the window holds min_rays(spp)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        illum = np.where(axis > 0, (rays / spp) / axis, 0.0)
    return illum.astype(np.float32), np.rint(window) >= min_rays(spp)


def kept(rays: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The share of each channel's valid rays inside the window, from ``trace_counted``'s counts ``rays`` and
    ``window`` [B, 3]: [B, 3] float32 in 0..1. 0 where no ray is valid: such a channel is dark (``relative`` marks it
    not valid), never truncated."""
    share = np.where(rays > 0, window / np.maximum(rays, 1.0), 0.0)
    # The window's count is a float32 sum of bilinear weights: it may pass the exact count by a rounding error.
    return np.clip(share, 0.0, 1.0).astype(np.float32)
