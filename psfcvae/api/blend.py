"""The network blended with its training grid, where the validation points say so.

The network's PSFs are smooth in the field and free of ray noise, but its fit is off by a bias that moves with the
PSF: on a coarse grid near the optical axis, where the PSF is sharpest, a few per cent (docs/results.md, "The centre
and the blend"). The grid's PSFs are right on average but each carries its rays' noise, and bicubic interpolation
between them misses what changes faster than the grid. The blend takes the better of the two where the validation
points say so::

    K(c) = K_net(c) + (1 - w(r)) · (B(c) - (1 - detail) · K_net(c)), clipped at 0, each channel renormalised
    B = bicubic interpolation of S(grid) - detail · S(K_net at the grid's points), S a Gaussian over the field

w is the weight of the network as it is (1: the network alone), 1 - w that of the grid's part. With detail 0 that
part is bicubic interpolation of the (smoothed) grid, B clipped and renormalised first as the evaluation's bicubic
is: w · K_net + (1 - w) · B. With detail 1 it is the network corrected by its residual on the grid, K_net + (1 - w)
· bicubic of S(grid - K_net): the grid's PSFs less the network's at the same points hold the network's bias and the
rays' noise, and interpolated to any point they correct the network there, which keeps the network's own detail
between the grid's points (a network that is exact on a noise-free grid answers unchanged). Smoothing, S a Gaussian
of ``smooth`` grid spacings, takes out most of the noise and, as long as the network's bias changes slowly across
the grid, little of the bias. Which is better depends on the grid and the network: on the Cooke triplet's 17 close
depths, whose grid PSFs are noisy (spp 5 036), detail 1 with smooth 0.5 is best; on the default lens's 16×16 grid of
3 depths, where the network's detail between the depths is wrong, interpolation's is better there (docs/results.md,
"The blend with the grid"). So ``fit`` chooses smooth and detail among CANDIDATES, and w, on the validation points.

r = √(x² + y²) in normalised field coordinates (√2 at the sensor's corner). w holds one weight per radius band
of RADIUS_BANDS ([0, 0.15), [0.15, 0.5), [0.5, 0.9), [0.9, √2]) over the whole band and turns linearly to the
next band's weight over the first RAMP of that next band: continuous, so a rendering shows no seam. The turn lies
outside each band, not across its edge, so that the points nearest the axis, where interpolation is best, keep
their band's weight to its edge (the demo's centre: 3.0% against 3.3% with the turn centred on the edge, 3.2%
with w linear between the bands' middles; docs/results.md). For each candidate (smooth, detail) the weights, each
one of 0, 0.05, ..., 1, minimise the sum over bands of the pooled noise-corrected error on the file's lit validation
points in the band (by the radius w is taken at: a canonical model's octant image's, below), w(r) applied as it will
be (by coordinate descent); the earliest candidate within MARGIN (2%) of the lowest sum wins (``fit``: psf train, at
every validation step). Never the test points, which psf eval scores. A point that the network and every candidate
at w = 0 miss by more than FAIL is left out of every candidate's fit (it cannot tell them apart, and a compact one
would choose the weight alone), unless that leaves its band fewer than MIN_POINTS. A band with fewer than MIN_POINTS
validation points keeps the network alone (w = 1) over it, past the turn from the band before.

B is the evaluation's bicubic (psfcvae/evaluation/baselines.py: Catmull-Rom over the field, linear in 1/depth and
in 1/focus between the grid's planes) before its clip, computed here in torch on the model's device. For a
rotationally symmetric (canonical-frame) model the grid is first averaged over each grid point's mirror images (psf
train's ``blend_grid``, with baselines.mirror_averaged: the mirrors in x and y, and the diagonal too on a square
sensor), which brings its ray noise down to about half (a third on a square sensor; psf eval scores bicubic of that
grid alone as "bicubic (mirror-averaged)", taken at the point itself), and B is taken at the point's image in the
first octant and turned back, as the model's table takes every point, so that the table and ``model.psf`` agree
everywhere. The weight is taken at that octant point too, so the answer keeps the lens's symmetry on a sensor that
is not square. Outside the grid (beyond the sensor's edge, or, for a model of several depths or focus settings,
beyond the grid's, which allow_extrapolation admits) interpolation only repeats the edge, so w turns linearly
to 1 (the network alone) over RAMP past it: RAMP in the normalised field, RAMP of the grid's span in 1/depth
(1/focus). Continuous, so a render through a depth map that leaves the grid's depths shows no seam where it leaves
them. (A grid of one depth has no span: ``weight`` gives 1 at any other depth, where ``model.psf`` never asks, since
such a model's condition holds no depth.)

Between focus settings. A model over several focus settings answers a point between two of the grid's from those two
(``refocused``), weighted linearly in 1/focus, each at the depth of the same defocus 1/depth - 1/focus [1/m]: the
defocus sets most of the PSF, so a point focused at 2 m and 1 m away looks like one focused at infinity and 2 m away
far more than like one focused at infinity and 1 m away. Each side is the blended model at a grid focus, where the
network has seen PSFs and the grid holds them; between them the network's own answer, which has seen none, errs by
1.7-2.4 times as much on the default lens's 16x16 files (about as much on the demo's 8x8 grid, where the network is
coarse everywhere; docs/results.md, "One model over focus"). Where the same defocus lies beyond the grid's depths
(nearer than the nearest, or farther than the farthest, up to past infinity, which no grid holds), the side holds
the nearest and misses the point's defocus by ``miss`` [1/m]. Such a side weighs less: t_s · exp(-(miss_s /
sigma)²), renormalised over the point's sides, sigma [1/m] chosen by ``fit`` among SIGMAS on the validation points
(infinite: t alone), and the band weights fitted again with it. A held side keeps its focus setting but not the
defocus, the other the defocus at another focus setting: neither is the truth. On the default lens at the
benchmark's rays (42x42), the 21 of 37 test points between focus settings with a held side err by 2.7% at sigma 0.5,
by 4.3% with t alone or with the other side alone (the other 16: 2.1%; docs/results.md, "One model over focus").
``fit`` scores the validation points between focus settings as answered so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from psfcvae.api.table import anti_transpose
from psfcvae.evaluation import baselines
from psfcvae.evaluation.metrics import rel_l2_corrected
from psfgen.plan.grid import RADIUS_BANDS, radius_band

STEPS = 21  # candidate weights 1, 0.95, ..., 0
MIN_POINTS = 2  # validation points a band needs before its weight is fitted
SWEEPS = 5  # coordinate-descent passes over the weights at most
BANDS = len(RADIUS_BANDS) - 1
RAMP = 0.05  # the radius over which w turns from a band's weight to the next's, from the band's outer edge on; and
# past the grid, to 1 (in the normalised field, or as a share of the grid's span in 1/depth and 1/focus)
# w's knots (r, index of the band whose weight holds there): each inner edge, then RAMP beyond it
KNOTS = tuple((e + d, b + (d > 0)) for b, e in enumerate(RADIUS_BANDS[1:-1]) for d in (0.0, RAMP))
SLACK = 1e-9  # relative: a depth this close to a one-depth grid's is on it
SNAP = 1e-6  # a share of the grid's span in 1/focus: a focus this close to a grid focus is on it (``refocused``)
# A validation point whose noise-corrected relative L2 is above this for both the network and the blend's w = 0 is left
# out of the fit (``fit``): on LA1131's seed-1 benchmark file two such compact points (missed by 102% and 101%, 96%
# and 62%) carried all but 1% of their band's pooled error and took its weight from 1 to 0.5, costing 0.8 point on
# the test points.
FAIL = 0.5
# (smooth [grid spacings], detail) that fit tries, in this order (the module's docstring): the first is bicubic
# interpolation of the grid itself, the blend as it was before the others were measured
CANDIDATES = ((0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 0.0), (0.5, 0.5), (0.5, 1.0))
REACH = 4  # the Gaussian reaches REACH · smooth grid points each side (rounded up): e^-8 of the centre's weight
# fit keeps the earliest candidate whose sum is within this share of the lowest: with 2-10 validation points a band,
# closer sums are a coin toss (on LA1131's benchmark file all six lay within 1% of each other, and the lowest, by
# 0.03%, was 0.14 point worse on the test points than the first)
MARGIN = 0.02
# sigma [1/m] that fit tries for the sides between focus settings (``Sides.tempered``), in this order, the earliest
# within MARGIN of the lowest kept: t alone first. How far a side may miss depends on how fast the lens's PSF changes
# with defocus: the validation points chose 0.5 on the default lens's files of 3 depths and 0.25 on one of 5 (f 7.9
# mm), 0.05 on the Cooke triplet's 8x8 file (f 50 mm, focus settings 0.08 1/m apart) and infinity on its file over
# 5-6 m, where no side misses by more than 0.017 1/m (docs/results.md, "One model over focus"). The margin is on the
# whole band sum, points whose sides miss nothing included: a gain on a few such points may stay under it
SIGMAS = (math.inf, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05)


def _toward_network(w: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Weights w [M] turned linearly to 1 over RAMP of past [M], how far each point lies beyond the grid (<= 0
    inside it)."""
    return w + (1.0 - w) * np.clip(past / RAMP, 0.0, 1.0)


def _field_past(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """How far field points [M] (normalised) lie beyond the grid's square [-1, 1]², along the farther axis."""
    return np.maximum(np.abs(fx), np.abs(fy)) - 1.0


def _past(values: np.ndarray, query) -> np.ndarray:
    """How far each query [M] m lies beyond the range of values [V] m (inf allowed) in 1/value, as a share of the
    range's span in 1/value: 0 inside; inf off a single value."""
    inv = 1.0 / np.asarray(query, dtype=np.float64)
    lo, hi = 1.0 / np.max(values), 1.0 / np.min(values)
    past = np.maximum(inv - hi, lo - inv)
    if hi > lo:
        return np.maximum(past / (hi - lo), 0.0)
    return np.where(past > SLACK * hi, np.inf, 0.0)


def folded(fold: tuple[float, float] | None, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Where a blend of fold ``fold`` (Blend.fold) looks up field points x, y [M]: their image in the first octant
    (0 <= y' <= x' on the sensor, the table's) for a canonical model, themselves otherwise. Normalised coordinates
    [M] each."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if fold is None:
        return x, y
    sx, sy = fold
    a, b = np.abs(x * sx), np.abs(y * sy)
    return np.maximum(a, b) / sx, np.minimum(a, b) / sy


def profile(r: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The network's weight w [M] at radii r [M] from the bands' weights [BANDS] (the module's docstring)."""
    return np.interp(r, [k[0] for k in KNOTS], np.asarray(weights)[[k[1] for k in KNOTS]])


@dataclass(frozen=True)
class Sides:
    """Where a model answers points: S sides per point, each a (depth [S, M] m, focus [S, M] m or None) it asks
    the network and the blend at, and a weight t [S, M] (each point's sum to 1): the answer is Σ_s t_s · K(side s)
    (``refocused``). itself [S, M]: the side is the point itself (its condition can be reused). miss [S, M] 1/m:
    how far the side's defocus 1/depth - 1/focus lies from the point's, 0 unless ``refocused`` held its depth (at
    the grid's nearest or farthest depth, or at the point's own where that lies beyond them)."""

    depth: np.ndarray
    focus: np.ndarray | None
    t: np.ndarray
    itself: np.ndarray
    miss: np.ndarray

    def tempered(self, sigma: float) -> Sides:
        """These sides with each point's weights t_s · exp(-(miss_s / sigma)²) renormalised (the module's
        docstring); sigma [1/m], infinite: these. A side whose t is 0 stays 0; of a point's others, the one that
        misses least keeps its factor 1 before the renormalisation, so no point's weights all vanish."""
        if math.isinf(sigma) or not self.miss.any():
            return self
        e = np.where(self.t > 0, (self.miss / sigma) ** 2, np.inf)
        t = self.t * np.exp(-(e - e.min(axis=0)))
        return replace(self, t=t / t.sum(axis=0))

    def focus_of(self, s: int) -> np.ndarray | None:
        """Side s's focus [M] m, None for a model of one focus setting."""
        return None if self.focus is None else self.focus[s]

    def subset(self, keep: np.ndarray) -> Sides:
        """The sides of the points ``keep`` [M] bool selects."""
        pick = lambda v: None if v is None else v[:, keep]  # noqa: E731
        return Sides(*(pick(v) for v in (self.depth, self.focus, self.t, self.itself, self.miss)))


def refocused(depth_m, focus_m, depths, focus) -> Sides:
    """Where a model over the grid's focus settings focus [F] m (inf allowed) answers points at depth_m [M] m and
    focus_m [M] m: at a grid focus setting, itself; between two, at each of them, weighted linearly in 1/focus, at
    the depth of the same defocus 1/depth - 1/focus [1/m] (the module's docstring), held within the grid's depths
    [D] m (or the point's own, where that lies beyond them). A model of one focus setting (focus_m None, or one
    grid focus), and a point beyond the grid's focus settings, answer at the point itself: side 0, t = 1. Two
    sides for a model over focus; a side whose t is 0 need not be asked."""
    depth_m = np.asarray(depth_m, dtype=np.float64).reshape(-1)
    if focus_m is None or len(np.atleast_1d(focus)) < 2:
        same = None if focus_m is None else np.broadcast_to(np.asarray(focus_m, np.float64), depth_m.shape)[None]
        one = np.ones((1, len(depth_m)))
        return Sides(depth_m[None], same, one, one.astype(bool), np.zeros_like(one))
    focus_m = np.broadcast_to(np.asarray(focus_m, dtype=np.float64), depth_m.shape)
    phi = 1.0 / focus_m  # 1/inf = 0
    grid = np.sort(1.0 / np.asarray(focus, dtype=np.float64))
    # A focus within SNAP of the grid's span from a grid focus is on it: a model's condition holds the focus as a
    # float32 code, which turns a grid focus into its neighbour within 1e-7
    nearest = grid[np.argmin(np.abs(phi[:, None] - grid[None]), axis=1)]
    on = np.abs(phi - nearest) <= SNAP * (grid[-1] - grid[0])
    phi = np.where(on, nearest, phi)
    j = np.clip(np.searchsorted(grid, phi, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[j], grid[j + 1]
    inside = (phi >= grid[0]) & (phi <= grid[-1])
    t = np.where(inside, np.clip((phi - lo) / (hi - lo), 0.0, 1.0), 0.0)  # beyond: side 0 is the point itself
    inv_d = 1.0 / depth_m
    near, far = np.maximum(1.0 / np.min(depths), inv_d), np.minimum(1.0 / np.max(depths), inv_d)
    depth, focus_s, itself, miss = [], [], [], []
    for at in (lo, hi):
        inv = np.clip(inv_d - phi + at, far, near)  # the same defocus, within the grid's depths
        mine = ~inside | (on & (at == phi))  # the point itself: its own depth and focus, exactly
        with np.errstate(divide="ignore"):
            depth.append(np.where(mine, depth_m, 1.0 / inv))
            focus_s.append(np.where(mine, focus_m, 1.0 / at))
        itself.append(mine)
        miss.append(np.where(mine, 0.0, np.abs(inv - (inv_d - phi + at))))
    return Sides(np.stack(depth), np.stack(focus_s), np.stack([1.0 - t, t]), np.stack(itself), np.stack(miss))


@dataclass
class Blend:
    """The grid the blend interpolates, how it was made, and the network's weight per radius band.

    grid [F*D, P, 3, k, k] float16: S(grid) - detail · S(network) (``smoothed``) on the grid's planes p = f*D + d;
    grid_size N (P = N²); depths [D] m; focus [F] m ([nan]: one focus); weights [BANDS] in [0, 1];
    points [BANDS]: the validation points that fitted each weight; fold: the sensor's (half-width,
    half-height) over the longer for a canonical-frame model, whose interpolation is taken in the first octant
    (module docstring), None otherwise; smooth [grid spacings] and detail in [0, 1]: the module's docstring; sigma
    [1/m]: the weight of a side between focus settings that misses the point's defocus (``Sides.tempered``).
    """

    grid: torch.Tensor
    grid_size: int
    depths: np.ndarray
    focus: np.ndarray
    weights: np.ndarray
    points: np.ndarray
    fold: tuple[float, float] | None = None
    smooth: float = 0.0
    detail: float = 0.0
    sigma: float = math.inf
    _ext: dict = field(default_factory=dict, repr=False)  # device -> the grid with ghost borders, float32

    def folded(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Where the blend looks up field points x, y [M]: ``folded`` by its fold."""
        return folded(self.fold, x, y)

    def weight(self, x, y, depth_m, focus_m=None) -> np.ndarray:
        """The network's weight w [M] at field points x, y [M], depth_m [M] m and focus_m [M] m (None: one focus):
        profile(r) of the point where it is looked up (``folded``: on a sensor that is not square, mirroring a
        point in the diagonal changes its normalised radius, and the answer must not change), turning to 1 over
        RAMP beyond the grid (the module's docstring)."""
        fx, fy = self.folded(x, y)
        w = profile(np.hypot(fx, fy), self.weights)
        past = np.maximum(_field_past(fx, fy), _past(self.depths, depth_m))
        if focus_m is not None and len(self.focus) > 1:
            past = np.maximum(past, _past(self.focus, focus_m))
        return _toward_network(w, past)

    def interpolate(self, x, y, depth_m, focus_m=None, device="cpu") -> torch.Tensor:
        """B: bicubic interpolation of the grid at (x, y) [M], depth_m [M] m, focus_m [M] m (None: one focus), taken
        at the ``folded`` point and turned back: [M, 3, k, k] float32 on ``device``, not clipped (with detail > 0,
        of either sign)."""
        x, y, depth_m = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, depth_m))
        device = torch.device(device)
        k = self._bicubic(*self.folded(x, y), depth_m, focus_m, device)
        if self.fold is not None:
            sx, sy = self.fold
            px, py = x * sx, y * sy
            flag = lambda v: torch.as_tensor(v, device=device).view(-1, 1, 1, 1)  # noqa: E731
            k = torch.where(flag(np.abs(py) > np.abs(px)), anti_transpose(k), k)  # back: the table's own order
            k = torch.where(flag(px < 0), k.flip(-1), k)
            k = torch.where(flag(py < 0), k.flip(-2), k)
        return k

    def _bicubic(self, x, y, depth_m, focus_m, device) -> torch.Tensor:
        """baselines.bicubic before its clip and normalisation, in float32 torch: [M, 3, k, k]."""
        n, m = self.grid_size, len(x)
        ext = self._extended(device)  # [F*D * (n+2)², 3k²]
        row, col = baselines._lattice(n, x, y)
        r0 = np.clip(np.floor(row).astype(np.int64), 0, n - 2)
        c0 = np.clip(np.floor(col).astype(np.int64), 0, n - 2)
        wr, wc = baselines._cubic_weights(row - r0), baselines._cubic_weights(col - c0)  # [M, 4]
        focus_m = np.full(m, np.nan) if focus_m is None else np.asarray(focus_m, dtype=np.float64).reshape(-1)
        planes = baselines._plane_weights(self.depths, depth_m, self.focus, focus_m)  # [M, F*D], 4 nonzero at most
        slots = np.argsort(-planes, axis=1, kind="stable")[:, :4]
        slot_w = np.take_along_axis(planes, slots, axis=1)
        side = n + 2
        out = torch.zeros(m, ext.shape[1], device=device)
        for s in range(slots.shape[1]):
            if not slot_w[:, s].any():
                continue
            for i in range(4):
                for j in range(4):
                    flat = (slots[:, s] * side + r0 + i) * side + c0 + j  # taps r0-1..r0+2 -> ext r0..r0+3
                    w = torch.as_tensor(slot_w[:, s] * wr[:, i] * wc[:, j], dtype=torch.float32, device=device)
                    out.addcmul_(ext[torch.as_tensor(flat, device=device)], w[:, None])
        return out.view(m, *self.grid.shape[2:])

    def _extended(self, device: torch.device) -> torch.Tensor:
        """The grid on ``device`` as float32 with baselines._bicubic_field's ghost border (2·edge − inner), built
        once per device: [F*D * (n+2)², 3k²]."""
        if device not in self._ext:
            n = self.grid_size
            v = self.grid.to(device=device, dtype=torch.float32).reshape(len(self.grid), n, n, -1)
            ext = torch.empty(len(v), n + 2, n + 2, v.shape[-1], device=device)
            ext[:, 1:-1, 1:-1] = v
            ext[:, 0, 1:-1], ext[:, -1, 1:-1] = 2 * v[:, 0] - v[:, 1], 2 * v[:, -1] - v[:, -2]
            ext[:, :, 0], ext[:, :, -1] = 2 * ext[:, :, 1] - ext[:, :, 2], 2 * ext[:, :, -2] - ext[:, :, -3]
            self._ext[device] = ext.reshape(-1, v.shape[-1])
        return self._ext[device]

    def apply(self, psf: torch.Tensor, x, y, depth_m, focus_m=None) -> torch.Tensor:
        """The network's psf [M, 3, k, k] (or [M, S, 3, k, k], S samples per point) at (x, y, depth_m [m],
        focus_m [m]) [M] blended as the module's docstring says: same shape, each channel sums to 1."""
        w = self.weight(x, y, depth_m, focus_m)
        need = np.flatnonzero(w < 1.0)  # w = 1: the network alone, no interpolation to compute
        if not len(need):
            return psf
        pick = lambda v: None if v is None else np.broadcast_to(np.asarray(v, np.float64), w.shape)[need]  # noqa: E731
        b = self.interpolate(*(pick(v) for v in (x, y, depth_m, focus_m)), device=psf.device)
        if psf.dim() == 5:
            b = b[:, None]
        at = torch.as_tensor(need, device=psf.device)
        wt = torch.as_tensor(w[need], dtype=torch.float32, device=psf.device).view(-1, *[1] * (psf.dim() - 1))
        out = psf.clone()
        out[at] = mix(wt, psf[at], b, self.detail).to(psf.dtype)
        return out

    def answer(self, nets: torch.Tensor, x, y, sides: Sides) -> torch.Tensor:
        """The model's answer at field points x, y [M] from the network's PSFs nets [S, M, 3, k, k] at the points'
        sides (``refocused``): Σ_s t_s · apply(nets[s], x, y, the side's depth and focus), [M, 3, k, k], each channel
        summing to 1, t as ``sigma`` tempers it. A side's PSFs where its t is 0 are not read."""
        sides = sides.tempered(self.sigma)
        if len(sides.t) == 1:  # one focus setting: the point itself
            return self.apply(nets[0], x, y, sides.depth[0], sides.focus_of(0))
        x, y = (np.broadcast_to(np.asarray(v, dtype=np.float64), sides.t.shape[1:]) for v in (x, y))
        out = torch.zeros_like(nets[0])
        for s, t in enumerate(sides.t):
            need = np.flatnonzero(t > 0)
            if len(need):
                k = self.apply(nets[s][need], x[need], y[need], sides.depth[s][need], sides.focus[s][need])
                at = torch.as_tensor(need, device=out.device)
                out[at] += torch.as_tensor(t[need], dtype=out.dtype, device=out.device).view(-1, 1, 1, 1) * k
        return out

    def state(self) -> dict:
        """What a checkpoint stores (torch tensors and lists: loadable with weights_only=True)."""
        return {
            "grid": self.grid,
            "grid_size": self.grid_size,
            "depths": [float(d) for d in self.depths],
            "focus": [float(f) for f in self.focus],
            "weights": [float(v) for v in self.weights],
            "points": [int(v) for v in self.points],
            "fold": None if self.fold is None else [float(v) for v in self.fold],
            "smooth": float(self.smooth),
            "detail": float(self.detail),
            "sigma": float(self.sigma),
        }

    @classmethod
    def from_state(cls, state: dict, kernel_size: int, depths, focus) -> Blend:
        """The blend a checkpoint stored; ValueError where it does not fit the model (its kernel side, depths [m]
        and focus [m]) or is not a blend."""
        grid = state["grid"]
        n = int(state["grid_size"])
        blend = cls(
            grid=grid,
            grid_size=n,
            depths=np.asarray(state["depths"], dtype=np.float64),
            focus=np.asarray(state["focus"], dtype=np.float64),
            weights=np.asarray(state["weights"], dtype=np.float64),
            points=np.asarray(state["points"], dtype=np.int64),
            fold=None if state["fold"] is None else tuple(float(v) for v in state["fold"]),
            smooth=float(state["smooth"]),
            detail=float(state["detail"]),
            sigma=float(state["sigma"]),
        )
        planes = len(blend.depths) * len(blend.focus)
        if (
            not isinstance(grid, torch.Tensor)
            or tuple(grid.shape) != (planes, n * n, 3, kernel_size, kernel_size)
            or blend.weights.shape != (BANDS,)
            or not ((blend.weights >= 0) & (blend.weights <= 1)).all()
            or not (0 <= blend.detail <= 1 and 0 <= blend.smooth < math.inf and blend.sigma > 0)
            or not np.array_equal(blend.depths, np.asarray(depths, dtype=np.float64))
            or not np.array_equal(blend.focus, np.asarray(focus, dtype=np.float64), equal_nan=True)
        ):
            raise ValueError("the blend does not fit the model")
        return blend

    def describe(self) -> str:
        """'network weight 0.00 / 0.75 / 0.80 / 0.95 by radius band, the rest bicubic interpolation of the
        mirror-averaged grid (2 / 2 / 3 / 3 validation points used)'."""
        w = " / ".join(f"{v:.2f}" for v in self.weights)
        n = " / ".join(str(int(v)) for v in self.points)
        grid = "the grid" if self.fold is None else "the mirror-averaged grid"
        if self.smooth > 0:
            grid += f" smoothed over {self.smooth:g} grid spacings"
        if self.detail == 0:
            rest = f"bicubic interpolation of {grid}"
        else:
            rest = f"the network corrected by its residual on {grid}"
            if self.detail < 1:
                rest += f", keeping {self.detail:g} of its detail between the grid's points"
        out = f"network weight {w} by radius band, the rest {rest} ({n} validation points used)"
        if not math.isinf(self.sigma):
            out += (
                f"; between focus settings, a side that misses the point's defocus by m weighs "
                f"exp(-(m / {self.sigma:g} m⁻¹)²)"
            )
        return out


def smoothed(grid, net_grid, n: int, smooth: float, detail: float) -> torch.Tensor:
    """The blend's grid [F*D, P, 3, k, k] float16 (P = n²): S(grid) - detail · S(net_grid), of the grid's PSFs (a
    canonical model's mirror-averaged) and the network's prior mean at the same points, both [F*D, P, 3, k, k]
    (net_grid unread at detail 0). S, on each plane, is the Gaussian of ``smooth`` grid spacings over the field out
    to REACH · smooth points each side (the identity at 0): each point's channel becomes the weighted mean over its
    lit neighbours' (a channel dark in the grid is left out of both means and takes its lit neighbours' there; 0 where
    none is lit, and at smooth 0)."""
    if smooth == 0 and detail == 0:
        return torch.as_tensor(grid, dtype=torch.float16)  # the grid itself
    t = torch.arange(n, dtype=torch.float32)
    gap = t[:, None] - t[None, :]
    near = torch.exp(-0.5 * (gap / max(smooth, 1e-30)) ** 2) * (gap.abs() <= math.ceil(REACH * smooth))  # [n, n]

    def over(v: torch.Tensor) -> torch.Tensor:  # [n, n, ...]: along the rows, then along the columns
        rows = torch.einsum("ai,ij...->aj...", near, v)
        return torch.einsum("bj,aj...->ab...", near, rows)

    def plane(v) -> torch.Tensor:  # one plane [P, 3, k, k], torch or numpy (read-only too), as [n, n, 3, k²] float32
        v = v.float() if torch.is_tensor(v) else torch.from_numpy(np.array(v, dtype=np.float32))
        return v.reshape(n, n, 3, -1)

    out = torch.empty(tuple(grid.shape), dtype=torch.float16)
    for p in range(len(grid)):  # a plane at a time: one plane in float32 at once
        g = plane(grid[p])
        lit = (g.sum(dim=-1, keepdim=True) > 0).float()
        mixed = (g - detail * plane(net_grid[p])) * lit if detail else g * lit
        num, den = (over(mixed), over(lit)) if smooth > 0 else (mixed, lit)
        out[p] = torch.where(den > 0, num / den.clamp_min(1e-30), 0.0).reshape(out.shape[1:])
    return out


def fit(grid, net_grid, grid_size: int, depths, focus, net_psf: np.ndarray | None, validation: dict, fold=None):
    """The blend (a Blend) of the network, whose prior mean is net_grid [F*D, P, 3, k, k] at the grid's points and
    net_psf [S, V, 3, k, k] at the sides (``refocused``) of the lit validation points ``validation``
    (GridFile.heldout's entries: coords [V, 2], depth [V] m, focus [V] m, psf_a, psf_b [V, 3, k, k]), with the grid
    [F*D, P, 3, k, k] (depths [D] m, focus [F] m; fold: Blend.fold; a canonical model's grid and net_grid already
    mirror-averaged): of CANDIDATES and the weights, the earliest candidate within MARGIN of the lowest sum over
    bands of the pooled noise-corrected error of the answers as the model gives them (``Blend.answer``), every
    candidate scored on the same points, and its weights (the module's docstring; ``points`` counts the points),
    all with t alone; then, for that blend, sigma of SIGMAS alike (``Sides.tempered``), and with a finite sigma the
    weights again on the answers so weighed. Without a validation point, the first candidate with every weight 1:
    the network alone. One candidate's grid is held at a time."""

    def make(smooth: float, detail: float) -> Blend:
        return Blend(
            grid=smoothed(grid, net_grid, int(grid_size), smooth, detail),
            grid_size=int(grid_size),
            depths=np.asarray(depths, dtype=np.float64),
            focus=np.asarray(focus, dtype=np.float64),
            weights=np.ones(BANDS),
            points=np.zeros(BANDS, dtype=np.int64),
            fold=None if fold is None else tuple(float(v) for v in fold),
            smooth=smooth,
            detail=detail,
        )

    coords = validation["coords"]
    if not len(coords):
        return make(0.0, 0.0)  # the grid itself (net_grid may be None), every weight 1
    focus_m = None if len(np.atleast_1d(focus)) == 1 else validation["focus"]
    sides = refocused(validation["depth"], focus_m, depths, focus)

    def b_at(blend: Blend) -> torch.Tensor:  # B at each side: [S, V, 3, k, k]
        x, y = coords[:, 0], coords[:, 1]
        return torch.stack([blend.interpolate(x, y, d, sides.focus_of(s)) for s, d in enumerate(sides.depth)])

    at = [b_at(make(*c)) for c in CANDIDATES]  # B
    net = torch.as_tensor(net_psf, dtype=torch.float32)
    t = torch.as_tensor(sides.t, dtype=torch.float32)
    a, c = validation["psf_a"], validation["psf_b"]
    # A point that the network and every candidate (at w = 0) miss by more than FAIL says nothing about which is
    # better, yet a compact one can carry nearly all of its band's pooled error and so choose the weight alone: left
    # out, of every candidate's fit alike (a candidate scored without the points it misses would win on that). A point
    # whose per-point error is undefined, its two traces not overlapping, stays: it still counts in the pooled sums.
    none = torch.zeros(1, len(coords), 1, 1, 1)  # w = 0
    answers = [weighted(t, net)] + [weighted(t, mix(none, net, b, d)) for b, (_, d) in zip(at, CANDIDATES)]
    with np.errstate(invalid="ignore", divide="ignore"):
        missed = np.min([rel_l2_corrected(k.numpy(), a, c)[0] for k in answers], axis=0)
    told = ~(missed > FAIL)
    # Each point counts in the band whose weight it gets: that of its octant image's radius (``weight``), which on a
    # sensor that is not square can lie in the band below its own (LA1131's 3:2 sensor: 1 to 3 of 23 points).
    fx, fy = folded(fold, coords[:, 0], coords[:, 1])
    band = radius_band(np.column_stack([fx, fy]))
    for i in range(BANDS):  # unless that leaves a band too few to fit on: then it keeps them all
        if np.sum(told & (band == i)) < MIN_POINTS <= np.sum(band == i):
            told[band == i] = True
    keep = torch.as_tensor(told)
    points = np.bincount(band[told], minlength=BANDS)
    # As weight() takes them; a validation point's depth and focus, and its sides', lie within the grid's.
    told_at = dict(radius=np.hypot(fx, fy)[told], past=_field_past(fx, fy)[told], band=band[told], a=a[told], c=c[told])
    scored = [i for i in range(BANDS) if points[i] >= MIN_POINTS]
    fits = [
        _fit_weights(net[:, keep], b[:, keep], t[:, keep], detail, scored, **told_at)
        for b, (_, detail) in zip(at, CANDIDATES)
    ]
    chosen = _earliest_within_margin([loss for _, loss in fits])
    fitted = make(*CANDIDATES[chosen])
    fitted.weights, fitted.points = fits[chosen][0], points
    # Then how much a side that misses the point's defocus weighs, for the blend as fitted (sigma changes only t), and
    # the weights again with the sides so weighed: the answers the model gives
    told_sides = sides.subset(told)
    k = _at_sides(fitted.weights, net[:, keep], at[chosen][:, keep], fitted.detail, told_at["radius"], told_at["past"])
    fitted.sigma = _fit_sigma(told_sides, k, scored, told_at["band"], told_at["a"], told_at["c"])
    if not math.isinf(fitted.sigma):
        tempered = torch.as_tensor(told_sides.tempered(fitted.sigma).t, dtype=torch.float32)
        fitted.weights = _fit_weights(net[:, keep], at[chosen][:, keep], tempered, fitted.detail, scored, **told_at)[0]
    return fitted


def weighted(t, k: torch.Tensor) -> torch.Tensor:
    """Σ_s t_s · k_s of the sides' weights t [S, M] (numpy or torch) and PSFs k [S, M, 3, k, k]: [M, 3, k, k]. A
    side whose t is 0 is not read (it may hold anything)."""
    t = torch.as_tensor(t, dtype=k.dtype, device=k.device)
    t = t.view(*t.shape, 1, 1, 1)
    return torch.where(t > 0, t * k, 0.0).sum(dim=0)


def _fit_weights(net, b, t, detail: float, scored: list, radius, past, band, a, c) -> tuple[np.ndarray, float]:
    """The band weights [BANDS] of one candidate (its detail; B at the points' sides, b [S, M, 3, k, k]) of the
    lowest sum over the ``scored`` bands of the pooled noise-corrected error on the points (the network's PSFs at
    their sides net [S, M, 3, k, k], the sides' weights t [S, M], the points' radius [M], how far past the grid
    [M], band [M] and two references a, c [M, 3, k, k]), by coordinate descent from every weight 1; and that sum."""

    def loss(weights: np.ndarray) -> float:
        mixed = weighted(t, _at_sides(weights, net, b, detail, radius, past)).numpy()
        return _band_sum(mixed, scored, band, a, c)

    weights = np.ones(BANDS)
    candidates = np.linspace(1.0, 0.0, STEPS)  # from the network alone down: a tie keeps the larger weight
    for _ in range(SWEEPS):
        before = weights.copy()
        for i in scored:
            trials = [loss(np.where(np.arange(BANDS) == i, w, weights)) for w in candidates]
            weights[i] = round(float(candidates[int(np.argmin(trials))]), 2)  # 0.65, not 0.6499999999999999
        if np.array_equal(before, weights):
            break
    return weights, loss(weights)


def _at_sides(weights: np.ndarray, net, b, detail: float, radius, past) -> torch.Tensor:
    """The blended answer [S, M, 3, k, k] at each side of points at radius [M], ``past`` [M] the grid (``weight``),
    of band weights [BANDS], the network's PSFs net and B b there [S, M, 3, k, k], and ``detail``."""
    w = torch.as_tensor(_toward_network(profile(radius, weights), past), dtype=torch.float32)
    return mix(w.view(1, -1, 1, 1, 1), net, b, detail)


def _band_sum(k: np.ndarray, scored: list, band, a, c) -> float:
    """Σ over the ``scored`` bands of the pooled noise-corrected error of k [M, 3, k, k] on the points of each
    (band [M]; references a, c [M, 3, k, k])."""
    return sum(rel_l2_corrected(k[band == i], a[band == i], c[band == i])[1] for i in scored)


def _fit_sigma(sides: Sides, k: torch.Tensor, scored: list, band, a, c) -> float:
    """Of SIGMAS, the earliest within MARGIN of the lowest band sum (``fit``) of the points' answers Σ_s t_s · k_s,
    t tempered by it (``Sides.tempered``), from the blended answers k [S, M, 3, k, k] at their ``sides``; infinite
    where no side misses."""
    if not sides.miss.any():
        return math.inf
    losses = [_band_sum(weighted(sides.tempered(v).t, k).numpy(), scored, band, a, c) for v in SIGMAS]
    return float(SIGMAS[_earliest_within_margin(losses)])


def _earliest_within_margin(losses) -> int:
    """The index of the earliest of ``losses`` within MARGIN of the lowest; 0 when none is finite (a band whose
    pooled error is undefined cannot choose)."""
    losses = np.array(losses, dtype=np.float64)
    losses[~np.isfinite(losses)] = np.inf
    within = np.flatnonzero(losses <= losses.min() * (1 + MARGIN))
    return int(within[0]) if len(within) else 0


def mix(w: torch.Tensor, net: torch.Tensor, b: torch.Tensor, detail: float) -> torch.Tensor:
    """net + (1 - w) · (b - (1 - detail) · net) for the network's PSFs net [M, 3, k, k] (or [M, S, 3, k, k]), the
    blend's B there, b (broadcastable), and weights w [M, 1, 1, 1] (...): clipped at 0, each channel renormalised to
    sum 1 (the network's where nothing is left). At detail 0, b is first clipped and renormalised itself, as bicubic
    interpolation of a grid of PSFs answers (psfcvae/evaluation/baselines.py): w · net + (1 - w) · b. (A channel the
    network leaves 0 takes the residual's positive part at detail > 0; the API zeroes the points its head calls
    dark after the blend.)"""
    if detail == 0:
        b = normalise(b)
    k = (net + (1.0 - w) * (b - (1.0 - detail) * net)).clamp_min(0.0)
    s = k.sum(dim=(-2, -1), keepdim=True)
    return torch.where(s > 0, k / s.clamp_min(1e-30), net)


def normalise(k: torch.Tensor) -> torch.Tensor:
    """k [..., 3, k, k] clipped at 0, each channel divided by its sum (left 0 where the sum is 0)."""
    k = k.clamp_min(0.0)
    s = k.sum(dim=(-2, -1), keepdim=True)
    return torch.where(s > 0, k / s.clamp_min(1e-30), k)
