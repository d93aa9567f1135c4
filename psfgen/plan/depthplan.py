"""``num_depths: auto``: how many depths a range needs, from a short pilot trace.

Between two grid depths every model and baseline interpolates, and how well depends on the
lens: the default condenser's PSFs change slowly with depth, the Cooke triplet's, sharp in
focus, change fast. Measured at the same rays in all (docs/ray_budget.md), the triplet's
held-out error fell from 11.4% to 2.5% (bicubic) with 17 depths instead of 5 between 3 and
20 m, while the condenser's CVAE went from 8.4% to 5.4% with 5 depths instead of 3.

The pilot traces 9 field points ({0, 0.5, 1}², a quadrant of the field: axis, edges,
corner) at 33 depths spaced uniformly in 1/depth over the range, twice, at PILOT_SPP rays.
For D in 3, 5, 9, 17 (nested: every (33 - 1) / (D - 1)-th pilot depth), the pilot depths
half way between D's neighbours are predicted linearly in 1/depth from them: the pooled
relative L2 of those predictions, with the two traces' Monte Carlo noise taken out, is the
error of interpolating in depth on D depths. The fewest D whose error is at most
DEPTH_ERROR is chosen; 33 when none is. A run over several focus settings runs the pilot at the
nearest and the farthest and takes the larger count.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from psfgen.analysis.spacing import corrected, noise_removed, pooled
from psfgen.gridfile import focus_text
from psfgen.plan.budget import DEPTH_CHOICES as CHOICES
from psfgen.shared.errors import InputError
from psfgen.trace import illumination
from psfgen.trace.resample import downsample

log = logging.getLogger(__name__)

PILOT_DEPTHS = 33  # pilot depths, uniform in 1/depth: nested grids of 3, 5, 9, 17 and 33
PILOT_SPP = 8000  # rays per pilot point and colour (each point traced twice)
PILOT_FIELD = (0.0, 0.5, 1.0)  # x and y of the pilot points (normalised field)
# The largest error of interpolating in depth (noise removed) a choice may leave. Measured (docs/ray_budget.md): at
# a pilot figure of 3.1% (the condenser on 5 depths over 0.5-5 m) the CVAE was as accurate between depths as at
# them (4.8% and 6.0%), at 2.0% (the triplet on 17 depths over 3-20 m) bicubic too (2.4% and 2.5%); at 7.1% (the
# triplet on 9 depths) bicubic was 2.5x as wrong between depths as at them (4.9% and 2.0%). The bound lies between.
DEPTH_ERROR = 0.04


@dataclass(frozen=True)
class DepthPlan:
    """What the pilot measured and chose."""

    num_depths: int
    errors: dict[int, float]  # D -> error of interpolating in depth on D depths (pooled relative L2, noise removed)
    noise: float  # the pilot's noise, one trace (pooled relative L2)
    seconds: float
    focus_m: float | None = None  # the focus [m] the pilot traced at (None: the lens file's sensor)

    def describe(self) -> str:
        errs = ", ".join(f"{d}: {100 * e:.1f}%" for d, e in self.errors.items())
        return (
            f"num_depths auto: {self.num_depths} depths"
            + ("" if self.focus_m is None else f" at focus {focus_text(self.focus_m)}")
            + f" (pilot of {len(PILOT_FIELD) ** 2} points x {PILOT_DEPTHS} "
            f"depths at spp {PILOT_SPP}, {self.seconds:.0f} s; interpolation error in depth, noise "
            f"{100 * self.noise:.1f}% removed, by number of depths: {errs}; at most {100 * DEPTH_ERROR:g}% wanted)"
        )

    def to_json(self) -> str:
        return plan_json(num_depths=self.num_depths, errors=self.errors, noise=self.noise, focus_m=self.focus_m)


def plan_json(**fields) -> str:
    """A pilot's plan as the grid file records it: JSON of fields, the errors' counts as text keys."""
    return json.dumps({**fields, "errors": {str(k): v for k, v in fields["errors"].items()}})


def nested_counts(m: int) -> list[int]:
    """The counts of the grids nested in m settings, fewer than m, ascending: every (m - 1) / (n - 1)-th setting,
    halving the spacing from one to the next; 3, 5, 9, 17 of 33."""
    counts = []
    while (m - 1) % 2 == 0 and (m - 1) // 2 >= 2:
        m = (m - 1) // 2 + 1
        counts.append(m)
    return counts[::-1]


def midpoint_errors(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> tuple[dict[int, float], float]:
    """How well a grid of n of M settings uniform in an inverse distance (1/depth, 1/focus) predicts the settings
    half way between its neighbours, linearly in it, for each nested n (nested_counts(M)).

    a, b: two traces [M, ..., 3, k, k] at the M settings, in order; ok [M, ...] bool (lit in both). Everything
    past the first axis is pooled. Returns ({n: pooled relative L2 of the predictions, noise removed}, one trace's
    noise)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean = 0.5 * (a + b)
    diff, norm = pooled(a, b, ok)
    noise2 = diff / norm / 2 if norm > 0 else 0.0  # one trace's squared noise: a - b holds two traces' worth
    m = len(mean)
    errors = {}
    for d in nested_counts(m):
        step = (m - 1) // (d - 1)
        mids = np.arange(step // 2, m - 1, step)
        lo, hi = mids - step // 2, mids + step // 2
        pair = pooled(0.5 * (mean[lo] + mean[hi]), mean[mids], ok[lo] & ok[mids] & ok[hi])
        errors[d] = corrected(noise_removed(pair, noise2 / 2, 0.5))  # a mean of two holds half a trace's noise
    return errors, float(np.sqrt(noise2))


def pilot_points(field=None) -> np.ndarray:
    """The pilot's field points [P, 2]: every (x, y) of field (default PILOT_FIELD), normalised."""
    field = PILOT_FIELD if field is None else field
    return np.array([(x, y) for y in field for x in field])


def trace_twice(settings, spp: int, kernel_size: int, kernel_size_small: int):
    """Trace every setting (lens, xy [B, 2], depth [B] m) in order, then all of them again, at spp rays in a
    kernel_size window. Returns (a, b [M, B, 3, k, k] float, downsampled to k = kernel_size_small; ok [M, B] bool:
    enough rays in the window, every channel, in both)."""
    traces = []
    for _ in range(2):
        psfs, lit = [], []
        for lens, xy, depth in settings:
            psf, _, window = illumination.trace_counted(lens, xy, depth, spp, kernel_size)
            psfs.append(downsample(psf, kernel_size_small).cpu().numpy())
            lit.append((window.cpu().numpy() >= illumination.min_rays(spp)).all(axis=-1))
        traces.append((np.stack(psfs), np.stack(lit)))
    (a, lit_a), (b, lit_b) = traces
    return a, b, lit_a & lit_b


def choose(errors: dict[int, float]) -> int:
    """The fewest depths whose error is at most DEPTH_ERROR; the most (33) when none is."""
    return next((d for d in CHOICES[:-1] if errors[d] <= DEPTH_ERROR), CHOICES[-1])


def pilot(lens, depth_min: float, depth_max: float, kernel_size: int, kernel_size_small: int, seed: int,
          focus_m: float | None = None) -> DepthPlan:  # fmt: skip
    """Trace the pilot on ``lens`` (refocused to focus_m [m], recorded; None: the lens file's sensor) over
    [depth_min, depth_max] [m] and choose the number of depths."""
    t = time.time()
    torch.manual_seed(seed)
    depths = 1.0 / np.linspace(1.0 / depth_min, 1.0 / depth_max, PILOT_DEPTHS)  # [M] m
    xy = pilot_points()
    # one depth at a time: memory as one block of 9 points
    settings = [(lens, xy, np.full(len(xy), d)) for d in depths]
    errors, noise = midpoint_errors(*trace_twice(settings, PILOT_SPP, kernel_size, kernel_size_small))
    if not np.isfinite(list(errors.values())).any():
        raise InputError(
            f"the pilot of num_depths auto found no field point lit at three neighbouring depths between "
            f"{depth_min:g} and {depth_max:g} m; give the depths (--num-depths N or --depths)"
        )
    plan = DepthPlan(choose(errors), errors, noise, time.time() - t, focus_m)
    if errors[CHOICES[-2]] > 4 * DEPTH_ERROR:  # interpolation error falls ~4x a halving: 33 will not do either
        log.warning(
            "%s depths over %g-%g m leave about %.0f%% error in depth between them (%d depths: %.0f%%): narrow "
            "the depth range, or give more depths (--num-depths N or --depths)",
            CHOICES[-1],
            depth_min,
            depth_max,
            100 * errors[CHOICES[-2]] / 4,
            CHOICES[-2],
            100 * errors[CHOICES[-2]],
        )
    return plan
