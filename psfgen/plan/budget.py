"""The ray budget of ``psf generate``: how many grid points, and how many rays each, for R rays.

R (``ray_budget``) counts the grid's rays per colour over all its planes: focus settings × depths
× grid_size² × spp. Each plane (one depth at one focus) gets R / planes. Spread over more points
at fewer rays each, a plane's rays trade interpolation error between grid points for Monte Carlo
noise in every grid PSF.
``choose`` is the split measured best for one depth's rays; ``resolve`` turns the config's
keys into the grid size and spp that are traced. How many depths and focus settings is the config's
choice (``num_depths: auto`` and ``num_focus: auto`` let a pilot trace choose: psfgen/plan/depthplan.py,
psfgen/plan/focusplan.py).
"""

from __future__ import annotations

import math

from psfgen.shared.errors import InputError

# The defaults of psf generate: the spec's budget (its 20 x 20 grid at 10^5 rays a point: 4e7 rays per depth and
# colour) split by the rule below, 46 x 46 at spp 18 903. The same rays on the spec's grid gave the CVAE about
# twice the held-out error on the default lens (docs/ray_budget.md; README, accuracy). Each default stands alone:
# --grid-size alone keeps spp at DEFAULT_SPP (a budget is spread only when ray_budget is given).
DEFAULT_RAY_BUDGET = 40_000_000  # per depth
DEFAULT_NUM_DEPTHS = 5  # num_depths auto spends the rays of this many default depths over those it picks
# The numbers of depths num_depths auto chooses from (nested in 1/depth: psfgen/plan/depthplan.py's pilot).
DEPTH_CHOICES = (3, 5, 9, 17, 33)
# And the numbers of focus settings num_focus auto chooses from, nested in 1/focus (psfgen/plan/focusplan.py).
FOCUS_CHOICES = DEPTH_CHOICES
# Below ~1000 rays a point, tracing costs more per ray (each point's chief-ray search is fixed work:
# benchmarks/bench_generate.py), a PSF is mostly noise (~18% at 1000 on the default lens) and a point needs 10% of
# its rays valid to count as lit (illumination.MIN_RAYS = 100); a budget may not go lower.
MIN_SPP = 1000
MIN_GRID_SIZE = 2

# The rule, from measured curves of held-out error against grid size at a fixed budget (docs/ray_budget.md;
# benchmarks/bench_budget.py, one depth, 32 held-out points, bicubic and bilinear interpolation of the grid).
# Fitting err^2 = A N^(-2p) + B N^2 / R (interpolation bias falling as N^-p, grid noise rising as N / sqrt(R))
# puts the least error at N* ~ R^(1 / (2p + 2)):
#   default lens (acl12708u, 1 m; 13 grids at 1.6e6 and 6.4e6 rays): p = 1.05, N* = 48 at 6.4e6, ~R^0.244;
#   Cooke triplet (5 m; 7 grids at 6.4e6 rays, its field is smooth): p = 2.14, N* = 20 at 6.4e6, ~R^0.159.
# The rule takes their geometric mean, 31 at 6.4e6 ~R^0.20, rounded to the grid measured there: 32 x 32 costs
# each lens at most 1.16x its own optimum's bicubic error (13.0% vs 12.1%; 1.35% vs 1.17%), where either
# lens's optimum costs the other 1.45x (24 x 24 on the default lens) or 1.66x (48 x 48 on the triplet).
# The CVAE (psf train's defaults, 2000 steps, default lens) follows the same curve: 18.8% on 16 x 16, 8.0% on
# 32 x 32, least 7.0% on 48 x 48, 7.8% on 64 x 64 at 6.4e6 rays; 13.3% on 20 x 20 and 6.4% on the rule's 46 x 46
# at 4e7. On the triplet the rule's 32 x 32 costs the CVAE nothing (1.83% against 1.88% on 16 x 16).
REF_BUDGET = 6_400_000
REF_GRID = 32
EXPONENT = 0.2


def choose(ray_budget: int) -> tuple[int, int]:
    """(grid_size, spp) for ``ray_budget`` rays per colour at one depth: the measured rule,
    REF_GRID at REF_BUDGET, scaled as R^EXPONENT, rounded, kept at spp >= MIN_SPP."""
    n = round(REF_GRID * (ray_budget / REF_BUDGET) ** EXPONENT)
    n = max(MIN_GRID_SIZE, min(n, math.isqrt(ray_budget // MIN_SPP)))
    return n, ray_budget // n**2


def _planes(num_depths: int, num_focus: int) -> tuple[int, str]:
    """(planes, ' at each of 3 depths x 2 focus settings' or '' for one plane)."""
    planes = num_depths * num_focus
    if planes == 1:
        return 1, ""
    if num_focus == 1:
        return planes, f" at each of {num_depths} depths"
    return planes, f" at each of {num_depths} depth{'s' if num_depths > 1 else ''} x {num_focus} focus settings"


def resolve(
    ray_budget: int | None, grid_size: int | None, spp: int | None, num_depths: int = 1, num_focus: int = 1
) -> tuple[int, int]:
    """The traced (grid_size, spp) from the config's keys; None means not given. ray_budget counts
    rays per colour over all num_depths x num_focus planes; each plane gets ray_budget // planes.

    Without a budget: each as given, else its default (46, 18 903: DEFAULT_RAY_BUDGET split by
    the rule). With one: grid_size and spp from ``choose``; with grid_size, spp = R // N²; with
    spp, N = floor(sqrt(R / spp)) (R a depth's rays). A budget with both, or too small for a
    2 x 2 grid at MIN_SPP rays at every depth, raises InputError.
    """
    if ray_budget is None:
        return (DEFAULT_GRID_SIZE if grid_size is None else grid_size), (DEFAULT_SPP if spp is None else spp)
    num_depths, at = _planes(num_depths, num_focus)  # from here on a plane is what a depth was
    least = MIN_GRID_SIZE**2 * MIN_SPP * num_depths
    if ray_budget < least:
        raise InputError.for_key(
            "ray_budget",
            f"must be at least {least} (rays per colour: a {MIN_GRID_SIZE}x{MIN_GRID_SIZE} grid at "
            f"{MIN_SPP} rays a point{at}), got {ray_budget}",
        )
    if grid_size is not None and spp is not None:
        keys = ("ray_budget", "grid_size", "spp")  # each named as the user set it: option, --set or config file
        raise InputError(
            "{ray_budget} sets the grid size x spp: give it with at most one of {grid_size} and {spp}",
            {k: f"config key '{k}'" for k in keys},
        )
    per_depth = ray_budget // num_depths
    if grid_size is not None:
        if grid_size < MIN_GRID_SIZE or per_depth // grid_size**2 < MIN_SPP:
            raise InputError.for_keys(
                f"{{ray_budget}} {ray_budget} over a {grid_size}x{grid_size} grid{at} gives "
                f"{per_depth // max(grid_size, 1) ** 2} rays a point, fewer than {MIN_SPP}: lower {{grid_size}} "
                f"(at most {math.isqrt(per_depth // MIN_SPP)}) or raise the budget",
                "ray_budget",
                "grid_size",
            )
        return grid_size, per_depth // grid_size**2
    if spp is not None:
        n = math.isqrt(per_depth // spp) if spp > 0 else 0
        if n < MIN_GRID_SIZE:
            raise InputError.for_keys(
                f"{{ray_budget}} {ray_budget} at {{spp}} {spp} is not enough for a {MIN_GRID_SIZE}x{MIN_GRID_SIZE} "
                f"grid{at} (it needs {MIN_GRID_SIZE**2 * spp * num_depths} rays); lower {{spp}} or raise the budget",
                "ray_budget",
                "spp",
            )
        return n, spp
    return choose(per_depth)


def affords(
    ray_budget: int | None, grid_size: int | None, spp: int | None, num_depths: int, num_focus: int = 1
) -> bool:
    """Whether ``resolve`` accepts these keys at num_depths x num_focus planes (no budget: always)."""
    try:
        resolve(ray_budget, grid_size, spp, num_depths, num_focus)
    except InputError:
        return False
    return True


def explain(ray_budget: int, grid_size: int, spp: int, num_depths: int = 1, num_focus: int = 1) -> str:
    """One line for the log: what a budget became, and why."""
    planes = num_depths * num_focus
    used = grid_size**2 * spp * planes
    rule = choose(ray_budget // planes)
    over = f"{num_depths} depth{'s' if num_depths > 1 else ''}"
    if num_focus > 1:
        over += f" x {num_focus} focus settings"
    why = (
        f"the measured rule ({REF_GRID}x{REF_GRID} at {REF_BUDGET:.3g} rays a depth, scaled as R^{EXPONENT}; "
        "docs/ray_budget.md)"
        if (grid_size, spp) == rule
        else "the grid size or spp given with it"
    )
    return (
        f"ray budget {ray_budget:,} rays per colour over {over}: "
        f"{grid_size}x{grid_size} grid at spp {spp:,} ({used:,} rays traced) from {why}"
    )


DEFAULT_GRID_SIZE, DEFAULT_SPP = choose(DEFAULT_RAY_BUDGET)  # 46, 18 903
