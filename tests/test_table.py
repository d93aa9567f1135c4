"""The tabulated prior mean (psfcvae/api/table.py): the network's PSFs at the table's nodes in every
octant of the field, close between them, the network beyond it, dark points from the head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import small_config

import psfcvae
from psfcvae.api import table as table_module
from psfcvae.api.blend import Blend
from psfcvae.api.psfmodel import PSFModel
from psfcvae.api.table import PSFTable
from psfcvae.model.cvae import CVAE, ModelArgs
from psfgen.shared.errors import InputError


def _nodes(table, model, octant_only: bool = False):
    """Every node of a small table on the sensor and (unless octant_only) its images under the
    eight symmetries, as (x, y, depth_m)."""
    R, A, D = table.shape
    r = np.linspace(0, table.r_max, R)
    r[0] = 1e-6 * table.r_max  # the table's first row: one hair off the axis, in each node's direction
    theta = np.linspace(0, math.pi / 4, A)
    code = np.linspace(-1, 1, D)
    lo, hi = 1 / model.depth_range[1], 1 / model.depth_range[0]
    depth = 1 / (lo + (code + 1) / 2 * (hi - lo)) if table.has_depth else np.full(D, model.depth_range[0])
    rr, tt, dd = (a.ravel() for a in np.meshgrid(r, theta, depth, indexing="ij"))
    px, py = rr * np.cos(tt), rr * np.sin(tt)
    images = [(px, py), (-px, py), (px, -py), (-px, -py), (py, px), (-py, px), (py, -px), (-py, -px)]
    x = np.concatenate([a for a, _ in images]) / table.scale[0]
    y = np.concatenate([b for _, b in images]) / table.scale[1]
    d = np.tile(dd, len(images))
    on = (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if octant_only:
        on[len(dd) :] = False
    return x[on], y[on], d[on]


def test_the_table_is_the_network_at_its_nodes_in_every_octant(tiny_run):
    # The network rotates its canonical kernel by the point's angle; the table mirrors and
    # transposes the kernel of the octant's point. At a node they must agree exactly (float32).
    model = psfcvae.load_model(tiny_run / "best.pt", device="cpu")
    assert model.net.canonical
    table = model.tabulate(sizes=(5, 4, 3), dtype=torch.float32)
    x, y, d = _nodes(table, model)
    assert len(x) > 100 and (x < 0).any() and (np.abs(y) > np.abs(x)).any()
    got = table.psf(x, y, d)
    want = model.psf(x, y, d)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)
    # Each channel sums to 1, as the network's do.
    torch.testing.assert_close(got.sum(dim=(-2, -1)), torch.ones(len(x), 3), atol=1e-5, rtol=0)


def _untrained(cond_dim: int, field_scale=(1.0, 1.0), focus=(math.nan,)) -> PSFModel:
    """A small canonical network with random weights: a deterministic, fast field to tabulate. cond_dim counts
    x, y and the depth code; several ``focus`` settings [m] add the focus code."""
    torch.manual_seed(0)
    depths = [1.0, 4.0] if cond_dim == 3 else [1.0]
    over_focus = dict(has_focus=True, focus_min=min(focus), focus_max=max(focus)) if len(focus) > 1 else {}
    args = ModelArgs(
        **over_focus,
        frame="canonical",
        cond_dim=cond_dim + len(over_focus) // 3,
        latent_dim=4,
        hidden_dim=32,
        num_layers=2,
        num_frequencies=3,
        pe_scale=0.5,
        depth_min=min(depths),
        depth_max=max(depths),
        field_scale=field_scale,
    )
    return PSFModel(CVAE(args).eval(), {"data_fingerprint": {"depths": depths, "focus": list(focus)}})


@pytest.mark.parametrize("cond_dim, field_scale", [(3, (1.0, 0.6)), (2, (0.75, 1.0))])
def test_nodes_on_a_non_square_sensor_and_without_depth(cond_dim, field_scale):
    # x and y are normalised to different half-sides: the octant and the mirrors live in
    # physical units. A model of one depth has a table of one depth.
    model = _untrained(cond_dim, field_scale)
    table = model.tabulate(sizes=(6, 5, 3), dtype=torch.float32)
    assert table.shape[2] == (3 if cond_dim == 3 else 1)
    x, y, d = _nodes(table, model)
    assert (np.abs(x) > np.abs(y)).any() and (np.abs(y) > np.abs(x)).any()
    torch.testing.assert_close(table.psf(x, y, d), model.psf(x, y, d), atol=2e-6, rtol=1e-4)
    # Sizes it picks for itself (one depth without depth, where it used to refuse): near its target.
    rng = np.random.default_rng(1)
    x, y, d = rng.uniform(-1, 1, 400), rng.uniform(-1, 1, 400), rng.uniform(*model.depth_range, 400)
    assert model.tabulate(target=0.02).deviation(x, y, d) < 0.04


def test_a_table_at_one_focus_is_the_network_at_that_focus():
    model = _untrained(3, focus=(0.5, 2.0, math.inf))
    assert model.net.args.cond_dim == 4 and model.focus_range == (0.5, math.inf)
    tables = {}
    for focus in (0.5, 1.0, math.inf):  # at a grid focus, between two, at infinity
        tables[focus] = table = model.tabulate(focus_m=focus, sizes=(5, 4, 3), dtype=torch.float32)
        x, y, d = _nodes(table, model)
        torch.testing.assert_close(table.psf(x, y, d), model.psf(x, y, d, focus_m=focus), atol=2e-6, rtol=1e-4)
        ox, oy, od = _nodes(table, model, octant_only=True)  # the head is the network's at the octant's point
        torch.testing.assert_close(
            table.illumination(ox, oy, od), model.illumination(ox, oy, od, focus_m=focus), atol=1e-5, rtol=1e-4
        )
        # the saved table keeps its focus
        assert PSFTable.from_state(model, table.state()).focus_m == focus
    # the focus is an input: the tables differ far beyond their match with the network
    assert (tables[0.5].psf(x, y, d) - tables[math.inf].psf(x, y, d)).abs().max() > 10 * 2e-6
    with pytest.raises(InputError, match="give focus_m"):
        model.tabulate(sizes=(5, 4, 3))
    with pytest.raises(InputError, match="focus_m 0.3 m is outside the trained focus range 0.5-inf m; pass allow_"):
        model.tabulate(focus_m=0.3, sizes=(5, 4, 3))
    # what that error asks for: a table beyond the trained focus, the network extrapolated there (its queries
    # extrapolate too, as model.psf's do), saved and read back
    table = model.tabulate(focus_m=0.3, allow_extrapolation=True, sizes=(5, 4, 3), dtype=torch.float32)
    x, y, d = _nodes(table, model)
    want = model.psf(x, y, d, focus_m=0.3, allow_extrapolation=True)
    torch.testing.assert_close(table.psf(x, y, d, allow_extrapolation=True), want, atol=2e-6, rtol=1e-4)
    assert PSFTable.from_state(model, table.state()).focus_m == 0.3


def test_between_nodes_a_finer_table_is_closer_to_the_network(tiny_run):
    model = psfcvae.load_model(tiny_run / "best.pt", device="cpu")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, 300), rng.uniform(-1, 1, 300)
    d = rng.uniform(*model.depth_range, 300)
    coarse = model.tabulate(sizes=(3, 2, 2)).deviation(x, y, d)
    fine = model.tabulate(sizes=(33, 9, 9)).deviation(x, y, d)
    assert fine < 0.25 * coarse, (coarse, fine)
    # The sizes it chooses for itself keep it near its target.
    chosen = model.tabulate(target=0.01)
    assert chosen.deviation(x, y, d) < 0.02
    assert math.prod(model.tabulate(target=0.005).shape) > math.prod(chosen.shape)


def test_a_blended_models_table_puts_its_depth_nodes_on_the_grid_depths():
    # The blend interpolates the grid linearly in 1/depth between its depths, so the prior mean bends at each: on the
    # grid's depths, the nodes leave every table interval inside one straight piece.
    at = (np.arange(17) / 16)[::-1]  # the Cooke triplet's 17 depths, even in 1/depth
    assert table_module.on_grid_depths(48, at, 200) == 49 and table_module.on_grid_depths(49, at, 200) == 49
    assert table_module.on_grid_depths(9, np.array([1.0, 4 / 9, 0.0]), 200) == 10  # 0.5, 1, 5 m: 1/d at 2, 1, 0.2
    assert table_module.on_grid_depths(9, np.array([1.0, 1 / math.pi, 0.0]), 200) == 9  # none up to 18: as chosen
    assert table_module.on_grid_depths(40, at, 45) == 40  # 49 would pass the most the table may hold
    # A model whose blend is interpolation alone (weights 0) of a grid that is one kernel per depth (so that no
    # bicubic overshoot is clipped): between depth nodes, its table is the model itself, to float precision.
    model = _untrained(3)  # depths 1 to 4 m
    n, depths = 5, 1 / np.linspace(1.0, 0.25, 5)  # five grid depths even in 1/depth
    plane = np.random.default_rng(3).uniform(size=(5, 1, 3, 15, 15)).astype(np.float32)
    grid = np.repeat(plane / plane.sum(axis=(-2, -1), keepdims=True), n * n, axis=1)
    model.blend = Blend(
        grid=torch.as_tensor(grid, dtype=torch.float16),
        grid_size=n,
        depths=depths,
        focus=np.array([np.nan]),
        weights=np.zeros(4),
        points=np.full(4, 3),
        fold=(1.0, 1.0),
    )
    table = model.tabulate(target=0.02, dtype=torch.float32)
    assert (table.shape[2] - 1) % 4 == 0, table.shape
    x, y, _ = _nodes(table, model, octant_only=True)
    d = np.random.default_rng(4).uniform(1.0, 4.0, len(x))
    torch.testing.assert_close(table.psf(x, y, d), model.psf(x, y, d), atol=2e-6, rtol=1e-4)


def test_beyond_the_table_the_network_answers(tiny_run):
    model = psfcvae.load_model(tiny_run / "best.pt", device="cpu")
    table = model.tabulate(sizes=(5, 4, 3))
    far = 3 * model.depth_range[1]  # past the trained depths: no table there
    x, y, d = np.array([0.3, -0.5, 0.2]), np.array([0.1, 0.4, -0.9]), np.array([far, 1.0, far])
    got = table.psf(x, y, d, allow_extrapolation=True)
    want = model.psf(x, y, d, allow_extrapolation=True)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]])  # from the network itself
    assert float((got[1] - want[1]).abs().max()) < 0.05  # point 1 lies in the table: close, not equal
    with pytest.raises(InputError, match="outside the trained range"):
        table.psf(x, y, d)


def test_dark_points_follow_the_illumination_head(vignetted_grid, tmp_path):
    # The small vignetted run of conftest is cartesian (its 4 x 4 file does not pass the symmetry
    # check); a canonical one, trained long enough for its illumination head to call the corners dark.
    cfg = small_config(vignetted_grid, tmp_path / "v", condition_frame="canonical", max_steps=150, val_every=150)
    model = psfcvae.load_model(psfcvae.train(cfg) / "best.pt", device="cpu")
    table = model.tabulate(sizes=(17, 9, 3))
    x, y, d = _nodes(table, model, octant_only=True)
    _, lit = table.psf(x, y, d, allow_dark=True)
    _, want = model.psf(x, y, d, allow_dark=True)
    assert (~lit).any() and lit.any()  # the corners of this lens are dark
    assert torch.equal(lit, want.cpu())
    # The head of a canonical model sees the radius alone: at one radius on the sensor (units of the longer
    # half-side; the corner at 1.2), every direction gets the same illumination and the same lit/dark answer. Given
    # (x, y), on LA1131's 3:2 field, the head made a lit point dark (psfcvae/model/illumination.py).
    sx, sy = model.net.args.field_scale
    assert sx != sy  # the LA1131's sensor is not square: x and y are not the radius
    angles = np.linspace(0.0, 2 * np.pi, 13)
    for r in (0.3, 0.9, 1.15):
        px, py = r * np.cos(angles) / sx, r * np.sin(angles) / sy
        keep = (np.abs(px) <= 1) & (np.abs(py) <= 1)
        light = model.illumination(px[keep], py[keep], 1.0)
        _, round_lit = model.psf(px[keep], py[keep], 1.0, allow_dark=True)
        assert keep.sum() >= 3
        torch.testing.assert_close(light, light[:1].expand_as(light), atol=1e-5, rtol=1e-5)
        assert bool(round_lit.all()) or not bool(round_lit.any())
    # The table holds the head's answer for the first octant; the other seven are its images.
    x, y, d = _nodes(table, model)
    psf, lit = table.psf(x, y, d, allow_dark=True)
    a, b = np.abs(x * table.scale[0]), np.abs(y * table.scale[1])
    octant = np.round(np.stack([np.maximum(a, b), np.minimum(a, b), d], axis=1), 9)  # the octant's point
    keys, which = np.unique(octant, axis=0, return_inverse=True)
    assert len(keys) < len(x)
    for k in range(len(keys)):
        assert len(set(lit[which.ravel() == k].tolist())) == 1
    assert (~lit).any() and float(psf[~lit].abs().sum()) == 0.0
    with pytest.raises(InputError, match="outside the lens's lit field"):
        table.psf(x[~lit.numpy()], y[~lit.numpy()], d[~lit.numpy()])


def test_a_cartesian_model_has_no_table():
    net = CVAE(ModelArgs(latent_dim=4, hidden_dim=8, num_layers=1, num_frequencies=1))
    model = PSFModel(net, {"data_fingerprint": {"depths": [1.0], "focus": [np.nan]}})
    with pytest.raises(InputError, match="canonical-frame model"):
        model.tabulate()
    with pytest.raises(InputError, match="target deviation must be between 0 and 1, got 0"):
        _untrained(3).tabulate(target=0)
