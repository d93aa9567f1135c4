"""``kernel_size: auto``: the traced window that keeps the light, from a short pilot trace.

DeepLens bins only the rays inside the ``ks`` x ``ks`` window around the chief ray and drops the
rest before normalising (docs/dataset.md, "Truncation"), so a window smaller than the PSF stores
a truncated PSF that looks whole. How large the PSFs grow depends on the lens and the depths:
measured at 99% of the valid rays, the default condenser needs 80-108 px on the axis and ~290 px
at the corners over 0.4-20 m, the LA1131 singlet ~145 px near x = +-0.9 over 0.5-5 m, the Cooke
triplet ~44 px over 3-20 m.

The pilot traces PILOT_FIELD (an 11 x 11 grid over the whole field: axis, edges, corners and the
rings between them, with no symmetry assumed) at the extreme depths of the run's range, and at
the focus distance when one is given and lies between them, at PILOT_SPP rays (a run over several
focus settings runs it at the nearest and the farthest and takes the larger side). It keeps each
valid ray's Chebyshev distance from the chief ray, so one trace answers for every window: a ks
window holds the rays closer than ks/2 - 0.5 px (DeepLens's forward_integral), centred as the
tracer centres it (on the valid rays' centroid when the chief-ray window would hold too few rays
for a PSF, illumination._binned). The smallest even side that keeps at least KEPT of the valid
rays of every lit pilot point and channel, times MARGIN for the grid points between the pilot's
and the pilot's own noise, is chosen; no less than kernel_size_small, no more than the sensor's
shorter side (a warning says when that cap binds).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from psfgen.gridfile import KEPT_LIMIT as KEPT  # the share of a lit PSF's valid rays the window must keep
from psfgen.gridfile import focus_text
from psfgen.trace import illumination

log = logging.getLogger(__name__)

PILOT_SPP = 8000  # rays per pilot point and colour
# x and y of the pilot points (normalised field): every quarter, and 0.9, where a stop begins to block the chief ray of
# la1131_f50 and DeepLens's chief-ray framing moves its PSFs off centre (docs/dataset.md, "Truncation")
PILOT_FIELD = np.array([-1.0, -0.9, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
PILOT_BLOCK = 27  # pilot points traced at once (memory: 27 x 3 x PILOT_SPP rays)
# The chosen side over the pilot's: for the grid points between the pilot's and the pilot's own noise. Measured on
# independent full grids (docs/dataset.md, "Truncation"): the default lens's least kept was 99.31% in the pilot's side
# (290 px) and 100.00% in 1.1 times it; la1131_f50's grid needed 146 px where its pilot said 144.
MARGIN = 1.1


@dataclass(frozen=True)
class WindowPlan:
    """What the pilot measured and chose."""

    kernel_size: int  # the chosen side [px]
    needed: int  # the smallest even side keeping KEPT of every lit pilot point and channel [px]
    kept: float  # the pilot's least kept share in the chosen window
    where: tuple[float, float, float, int]  # (x, y, depth [m], channel) of the point needing the largest window
    depths: tuple[float, ...]  # the pilot's depths [m]
    cap: int  # the largest side allowed: the sensor's shorter side [px]
    seconds: float
    focus_m: float | None = None  # the focus [m] the pilot traced at (None: the lens file's sensor)

    def describe(self) -> str:
        x, y, depth, c = self.where
        return (
            f"kernel_size auto: {self.kernel_size} px{_focused(self.focus_m)} (pilot of {len(PILOT_FIELD) ** 2} "
            f"points x {len(self.depths)} depths ({', '.join(f'{d:g}' for d in self.depths)} m) at spp {PILOT_SPP}, "
            f"{self.seconds:.0f} s; {self.needed} px keep {100 * KEPT:g}% of every lit pilot PSF, the most needed at "
            f"({x:+.2f}, {y:+.2f}), {depth:g} m, channel {'RGB'[c]}; x {MARGIN:g} margin; the pilot's least kept "
            f"{100 * self.kept:.2f}%)"
        )

    def to_json(self) -> str:
        return json.dumps(
            {"kernel_size": self.kernel_size, "needed": self.needed, "kept": self.kept, "focus_m": self.focus_m}
        )


def _focused(focus_m: float | None) -> str:
    return "" if focus_m is None else f" at focus {focus_text(focus_m)}"


def pilot_depths(depth_lo: float, depth_hi: float, focus_m: float | None) -> tuple[float, ...]:
    """The pilot's depths [m]: the range's ends (the most defocus on either side of focus) and the focus distance
    when it lies strictly between them."""
    depths = {depth_lo, depth_hi}
    if focus_m is not None and depth_lo < focus_m < depth_hi:
        depths.add(focus_m)
    return tuple(sorted(depths))


def kept_by_side(chief: np.ndarray, centroid: np.ndarray, sides: np.ndarray, min_rays: int) -> np.ndarray:
    """The share of valid rays a window of each side keeps, centred as the tracer centres it.

    chief, centroid: [B, 3, n] Chebyshev distances [px] of each ray from the chief-ray centre and from the valid
    rays' centroid, inf for a ray not valid (illumination.ray_offsets); sides: [K] window sides [px]; min_rays: the
    rays a window must hold for the tracer to keep it on the chief ray. Returns [B, 3, K]; 0 with no valid ray."""
    valid = np.isfinite(chief).sum(axis=-1)  # [B, 3]
    inside = sides / 2 - 0.5 - 0.001  # DeepLens's rule: |offset| < (ks / 2 - 0.5) px - 0.001 px
    on_chief, on_centroid = _closer_than(chief, inside), _closer_than(centroid, inside)  # [B, 3, K]
    # The tracer recentres a lit channel whose chief-ray window holds too few rays (illumination._binned).
    held = np.where((on_chief < min_rays) & (valid[..., None] >= min_rays), on_centroid, on_chief)
    return held / np.maximum(valid[..., None], 1)


def _closer_than(dist: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """dist [B, 3, n], limits [K] -> [B, 3, K]: how many of each row's distances are below each limit."""
    rows = np.sort(dist.reshape(-1, dist.shape[-1]), axis=-1)
    return np.stack([np.searchsorted(row, limits) for row in rows]).reshape(*dist.shape[:-1], len(limits))


def choose(kept: np.ndarray, lit: np.ndarray, sides: np.ndarray) -> int:
    """The index into ``sides`` of the smallest side keeping KEPT of every lit (point, channel); kept: [B, 3, K],
    lit: [B, 3] bool. The last side when none does."""
    ok = (kept >= KEPT) | ~lit[..., None]  # [B, 3, K]
    good = np.nonzero(ok.all(axis=(0, 1)))[0]
    return int(good[0]) if len(good) else len(sides) - 1


def pilot(
    lens, depths: tuple[float, ...], kernel_size_small: int, seed: int, focus_m: float | None = None
) -> WindowPlan:
    """Trace the pilot on ``lens`` (refocused to focus_m [m], recorded; None: the lens file's sensor) at ``depths``
    [m] and choose the traced window's side."""
    t = time.time()
    torch.manual_seed(seed)
    cap = int(min(lens.sensor_res))
    sides = np.arange(2, cap + 2, 2)  # every even side up to the cap [px]
    xy = np.array([(x, y) for y in PILOT_FIELD[::-1] for x in PILOT_FIELD])  # [P, 2]
    need = illumination.min_rays(PILOT_SPP)
    kept, lit, where = [], [], []
    for depth in depths:
        for a in range(0, len(xy), PILOT_BLOCK):
            part = xy[a : a + PILOT_BLOCK]
            chief, centroid = illumination.ray_offsets(lens, part, np.full(len(part), depth), PILOT_SPP)
            kept.append(kept_by_side(chief, centroid, sides, need))  # [B, 3, K]
            lit.append(np.isfinite(chief).sum(axis=-1) >= need)  # [B, 3]
            where += [(float(x), float(y), float(depth)) for x, y in part]
    kept, lit = np.concatenate(kept), np.concatenate(lit)
    i = choose(kept, lit, sides)
    needed = int(sides[i])
    # The point and channel that set the side: the lit one keeping least one step below it (or at it, at 2 px).
    below = np.where(lit, kept[..., max(i - 1, 0)], np.inf)
    b, c = np.unravel_index(np.argmin(below), below.shape)
    side = min(cap, max(needed * MARGIN, kernel_size_small))
    side = int(min(cap - cap % 2, 2 * np.ceil(side / 2)))  # even, as DeepLens centres the window between pixels
    at = int(np.searchsorted(sides, side))
    least = float(np.where(lit, kept[..., min(at, len(sides) - 1)], np.inf).min()) if lit.any() else 1.0
    plan = WindowPlan(side, needed, least, (*where[b], int(c)), tuple(depths), cap, time.time() - t, focus_m)
    if needed * MARGIN > cap:
        log.warning(
            "kernel_size auto: the PSFs need a window of about %d px, more than the sensor's %d px; traced in %d px, "
            "they keep %.1f%% of their light at worst (the pilot's figure). The lens images these depths poorly: "
            "narrow the depth range (--depth-min, --depth-max) or the focus (--focus-m)",
            int(needed * MARGIN),
            cap,
            side,
            100 * least,
        )
    return plan
