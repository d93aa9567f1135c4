"""The blend of the network with bicubic interpolation of its grid (psfcvae/api/blend.py): the profile, the fit, the
API and the table, and that psf train fits it on the validation points alone."""

from __future__ import annotations

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
    val = {"coords": coords, "depth": np.ones(7), "focus": np.full(7, np.nan), "psf_a": ref, "psf_b": ref}
    fitted = blend.fit(flat, n, [1.0], [np.nan], net, val)
    assert fitted.weights[1] == 1.0 and fitted.points[1] == 6
    # Unless leaving it out would leave its band fewer than MIN_POINTS to fit on: with two others it goes, with one
    # other both stay, and the compact point pulls the weight as without the rule.
    fitted = blend.fit(flat, n, [1.0], [np.nan], net[4:], {key: value[4:] for key, value in val.items()})
    assert fitted.points[1] == 2 and fitted.weights[1] == 1.0
    fitted = blend.fit(flat, n, [1.0], [np.nan], net[5:], {key: value[5:] for key, value in val.items()})
    assert fitted.points[1] == 2 and fitted.weights[1] < 1.0
    # the oracle the rule guards against: with the point scored, the pooled error moves the weight off the network
    mixed = lambda w: blend._mix(np.full(7, w), net, np.full_like(net, 1.0 / k**2))  # noqa: E731
    pooled = [rel_l2_corrected(mixed(w), ref, ref)[1] for w in (1.0, 0.0)]
    assert pooled[1] < pooled[0]


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
    fitted = blend.fit(grid, n, np.array([1.0]), np.array([np.nan]), net, val)
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


def test_a_band_with_too_few_validation_points_keeps_the_network():
    coords = np.array([[0.05, 0.0], [0.3, 0.1], [0.35, 0.0]])  # one near the axis: too few to fit its band
    truth = _field(coords)
    net = _gaussians(2.0 * coords**3 + 2.0, 0.6)  # off everywhere
    lin = np.linspace(-1, 1, 4)
    grid = _field(np.array([(x, y) for y in lin[::-1] for x in lin]))[None]
    val = {"coords": coords, "depth": np.ones(3), "focus": np.full(3, np.nan), "psf_a": truth, "psf_b": truth}
    fitted = blend.fit(grid, 4, np.array([1.0]), np.array([np.nan]), net, val)
    assert fitted.weights[0] == 1.0 and fitted.weights[1] < 1.0
    np.testing.assert_array_equal(fitted.points, [1, 2, 0, 0])


def test_the_api_and_the_table_answer_with_the_blend(tiny_run, tiny_grid):
    model = load_model(tiny_run / "latest.pt", device="cpu")
    assert model.blend is not None and model.blend.fold is not None  # psf train's default; a canonical model
    info = GridFile.open(tiny_grid)
    # in the first octant (x >= y >= 0 on the sensor), where the interpolation is the bicubic baseline on the grid
    # averaged over its mirror images (tested above), as psf eval's 'bicubic (mirror-averaged)'
    x, y = np.array([0.05, 0.4, 0.8]), np.array([0.02, 0.3, 0.1])
    depth = np.array([0.5, 0.9, 2.0])
    net = model.net.sample_from_prior(model.conditions(x, y, depth), mean=True).numpy()
    square = model.blend.fold[0] == model.blend.fold[1]
    sym = baselines.mirror_averaged(info.grid_psfs(), info.grid_size, square)
    bic = baselines.bicubic(sym, info.depths, info.grid_size, x, y, depth)
    plain = baselines.bicubic(info.grid_psfs(), info.depths, info.grid_size, x, y, depth)
    assert np.abs(bic - plain).max() > 1e-3  # the tiny grid's ray noise: the mirror images differ
    model.blend.weights[:] = 0.0  # interpolation alone
    np.testing.assert_allclose(model.psf(x, y, depth).numpy(), bic, atol=2e-3)
    model.blend.weights[:] = 1.0  # the network alone
    np.testing.assert_allclose(model.psf(x, y, depth).numpy(), net, atol=1e-6)
    model.blend.weights[:] = 0.5
    half = 0.5 * (net + bic)
    np.testing.assert_allclose(model.psf(x, y, depth).numpy(), half, atol=2e-3)
    # The table holds the blend: within its interpolation error of model.psf in the octant and out of it (the
    # interpolation is taken in the octant and turned back, as the table takes every point)
    table = model.tabulate(sizes=(64, 16, 16))
    got = table.psf(x, y, depth).numpy()
    assert np.sqrt(((got - half) ** 2).sum() / (half**2).sum()) < 0.03
    assert np.sqrt(((got - net) ** 2).sum() / (net**2).sum()) > 0.03  # not the network's table
    xs, ys = np.array([-0.4, 0.1, -0.7, 0.3]), np.array([0.3, -0.6, -0.2, 0.9])
    want = model.psf(xs, ys, depth[:1]).numpy()
    got = table.psf(xs, ys, depth[:1]).numpy()
    assert np.sqrt(((got - want) ** 2).sum() / (want**2).sum()) < 0.03


def test_draws_keep_the_networks_spread_around_the_blended_mean(tiny_run):
    """mode="sample" where the blend takes interpolation alone (w = 0): the draws differ from each other as the
    network's do (prior_std reports that spread), each shifted by the blend's change of the mean."""
    model = load_model(tiny_run / "latest.pt", device="cpu")
    x, y, depth = np.array([0.05, 0.4]), np.array([0.02, 0.3]), np.array([0.5, 0.9])
    cond = model.conditions(x, y, depth)
    net_mean = model.net.sample_from_prior(cond, mean=True)
    model.blend.weights[:] = 0.0  # interpolation alone: blending each draw would leave no spread at all
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


def test_a_canonical_models_interpolation_has_the_lens_symmetry(tiny_run, tiny_grid):
    """The grid's noisy PSFs are not symmetric; the blend's interpolation of them is, as the lens is: the point
    mirrored in x (in y) gives the kernel with its columns (rows) reversed."""
    model = load_model(tiny_run / "latest.pt", device="cpu")
    model.blend.weights[:] = 0.0  # interpolation alone
    x, y, d = np.array([0.3, 0.7, 0.1]), np.array([0.2, -0.5, 0.6]), np.array([0.5, 1.0, 2.0])
    at = model.psf(x, y, d)
    torch.testing.assert_close(model.psf(-x, y, d), at.flip(-1))
    torch.testing.assert_close(model.psf(x, -y, d), at.flip(-2))
    info = GridFile.open(tiny_grid)  # the plain baseline is not symmetric: the grid holds Monte Carlo noise
    plain = [baselines.bicubic(info.grid_psfs(), info.depths, info.grid_size, u, y, d) for u in (x, -x)]
    assert np.abs(plain[1] - plain[0][..., ::-1]).max() > 1e-3


def _interpolated_references(src, dst, part_value: int) -> None:
    """A copy of grid file src at dst whose lit held-out points of part part_value have the grid's bicubic
    interpolation as their references: a blend fitted on them leans to interpolation (random references, which both
    methods miss, would be left out of the fit: blend.FAIL)."""
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
    assert clean["weights"] == test_changed["weights"] and clean["points"] == test_changed["points"]
    assert torch.equal(clean["grid"], test_changed["grid"])
    val_changed = blend_of("validation", _validation_part(vignetted_grid))
    assert val_changed["weights"] != clean["weights"]


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
    net = model.net.sample_from_prior(cond, mean=True)
    # the blended PSFs model.psf answers with (model.psf would also zero a point its head calls dark)
    answered = rel_l2(model.blended(net, cond).numpy(), val["ref"][lit]).mean()
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
    truth = lookup.interpolate(coords[:, 0], coords[:, 1], one).numpy()  # interpolation exact
    net = np.roll(truth, 2, axis=-1)  # the network 2 px off
    val = {"coords": coords, "depth": one, "focus": np.full(3, np.nan), "psf_a": truth, "psf_b": truth}
    fitted = blend.fit(grid, n, [1.0], [np.nan], net, val, fold)
    np.testing.assert_array_equal(fitted.points, [0, 0, 3, 0])
    assert fitted.weights[2] == 0.0 and fitted.weights[3] == 1.0
