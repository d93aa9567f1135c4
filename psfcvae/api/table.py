"""The prior mean of a canonical model, tabulated: PSFs at tens of thousands per second on a CPU.

A coaxial lens's PSF field has eight exact symmetries: the PSF at a field point turned by
90° is the PSF turned by 90° (``torch.rot90``), and the PSF at a point mirrored in x (in
y) is the PSF with its columns (rows) reversed. Every field point is therefore one of
these eight images of a point in the first octant, 0 <= θ <= 45° in physical sensor
units. ``PSFTable`` evaluates the model's prior mean once on a regular grid over (radius,
angle in that octant, depth code) and answers a query by trilinear interpolation of the
grid's 15 x 15 kernels, then the symmetry that takes the octant to the query's point.
No network runs and nothing is rotated per query: the cost is eight kernel reads.

With a blend (psfcvae/api/blend.py), the table holds the blended PSFs, as ``model.psf`` gives them (the blend
looks every point up in the same octant). The table is an approximation of ``model.psf``, not of the lens: its
deviation from it is measured (``deviation``, ``psf eval``'s speed lines, docs/speed.md) and is a
small fraction of the network's own error. Cartesian models have no symmetry to fold the
field into one octant, and a table over the whole field would be eight times larger; they
are refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from psfcvae.model.frame import max_radius
from psfgen.shared.errors import InputError

TARGET = 0.005  # the table's sizes aim at this deviation from the network (pooled relative L2)
MAX_ENTRIES = 2**17  # at most this many kernels: 171 MiB of float16 15 x 15 RGB kernels and head outputs
MAX_SAMPLES = 257  # per axis
PROBE_POINTS = 256  # random octant points at which each axis's curvature is measured
CHUNK = 4096  # network evaluations per batch
ON_NODE = 0.02  # a grid depth this close to a table node, in node steps, counts as on it (``on_grid_depths``)


def anti_transpose(k: torch.Tensor) -> torch.Tensor:
    """k [..., n, n] -> the kernel of the point mirrored in the diagonal x = y: K'[i, j] = K[n-1-j, n-1-i]
    (rows run along -y, columns along +x)."""
    return k.transpose(-2, -1).flip(-2, -1)


def refuse_dark(lit: torch.Tensor) -> None:
    """The one-line InputError of ``psf`` without allow_dark, when any of lit [B] bool is False."""
    if not bool(lit.all()):
        raise InputError(
            f"{int((~lit).sum())} of {len(lit)} points lie outside the lens's lit field (dark: no "
            "light reaches the sensor there, so there is no PSF); pass allow_dark=True for zeros and a "
            "lit mask, or see model.illumination(x, y, depth_m)"
        )


def on_grid_depths(n: int, at: np.ndarray, most: int) -> int:
    """Depth samples for a table of a blended model: the fewest from n to 2n (and ``most``) whose nodes, spaced evenly
    over the depth code, fall on every grid depth (within ON_NODE of a step), where ``at`` [D] places the grid's
    depths along the axis in [0, 1]; n when none does (a table at most twice as long, not one as long as it takes).

    The blend interpolates the grid linearly in 1/depth between its depths, so the model's prior mean bends at each
    one; a table node beside a bend cuts the corner, while nodes on the bends follow each piece. On the Cooke triplet's
    17 depths (even in 1/depth) 48 depth samples put the table 0.70% from the model, 49 (3 per grid interval) 0.31%,
    33 0.34%: the depth axis alone (doubling the radii or angles instead: 0.65%, 0.66%). Between a model's focus
    settings its answer bends where its sides (blend.refocused) cross the grid's depths instead; nodes placed on
    those did no better (the default lens's 16x16 model over 0.5 m-inf at 0.667 m focus: 0.49% from the model
    against 0.46% with the grid's depths, at 2 m 0.50% either way), so the grid's depths stay the rule."""
    for m in range(n, max(n, min(2 * n, most)) + 1):
        pos = np.asarray(at, dtype=np.float64) * (m - 1)
        if np.all(np.abs(pos - np.round(pos)) <= ON_NODE):
            return m
    return n


class PSFTable:
    """model.psf(..., mode="mean") of a canonical-frame ``PSFModel``, from a precomputed table.

    Memory: radii x angles x depths kernels of 3 k² values of ``dtype`` (float16 by default: the
    kernels' relative rounding, 5e-4, is far below the table's interpolation error), and 4
    float32 values of the illumination head per node.

    The lit mask and the illumination are the head's at the octant's point: a canonical model's
    head sees the radius alone, so its lit field and illumination are round, and the table's
    differ from ``model.psf``'s only by the interpolation between the table's radii and depths.
    """

    def __init__(
        self,
        model,
        sizes: tuple[int, int, int] | None = None,
        target: float = TARGET,
        dtype=torch.float16,
        focus_m=None,
        allow_extrapolation: bool = False,
    ):
        """sizes: (radii, angles, depths) samples; None: the fewest that keep each axis's linear
        interpolation error near target / √3 (measured on the network, ``choose_sizes``), at most
        MAX_ENTRIES kernels in all. focus_m [m]: the one focus of the table (inf allowed), as
        ``model.psf`` takes it: needed by a model over focus, within its trained focus range unless
        allow_extrapolation (the network extrapolated there; its queries then pass allow_extrapolation too, as
        ``model.psf``'s do), None (or its own) otherwise."""
        self._frame(model, focus_m, allow_extrapolation)
        if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target < 1:
            raise InputError(f"the table's target deviation must be between 0 and 1, got {target!r:.60}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise InputError(f"the table's dtype must be a torch floating type (float16 by default), got {dtype!r:.60}")
        if sizes is not None and not (
            isinstance(sizes, (tuple, list))
            and len(sizes) == 3
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sizes)
        ):
            raise InputError(f"a table needs sizes (radii, angles, depths) as three whole numbers, got {sizes!r:.60}")
        if sizes is None:
            sizes = self.choose_sizes(target)
        used = tuple(sizes)[: 3 if self.has_depth else 2]  # a model without depth has one depth sample
        if len(sizes) != 3 or min(used) < 2:
            raise InputError(f"a table needs (radii, angles, depths), each at least 2, got {tuple(sizes)}")
        # (radii, angles, depths): samples per axis; depths is 1 for a model without depth
        self.shape = (sizes[0], sizes[1], sizes[2] if self.has_depth else 1)
        self.psfs, self.light = self._build(dtype)

    def _frame(self, model, focus_m=None, allow_extrapolation: bool = False) -> None:
        """The model, the table's focus and the geometry of its octant; a model without the canonical frame is
        refused."""
        net = model.net
        if not net.canonical:
            raise InputError(
                "a table needs a canonical-frame model (a rotationally symmetric lens, condition_frame "
                "canonical); this checkpoint conditions on (x, y): use model.psf"
            )
        self.model = model
        # [1] metres, or None for a single-focus model: the focus every query is at (checked as model.psf checks it)
        focus = model._focus(focus_m, 1, allow_extrapolation)
        self.focus_m = None if focus is None else float(focus[0])
        self.scale = tuple(net.args.field_scale)
        self.r_max = max_radius(self.scale)
        self.has_depth = net.args.has_depth
        self.spans = (self.r_max, math.pi / 4, 2.0)  # lengths of the radius, angle and depth-code axes
        self.k = net.args.kernel_size_small

    def state(self) -> dict:
        """The table's arrays, sizes and focus for ``torch.save``; ``from_state`` makes the table again (a cached
        table)."""
        return {"shape": list(self.shape), "psfs": self.psfs, "light": self.light, "focus_m": self.focus_m}

    @classmethod
    def from_state(cls, model, state: dict) -> PSFTable:
        """The table of ``model`` saved by ``state()``; one InputError when it does not fit the model."""
        table = cls.__new__(cls)
        table._frame(model, state.get("focus_m"), allow_extrapolation=True)  # its focus was checked when built
        shape = tuple(state.get("shape", ()))
        psfs, light = state.get("psfs"), state.get("light")
        if (
            len(shape) != 3
            or not isinstance(psfs, torch.Tensor)
            or not isinstance(light, torch.Tensor)
            or tuple(psfs.shape) != (math.prod(shape), 3 * table.k**2)
            or tuple(light.shape) != (math.prod(shape), 4)
        ):
            raise InputError("a saved table does not fit this model; build it again with model.tabulate()")
        table.shape, table.psfs, table.light = shape, psfs, light
        return table

    def _cond(self, r: torch.Tensor, theta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Model-space conditions [N, C] of physical radius r, octant angle θ [rad] and depth code d ([N] each), at
        the table's focus."""
        x = r * torch.cos(theta) / self.scale[0]
        y = r * torch.sin(theta) / self.scale[1]
        cols = [x, y, d] if self.has_depth else [x, y]
        if self.focus_m is not None:
            phi = self.model.net.focus_code(torch.tensor(self.focus_m, dtype=torch.float64))
            cols.append(phi.expand_as(x))
        return torch.stack(cols, dim=-1).float().to(self.model.device)

    @torch.no_grad()
    def _prior_mean(self, cond: torch.Tensor) -> torch.Tensor:
        """The model's prior mean [N, 3 k²] on the CPU, float32, in chunks: the model's answer, as model.psf gives it
        (PSFModel.answer)."""
        return torch.cat([self.model.answer(c).flatten(1).cpu() for c in cond.split(CHUNK)])

    def choose_sizes(self, target: float, seed: int = 0) -> tuple[int, int, int]:
        """Samples per axis so that linear interpolation along each one errs by about target / √3.

        The error of a linear blend over a step H grows as c·H²; c is measured per axis at
        PROBE_POINTS random octant points, from the network's PSFs at the middle and the two
        ends of a step H0. Past MAX_ENTRIES kernels every step grows by one factor. A blended model's depth
        samples then grow to the fewest whose nodes fall on the grid's depths (``on_grid_depths``).
        """
        g = torch.Generator().manual_seed(seed)
        n = PROBE_POINTS
        r = (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)) * self.r_max
        theta = (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)) * math.pi / 4
        d = (
            1.8 * torch.rand(n, generator=g, dtype=torch.float64) - 0.9
            if self.has_depth
            else torch.zeros(n, dtype=torch.float64)
        )
        sizes = []
        for axis, span in enumerate(self.spans):
            if axis == 2 and not self.has_depth:
                sizes.append(1)
                continue
            h0 = span / 16
            point = [r, theta, d]
            lo, hi = list(point), list(point)
            lo[axis], hi[axis] = point[axis] - h0 / 2, point[axis] + h0 / 2
            mid = self._prior_mean(self._cond(*point))
            blend = 0.5 * (self._prior_mean(self._cond(*lo)) + self._prior_mean(self._cond(*hi)))
            err = float(((blend - mid) ** 2).sum().sqrt() / (mid**2).sum().sqrt())
            step = h0 * math.sqrt((target / math.sqrt(3)) / max(err, 1e-12))
            sizes.append(min(MAX_SAMPLES, max(2, math.ceil(span / step) + 1)))
        while math.prod(sizes) > MAX_ENTRIES:  # coarser everywhere, by the same factor
            sizes = [max(2, math.ceil((s - 1) / 1.1) + 1) if s > 1 else 1 for s in sizes]
        if self.has_depth and self.model.blend is not None and len(self.model.blend.depths) > 1:
            codes = self.model.net.depth_code(torch.as_tensor(self.model.blend.depths, dtype=torch.float64))
            most = min(MAX_SAMPLES, MAX_ENTRIES // (sizes[0] * sizes[1]))
            sizes[2] = on_grid_depths(sizes[2], (codes.numpy() + 1.0) / 2.0, most)
        return tuple(sizes)

    def _build(self, dtype):
        """(kernels [R·A·D, 3 k²] of ``dtype``, head outputs [R·A·D, 4] float32: log illumination ×3, lit logit)."""
        R, A, D = self.shape
        r = torch.linspace(0.0, self.r_max, R, dtype=torch.float64)
        # Not the axis itself, where the network's angle is 0 whatever the node's: one hair off
        # it, each node's direction, as the network turns the kernel just beside the axis.
        r[0] = 1e-6 * self.r_max
        theta = torch.linspace(0.0, math.pi / 4, A, dtype=torch.float64)
        d = torch.linspace(-1.0, 1.0, D, dtype=torch.float64) if self.has_depth else torch.zeros(1, dtype=torch.float64)
        rr, tt, dd = (t.reshape(-1) for t in torch.meshgrid(r, theta, d, indexing="ij"))  # row-major [R, A, D]
        cond = self._cond(rr, tt, dd)
        psfs = self._prior_mean(cond).to(dtype)
        with torch.no_grad():
            log_illum, logit = self.model.net.illumination(cond)
        return psfs, torch.cat([log_illum, logit[:, None]], dim=1).float().cpu()

    @property
    def nbytes(self) -> int:
        """Memory held by the table [bytes]."""
        return self.psfs.numel() * self.psfs.element_size() + self.light.numel() * self.light.element_size()

    def psf(self, x, y, depth_m=None, allow_extrapolation: bool = False, allow_dark: bool = False):
        """As ``PSFModel.psf`` with mode "mean" at the table's focus ``focus_m``, at field points x, y (scalars or
        [B], in [-1, 1]) and depth_m [m] (scalar or [B]): [B, 3, k, k] float32 on the CPU, each channel sums to 1 (with
        allow_dark=True: (psf, lit [B] bool), psf zero where lit is False). Points beyond the table
        (an extrapolated depth) are computed by ``model.psf``."""
        cond = self._conditions(x, y, depth_m, allow_extrapolation)
        psf, light = self._lookup(cond)
        lit = self._lit(light)
        beyond = self._beyond(cond)
        if beyond.any():
            net_psf, net_lit = self.model.psf(
                *_pick(beyond, x, y, depth_m), self.focus_m, allow_extrapolation=True, allow_dark=True
            )
            psf[beyond], lit[beyond] = net_psf.cpu(), net_lit.cpu()
        if not allow_dark:
            refuse_dark(lit)
        psf = psf * lit.view(-1, 1, 1, 1)
        return (psf, lit) if allow_dark else psf

    @torch.no_grad()
    def psf_and_illumination(self, x, y, depth_m=None, allow_extrapolation: bool = False):
        """As ``PSFModel.psf_and_illumination`` (mode "mean"), from one lookup: (psf [B, 3, k, k], zero where
        dark; illumination [B, 3], 0 where dark; lit [B] bool), float32 on the CPU. What a rendering needs."""
        cond = self._conditions(x, y, depth_m, allow_extrapolation)
        psf, light = self._lookup(cond)
        lit = self._lit(light)
        illum = light[:, :3].exp()
        beyond = self._beyond(cond)
        if beyond.any():
            net_psf, net_light, net_lit = self.model.psf_and_illumination(
                *_pick(beyond, x, y, depth_m), self.focus_m, allow_extrapolation=True
            )
            psf[beyond], illum[beyond], lit[beyond] = net_psf.cpu(), net_light.cpu(), net_lit.cpu()
        return psf * lit.view(-1, 1, 1, 1), illum * lit[:, None], lit

    def _conditions(self, x, y, depth_m, allow_extrapolation: bool) -> torch.Tensor:
        """model.conditions at the table's focus, on the CPU: [B, C]."""
        return self.model.conditions(x, y, depth_m, self.focus_m, allow_extrapolation).cpu()

    def _beyond(self, cond: torch.Tensor) -> torch.Tensor:
        """[B] bool: conditions outside the table (radius past the corner, depth code outside [-1, 1])."""
        px, py = cond[:, 0] * self.scale[0], cond[:, 1] * self.scale[1]
        out = torch.hypot(px, py) > self.r_max * (1 + 1e-6)
        if self.has_depth:
            out |= cond[:, 2].abs() > 1 + 1e-6
        return out

    @torch.no_grad()
    def illumination(self, x, y, depth_m=None, allow_extrapolation: bool = False) -> torch.Tensor:
        """As ``PSFModel.illumination``, from the table: [B, 3] float32 on the CPU, 0 where dark."""
        cond = self._conditions(x, y, depth_m, allow_extrapolation)
        _, light = self._lookup(cond)
        out = light[:, :3].exp() * self._lit(light)[:, None]
        beyond = self._beyond(cond)
        if beyond.any():
            out[beyond] = self.model.illumination(
                *_pick(beyond, x, y, depth_m), self.focus_m, allow_extrapolation=True
            ).cpu()
        return out

    def _lit(self, light: torch.Tensor) -> torch.Tensor:
        """lit [B] bool from interpolated head outputs [B, 4]: the head's rule (logit > 0, or no dark point trained)."""
        if not bool(self.model.net.illumination.any_dark):
            return torch.ones(len(light), dtype=torch.bool)
        return light[:, 3] > 0

    def _lookup(self, cond: torch.Tensor):
        """cond [B, C] (model space) -> (psf [B, 3, k, k] float32, head outputs [B, 4])."""
        R, A, D = self.shape
        px, py = cond[:, 0].double() * self.scale[0], cond[:, 1].double() * self.scale[1]
        a, b = px.abs(), py.abs()
        swap = b > a  # beyond 45°: the octant's point mirrored in the diagonal
        r = torch.hypot(a, b)
        theta = torch.atan2(torch.minimum(a, b), torch.maximum(a, b))  # [0, π/4]
        u = (r / self.r_max).clamp(0, 1) * (R - 1)
        v = (theta / (math.pi / 4)).clamp(0, 1) * (A - 1)
        w = ((cond[:, 2].double().clamp(-1, 1) + 1) / 2 * (D - 1)) if self.has_depth else torch.zeros_like(u)
        psf = torch.zeros(len(cond), self.psfs.shape[1])
        light = torch.zeros(len(cond), 4)
        corners = []
        for t, n in ((u, R), (v, A), (w, D)):
            lo = t.floor().long().clamp(0, max(n - 2, 0))
            f = (t - lo).float() if n > 1 else torch.zeros_like(t, dtype=torch.float32)
            corners.append((lo, f))
        (i0, fi), (j0, fj), (l0, fl) = corners
        for di in (0, 1):
            for dj in (0, 1):
                for dl in (0, 1) if D > 1 else (0,):
                    weight = (fi if di else 1 - fi) * (fj if dj else 1 - fj) * ((fl if dl else 1 - fl) if D > 1 else 1)
                    idx = ((i0 + di) * A + (j0 + dj)) * D + (l0 + dl)
                    psf.addcmul_(self.psfs.index_select(0, idx).float(), weight[:, None])
                    light.addcmul_(self.light.index_select(0, idx), weight[:, None])
        psf = psf.view(-1, 3, self.k, self.k)
        # From the octant to the point: the diagonal mirror first, then the mirrors in x and y.
        psf = torch.where(swap.view(-1, 1, 1, 1), anti_transpose(psf), psf)
        psf = torch.where((px < 0).view(-1, 1, 1, 1), psf.flip(-1), psf)
        psf = torch.where((py < 0).view(-1, 1, 1, 1), psf.flip(-2), psf)
        return psf, light

    @torch.no_grad()
    def deviation(self, x, y, depth_m=None) -> float:
        """Pooled relative L2 between the table and the network at the points x, y (in [-1, 1]) and
        depths depth_m [m] that the table calls lit."""
        got, lit = self.psf(x, y, depth_m, allow_dark=True)
        want, _ = self.model.psf(x, y, depth_m, self.focus_m, allow_dark=True)
        want = want.cpu()[lit]
        return float(((got[lit] - want) ** 2).sum().sqrt() / (want**2).sum().sqrt())


def _pick(mask: torch.Tensor, x, y, depth_m) -> tuple:
    """(x, y, depth_m) at the points of mask [B] bool, each as a float64 array (depth_m None stays None);
    the arguments are scalars or one value per point, as ``conditions`` has already checked."""
    pick = mask.numpy()

    def per_point(values):
        return np.broadcast_to(np.asarray(values, dtype=np.float64).reshape(-1), pick.shape)[pick]

    return per_point(x), per_point(y), None if depth_m is None else per_point(depth_m)
