"""One model over field, depth and focus (issue 25): training over planes f*D + d, the focus code φ, focus_m across
the API, FieldMap over focus, and psf sample / psf render --focus-m. A single-focus file conditions as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_focus_grid, run_cli, scalars, small_config

from psfcvae import load_model, train
from psfcvae.api import blend
from psfcvae.api.psfmodel import PSFModel
from psfcvae.rendering.chart import rgbd_scene
from psfcvae.rendering.imageio import read_image, write_image
from psfcvae.training.data import Conditions, depth_codes
from psfcvae.training.loop import model_args_for, resolve
from psfgen.gridfile import GridFile
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2

FOCUS = (0.5, math.inf)


@pytest.fixture(scope="module")
def focus_grid(tmp_path_factory):
    """A tiny grid traced focused at 0.5 m and at infinity (2 focus settings x 2 depths): read-only."""
    return make_focus_grid(tmp_path_factory.mktemp("focus"), FOCUS)


@pytest.fixture(scope="module")
def focus_run(focus_grid, tmp_path_factory):
    """A small canonical model trained a few steps on focus_grid: its run directory."""
    run_dir = tmp_path_factory.mktemp("focusrun") / "run"
    return train(small_config(focus_grid, run_dir, max_steps=10, val_every=5, checkpoint_every=5))


def test_a_single_focus_file_conditions_as_before(tiny_grid):
    # The network and its conditioning table of a file without focus settings: (x, y, d), no focus input.
    info = GridFile.open(tiny_grid)
    assert info.n_focus == 1 and info.n_planes == len(info.depths)
    args = model_args_for(resolve(small_config(tiny_grid, "unused"), info), info)
    assert args.cond_dim == 3 and args.has_depth and not args.has_focus
    conds = Conditions(info.coords, info.depths, info.neighbors, True, "cpu", info.lit, info.focus)
    D, P = len(info.depths), len(info.coords)
    codes = np.broadcast_to(depth_codes(info.depths)[:, None, None], (D, P, 1))
    table = np.concatenate([np.broadcast_to(info.coords[None], (D, P, 2)), codes], axis=2)
    torch.testing.assert_close(conds.table, torch.as_tensor(table, dtype=torch.float32), rtol=0, atol=0)


def test_neighbours_cross_depth_within_a_focus_and_focus_at_a_depth():
    # 3 focus settings x 2 depths of a 2-point field: plane p = f*2 + d.
    coords = np.array([[0.0, 0.0], [1.0, 0.0]])
    conds = Conditions(coords, np.array([1.0, 4.0]), np.array([[0, 1]]), True, "cpu", focus=np.array([0.5, 2, np.inf]))
    assert conds.table.shape == (6, 2, 4)
    torch.testing.assert_close(conds.table[:, 0, 3], torch.tensor([1.0, 1, -0.5, -0.5, -1, -1]))  # φ: linear in 1/focus
    torch.testing.assert_close(conds.table[:, 0, 2], torch.tensor([1.0, -1, 1, -1, 1, -1]))  # d, 1/depth
    for plane, others in ((0, {1, 2}), (1, {0, 3}), (2, {3, 0, 4}), (3, {2, 1, 5}), (5, {4, 3})):
        src, cond = conds.pairs(torch.tensor([0]), torch.tensor([plane]))
        rows = {tuple(c.tolist()) for c in cond}
        want = {tuple(conds.table[plane, 1].tolist())} | {tuple(conds.table[p, 0].tolist()) for p in others}
        assert rows == want and len(src) == len(want), plane  # never across a focus boundary by a depth step
    assert conds.dark_pairs(np.array([[0, 1]])) == 0


def test_cond_dim_counts_depth_and_focus(tiny_grid):
    info = GridFile.open(tiny_grid)

    class OneDepthTwoFocus:  # the file facts resolve and model_args_for read
        grid_size, kernel_size_small, depths, path, sensor_size_mm = 4, 15, np.array([1.0]), "x.h5", (1.0, 1.0)
        focus, n_focus, n_planes = np.array([0.5, np.inf]), 2, 2

    cfg = resolve(small_config(tiny_grid, "unused", condition_frame="cartesian"), info)
    args = model_args_for(cfg, OneDepthTwoFocus)  # condition_on_depth true here: (x, y, d, φ)
    assert args.cond_dim == 4 and args.has_focus and (args.focus_min, args.focus_max) == FOCUS
    no_depth = model_args_for(small_config(tiny_grid, "u", condition_frame="cartesian", condition_on_depth="false"),
                              OneDepthTwoFocus)  # fmt: skip
    assert no_depth.cond_dim == 3 and no_depth.has_focus and not no_depth.has_depth


def test_a_model_over_focus_trains_and_conditions_on_the_focus(focus_grid, focus_run):
    info = GridFile.open(focus_grid)
    model = load_model(focus_run / "latest.pt", device="cpu")
    assert model.net.args.cond_dim == 4 and model.net.args.has_focus
    np.testing.assert_array_equal(model.focus, info.focus)
    assert model.focus_range == FOCUS and "focus [0.5, inf] m" in repr(model)
    # The API's conditions at every grid plane are the training table's.
    conds = Conditions(info.coords, info.depths, info.neighbors, True, "cpu", info.lit, info.focus)
    x, y = info.coords[:, 0], info.coords[:, 1]
    for p in range(info.n_planes):
        got = model.conditions(x, y, info.plane_depth[p], focus_m=info.plane_focus[p])
        torch.testing.assert_close(got, conds.table[p])
    # psf() at each focus differs, and is the network's prior mean at the condition with that focus.
    depth = 2.0
    psfs = {}
    for f, phi in zip(FOCUS, (1.0, -1.0)):
        psfs[f] = model.psf(x, y, depth, focus_m=f)
        cond = torch.as_tensor(
            np.column_stack([x, y, np.full_like(x, -1.0), np.full_like(x, phi)]), dtype=torch.float32
        )
        assert torch.equal(psfs[f], model.net.sample_from_prior(cond, mean=True))
    assert (psfs[0.5] - psfs[math.inf]).abs().max() > 1e-6
    mid = model.psf(x, y, depth, focus_m=np.full(len(x), 1.0))  # one focus per point works too
    assert mid.shape == psfs[0.5].shape


def test_the_defocus_code_feeds_the_networks_1_over_depth_minus_1_over_focus(focus_grid):
    from psfcvae.model.cvae import CVAE

    # focus_code defocus: the networks see (x, y, δ, φ), δ linear in 1/depth - 1/focus over its training range.
    info = GridFile.open(focus_grid)
    cfg = resolve(small_config(focus_grid, "unused", condition_frame="cartesian", focus_code="defocus"), info)
    net = CVAE(model_args_for(cfg, info))
    depth = np.array([info.depths.min(), info.depths.max(), 1.0, 1.0])
    focus = np.array([math.inf, 0.5, 0.5, math.inf])
    seen = net._frame(net.condition(np.zeros((4, 2)), depth, focus))[0]
    defocus = 1.0 / depth - 1.0 / focus
    low = 1.0 / info.depths.max() - 1.0 / 0.5  # farthest depth at the nearest focus
    high = 1.0 / info.depths.min() - 0.0  # nearest depth at focus infinity
    torch.testing.assert_close(seen[:, 2], torch.tensor(2 * (defocus - low) / (high - low) - 1, dtype=torch.float32))
    torch.testing.assert_close(seen[:, 3], torch.tensor([-1.0, 1.0, 1.0, -1.0]))  # φ as it was
    assert seen[0, 2] == 1 and seen[1, 2] == -1
    # The inverse code (the default) leaves d: the networks see the condition itself.
    plain = CVAE(model_args_for(resolve(small_config(focus_grid, "u", condition_frame="cartesian"), info), info))
    cond = plain.condition(np.zeros((4, 2)), depth, focus)
    assert torch.equal(plain._frame(cond)[0], cond)


def test_focus_outside_the_range_is_refused_unless_extrapolating(focus_run, tiny_run):
    model = load_model(focus_run / "latest.pt", device="cpu")
    with pytest.raises(InputError, match="trained on focus 0.5-inf m: give focus_m"):
        model.psf(0.0, 0.0, 1.0)
    with pytest.raises(InputError, match="focus_m 0.3 m is outside the trained focus range 0.5-inf m; pass allow_ext"):
        model.psf(0.0, 0.0, 1.0, focus_m=0.3)
    assert model.psf(0.0, 0.0, 1.0, focus_m=0.3, allow_extrapolation=True).shape[0] == 1
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(InputError, match="focus_m must be a positive number of metres"):
            model.psf(0.0, 0.0, 1.0, focus_m=bad, allow_extrapolation=True)
    with pytest.raises(InputError, match="focus_m must be one focus or one per point"):
        model.psf([0.0, 0.1], [0.0, 0.0], 1.0, focus_m=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="focus_m 0.3 m is outside"):
        model.height_at(0.5, 0.5, 1.0, focus_m=0.3)
    # A single-focus model takes no other focus, extrapolating or not.
    single = load_model(tiny_run / "latest.pt", device="cpu")
    assert single.focus.shape == (1,) and math.isnan(single.focus_range[0])
    for allow in (False, True):
        with pytest.raises(InputError, match="trained at one focus .*: leave out focus_m"):
            single.psf(0.0, 0.0, 1.0, focus_m=2.0, allow_extrapolation=allow)


def test_a_model_trained_at_one_focus_at_infinity_takes_that_focus(tiny_run):
    # A single-focus file traced with --focus-m inf: its model takes focus_m=inf (its own focus), as one trained
    # at 2 m takes 2, and refuses any other naming infinity as its focus.
    model = load_model(tiny_run / "latest.pt", device="cpu")
    fingerprint = {**model.info["data_fingerprint"], "focus": [math.inf]}
    at_inf = PSFModel(model.net, {**model.info, "data_fingerprint": fingerprint})
    want = at_inf.psf(0.5, 0.5, 1.0)
    assert torch.equal(at_inf.psf(0.5, 0.5, 1.0, focus_m=math.inf), want)
    with pytest.raises(InputError, match=r"trained at one focus \(infinity\): leave out focus_m"):
        at_inf.psf(0.5, 0.5, 1.0, focus_m=2.0)


def test_the_field_map_at_a_grid_focus_is_the_files_chief_rays(focus_grid, focus_run):
    info = GridFile.open(focus_grid)
    model = load_model(focus_run / "latest.pt", device="cpu")
    x, y = info.coords[:, 0], info.coords[:, 1]
    for p in range(info.n_planes):
        hx, hy = model.height_at(x, y, info.plane_depth[p], focus_m=info.plane_focus[p])
        np.testing.assert_allclose(np.column_stack([hx, hy]), info.chief_mm[p], rtol=0, atol=1e-9)
    # Refocusing moves the landing points: the two focus settings' chief rays differ (the field map follows).
    assert np.abs(info.chief_mm[info.plane(0, 0)] - info.chief_mm[info.plane(1, 0)]).max() > 1e-6
    # Between the grid's focus settings: linear in 1/focus (2 m is a quarter of the way from inf to 0.5 m).
    d = info.depths[0]
    hx, _ = model.height_at(x, y, d, focus_m=2.0)
    near, far = info.chief_mm[info.plane(0, 0), :, 0], info.chief_mm[info.plane(1, 0), :, 0]
    np.testing.assert_allclose(hx, 0.25 * near + 0.75 * far, rtol=0, atol=1e-9)


def test_sample_and_render_take_focus_m(focus_run, tmp_path):
    ckpt = str(focus_run / "latest.pt")
    model = load_model(ckpt, device="cpu")
    outs = {}
    for f in ("0.5", "inf"):
        out = tmp_path / f"p{f}.npz"
        args = ["sample", "--checkpoint", ckpt, "--coords", "0,0;0.5,0.5", "--depth", "2", "--focus-m", f]
        r = run_cli([*args, "--out", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs[f] = np.load(out)
        assert float(outs[f]["focus_m"]) == float(f)
        np.testing.assert_allclose(outs[f]["psf"], model.psf([0, 0.5], [0, 0.5], 2.0, focus_m=float(f)).numpy())
    assert np.abs(outs["0.5"]["psf"] - outs["inf"]["psf"]).max() > 1e-6
    base = ["sample", "--checkpoint", ckpt, "--coords", "0,0", "--depth", "2", "--out", str(tmp_path / "x.npz")]
    assert_one_line_error(run_cli(base), "give --focus-m")
    assert_one_line_error(run_cli([*base, "--focus-m", "0.2"]), "--focus-m 0.2 m is outside", "--allow-extrapolation")
    # psf render: a refocused photograph of a scene with a depth map, its table cached per focus.
    image, depth = rgbd_scene(12, 12, 0.5, 2.0)
    src, dmap = tmp_path / "scene.png", tmp_path / "scene.npy"
    write_image(src, image, 8)
    np.save(dmap, depth.numpy())
    shots = {}
    for f in ("0.5", "inf"):
        out = tmp_path / f"r{f}.png"
        args = ["render", "--checkpoint", ckpt, "--image", str(src), "--depth-map", str(dmap), "--focus-m", f]
        r = run_cli([*args, "--out", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        shots[f] = read_image(out)[0]
        assert (focus_run / f"latest.pt.focus-{float(f):.9g}.table").is_file()
    assert (shots["0.5"] - shots["inf"]).abs().max() > 0
    r = run_cli(["render", "--checkpoint", ckpt, "--image", str(src), "--depth", "1", "--out", str(tmp_path / "n.png")])
    assert_one_line_error(r, "give --focus-m")


def test_bench_inference_queries_a_model_over_focus_at_the_focus_it_traces(focus_run, monkeypatch, caplog):
    import importlib.util
    import logging
    import sys

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "benchmarks" / "bench_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--checkpoint", str(focus_run / "latest.pt"), "--spp", "500", "--trace-points", "2", "--batch", "32"]
    monkeypatch.setattr(sys, "argv", ["bench_inference.py", *args])
    with caplog.at_level(logging.INFO):
        bench.main()
    assert "model prior mean" in caplog.text and "table prior mean" in caplog.text  # model.psf (blended) and table


def test_between_focus_settings_the_model_asks_its_neighbours_at_the_same_defocus():
    # By hand: grid focus 0.5 m, 1 m, inf (1/focus 2, 1, 0) and depths 0.4-20 m (1/depth 2.5-0.05).
    depths, focus = [0.4, 0.8, 20.0], [0.5, 1.0, math.inf]
    points = {  # (depth, focus) m: {side's (depth, focus): t}
        (1.0, 2.0): {(2.0, math.inf): 0.5, (2 / 3, 1.0): 0.5},  # defocus 1 - 0.5 = 0.5: 1/depth 0.5 and 1.5
        (0.4, 2 / 3): {(0.5, 1.0): 0.5, (0.4, 0.5): 0.5},  # defocus 1: 1/depth 2, and 3 held at the nearest depth
        (5.0, 4.0): {(20.0, math.inf): 0.75, (1 / 0.95, 1.0): 0.25},  # defocus -0.05: beyond 20 m at inf, held there
        (0.8, 1.0): {(0.8, 1.0): 1.0},  # at a grid focus: the point itself
        (0.8, 1.0000001): {(0.8, 1.0000001): 1.0},  # as a float32 focus code gives a grid focus: on it
        (0.8, 0.3): {(0.8, 0.3): 1.0},  # beyond the grid's focus settings: itself (the network, allow_extrapolation)
    }
    sides = blend.refocused([d for d, _ in points], [f for _, f in points], depths, focus)
    assert sides.depth.shape == sides.focus.shape == sides.t.shape == (2, len(points))
    np.testing.assert_allclose(sides.t.sum(axis=0), 1.0)
    for i, (point, want) in enumerate(points.items()):
        got = {(sides.depth[s, i], sides.focus[s, i]): sides.t[s, i] for s in range(2) if sides.t[s, i] > 0}
        assert len(got) == len(want), point
        for (d, f), t in want.items():
            match = [k for k in got if np.isclose(k[0], d, rtol=1e-4) and np.isclose(k[1], f, rtol=1e-12)]
            assert match and np.isclose(got[match[0]], t, rtol=1e-4), (point, got)
        if len(want) == 1:  # the point itself, its depth exactly and flagged as such (its condition is reused)
            s = int(np.argmax(sides.t[:, i]))
            assert sides.depth[s, i] == point[0] and sides.itself[s, i]
    # how far each side's defocus lies from the point's: 1/depth 3 held at 2.5; -0.05 held at 0.05; else 0
    # (the side held: at 0.5 m focus, the larger 1/focus, side 1; at inf, side 0)
    miss = {(0.4, 2 / 3): [0.0, 0.5], (5.0, 4.0): [0.1, 0.0]}
    for i, point in enumerate(points):
        np.testing.assert_allclose(sides.miss[:, i], miss.get(point, [0.0, 0.0]), atol=1e-12, err_msg=str(point))
    one = blend.refocused([1.0, 2.0], None, depths, [np.nan])  # one focus setting: the points themselves
    assert one.t.shape == (1, 2) and one.focus is None and np.array_equal(one.depth[0], [1.0, 2.0])


def test_the_model_between_focus_settings_is_its_answers_at_them_and_its_table_agrees(focus_run):
    # focus_run: grid focus 0.5 m and inf, depths 0.5 and 2 m. At 1 m focus (1/focus 1, halfway) and 1 m depth the
    # defocus is 0: at 0.5 m focus that is 1/depth 2 (0.5 m); at inf 1/depth 0, beyond the far depth: 2 m.
    # The side at inf is held at 2 m, 0.5 1/m off that defocus: it weighs exp(-(0.5 / sigma)²) of the other's.
    model = load_model(focus_run / "latest.pt", device="cpu")
    assert model.blend is not None
    x, y = np.array([0.0, 0.3, -0.6]), np.array([0.0, 0.5, 0.2])
    far = math.exp(-((0.5 / model.blend.sigma) ** 2))
    near = model.psf(x, y, 0.5, focus_m=0.5)
    want = (near + far * model.psf(x, y, 2.0, focus_m=math.inf)) / (1 + far)
    torch.testing.assert_close(model.psf(x, y, 1.0, focus_m=1.0), want, atol=1e-6, rtol=1e-5)
    # the network at that point is not that answer within the same tolerance: the test can fail (the 10-step
    # network is nearly flat, so the margin is small)
    cond = model.conditions(x, y, 1.0, focus_m=1.0)
    assert not torch.allclose(model.net.sample_from_prior(cond, mean=True), want, atol=1e-6, rtol=1e-5)
    # sample mode: each draw keeps its offset from the network's mean at the point, around that answer
    torch.manual_seed(0)
    draw = model.psf(x, y, 1.0, focus_m=1.0, mode="sample")
    torch.manual_seed(0)
    raw = model.net.sample_from_prior(cond)  # the same draw of z
    offset = raw + (want - model.net.sample_from_prior(cond, mean=True))
    torch.testing.assert_close(draw, offset / offset.sum(dim=(-2, -1), keepdim=True), atol=1e-6, rtol=1e-5)
    # the table at that focus holds the same answers (its depth nodes: 0.5 and 2 m among them)
    table = model.tabulate(focus_m=1.0, sizes=(5, 4, 3), dtype=torch.float32)
    r = np.array([0.25, 0.5]) * table.r_max  # nodes of its 5 radii
    tx, ty = r / table.scale[0], np.zeros(2)
    for depth in (0.5, 2.0):
        torch.testing.assert_close(
            table.psf(tx, ty, depth), model.psf(tx, ty, depth, focus_m=1.0), atol=2e-6, rtol=1e-4
        )
    # another sigma weighs the sides so (the fit's choice on a 10-step network is a coin toss)
    answers = []
    for sigma in (0.25, math.inf):
        model.blend.sigma = sigma
        far = math.exp(-((0.5 / sigma) ** 2))
        want = (near + far * model.psf(x, y, 2.0, focus_m=math.inf)) / (1 + far)
        answers.append(model.psf(x, y, 1.0, focus_m=1.0))
        torch.testing.assert_close(answers[-1], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(answers[0], answers[1], atol=1e-6, rtol=1e-5)  # sigma tells them apart here
    # without a blend (blend: none) the model refocuses the network alike, t alone
    model.blend = None
    want = 0.5 * model.psf(x, y, 0.5, focus_m=0.5) + 0.5 * model.psf(x, y, 2.0, focus_m=math.inf)
    torch.testing.assert_close(model.psf(x, y, 1.0, focus_m=1.0), want, atol=1e-6, rtol=1e-5)


def test_training_scores_the_answers_the_api_gives_between_focus_settings(focus_grid, focus_run):
    # val_blended_rel_l2, which psf train computes from the network at the validation points' sides
    # (_validation_prediction, the same the blend's fit takes), is what model.psf gives at the validation points,
    # among them points between the grid's focus settings. That the fit scores those answers:
    # test_blend.py's test_fit_scores_points_between_focus_settings_as_the_model_answers_them.
    val = GridFile.open(focus_grid).heldout("validation")
    lit = val["lit"]
    assert not val["at_grid_focus"][lit].all()
    model = load_model(focus_run / "latest.pt", device="cpu")
    x, y, depth, focus = val["coords"][lit, 0], val["coords"][lit, 1], val["depth"][lit], val["focus"][lit]
    cond = model.conditions(x, y, depth, focus_m=focus)
    answered = rel_l2(model.answer(cond).numpy(), val["ref"][lit]).mean()
    step = torch.load(focus_run / "latest.pt", weights_only=True)["step"]
    assert np.isclose(dict(scalars(focus_run, "val_blended_rel_l2"))[step], answered, rtol=1e-5)
