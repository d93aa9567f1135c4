"""``num_focus: auto``: how many focus settings a focus range needs, from a short pilot trace.

Between two grid focus settings every model and baseline interpolates (linearly in 1/focus, as
the held-out points between them are placed), and how well depends on the lens, as across depth
(psfgen/plan/depthplan.py): measured with bench_focus.py, the Cooke triplet at 3, 6 m and infinity
left every method above 45% error between the settings, at 3, 4, 6, 12 m and infinity the CVAE at
14%, while the default condenser needed no more than 0.5, 2 m and infinity.

The pilot traces 9 field points ({0, 0.5, 1}², as the depth pilot) at 33 focus settings spaced
uniformly in 1/focus over the range (1/inf = 0), each lens refocused as the run refocuses it, at
the run's nearest and farthest depth and the one nearest the middle in 1/depth, twice, at the
depth pilot's PILOT_SPP. For F in 3, 5, 9, 17 (nested: every (33 - 1) / (F - 1)-th pilot
setting), the settings half way between F's neighbours are predicted linearly in 1/focus from
them: the pooled relative L2 over the three depths, the two traces' noise removed
(depthplan.midpoint_errors), is the error of interpolating in focus on F settings. The fewest F
whose error is at most FOCUS_ERROR is chosen; 33 when none is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from psfgen.gridfile import focus_text
from psfgen.plan import depthplan
from psfgen.shared.errors import InputError

log = logging.getLogger(__name__)

PILOT_FOCUS = 33  # pilot focus settings, uniform in 1/focus: nested grids of 3, 5, 9, 17 and 33
PILOT_SPP = depthplan.PILOT_SPP  # rays per pilot point and colour (each point traced twice)
PILOT_FIELD = depthplan.PILOT_FIELD  # x and y of the pilot points (normalised field)
# The largest error of interpolating in focus (noise removed) a choice may leave: the depth pilot's bound. Not
# measured across focus on its own: the figure is the same quantity (the pooled error at the point half way
# between two grid planes, in the inverse distance every model interpolates in), and half the held-out points
# sit half way between grid focus settings as half sit between grid depths, so the same bound promises the same
# accuracy between focus settings as between depths.
FOCUS_ERROR = depthplan.DEPTH_ERROR


@dataclass(frozen=True)
class FocusPlan:
    """What the pilot measured and chose."""

    num_focus: int
    errors: dict[int, float]  # F -> error of interpolating in focus on F settings (pooled relative L2, noise removed)
    noise: float  # the pilot's noise, one trace (pooled relative L2)
    seconds: float
    depths_m: tuple[float, ...]  # the depths [m] the pilot traced at

    def describe(self) -> str:
        errs = ", ".join(f"{f}: {100 * e:.1f}%" for f, e in self.errors.items())
        at = ", ".join(f"{d:g}" for d in self.depths_m)
        return (
            f"num_focus auto: {self.num_focus} focus settings (pilot of {len(PILOT_FIELD) ** 2} points x {PILOT_FOCUS} "
            f"focus settings at depths {at} m at spp {PILOT_SPP}, {self.seconds:.0f} s; interpolation error in "
            f"focus, noise {100 * self.noise:.1f}% removed, by number of focus settings: {errs}; at most "
            f"{100 * FOCUS_ERROR:g}% wanted)"
        )

    def to_json(self) -> str:
        return depthplan.plan_json(
            num_focus=self.num_focus, errors=self.errors, noise=self.noise, depths_m=list(self.depths_m)
        )


def pilot_depths(depths: np.ndarray) -> np.ndarray:
    """The depths [m] the pilot traces at, of a run's depths [D] m (ascending): the nearest, the farthest and the
    one nearest the middle in 1/depth; fewer when the run has fewer."""
    inv = 1.0 / np.asarray(depths, np.float64)
    middle = int(np.argmin(np.abs(inv - 0.5 * (inv[0] + inv[-1]))))
    return np.asarray(depths, np.float64)[sorted({0, middle, len(inv) - 1})]


def pilot_focus(focus_min: float, focus_max: float) -> np.ndarray:
    """The pilot's PILOT_FOCUS focus settings [m], uniform in 1/focus from focus_min to focus_max (inf allowed)."""
    inv = np.linspace(1.0 / focus_min, 1.0 / focus_max, PILOT_FOCUS)  # 1/inf = 0
    with np.errstate(divide="ignore"):
        return 1.0 / inv


def choose(errors: dict[int, float]) -> int:
    """The fewest focus settings whose error is at most FOCUS_ERROR; all the pilot's (33) when none is."""
    return next((f for f in sorted(errors) if errors[f] <= FOCUS_ERROR), PILOT_FOCUS)


def pilot(lens_at, focus_min: float, focus_max: float, depths: np.ndarray, kernel_size: int, kernel_size_small: int,
          seed: int) -> FocusPlan:  # fmt: skip
    """Trace the pilot over [focus_min, focus_max] [m] (inf allowed) at pilot_depths(depths) (the run's depths [m])
    and choose the number of focus settings. lens_at(focus [m]): the lens refocused there, as the run builds it."""
    t = time.time()
    focus = pilot_focus(focus_min, focus_max)
    lenses = [lens_at(float(f)) for f in focus]  # built first: building one seeds torch (refocusing samples rays)
    torch.manual_seed(seed)
    at = pilot_depths(depths)
    xy = depthplan.pilot_points(PILOT_FIELD)
    # One focus at a time, its depths' points together: [M] settings of len(at) x P points.
    points = np.tile(xy, (len(at), 1))  # [len(at) * P, 2]
    depth = np.repeat(at, len(xy))
    settings = [(lens, points, depth) for lens in lenses]
    errors, noise = depthplan.midpoint_errors(*depthplan.trace_twice(settings, PILOT_SPP, kernel_size,
                                                                      kernel_size_small))  # fmt: skip
    span = f"{focus_text(focus_min)} and {focus_text(focus_max)}"
    if not np.isfinite(list(errors.values())).any():
        raise InputError(
            f"the pilot of num_focus auto found no field point lit at three neighbouring focus settings between "
            f"{span}; give the focus settings (--num-focus N or --focus-m)"
        )
    plan = FocusPlan(choose(errors), errors, noise, time.time() - t, tuple(float(d) for d in at))
    most = max(errors)
    if errors[most] > 4 * FOCUS_ERROR:  # interpolation error falls ~4x a halving: the pilot's count will not do
        log.warning(
            "%d focus settings between %s leave about %.0f%% error in focus between them (%d settings: %.0f%%): "
            "narrow the focus range, or give more focus settings (--num-focus N or --focus-m)",
            PILOT_FOCUS,
            span,
            100 * errors[most] / 4,
            most,
            100 * errors[most],
        )
    return plan
