"""The blend of the network with its grid (psfcvae/api/blend.py): the smoothed grid, the profile, the fit, the API and
the table, and that psf train fits it on the validation points alone."""

from __future__ import annotations

import math
import shutil

import h5py
import numpy as np
import pytest
import torch
from helpers import scalars, small_config

from psfcvae import load_model, train
from psfcvae.api import blend
from psfcvae.api.table import anti_transpose
from psfcvae.evaluation import baselines
from psfcvae.evaluation.metrics import rel_l2_corrected
from psfgen.gridfile import GridFile
from psfgen.plan.grid import TEST
from psfgen.shared.metrics import rel_l2


def _gaussians(centres: np.ndarray, sigma, k: int = 9) -> np.ndarray:
    """[M, 3, k, k] normalised Gaussian spots of width sigma (px, scalar or [M]) at sub-pixel offsets centres [M, 2]
    (px, x then y) from the kernel's centre."""
    t = np.arange(k) - k // 2
    s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(centres),))[:, None]
    gx = np.exp(-0.5 * ((t[None, :] - centres[:, :1]) / s) ** 2)  # [M, k] along columns
    gy = np.exp(-0.5 * ((t[None, :] - centres[:, 1:]) / s) ** 2)  # [M, k] along rows
    spot = gy[:, :, None] * gx[:, None, :]
    spot = np.repeat(spot[:, None], 3, axis=1)
    return (spot / spot.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def _field(xy: np.ndarray) -> np.ndarray:
    """A PSF field that bicubic interpolation of a 5 x 5 grid follows to a few per cent, not exactly: the spot moves
    as the cube of the field position and widens with r²."""
    return _gaussians(2.0 * xy**3, 0.6 + 0.8 * (xy**2).sum(axis=1))


def test_profile_holds_each_band_weight_over_the_band_and_turns_to_the_next_just_outside_it():
    w = np.array([0.0, 0.6, 0.8, 1.0])
    r = np.array([0.0, 0.149, 0.15, 0.175, 0.2, 0.5, 0.52, 0.9, 0.95, 1.3])
    # by hand: the first band's 0 up to its edge 0.15, then linear to 0.6 at 0.15 + RAMP (0.05); and so on
    np.testing.assert_allclose(blend.profile(r, w), [0.0, 0.0, 0.0, 0.3, 0.6, 0.6, 0.68, 0.8, 1.0, 1.0])


def test_a_validation_point_both_miss_does_not_choose_the_weight():
    """Six points where the network is exact and interpolation (a flat grid) is not; one compact point that both
    miss by ~100% and that interpolation misses a little less. Pooled, that point would carry the band and take its
    weight to interpolation; it is left out, and the network keeps the band."""
    n, k = 4, 5
    flat = np.full((1, n * n, 3, k, k), 1.0 / k**2, dtype=np.float32)  # every grid PSF flat: bicubic gives flat
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 7)
    coords = 0.3 * np.column_stack([np.cos(angle), np.sin(angle)])  # all in the band [0.15, 0.5)
    t = np.arange(k) - k // 2
    blob = np.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2) / 0.8**2)
    ref = np.repeat((blob / blob.sum())[None, None], 7, axis=0).repeat(3, axis=1).astype(np.float32)
    net = ref.copy()
    ref[6] = 0.0
    ref[6, :, 0, 0] = 1.0  # compact: a delta in one corner
    net[6] = 0.0
    net[6, :, -1, -1] = 1.0  # the opposite corner: 141% off; flat interpolation 98% off
    net_grid = np.broadcast_to(ref[:1], flat.shape)  # the network draws the blob at every grid point
    val = {"coords": coords, "depth": np.ones(7), "focus": np.full(7, np.nan), "psf_a": ref, "psf_b": ref}
    fitted = blend.fit(flat, net_grid, n, [1.0], [np.nan], net[None], val)
    assert fitted.weights[1] == 1.0 and fitted.points[1] == 6
    # Unless leaving it out would leave its band fewer than MIN_POINTS to fit on: with two others it goes, with one
    # other both stay, and the compact point pulls the weight as without the rule.
    fitted = blend.fit(
        flat, net_grid, n, [1.0], [np.nan], net[None, 4:], {key: value[4:] for key, value in val.items()}
    )
    assert fitted.points[1] == 2 and fitted.weights[1] == 1.0
    fitted = blend.fit(
        flat, net_grid, n, [1.0], [np.nan], net[None, 5:], {key: value[5:] for key, value in val.items()}
    )
    assert fitted.points[1] == 2 and fitted.weights[1] < 1.0
    # the oracle the rule guards against: with the point scored, the pooled error moves the weight off the network
    flat_b = torch.full(net.shape, 1.0 / k**2)  # interpolation of the flat grid (detail 0)
    mixed = lambda w: blend.mix(torch.full((7, 1, 1, 1), w), torch.as_tensor(net), flat_b, 0.0).numpy()  # noqa: E731
    pooled = [rel_l2_corrected(mixed(w), ref, ref)[1] for w in (1.0, 0.0)]
    assert pooled[1] < pooled[0]


def test_every_candidate_is_scored_on_the_same_validation_points():
    """A point left out of one candidate's fit but not another's would let the candidate that misses it win on the
    rest. Six points the network gets exactly and a compact seventh it misses by 141%, on a grid of the true blob
    with 20% pixel noise: interpolation of the grid (detail 0) gets the seventh, so it stays in every candidate's
    fit, and the one chosen is good on all seven."""
    n, k = 4, 5
    t = np.arange(k) - k // 2
    blob = np.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2) / 0.8**2)
    blob = (blob / blob.sum()).astype(np.float32)
    noisy = blob * np.random.default_rng(0).uniform(0.8, 1.2, (1, n * n, 3, k, k))
    grid = (noisy / noisy.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)
    angle = np.random.default_rng(1).uniform(0, 2 * np.pi, 7)
    coords = 0.3 * np.column_stack([np.cos(angle), np.sin(angle)])  # all in the band [0.15, 0.5)
    ref = np.broadcast_to(blob, (7, 3, k, k)).copy()
    net = ref.copy()
    net[6] = 0.0
    net[6, :, -1, -1] = 1.0  # the network misses the seventh
    val = {"coords": coords, "depth": np.ones(7), "focus": np.full(7, np.nan), "psf_a": ref, "psf_b": ref}
    fitted = blend.fit(grid, np.broadcast_to(blob, grid.shape), n, [1.0], [np.nan], net[None], val)
    assert fitted.points[1] == 7
    got = fitted.apply(torch.as_tensor(net), coords[:, 0], coords[:, 1], np.ones(7)).numpy()
    assert rel_l2_corrected(got, ref, ref)[1] < 0.2  # the network alone: 113% pooled


@pytest.mark.parametrize(
    "losses, chosen",
    [((1.015, 1.0, 1.1, 1.2, 1.3, 1.4), 0), ((1.03, 1.0, 1.1, 1.2, 1.3, 1.01), 1), ((0.0,) * 6, 0)]
    + [((float("nan"), 1.0, 1.1, 1.2, 1.3, 1.4), 1), ((float("nan"),) * 6, 0)],
)
def test_fit_keeps_the_earliest_candidate_within_the_margin_of_the_lowest(monkeypatch, losses, chosen):
    """Candidates whose validation sums lie within MARGIN (2%) of the lowest are a coin toss: the earliest of them
    wins (an undefined sum never does)."""
    n, k = 3, 5
    grid = np.full((1, n * n, 3, k, k), 1.0 / k**2, dtype=np.float32)
    coords = np.array([[0.3, 0.1], [0.2, 0.25]])
    ref = np.full((2, 3, k, k), 1.0 / k**2, dtype=np.float32)
    val = {"coords": coords, "depth": np.ones(2), "focus": np.full(2, np.nan), "psf_a": ref, "psf_b": ref}
    given = iter(losses)
    monkeypatch.setattr(blend, "_fit_weights", lambda *a, **kw: (np.full(4, 0.5), next(given)))
    fitted = blend.fit(grid, grid, n, [1.0], [np.nan], ref[None], val)
    assert (fitted.smooth, fitted.detail) == blend.CANDIDATES[chosen]
    assert fitted.weights.tolist() == [0.5] * 4


def test_a_checkpoint_blend_out_of_range_is_refused():
    state = {
        "grid": torch.zeros(1, 4, 3, 5, 5, dtype=torch.float16),
        "grid_size": 2,
        "depths": [1.0],
        "focus": [float("nan")],
        "weights": [1.0] * 4,
        "points": [0] * 4,
        "fold": None,
        "smooth": 0.5,
        "detail": 1.0,
        "sigma": float("inf"),
    }
    assert blend.Blend.from_state(state, 5, [1.0], [np.nan]).detail == 1.0
    bad_values = (("detail", 1.5), ("detail", float("nan")), ("smooth", -0.5), ("smooth", float("inf")), ("sigma", 0.0))
    for key, bad in bad_values:
        with pytest.raises(ValueError):
            blend.Blend.from_state({**state, key: bad}, 5, [1.0], [np.nan])
    with pytest.raises(KeyError):
        blend.Blend.from_state({k: v for k, v in state.items() if k != "detail"}, 5, [1.0], [np.nan])


def _mirror_field(xy: np.ndarray) -> np.ndarray:
    """A field with a rotationally symmetric lens's mirror symmetries, in the grid file's orientation (kernel rows
    along -y), and no other: a spot displaced outwards along (x, -y) by 3 r³ px, elongated along the radius."""
    k, t = 9, np.arange(9) - 4
    r = np.hypot(xy[:, 0], xy[:, 1])
    u = np.where(r > 0, xy[:, 0] / np.where(r > 0, r, 1), 1.0)[:, None, None]  # the radial direction
    v = np.where(r > 0, -xy[:, 1] / np.where(r > 0, r, 1), 0.0)[:, None, None]  # in (column, row) pixels
    c, rr = t[None, None, :], t[None, :, None]
    along = (c - 3 * r[:, None, None] ** 3 * u) * u + (rr - 3 * r[:, None, None] ** 3 * v) * v
    across = -(c - 3 * r[:, None, None] ** 3 * u) * v + (rr - 3 * r[:, None, None] ** 3 * v) * u
    spot = np.exp(-0.5 * (along / (0.8 + r[:, None, None])) ** 2 - 0.5 * (across / 0.8) ** 2)
    spot = np.repeat(spot[:, None], 3, axis=1)
    return (spot / spot.sum(axis=(-2, -1), keepdims=True)).reshape(-1, 3, k, k)


@pytest.mark.parametrize("square", [True, False])
def test_mirror_averaged_leaves_a_symmetric_grid_alone_and_averages_each_point_with_its_mirror_images(square):
    n = 6
    lin = np.linspace(-1, 1, n)
    coords = np.array([(x, y) for y in lin[::-1] for x in lin])  # rows from y = +1, as the grid file
    grid = _mirror_field(coords)[None].astype(np.float32)  # [1, P, 3, 9, 9]
    # the oracle: a field that has the mirror symmetries comes back unchanged (a wrong orientation would not)
    np.testing.assert_allclose(baselines.mirror_averaged(grid, n, square), grid, atol=1e-7)
    # noise: each point becomes the mean of its images, the same at every image, whatever the noise was
    noisy = grid * np.random.default_rng(0).uniform(0.5, 1.5, grid.shape).astype(np.float32)
    noisy[0, 0] = 0.0  # a dark corner (top left): left out of its images' means
    noisy[0, n * n - 1, 2] = 0.0  # the bottom-right corner's blue channel dark: its red and green still count
    total = noisy.sum(axis=(-2, -1), keepdims=True)
    noisy = np.where(total > 0, noisy / np.where(total > 0, total, 1), 0.0).astype(np.float32)  # channels sum to 1
    sym = torch.as_tensor(baselines.mirror_averaged(noisy, n, square)).reshape(1, n, n, 3, 9, 9)
    torch.testing.assert_close(sym.flip(2, -1), sym)  # x -> -x
    torch.testing.assert_close(sym.flip(1, -2), sym)  # y -> -y
    diagonal = anti_transpose(anti_transpose(sym).movedim((1, 2), (-2, -1))).movedim((-2, -1), (1, 2))
    assert torch.allclose(diagonal, sym) == square
    images = torch.as_tensor(noisy).reshape(1, n, n, 3, 9, 9)
    top_right = [images[0, 0, -1], images[0, -1, -1].flip(-2), images[0, -1, 0].flip(-2, -1)]  # itself, y, x and y
    if square:
        top_right += [anti_transpose(c) for c in top_right]  # (x, y) -> (y, x): the corner's own diagonal mirror
    want = torch.stack(top_right)
    lit = want.sum(dim=(-2, -1), keepdim=True) > 0  # per image and channel
    want = (want * lit).sum(dim=0) / lit.sum(dim=0)
    torch.testing.assert_close(sym[0, 0, -1], want)
    assert float(sym[0, 0, -1, 2].sum()) == pytest.approx(1.0, abs=1e-5)  # blue: the mean of its lit images alone


def test_fit_chooses_interpolation_where_the_network_is_off_and_the_network_where_it_is_exact():
    """A network right at the grid points but off near the axis between them: its residual on the grid is 0 and
    cannot correct it; interpolation of the grid (detail 0) can."""
    n = 5
    lin = np.linspace(-1, 1, n)
    coords = np.array([(x, y) for y in lin[::-1] for x in lin])  # rows from y = +1, as the grid file
    grid = _field(coords)[None]  # one plane [1, P, 3, k, k]
    rng = np.random.default_rng(0)
    # validation points: 4 near the axis, 4 in each other band
    radii = np.repeat([0.08, 0.3, 0.7, 1.0], 4)
    angles = rng.uniform(0, 2 * np.pi, len(radii))
    val_xy = np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])
    truth = _field(val_xy)
    net = truth.copy()
    centre = radii < 0.15
    net[centre] = _gaussians(2.0 * val_xy[centre] ** 3 + 1.5, 0.6)  # the network's spot 1.5 px off near the axis
    val = {"coords": val_xy, "depth": np.full(len(radii), 1.0), "focus": np.full(len(radii), np.nan)}
    val |= {"psf_a": truth, "psf_b": truth}  # noise-free references
    fitted = blend.fit(grid, grid, n, np.array([1.0]), np.array([np.nan]), net[None], val)
    assert (fitted.smooth, fitted.detail) == (0.0, 0.0)  # the grid itself
    assert fitted.weights[0] == 0.0  # near the axis: interpolation alone
    np.testing.assert_array_equal(fitted.weights[1:], 1.0)  # elsewhere the network is exact: it alone
    np.testing.assert_array_equal(fitted.points, [4, 4, 4, 4])
    # applied: w(r) · network + (1 - w(r)) · the bicubic interpolation of the grid, computed here from the baseline
    # itself; near the axis w is 0, halfway through the turn to the next band's 1 it is 0.5
    for pts, net_pts in ((val_xy[centre], net[centre]), (np.array([[0.175, 0.0]]), _gaussians(np.zeros((1, 2)), 1.0))):
        (x, y), one = pts.T, np.ones(len(pts))
        w = blend.profile(np.hypot(x, y), fitted.weights)[:, None, None, None]
        bic = baselines.bicubic(grid, np.array([1.0]), n, x, y, one)
        got = fitted.apply(torch.as_tensor(net_pts), x, y, one).numpy()
        np.testing.assert_allclose(got, w * net_pts + (1 - w) * bic, atol=2e-3)  # the grid is stored in float16
    assert blend.profile(np.array([0.08, 0.175]), fitted.weights).tolist() == pytest.approx([0.0, 0.5])


def _smoothed_by_hand(grid: np.ndarray, net_grid: np.ndarray, n: int, smooth: float, detail: float) -> np.ndarray:
    """blend.smoothed's oracle, written out point by point: at each grid point and channel, the mean of grid -
    detail · net_grid over the lit grid points within ceil(REACH · smooth) rows and columns, weighted by
    exp(-(di² + dj²) / (2 smooth²)) (the point alone at smooth 0)."""
    g = grid.reshape(len(grid), n, n, 3, -1).astype(np.float64)
    r = g - detail * net_grid.reshape(g.shape)
    out = np.zeros_like(g)
    reach = int(np.ceil(blend.REACH * smooth))
    for p, i, j, ch in np.ndindex(len(g), n, n, 3):
        num, den = 0.0, 0.0
        for di in range(-reach, reach + 1):
            for dj in range(-reach, reach + 1):
                a, b = i + di, j + dj
                if 0 <= a < n and 0 <= b < n and g[p, a, b, ch].sum() > 0:
                    w = np.exp(-(di * di + dj * dj) / (2 * smooth**2)) if smooth > 0 else 1.0
                    num, den = num + w * r[p, a, b, ch], den + w
        out[p, i, j, ch] = num / den if den > 0 else 0.0
    return out.reshape(grid.shape)


@pytest.mark.parametrize("smooth, detail", [(0.5, 1.0), (0.5, 0.0), (0.0, 0.5), (2.0, 1.0)])
def test_the_blends_grid_is_the_grid_less_detail_of_the_network_smoothed_over_lit_neighbours(smooth, detail):
    rng = np.random.default_rng(5)
    n, k = 6, 3
    grid = rng.uniform(size=(2, n * n, 3, k, k)).astype(np.float32)
    grid[0, 7] = 0.0  # a dark grid point: left out of its neighbours' means, and given theirs when smoothed
    grid[1, 20, 1] = 0.0  # one dark channel
    net_grid = rng.uniform(size=grid.shape).astype(np.float32)
    got = blend.smoothed(grid, net_grid, n, smooth, detail)
    assert got.dtype == torch.float16 and got.shape == grid.shape
    want = _smoothed_by_hand(grid, net_grid, n, smooth, detail)
    np.testing.assert_allclose(got.float().numpy(), want, atol=2e-3, rtol=2e-3)
    assert (float(got[0, 7].abs().min()) > 0) == (smooth > 0)
    # a residual the same at every point stays as it is: the smoothing is a weighted mean
    same = blend.smoothed(grid, grid - 0.25, n, smooth, 1.0).float().numpy()
    lit = grid.sum(axis=(-2, -1), keepdims=True) > 0
    np.testing.assert_allclose(same[lit.repeat(k, -2).repeat(k, -1)], 0.25, atol=1e-3)
    assert torch.equal(blend.smoothed(grid, None, n, 0.0, 0.0), torch.as_tensor(grid, dtype=torch.float16))


@pytest.mark.parametrize("n, noise, chosen", [(5, 0.0, (0.0, 1.0)), (9, 0.3, (0.5, 1.0))])
def test_fit_corrects_the_network_by_its_residual_where_its_detail_is_right(n, noise, chosen):
    """A network that draws the field's moving spot 0.2 px too wide (0.1 px on the finer grid): its residual on the
    grid is nearly the same everywhere. On a coarse noise-free grid, which bicubic interpolation cannot follow, the
    fit takes the network corrected by that residual (detail 1); on a finer grid whose PSFs carry 30% pixel noise,
    the residual smoothed too."""
    lin = np.linspace(-1, 1, n)
    coords = np.array([(x, y) for y in lin[::-1] for x in lin])  # rows from y = +1, as the grid file
    wide = 0.2 if n == 5 else 0.1
    network = lambda xy: _gaussians(2.0 * xy**3, 0.6 + 0.8 * (xy**2).sum(axis=1) + wide)  # noqa: E731
    grid = _field(coords)[None] * np.random.default_rng(1).uniform(1 - noise, 1 + noise, (1, n * n, 3, 9, 9))
    grid = (grid / grid.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(0)
    radii = np.repeat([0.08, 0.3, 0.7, 1.0], 4)  # validation points: 4 in each band
    angles = rng.uniform(0, 2 * np.pi, len(radii))
    val_xy = np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])
    truth, net = _field(val_xy), network(val_xy)
    val = {"coords": val_xy, "depth": np.full(len(radii), 1.0), "focus": np.full(len(radii), np.nan)}
    val |= {"psf_a": truth, "psf_b": truth}  # noise-free references
    fitted = blend.fit(grid, network(coords)[None], n, np.array([1.0]), np.array([np.nan]), net[None], val)
    assert (fitted.smooth, fitted.detail) == chosen
    one = np.ones(len(radii))
    got = fitted.apply(torch.as_tensor(net), *val_xy.T, one).numpy()
    interpolated = baselines.bicubic(grid, np.ones(1), n, *val_xy.T, one)
    pooled = lambda k: rel_l2_corrected(k, truth, truth)[1]  # noqa: E731
    assert pooled(got) < 0.8 * min(pooled(net), pooled(interpolated))
    # applied at a grid point, where bicubic interpolation passes through the blend's grid: by hand, the network plus
    # (1 - w) of its residual there (smoothed), clipped and renormalised; at w 0 and at w 0.5
    by_hand = _smoothed_by_hand(grid, network(coords)[None], n, fitted.smooth, 1.0)[0]
    p = n * (n // 2) + n // 2 + 1  # (2 / (n - 1), 0)
    for w in (0.0, 0.5):
        fitted.weights = np.full(4, w)
        x, y = coords[p : p + 1].T
        want = np.clip(network(coords[p : p + 1]) + (1 - w) * by_hand[p], 0, None)
        want /= want.sum(axis=(-2, -1), keepdims=True)
        got = fitted.apply(torch.as_tensor(network(coords[p : p + 1])), x, y, np.ones(1)).numpy()
        np.testing.assert_allclose(got, want, atol=2e-4)  # the grid is stored in float16


def test_a_band_with_too_few_validation_points_keeps_the_network():
    coords = np.array([[0.05, 0.0], [0.3, 0.1], [0.35, 0.0]])  # one near the axis: too few to fit its band
    truth = _field(coords)
    network = lambda xy: _gaussians(2.0 * xy**3 + 2.0, 0.6)  # noqa: E731  off everywhere
    lin = np.linspace(-1, 1, 4)
    nodes = np.array([(x, y) for y in lin[::-1] for x in lin])
    grid = _field(nodes)[None]
    val = {"coords": coords, "depth": np.ones(3), "focus": np.full(3, np.nan), "psf_a": truth, "psf_b": truth}
    fitted = blend.fit(grid, network(nodes)[None], 4, np.array([1.0]), np.array([np.nan]), network(coords)[None], val)
    assert fitted.weights[0] == 1.0 and fitted.weights[1] < 1.0
    np.testing.assert_array_equal(fitted.points, [1, 2, 0, 0])


def _raw_bicubic(grid: np.ndarray, depths, n: int, x, y, depth_m) -> np.ndarray:
    """baselines.bicubic without its clip and normalisation (the blend's B, in numpy): [M, 3, k, k]."""
    row, col = baselines._lattice(n, x, y)
    flat = grid.reshape(grid.shape[:2] + (-1,)).astype(np.float64)
    out = baselines._in_planes(lambda v: baselines._bicubic_field(v, n, row, col), flat, depths, depth_m)
    return out.reshape((len(x),) + grid.shape[2:])


def test_the_api_and_the_table_answer_with_the_blend(tiny_grid, tmp_path, monkeypatch):
    # psf train with the one candidate that reads every part: the network at the grid's points, the smoothing
    monkeypatch.setattr(blend, "CANDIDATES", ((0.5, 1.0),))
    model = load_model(train(small_config(tiny_grid, tmp_path / "r")) / "latest.pt", device="cpu")
    assert model.blend is not None and model.blend.fold is not None  # psf train's default; a canonical model
    assert (model.blend.smooth, model.blend.detail) == (0.5, 1.0)
    info = GridFile.open(tiny_grid)
    n, detail = info.grid_size, model.blend.detail
    # The grid psf train stored, by hand: the grid and the network's prior mean at the grid points, each averaged over
    # the mirror images (tested above), smoothed, the one less the other
    square = model.blend.fold[0] == model.blend.fold[1]
    sym = baselines.mirror_averaged(info.grid_psfs(), n, square)
    assert np.abs(sym - info.grid_psfs()).max() > 1e-3  # the tiny grid's ray noise: the mirror images differ
    prior = lambda x, y, d: model.net.sample_from_prior(model.conditions(x, y, d), mean=True).numpy()  # noqa: E731
    net_grid = np.stack([prior(*info.coords.T, np.full(n * n, d)) for d in info.depths])
    net_grid = baselines.mirror_averaged(net_grid, n, square)
    by_hand = _smoothed_by_hand(sym, net_grid, n, model.blend.smooth, detail)
    np.testing.assert_allclose(model.blend.grid.float().numpy(), by_hand, atol=1e-4, rtol=1e-2)
    # in the first octant (x >= y >= 0 on the sensor), where B is bicubic interpolation of that grid
    x, y = np.array([0.05, 0.4, 0.8]), np.array([0.02, 0.3, 0.1])
    depth = np.array([0.5, 0.9, 2.0])
    net = prior(x, y, depth)
    b = _raw_bicubic(by_hand, info.depths, n, x, y, depth)

    def by_formula(w: float) -> np.ndarray:  # the module's docstring, written out
        k = np.clip(net + (1 - w) * (b - (1 - detail) * net), 0, None)
        return k / k.sum(axis=(-2, -1), keepdims=True)

    for w in (0.0, 1.0, 0.5):
        model.blend.weights[:] = w
        np.testing.assert_allclose(model.psf(x, y, depth).numpy(), by_formula(w), atol=2e-4)
    # The table holds the blend: within its interpolation error of model.psf in the octant and out of it (the
    # interpolation is taken in the octant and turned back, as the table takes every point)
    half = by_formula(0.5)
    table = model.tabulate(sizes=(64, 16, 16))
    got = table.psf(x, y, depth).numpy()
    assert np.sqrt(((got - half) ** 2).sum() / (half**2).sum()) < 0.03
    assert np.sqrt(((got - net) ** 2).sum() / (net**2).sum()) > 0.03  # not the network's table
    xs, ys = np.array([-0.4, 0.1, -0.7, 0.3]), np.array([0.3, -0.6, -0.2, 0.9])
    want = model.psf(xs, ys, depth[:1]).numpy()
    got = table.psf(xs, ys, depth[:1]).numpy()
    assert np.sqrt(((got - want) ** 2).sum() / (want**2).sum()) < 0.03


def test_draws_keep_the_networks_spread_around_the_blended_mean(tiny_run):
    """mode="sample" where the blend takes the network's weight to 0: the draws differ from each other as the
    network's do (prior_std reports that spread), each shifted by the blend's change of the mean."""
    model = load_model(tiny_run / "latest.pt", device="cpu")
    x, y, depth = np.array([0.05, 0.4]), np.array([0.02, 0.3]), np.array([0.5, 0.9])
    cond = model.conditions(x, y, depth)
    net_mean = model.net.sample_from_prior(cond, mean=True)
    model.blend.weights[:] = 0.0  # with detail 0, interpolation alone: blending each draw would leave no spread
    blended_mean = model.psf(x, y, depth)
    torch.manual_seed(3)
    draws = model.psf(x, y, depth, mode="sample", n_samples=4)  # [2, 4, 3, k, k]
    torch.manual_seed(3)
    net_draws = torch.stack([model.net.sample_from_prior(cond) for _ in range(4)], dim=1)
    assert float((net_draws - net_draws.mean(dim=1, keepdim=True)).abs().max()) > 1e-4  # the network has a spread
    want = (net_draws + (blended_mean - net_mean)[:, None]).clamp_min(0.0)
    want = want / want.sum(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(draws, want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(draws.sum(dim=(-2, -1)).numpy(), 1.0, atol=1e-5)
    spread = (draws - draws.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3, 4))
    assert (spread > 1e-4).all()


def test_a_canonical_models_blend_has_the_lens_symmetry(tiny_run, tiny_grid):
    """The grid's noisy PSFs are not symmetric; the blend of them is, as the lens is: the point mirrored in x (in y)
    gives the kernel with its columns (rows) reversed."""
    model = load_model(tiny_run / "latest.pt", device="cpu")
    model.blend.weights[:] = 0.0  # the network's weight 0: the grid's part at its largest
    x, y, d = np.array([0.3, 0.7, 0.1]), np.array([0.2, -0.5, 0.6]), np.array([0.5, 1.0, 2.0])
    at = model.psf(x, y, d)
    torch.testing.assert_close(model.psf(-x, y, d), at.flip(-1))
    torch.testing.assert_close(model.psf(x, -y, d), at.flip(-2))
    info = GridFile.open(tiny_grid)  # the plain baseline is not symmetric: the grid holds Monte Carlo noise
    plain = [baselines.bicubic(info.grid_psfs(), info.depths, info.grid_size, u, y, d) for u in (x, -x)]
    assert np.abs(plain[1] - plain[0][..., ::-1]).max() > 1e-3


def _interpolated_references(src, dst, part_value: int) -> None:
    """A copy of grid file src at dst whose lit held-out points of part part_value have the grid's bicubic
    interpolation as their references: a blend fitted on them leans to the grid (random references, which both the
    network and the grid's part miss, would be left out of the fit: blend.FAIL)."""
    info = GridFile.open(src)
    interpolated = baselines.bicubic(
        info.grid_psfs(), info.depths, info.grid_size, *info.heldout_coords.T, info.heldout_depth
    ).astype(np.float32)
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        part = f["heldout/part"][:]
        for half in ("a", "b"):
            psf = f[f"heldout/psf_{half}"][:]
            at = (part == part_value) & (psf.sum(axis=(1, 2, 3)) > 0)  # lit points only: a dark one holds zeros
            psf[at] = interpolated[at]
            f[f"heldout/psf_{half}"][...] = psf


def _validation_part(grid) -> int:
    """The value of heldout/part that marks grid file ``grid``'s validation points."""
    with h5py.File(grid) as f:
        return int(np.setdiff1d(np.unique(f["heldout/part"][:]), [TEST])[0])


def test_psf_train_fits_the_blend_on_the_validation_points_alone(vignetted_grid, tmp_path):
    """Other references at the test points leave the blend as it is; at the validation points they change it (so
    the comparison can see a point that fits it)."""

    def blend_of(part_name: str, value: int | None) -> dict:
        data = tmp_path / f"{part_name}.h5"
        if value is None:
            shutil.copy(vignetted_grid, data)
        else:
            _interpolated_references(vignetted_grid, data, value)
        run = train(small_config(data, tmp_path / f"run_{part_name}", max_steps=20, val_every=20))
        return torch.load(run / "latest.pt", weights_only=True)["blend"]

    clean, test_changed = blend_of("clean", None), blend_of("test", TEST)
    for key in ("weights", "points", "smooth", "detail"):
        assert clean[key] == test_changed[key]
    assert torch.equal(clean["grid"], test_changed["grid"])
    val_changed = blend_of("validation", _validation_part(vignetted_grid))
    assert any(val_changed[key] != clean[key] for key in ("weights", "smooth", "detail"))


def test_val_blended_rel_l2_is_what_the_api_answers_at_the_validation_points(vignetted_grid, tmp_path):
    """TensorBoard's val_blended_rel_l2 at a checkpoint's step is the mean relative L2 of the blended PSFs, as the
    loaded model answers, on the lit validation points; best.pt stays chosen on the network's own score."""
    data = tmp_path / "leaning.h5"  # validation references that make the blend lean to interpolation
    _interpolated_references(vignetted_grid, data, _validation_part(vignetted_grid))
    run = train(small_config(data, tmp_path / "run", max_steps=20, val_every=10, checkpoint_every=10))
    latest = torch.load(run / "latest.pt", weights_only=True)
    assert min(latest["blend"]["weights"]) < 1.0  # a blend that changes the answer, so the two scores differ
    val = GridFile.open(data).heldout("validation")
    lit = val["ref"].sum(axis=(1, 2, 3)) > 0
    model = load_model(run / "latest.pt", device="cpu")
    x, y, depth = val["coords"][lit, 0], val["coords"][lit, 1], val["depth"][lit]
    cond = model.conditions(x, y, depth, allow_extrapolation=True)
    net, answer = model.net.sample_from_prior(cond, mean=True), model.answer(cond)
    # the blended PSFs model.psf answers with (model.psf would also zero a point its head calls dark)
    answered = rel_l2(answer.numpy(), val["ref"][lit]).mean()
    network = rel_l2(net.numpy(), val["ref"][lit]).mean()
    assert abs(answered - network) > 1e-3
    assert np.isclose(dict(scalars(run, "val_blended_rel_l2"))[latest["step"]], answered, rtol=1e-4)
    assert np.isclose(dict(scalars(run, "val_points_rel_l2"))[latest["step"]], network, rtol=1e-4)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["selection"]["metric"] == "val_points_rel_l2"
    assert np.isclose(best["best_val"], min(v for _, v in scalars(run, "val_points_rel_l2")), rtol=1e-6)


def test_the_blend_is_fitted_once_a_step_and_both_checkpoints_of_that_step_hold_it(tiny_grid, tmp_path, monkeypatch):
    calls = []
    fit = blend.fit
    monkeypatch.setattr(blend, "fit", lambda *a, **k: calls.append(1) or fit(*a, **k))
    # step 2, the last, writes best.pt (its first validation) and latest.pt, then logs the blend
    run = train(small_config(tiny_grid, tmp_path / "r", max_steps=2, val_every=2, checkpoint_every=2))
    assert len(calls) == 1
    best, latest = (torch.load(run / f"{n}.pt", weights_only=True) for n in ("best", "latest"))
    assert best["step"] == latest["step"] == 2
    assert best["blend"]["weights"] == latest["blend"]["weights"] and torch.equal(
        best["blend"]["grid"], latest["blend"]["grid"]
    )


def test_beyond_the_grid_the_weight_turns_to_the_network_without_a_seam():
    """Past the grid's field, depths or focus settings (allow_extrapolation), interpolation only repeats the edge: w
    turns linearly from its value at the edge to 1 over RAMP, so an answer just past the edge is the edge's."""
    rng = np.random.default_rng(4)
    n, k = 5, 7
    grid = rng.uniform(size=(6, n * n, 3, k, k)).astype(np.float32)  # 2 focus x 3 depths
    grid /= grid.sum(axis=(-2, -1), keepdims=True)
    fitted = blend.Blend(
        grid=torch.as_tensor(grid, dtype=torch.float16),
        grid_size=n,
        depths=np.array([0.5, 1.0, 5.0]),
        focus=np.array([1.0, np.inf]),
        weights=np.array([0.2, 0.4, 0.6, 0.0]),
        points=np.full(4, 3),
    )
    one = np.ones(1)
    w = lambda x=0.95, d=1.0, f=2.0: fitted.weight(np.array([x]), np.zeros(1), d * one, f * one)[0]  # noqa: E731
    assert w(x=0.7) == pytest.approx(0.6) and w() == pytest.approx(0.0, abs=1e-12)  # inside: the bands' weights
    # by hand: half a RAMP past each edge is halfway from the edge's weight (0 at r = 1) to 1; a whole RAMP is 1
    span_d, span_f = 1 / 0.5 - 1 / 5.0, 1 / 1.0 - 0.0
    assert w(x=1.0) == pytest.approx(0.0, abs=1e-12)
    assert w(x=1.0 + blend.RAMP / 2) == pytest.approx(0.5) and w(x=1.0 + blend.RAMP) == 1.0
    assert w(x=1.0, d=1 / (2.0 + span_d * blend.RAMP / 2)) == pytest.approx(0.5)
    assert w(x=1.0, d=1 / (0.2 - span_d * blend.RAMP / 2)) == pytest.approx(0.5)
    assert w(x=1.0, f=1 / (1.0 + span_f * blend.RAMP / 2)) == pytest.approx(0.5)
    assert w(x=1.0, d=0.3) == 1.0 and w(x=1.0, d=50.0) == 1.0
    # no seam: the blended answer just past the nearest depth is the one at it
    net = torch.as_tensor(_gaussians(np.zeros((2, 2)), 1.0, k))
    depth = np.array([0.5, 0.5 * (1 - 1e-6)])
    at = fitted.apply(net, np.array([0.9, 0.9]), np.array([0.3, 0.3]), depth, 2 * np.ones(2))
    torch.testing.assert_close(at[1], at[0], atol=1e-5, rtol=0)
    assert not torch.allclose(at[0], net[0], atol=1e-3)  # and it is not the network alone
    # a model of one depth has no span: another depth gets the network alone
    flat = blend.Blend(**{**fitted.__dict__, "grid": fitted.grid[:1], "depths": np.array([1.0]), "_ext": {}})
    flat.focus = np.array([np.nan])
    assert flat.weight(np.array([0.7]), np.zeros(1), np.array([1.0]))[0] == pytest.approx(0.6)
    assert flat.weight(np.array([0.7]), np.zeros(1), np.array([1.01]))[0] == 1.0


def test_on_a_sensor_that_is_not_square_the_blend_keeps_the_diagonal_symmetry():
    """A canonical model's blend looks points up in the first octant, weight included: the point mirrored in the
    sensor's physical diagonal gets the same weight and the transposed interpolation, though its normalised radius
    differs (3:2 landscape); on a portrait sensor a point whose octant image leaves the grid keeps the network."""
    rng = np.random.default_rng(2)
    n, k = 5, 7
    grid = rng.uniform(size=(1, n * n, 3, k, k)).astype(np.float32)  # noisy: no symmetry of its own
    grid /= grid.sum(axis=(-2, -1), keepdims=True)
    sx, sy = 1.0, 2.0 / 3.0
    fitted = blend.Blend(
        grid=torch.as_tensor(grid, dtype=torch.float16),
        grid_size=n,
        depths=np.array([1.0]),
        focus=np.array([np.nan]),
        weights=np.array([0.2, 0.5, 0.7, 0.9]),
        points=np.full(4, 3),
        fold=(sx, sy),
    )
    phys = np.array([[0.6, 0.2], [0.3, 0.5], [0.55, 0.1]])  # inside the sensor both ways round
    x, y = phys[:, 0] / sx, phys[:, 1] / sy
    xm, ym = phys[:, 1] / sx, phys[:, 0] / sy  # the mirror images in the physical diagonal
    assert not np.allclose(np.hypot(x, y), np.hypot(xm, ym))  # their normalised radii differ
    one = np.ones(3)
    np.testing.assert_allclose(fitted.weight(x, y, one), fitted.weight(xm, ym, one))
    got = fitted.interpolate(xm, ym, one)
    torch.testing.assert_close(got, anti_transpose(fitted.interpolate(x, y, one)))
    portrait = blend.Blend(**{**fitted.__dict__, "fold": (sy, sx), "_ext": {}})
    # (0.2, 0.9) on a 2:3 portrait sensor is physical (0.13, 0.9): its octant image x' = 0.9 / (2/3) lies off the grid
    assert portrait.weight(np.array([0.2]), np.array([0.9]), np.ones(1))[0] == 1.0
    assert portrait.weight(np.array([0.2]), np.array([0.3]), np.ones(1))[0] < 1.0


def test_on_a_sensor_that_is_not_square_a_point_fits_the_weight_it_gets():
    """On a 3:2 landscape sensor a canonical model's weight at (0.1, 0.9), in the band [0.9, r_max] by its own
    radius, is taken at its octant image (0.6, 0.15), in [0.5, 0.9): that band's weight is what the point can
    choose, and fit counts it there. Interpolation is exact at the points and the network 2 px off: the band the
    points fall in by their octant images leans to interpolation; counted by their own radius, no weight moved."""
    rng = np.random.default_rng(3)
    n, k = 5, 7
    grid = rng.uniform(size=(1, n * n, 3, k, k)).astype(np.float32)
    grid /= grid.sum(axis=(-2, -1), keepdims=True)
    fold = (1.0, 2.0 / 3.0)
    coords = np.array([[0.1, 0.9], [-0.15, 0.95], [0.05, -0.92]])
    one = np.ones(len(coords))
    lookup = blend.Blend(
        torch.as_tensor(grid, dtype=torch.float16),
        n,
        one[:1],
        np.array([np.nan]),
        np.ones(4),
        np.zeros(4, dtype=np.int64),
        fold,
    )
    fx, fy = lookup.folded(coords[:, 0], coords[:, 1])
    assert (np.hypot(*coords.T) >= 0.9).all() and ((np.hypot(fx, fy) >= 0.5) & (np.hypot(fx, fy) < 0.9)).all()
    truth = blend.normalise(lookup.interpolate(coords[:, 0], coords[:, 1], one)).numpy()  # interpolation exact
    net = np.roll(truth, 2, axis=-1)  # the network 2 px off
    val = {"coords": coords, "depth": one, "focus": np.full(3, np.nan), "psf_a": truth, "psf_b": truth}
    net_grid = np.roll(grid, 2, axis=-1)  # 2 px off at the grid's points too
    fitted = blend.fit(grid, net_grid, n, [1.0], [np.nan], net[None], val, fold)
    np.testing.assert_array_equal(fitted.points, [0, 0, 3, 0])
    assert fitted.weights[2] == 0.0 and fitted.weights[3] == 1.0


def test_fit_scores_points_between_focus_settings_as_the_model_answers_them():
    """Grid focus 0.5 m and inf, depths 0.5 and 2 m; six validation points focused at 2 m and 1 m away, which the
    model answers 3/4 from inf at 2 m and 1/4 from 0.5 m focus at 0.5 m (blend.refocused: the same defocus, held
    at the nearest depth). The network is a spot A at the first side and a wider spot B at the second; the grid is
    a third spot G everywhere, and the truth halfway between the model's network answer N = 3/4 A + 1/4 B and G,
    which the first candidate, interpolation of the grid, gives at w = 0.5 (the earliest of the exact ones: at
    detail 0.5, w = 0 is exact too). Scoring N with equal weights, or either side alone, finds another w."""
    n, k = 4, 7
    centre = np.zeros((6, 2))
    spot_a, spot_b = _gaussians(centre, 0.7, k), _gaussians(centre, 1.6, k)
    spot_g = _gaussians(np.tile([1.0, 0.0], (6, 1)), 1.0, k)
    grid = np.broadcast_to(spot_g[:1], (4, n * n, 3, k, k)).copy()  # 2 focus x 2 depths planes
    angle = np.random.default_rng(2).uniform(0, 2 * np.pi, 6)
    coords = 0.3 * np.column_stack([np.cos(angle), np.sin(angle)])  # all in the band [0.15, 0.5)
    sides = blend.refocused(np.ones(6), np.full(6, 2.0), [0.5, 2.0], [0.5, np.inf])
    np.testing.assert_allclose(sides.t, [[0.75] * 6, [0.25] * 6])  # side 0: inf, side 1: 0.5 m (sorted in 1/focus)
    np.testing.assert_allclose(sides.depth, [[2.0] * 6, [0.5] * 6])
    net = np.stack([spot_a, spot_b])  # [2, 6, 3, k, k]
    truth = 0.5 * (0.75 * spot_a + 0.25 * spot_b) + 0.5 * spot_g
    val = {"coords": coords, "depth": np.ones(6), "focus": np.full(6, 2.0), "psf_a": truth, "psf_b": truth}
    fitted = blend.fit(grid, grid, n, [0.5, 2.0], [0.5, np.inf], net, val)
    assert fitted.weights[1] == 0.5 and fitted.points[1] == 6
    got = fitted.answer(torch.as_tensor(net), coords[:, 0], coords[:, 1], sides).numpy()
    np.testing.assert_allclose(got, truth, atol=2e-5)  # the blend's grid is float16

    # the oracle of the last sentence: the best w of the 21 for the wrong network answers
    def best(wrong: np.ndarray) -> float:
        ws = np.linspace(0, 1, 21)
        return ws[np.argmin([rel_l2_corrected(w * wrong + (1 - w) * spot_g, truth, truth)[1] for w in ws])]

    for wrong in (0.5 * (spot_a + spot_b), spot_a, spot_b):
        assert best(wrong) != 0.5


def test_a_side_that_misses_the_defocus_weighs_less_by_hand():
    # t 3/4 and 1/4, the second side 0.5 1/m off the point's defocus: at sigma 0.5 1/m its factor is e^-1
    sides = blend.refocused([1.0], [2.0], [0.5, 2.0], [0.5, np.inf])
    np.testing.assert_allclose(sides.miss, [[0.0], [0.5]])  # 1/depth 2.5 wanted at 0.5 m focus, 2 held
    assert not blend.refocused([1.0, 2.0], None, [0.5, 2.0], [np.nan]).miss.any()  # one focus: the points
    assert sides.tempered(math.inf) is sides
    want = np.array([0.75, 0.25 / math.e]) / (0.75 + 0.25 / math.e)
    np.testing.assert_allclose(sides.tempered(0.5).t[:, 0], want)
    # both sides far off at a small sigma: no 0/0; the side that misses less keeps the weight, a side of t 0 stays 0
    far = blend.Sides(
        np.ones((2, 2)),
        np.ones((2, 2)),
        np.array([[0.5, 1.0], [0.5, 0.0]]),
        np.zeros((2, 2), bool),
        np.array([[10.0, 20.0], [20.0, 0.0]]),
    )
    np.testing.assert_array_equal(far.tempered(0.05).t, [[1.0, 1.0], [0.0, 0.0]])


def test_fit_chooses_how_much_a_side_that_misses_the_defocus_weighs():
    """The setting of test_fit_scores_points_between_focus_settings_as_the_model_answers_them, whose second side
    (0.5 m focus) is held at the near depth, 0.5 1/m off the points' defocus; the grid is the network at each
    focus (spot A at inf, spot B at 0.5 m), so the weights cannot matter, and the truth is the sides weighed as
    sigma 0.5 weighs them. fit finds that sigma, and the answer is the truth; with t alone it is not."""
    n, k = 4, 7
    spot_a, spot_b = _gaussians(np.zeros((6, 2)), 0.7, k), _gaussians(np.zeros((6, 2)), 1.6, k)
    grid = np.concatenate([np.broadcast_to(s[:1], (2, n * n, 3, k, k)) for s in (spot_b, spot_a)])  # 0.5 m, inf
    angle = np.random.default_rng(3).uniform(0, 2 * np.pi, 6)
    coords = 0.3 * np.column_stack([np.cos(angle), np.sin(angle)])
    net = np.stack([spot_a, spot_b])
    e = 0.25 / math.e
    truth = (0.75 * spot_a + e * spot_b) / (0.75 + e)
    val = {"coords": coords, "depth": np.ones(6), "focus": np.full(6, 2.0), "psf_a": truth, "psf_b": truth}
    fitted = blend.fit(grid, grid, n, [0.5, 2.0], [0.5, np.inf], net, val)
    assert fitted.sigma == 0.5
    sides = blend.refocused(val["depth"], val["focus"], [0.5, 2.0], [0.5, np.inf])
    got = fitted.answer(torch.as_tensor(net), coords[:, 0], coords[:, 1], sides).numpy()
    np.testing.assert_allclose(got, truth, atol=2e-5)
    untempered = 0.75 * spot_a + 0.25 * spot_b
    assert np.abs(untempered - truth).max() > 1e-2
    assert "exp(-(m / 0.5 m⁻¹)²)" in fitted.describe()


@pytest.mark.parametrize(
    "losses, chosen",
    [
        ((1.0, 1.1, 1.2, 0.99, 1.3, 1.4, 1.5), math.inf),  # sigma 0.5 lowest, but t alone within 2%: t alone
        ((1.05, 1.2, 1.01, 1.0, 0.995, 1.4, 1.5), 1.0),  # 0.25 lowest; 1.0, earlier, within 2%
        ((float("nan"), 1.2, 1.1, float("nan"), 1.3, 1.4, 1.5), 1.0),  # an undefined sum never wins
        ((float("nan"),) * 7, math.inf),
    ],
)
def test_fit_keeps_the_earliest_sigma_within_the_margin_of_the_lowest(monkeypatch, losses, chosen):
    sides = blend.refocused(np.ones(2), np.full(2, 2.0), [0.5, 2.0], [0.5, np.inf])  # the second side misses
    k = torch.as_tensor(np.stack([_gaussians(np.zeros((2, 2)), w, 5) for w in (0.7, 1.6)]))
    given = iter(losses)
    monkeypatch.setattr(blend, "_band_sum", lambda *a, **kw: next(given))
    got = blend._fit_sigma(sides, k, [1], np.ones(2, int), k[0].numpy(), k[0].numpy())
    assert got == chosen and next(given, "spent") == "spent"  # every sigma scored once
