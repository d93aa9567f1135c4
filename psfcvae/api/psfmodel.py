"""PSFs at arbitrary coordinates from a trained checkpoint; no dataset needed.

import psfcvae
model = psfcvae.load_model("runs/v1/best.pt")           # device="auto": CUDA when present; .to(...) to move
psf = model.psf([0.5, -0.3], [0.5, 0.8], depth_m=1.0)    # [2, 3, 15, 15], each channel sums to 1
rel = model.illumination([0.5, -0.3], [0.5, 0.8], 1.0)    # [2, 3]: 1 on axis, 0 where dark
psf, lit = model.psf(x, y, 1.0, allow_dark=True)         # zeros and lit False outside the lit field
psf = model.psf_at_height(1.2, -0.5, depth_m=1.0)          # at an image height on the sensor [mm]
psf = model.psf_at_angle(10.0, 0.0, depth_m=1.0)           # at a field angle [deg]
psf = model.psf(x, y, depth_m=1.0, focus_m=2.0)           # a model over focus: the camera focused at 2 m
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from psfcvae import checkpoint
from psfcvae.api.blend import Blend, normalise, refocused, weighted
from psfcvae.api.table import PSFTable, refuse_dark
from psfcvae.model.cvae import CVAE, ModelArgs
from psfcvae.optics import FieldMap, model_optics
from psfgen.gridfile import focus_text
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError

CHUNK = 65536  # conditions decoded at once: bounds the networks' transient memory (~0.3 GiB at hidden 512)


def _positive_numbers(values) -> bool:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return v.ndim == 1 and v.size > 0 and bool(np.isfinite(v).all() and (v > 0).all())


# The spellings of the API's arguments in its messages; the CLI renders them as its options.
_API_NAMES = {
    "coords": "coordinates x and y",
    "allow_extrapolation": "allow_extrapolation=True",
    "depth_m": "depth_m",
    "focus_m": "focus_m",
    "height": "image height",
    "angle": "field angle",
}


def _focus_values(values) -> bool:
    """A checkpoint's focus settings: [nan] (one focus, the lens file's own) or positive numbers, inf allowed."""
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    if v.ndim != 1 or v.size == 0:
        return False
    return bool((v.size == 1 and np.isnan(v[0])) or (~np.isnan(v)).all() and (v > 0).all())


class PSFModel:
    """A trained CVAE with the ranges it was trained on, behind a coordinate API."""

    def __init__(self, net: CVAE, info: dict, blend: Blend | None = None):
        self.net = net
        self.info = info  # step, config, data_fingerprint, versions of the checkpoint
        # The network blended with its grid where the validation points say so (psfcvae/api/blend.py); None:
        # the network alone (blend: none)
        self.blend = blend
        self.depths = np.asarray(info["data_fingerprint"]["depths"])  # [D] training depths [m]
        # [F] training focus distances [m], ascending, inf allowed; [nan]: one focus, the lens file's own
        self.focus = np.asarray(info["data_fingerprint"]["focus"], dtype=np.float64)
        self.device = next(net.parameters()).device

    def to(self, device) -> PSFModel:
        self.net.to(device)
        if self.blend is not None:
            self.blend._ext.clear()  # the grid's copy on the device left behind
        self.device = torch.device(device)
        return self

    def eval(self) -> PSFModel:
        self.net.eval()
        return self

    @property
    def depth_range(self) -> tuple[float, float]:
        return float(self.depths.min()), float(self.depths.max())

    @property
    def focus_range(self) -> tuple[float, float]:
        """(nearest, farthest) training focus distance [m] (inf allowed; nan for a model of the lens file's own)."""
        return float(self.focus.min()), float(self.focus.max())

    def _focus(self, focus_m, n: int, allow_extrapolation: bool) -> np.ndarray | None:
        """focus_m checked against the model's focus settings: [n] metres for a model over focus (inf allowed),
        None for a single-focus model (which takes None or its own focus)."""
        lo, hi = self.focus_range
        if not self.net.args.has_focus:
            if focus_m is not None:
                f = _numbers("focus_m", focus_m)
                # lo: nan (the lens file's own focus), or the one focus_m it was traced at, inf included
                if np.isnan(lo) or not np.allclose(f, lo, rtol=1e-9, atol=0):
                    at = "the lens file's own focus" if np.isnan(lo) else focus_text(lo)
                    raise InputError(
                        f"this model was trained at one focus ({at}): leave out {{focus_m}}, or train on a file over "
                        "several (psf generate --focus-m)",
                        _API_NAMES,
                    )
            return None
        if focus_m is None:
            raise InputError(f"this model was trained on focus {lo:g}-{hi:g} m: give {{focus_m}}", _API_NAMES)
        f = _numbers("focus_m", focus_m)
        if f.size not in (1, n) or f.ndim > 1:
            raise InputError(f"{{focus_m}} must be one focus or one per point ({n}), got shape {f.shape}", _API_NAMES)
        f = np.broadcast_to(f.reshape(-1), (n,))
        if np.isnan(f).any() or (f <= 0).any():
            bad = f[np.isnan(f) | (f <= 0)][0]
            raise InputError(f"{{focus_m}} must be a positive number of metres (inf allowed), got {bad:g}", _API_NAMES)
        outside = (f < lo * (1 - 1e-9)) | (f > hi * (1 + 1e-9))
        if not allow_extrapolation and outside.any():
            raise InputError(
                f"{{focus_m}} {f[outside][0]:g} m is outside the trained focus range {lo:g}-{hi:g} m; pass "
                "{allow_extrapolation} to go beyond",
                _API_NAMES,
            )
        return f

    def __repr__(self) -> str:
        fp, args, optics = self.info["data_fingerprint"], self.net.args, self.info["optics"]
        lens = fp["lens_file"]
        lo, hi = self.depth_range
        depths = f"depths [{lo:g}, {hi:g}] m" + ("" if args.has_depth else " (not an input)")
        if args.has_focus:
            depths += ", focus [{:g}, {:g}] m".format(*self.focus_range)
        k = args.kernel_size_small
        kernel = f"kernel {k}x{k} px of {optics['kernel_pitch_mm']:.4g} mm"
        step = self.info["step"]
        return f"<PSFModel lens {lens}, {depths}, {args.frame} frame, {kernel}, step {step}, {self.device}>"

    def conditions(self, x, y, depth_m=None, focus_m=None, allow_extrapolation: bool = False) -> torch.Tensor:
        """cond [B, C] for field points x, y (scalars or [B]), depth_m [m] and focus_m [m] (scalars or [B];
        focus_m: a model over focus only, inf allowed)."""
        x, y = _numbers("x", x), _numbers("y", y)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise InputError(
                f"x and y must be scalars or non-empty 1-D arrays of one length, got shapes {x.shape} and {y.shape}"
            )
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise InputError("{coords} must be finite numbers (got NaN or inf)", _API_NAMES)
        if not allow_extrapolation and (np.abs(x).max() > 1 or np.abs(y).max() > 1):
            far = float(np.abs(np.concatenate([x, y])).max())
            raise InputError(
                f"{{coords}} must lie in [-1, 1] (the sensor), got {far!r}; pass {{allow_extrapolation}} to go beyond",
                _API_NAMES,
            )
        lo, hi = self.depth_range
        if depth_m is None:
            if self.net.args.has_depth and lo != hi:
                raise InputError(f"this model was trained on depths {lo:g}-{hi:g} m: give {{depth_m}}", _API_NAMES)
            depth_m = lo
        d = _numbers("depth_m", depth_m)
        if d.size not in (1, x.size) or d.ndim > 1:
            raise InputError(f"depth_m must be one depth or one per point ({x.size}), got shape {d.shape}")
        d = np.broadcast_to(d.reshape(-1), x.shape)
        if not np.isfinite(d).all() or (d <= 0).any():
            bad = d[~(np.isfinite(d) & (d > 0))][0]
            raise InputError(f"{{depth_m}} must be a positive, finite number of metres, got {bad:g}", _API_NAMES)
        # An (x, y) model does not use the depth, but a depth it never saw is still an extrapolation.
        if not allow_extrapolation and ((d < lo * (1 - 1e-9)).any() or (d > hi * (1 + 1e-9)).any()):
            out = d[(d < lo * (1 - 1e-9)) | (d > hi * (1 + 1e-9))][0]
            raise InputError(
                f"{{depth_m}} {out:g} m is outside the trained range {lo:g}-{hi:g} m; pass "
                "{allow_extrapolation} to go beyond",
                _API_NAMES,
            )
        cond = self.net.condition(np.stack([x, y], axis=1), d, self._focus(focus_m, x.size, allow_extrapolation))
        if not torch.isfinite(cond).all():  # e.g. 1/depth overflowing for a depth of 1e-300 m
            bad = d[~torch.isfinite(cond).all(dim=1).cpu().numpy()][0]
            raise InputError(
                f"{{depth_m}} {bad:g} m gives no finite condition (1/depth overflows); give a depth the lens can image",
                _API_NAMES,
            )
        return cond

    @torch.no_grad()
    def psf(
        self,
        x,
        y,
        depth_m=None,
        focus_m=None,
        mode: str = "mean",
        n_samples: int = 1,
        allow_extrapolation: bool = False,
        allow_dark: bool = False,
    ):
        """The lens's PSFs at field points (x, y) and object depth depth_m [m]: [N, 3, k, k] float32
        on the model's device.

        x, y: normalised field coordinates, scalars or [N]: x to the right, y up, ±1 at the
        sensor's edges, (0, 0) on the optical axis; beyond [-1, 1] is an InputError unless
        allow_extrapolation=True. depth_m: metres, a scalar or [N]; outside the trained depth
        range (``depth_range``) likewise; None only for a model trained on one depth.
        focus_m: the distance the camera is focused at [m], a scalar or [N], inf allowed; needed
        by a model trained over several (``focus``), outside ``focus_range`` likewise; a model
        trained at one focus takes None (or that focus). Between two of its grid's focus settings
        such a model answers from them, at the depth of the same defocus (``answer``).

        Each kernel: k x k pixels, k the model's kernel_size_small (15 by default, pitch in
        ``repr(model)``), centred on the point's chief ray (on its light's centroid where a stop
        blocks the chief ray); row 0 at the top (the y = +1 side), columns along +x; channels
        R, G, B. Non-negative, each channel sums to 1: the PSF's
        shape alone; how much light reaches the sensor from there is ``illumination()``.

        mode "mean" decodes z = μ_p(c): a deterministic interpolation. mode "sample" draws
        z ~ p(z|c), each draw keeping its offset from the network's mean around the model's answer
        (``blend``); with n_samples > 1 it returns [N, n_samples, 3, k, k].
        A point outside the lit field (no PSF: the lens does not light it) is an InputError;
        with allow_dark=True the result is (psf, lit [N] bool), psf zero where lit is False.

        Example::

            model = psfcvae.load_model("runs/demo/cvae/latest.pt")
            psf = model.psf([0.0, 0.5], [0.0, -0.3], depth_m=1.0)  # [2, 3, 15, 15]: the axis, then right and below it
        """
        _choice("mode", mode, ("mean", "sample"))
        n_samples = _count("n_samples", n_samples)
        cond = self.conditions(x, y, depth_m, focus_m, allow_extrapolation)
        lit = self._lit(cond)
        if not allow_dark:
            refuse_dark(lit)
        out = self._decode(cond, lit, mode, n_samples)
        return (out, lit) if allow_dark else out

    @torch.no_grad()
    def psf_and_illumination(
        self, x, y, depth_m=None, focus_m=None, mode: str = "mean", allow_extrapolation: bool = False
    ):
        """(psf [B, 3, k, k], zero where dark; illumination [B, 3], 0 where dark; lit [B] bool) with one
        condition and one pass of the head: what a rendering needs per pixel."""
        _choice("mode", mode, ("mean", "sample"))
        cond = self.conditions(x, y, depth_m, focus_m, allow_extrapolation)
        light, lit = self._head(cond)
        return self._decode(cond, lit, mode, 1), light.float(), lit

    # -- physical coordinates (psfcvae/optics.py, FieldMap: the conventions) ------------------------------------

    @property
    def field(self) -> FieldMap:
        """The map between normalised coordinates, image heights [mm] and field angles [deg] of this model's lens,
        from the chief-ray landing points its grid file recorded."""
        if "_field" not in self.__dict__:
            self._field = FieldMap(model_optics(self))
        return self._field

    def _one_depth(self, depth_m) -> np.ndarray:
        """depth_m as an array, or the model's only depth when None (the image height depends on the depth)."""
        if depth_m is None:
            lo, hi = self.depth_range
            if lo != hi:
                raise InputError(
                    f"an image height's place in the field depends on the depth: give {{depth_m}} ({lo:g}-{hi:g} m)",
                    _API_NAMES,
                )
            return np.array([lo])
        return _numbers("depth_m", depth_m)

    def coords_at_height(self, hx_mm, hy_mm, depth_m=None, focus_m=None, allow_extrapolation: bool = False):
        """(x, y) [B] normalised coordinates whose chief ray lands at image height (hx_mm, hy_mm) on the sensor
        [mm] (x right, y up, 0 on the axis) at depth_m and focus_m [m]. A height beyond the sensor's edges, where
        their chief rays land, is an InputError unless allow_extrapolation=True."""
        hx, hy = _numbers("hx_mm", hx_mm), _numbers("hy_mm", hy_mm)
        if hx.shape != hy.shape or hx.ndim != 1 or not (np.isfinite(hx).all() and np.isfinite(hy).all()):
            raise InputError("{height} must be finite numbers, hx_mm and hy_mm of one length", _API_NAMES)
        depth = self._one_depth(depth_m)
        if depth.size not in (1, hx.size) or not (np.isfinite(depth).all() and (depth > 0).all()):
            raise InputError(f"{{depth_m}} must be one positive depth or one per point ({hx.size})", _API_NAMES)
        focus = self._focus(focus_m, hx.size, allow_extrapolation)
        xy = self.field.coords_from_height(hx, hy, np.broadcast_to(depth, hx.shape), focus)
        out = np.abs(xy).max(axis=1) > 1 + 1e-9
        if out.any() and not allow_extrapolation:
            i = int(np.argmax(out))
            ex, ey = self.field.edge_heights(float(np.broadcast_to(depth, hx.shape)[i]), _at(focus, i))
            raise InputError(
                f"{{height}} ({hx[i]:g}, {hy[i]:g}) mm lies beyond the sensor's edges, whose chief rays land at "
                f"x = ±{ex:.4g} mm, y = ±{ey:.4g} mm at {float(np.broadcast_to(depth, hx.shape)[i]):g} m; pass "
                "{allow_extrapolation} to go beyond",
                _API_NAMES,
            )
        return xy[:, 0], xy[:, 1]

    def coords_at_angle(self, ax_deg, ay_deg, allow_extrapolation: bool = False):
        """(x, y) [B] normalised coordinates of the field angles (ax_deg, ay_deg) [deg]: per axis, the angle at the
        lens between the axis and the object point, positive where its image lies at positive x (right) or y
        (up); DeepLens's field: tan(ax) = x * (sensor width / 2) / focal length. Beyond the sensor's edges as in
        coords_at_height."""
        ax, ay = _numbers("ax_deg", ax_deg), _numbers("ay_deg", ay_deg)
        if ax.shape != ay.shape or ax.ndim != 1 or not (np.abs(ax).max() < 90 and np.abs(ay).max() < 90):
            raise InputError("{angle} must be degrees within ±90, ax_deg and ay_deg of one length", _API_NAMES)
        xy = self.field.coords_from_angle(ax, ay)
        out = np.abs(xy).max(axis=1) > 1 + 1e-9
        if out.any() and not allow_extrapolation:
            i = int(np.argmax(out))
            edge = self.field.angle(np.array([1.0]), np.array([1.0]))[0]
            raise InputError(
                f"{{angle}} ({ax[i]:g}, {ay[i]:g}) deg lies beyond the sensor's edges, at ±{edge[0]:.4g} deg (x) and "
                f"±{edge[1]:.4g} deg (y); pass {{allow_extrapolation}} to go beyond",
                _API_NAMES,
            )
        return xy[:, 0], xy[:, 1]

    def height_at(self, x, y, depth_m=None, focus_m=None, allow_extrapolation: bool = False):
        """(hx, hy) [B] mm: where the chief rays of the normalised points (x, y) land at depth_m and focus_m [m]."""
        x, y = _numbers("x", x), _numbers("y", y)
        focus = self._focus(focus_m, x.size, allow_extrapolation)
        h = self.field.height(x, y, np.broadcast_to(self._one_depth(depth_m), x.shape), focus)
        return h[:, 0], h[:, 1]

    def angle_at(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(ax, ay) [B] degrees: the field angles of the normalised points (x, y) (coords_at_angle's convention)."""
        a = self.field.angle(_numbers("x", x), _numbers("y", y))
        return a[:, 0], a[:, 1]

    def psf_at_height(self, hx_mm, hy_mm, depth_m=None, focus_m=None, **options):
        """``psf`` at image heights (hx_mm, hy_mm) [mm] on the sensor (coords_at_height) at depth_m and focus_m
        [m]; options as psf's (mode, n_samples, allow_extrapolation, allow_dark)."""
        x, y = self.coords_at_height(hx_mm, hy_mm, depth_m, focus_m, options.get("allow_extrapolation", False))
        return self.psf(x, y, depth_m, focus_m, **options)

    def psf_at_angle(self, ax_deg, ay_deg, depth_m=None, focus_m=None, **options):
        """``psf`` at field angles (ax_deg, ay_deg) [deg] (coords_at_angle) at depth_m and focus_m [m]; options
        as psf's. A field angle is the same object point at every focus."""
        x, y = self.coords_at_angle(ax_deg, ay_deg, options.get("allow_extrapolation", False))
        return self.psf(x, y, depth_m, focus_m, **options)

    def _decode(self, cond: torch.Tensor, lit: torch.Tensor, mode: str, n_samples: int, blend: bool = True):
        """PSFs at conditions cond [B, C]: [B, 3, k, k] (or [B, n_samples, 3, k, k]), zero where not lit; blend=False:
        the network alone, without the checkpoint's blend.
        CHUNK conditions at a time: the networks' intermediates grow with the batch, the output alone is kept."""
        parts = []
        for c, ok in zip(cond.split(CHUNK), lit.split(CHUNK)):
            if mode == "mean":
                out = self.answer(c) if blend else self.net.sample_from_prior(c, mean=True)
            else:
                draws = torch.stack([self.net.sample_from_prior(c) for _ in range(n_samples)], dim=1)
                if blend and not self.answers_with_network:
                    # Each draw keeps its offset from the network's mean, around the model's answer: blending the
                    # draws themselves would shrink their spread by w (none left where w = 0), while prior_std
                    # reports the network's.
                    mean = self.net.sample_from_prior(c, mean=True)
                    draws = normalise(draws + (self.answer(c, mean) - mean)[:, None])
                out = draws[:, 0] if n_samples == 1 else draws
            if not torch.isfinite(out[ok]).all():  # far outside the trained range the encoding can overflow
                raise InputError(
                    "the model gives no finite PSF at these coordinates or depths (too far outside the "
                    "trained range to extrapolate); bring them closer to the field and the trained depths"
                )
            parts.append(out)
        out = torch.cat(parts)
        return out * lit.view(-1, *[1] * (out.dim() - 1))

    @property
    def answers_with_network(self) -> bool:
        """Whether the model's answer is the network's prior mean itself: no blend and one focus setting."""
        return self.blend is None and not self.net.args.has_focus

    def answer(self, cond: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """The model's answer at conditions cond [B, C]: [B, 3, k, k], each channel summing to 1. A model over focus
        answers between its grid's focus settings from the two around, at the depth of the same defocus
        (blend.refocused); each of those answers, and the answer at a grid focus, is the network's prior mean
        blended with the grid as the checkpoint's blend says (psfcvae/api/blend.py; the prior mean itself without
        one). mean: the network's prior mean at cond [B, 3, k, k] where the caller has it (else it is computed where
        an answer needs it: not between focus settings)."""
        if self.answers_with_network:
            return self.net.sample_from_prior(cond, mean=True) if mean is None else mean
        c = cond.detach().cpu()
        args = self.net.args
        depth = self.net.depth_of(c[:, 2]).numpy() if args.has_depth else np.full(len(c), self.depths[0])
        focus = self.net.focus_of(c[:, -1]).numpy() if args.has_focus else None
        sides = refocused(depth, focus, self.depths, self.focus)
        if mean is None:
            own = ((sides.t > 0) & sides.itself).any(axis=0)
            mean = self.net.sample_from_prior(cond, mean=True) if own.all() else self._net_at(cond, own, None, None)
        nets = [
            mean if sides.itself[s].all() else self._net_at(cond, ~sides.itself[s] & (sides.t[s] > 0), sides, s, mean)
            for s in range(len(sides.t))
        ]
        if self.blend is None:
            return weighted(sides.t, torch.stack(nets))
        return self.blend.answer(torch.stack(nets), c[:, 0].double().numpy(), c[:, 1].double().numpy(), sides)

    def _net_at(self, cond: torch.Tensor, where: np.ndarray, sides, s, fill=None) -> torch.Tensor:
        """The network's prior mean [B, 3, k, k] at conditions cond [B, C] where ``where`` [B] holds, at side s of
        them (blend.Sides; None: at cond itself), ``fill`` (0 without) elsewhere."""
        need = np.flatnonzero(where)
        k = self.net.args.kernel_size_small
        out = torch.zeros(len(cond), 3, k, k, device=cond.device) if fill is None else fill.clone()
        if not len(need):
            return out
        at = torch.as_tensor(need, device=cond.device)
        c = cond[at].clone()
        if sides is not None:
            code = lambda f, v: f(torch.as_tensor(v[s][need], dtype=torch.float64, device=cond.device)).float()  # noqa: E731
            if self.net.args.has_depth:
                c[:, 2] = code(self.net.depth_code, sides.depth)
            c[:, -1] = code(self.net.focus_code, sides.focus)
        out[at] = self.net.sample_from_prior(c, mean=True)
        return out

    def _head(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(relative illumination [B, 3], lit [B] bool) at conditions cond [B, C], CHUNK at a time."""
        parts = [self.net.illumination.predict(c) for c in cond.split(CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _lit(self, cond: torch.Tensor) -> torch.Tensor:
        """lit [B] bool at conditions cond [B, C]: the illumination head's decision."""
        return self._head(cond)[1]

    @torch.no_grad()
    def illumination(self, x, y, depth_m=None, focus_m=None, allow_extrapolation: bool = False) -> torch.Tensor:
        """Relative illumination [B, 3] float32 on the model's device: per channel, the light reaching the
        sensor from (x, y) at depth_m [m] (focused at focus_m [m]) over that on the axis at the same depth and
        focus; 0 outside the lit field.

        Mechanical vignetting as DeepLens traces it (rays lost on apertures and rims), not the cos⁴ law.
        """
        return self._head(self.conditions(x, y, depth_m, focus_m, allow_extrapolation))[0].float()

    def tabulate(self, focus_m=None, **options):
        """Returns a ``PSFTable`` (psfcvae/api/table.py): this model's prior mean precomputed over the field
        and the trained depths at one focus focus_m [m] (a model over focus needs it; inf allowed), whose
        ``psf(x, y, depth_m)`` runs no network; canonical models only.
        options: sizes (radii, angles, depths), target (deviation from the network), dtype,
        allow_extrapolation (a focus outside the trained range)."""

        return PSFTable(self, focus_m=focus_m, **options)

    @torch.no_grad()
    def sample_from_prior(self, coords) -> torch.Tensor:
        """As in the spec: coords [B, C] (x, y[, d]) already in model space -> [B, 3, k, k], z ~ p(z|c): the
        network alone, without the blend that ``psf`` applies."""
        return self.net.sample_from_prior(torch.as_tensor(coords, dtype=torch.float32, device=self.device))

    @torch.no_grad()
    def prior_std(self, x, y, depth_m=None, focus_m=None, allow_extrapolation: bool = False) -> torch.Tensor:
        """The prior's standard deviation per position, RMS over latent dimensions: [B]."""
        _, logvar = self.net.prior_params(self.conditions(x, y, depth_m, focus_m, allow_extrapolation))
        return logvar.exp().mean(dim=1).sqrt()


def _at(values: np.ndarray | None, i: int) -> float | None:
    """values[i] as a float, None for None."""
    return None if values is None else float(values[i])


def _numbers(name: str, value) -> np.ndarray:
    """``value`` as a float64 array of at least one dimension, or an InputError naming the argument.
    Real numbers only: a complex value would lose its imaginary part without a word."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError):
        raw = np.asarray(None)
    if raw.dtype.kind not in "biuf":  # bool, integers, floats: not complex, text, objects or ragged lists
        raise InputError(f"{name} must be a real number or an array of real numbers, got {value!r:.60}")
    return np.atleast_1d(raw.astype(np.float64))


def _choice(name: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got {value!r:.60}")


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a whole number of at least 1, got {value!r:.60}")
    return int(value)


def load_model(path: str | Path, device="auto") -> PSFModel:
    """Load a checkpoint written by ``psf train`` (weights only, safe to load).

    device: "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:K" or a torch.device;
    a CUDA device that is absent is an InputError.
    """
    ckpt = checkpoint.load(path)
    mismatch = f"checkpoint {path} does not match this version's network; retrain with this version"
    # Exactly ModelArgs' keys: the dataclass's defaults would fill a missing one in silently.
    if not isinstance(ckpt["model_args"], dict) or set(ckpt["model_args"]) != {
        f.name for f in dataclasses.fields(ModelArgs)
    }:
        raise InputError(mismatch)
    try:
        net = CVAE(ModelArgs(**ckpt["model_args"]))
        net.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError):
        raise InputError(mismatch) from None
    fingerprint = ckpt["data_fingerprint"] if isinstance(ckpt["data_fingerprint"], dict) else {}
    if not _positive_numbers(fingerprint.get("depths")) or not _focus_values(fingerprint.get("focus")):
        raise InputError(
            f"checkpoint {path} has no valid training depths or focus settings; it was not written by 'psf train' "
            "or was edited"
        )
    info = {k: ckpt[k] for k in ("step", "config", "data_fingerprint", "versions", "selection")}
    info["path"] = str(path)
    info["optics"] = ckpt["optics"]  # kernel pitch for psf render (psfcvae/optics.py); None: the file lacked it
    try:
        blend = (
            None
            if ckpt["blend"] is None
            else Blend.from_state(
                ckpt["blend"], net.args.kernel_size_small, fingerprint["depths"], fingerprint["focus"]
            )
        )
    except (TypeError, KeyError, ValueError, AttributeError):
        raise InputError(
            f"checkpoint {path} holds no valid 'blend'; it was not written by 'psf train' or was edited"
        ) from None
    model = PSFModel(net.eval(), info, blend)
    return model.to(device if isinstance(device, torch.device) else resolve_device(device or "auto"))
