"""num_focus auto (psfgen.plan.focusplan): the choice, the pilot's arithmetic by hand, the config, the order of the
pilots, the record in the grid file, the resume, and a real pilot."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
from helpers import TINY, assert_one_line_error, run_cli, tiny_args, tiny_config

from psfgen import generate
from psfgen.analysis.info import summary
from psfgen.config import resolve
from psfgen.gridfile import GridFile
from psfgen.plan import depthplan, focusplan
from psfgen.shared.errors import DamagedFile, InputError

INF = float("inf")
M = focusplan.PILOT_FOCUS


def test_the_fewest_focus_settings_within_the_bound_win():
    e = focusplan.FOCUS_ERROR
    assert e == depthplan.DEPTH_ERROR
    assert focusplan.choose({3: 2 * e, 5: e / 2, 9: 0.0, 17: 0.0}) == 5
    assert focusplan.choose({3: e / 2, 5: 0.0, 9: 0.0, 17: 0.0}) == 3
    assert focusplan.choose({3: e, 5: 0.0, 9: 0.0, 17: 0.0}) == 3  # at the bound is within it
    assert focusplan.choose({3: 12 * e, 5: 4 * e, 9: 2 * e, 17: e / 2}) == 17
    assert focusplan.choose({3: 9 * e, 5: 5 * e, 9: 3 * e, 17: 2 * e}) == 33  # none: all the pilot's settings
    assert focusplan.choose({3: float("nan"), 5: 2 * e, 9: e / 2, 17: 0.0}) == 9  # unmeasured is not within


def _pilot_field(scale: np.ndarray, k: int = 5) -> np.ndarray:
    """[M, 3 * 2, 3, k, k], as the pilot lays its traces out: at pilot focus m, depth j and two field points, a
    fixed pattern times scale[m, j] ([M, 3])."""
    pattern = np.arange(1, 3 * k * k + 1, dtype=np.float64).reshape(3, k, k)
    field = scale[:, :, None, None, None, None] * np.broadcast_to(pattern, (2, 3, k, k))  # [M, 3, 2, 3, k, k]
    return field.reshape(M, 6, 3, k, k)


def test_the_error_in_focus_by_hand():
    u = 1.0 / focusplan.pilot_focus(0.5, INF)  # 1/focus: 2 down to 0, uniform
    np.testing.assert_allclose(u, np.linspace(2.0, 0.0, M))
    ok = np.ones((M, 6), bool)
    # Exactly linear in 1/focus at every depth: the neighbours' mean is the midpoint, nothing to correct.
    linear = _pilot_field(np.stack([2 + u, 1 + 3 * u, 5 - u], axis=1))
    errors, noise = depthplan.midpoint_errors(linear, linear, ok)
    assert noise == 0 and list(errors) == [3, 5, 9, 17]
    assert max(errors.values()) < 1e-12
    # Quadratic, 1 + a_j u² at depth j: a midpoint between neighbours h apart in u is predicted as 1 + a_j (u² + h²),
    # off by a_j h²; pooled over the three depths and the midpoints u_m of F settings:
    # h² sqrt(n_mid Σ_j a_j² / Σ_j Σ_m (1 + a_j u_m²)²).
    a = np.array([1.0, 2.0, 0.5])
    quadratic = _pilot_field(1 + a[None, :] * u[:, None] ** 2)
    errors, _ = depthplan.midpoint_errors(quadratic, quadratic, ok)
    for f in (3, 5, 9, 17):
        step = (M - 1) // (f - 1)
        mids = u[step // 2 :: step][: f - 1]
        h = u[0] - u[step // 2]
        by_hand = h**2 * np.sqrt(len(mids) * (a**2).sum() / ((1 + a[:, None] * mids[None, :] ** 2) ** 2).sum())
        assert errors[f] == pytest.approx(by_hand, rel=1e-9), f
    assert errors[3] > errors[5] > errors[9] > errors[17]


def test_the_pilot_depths_are_the_ends_and_the_middle_in_inverse_depth():
    np.testing.assert_array_equal(focusplan.pilot_depths(np.array([3.0, 5.0, 20.0])), [3.0, 5.0, 20.0])
    five = 1.0 / np.linspace(2.0, 0.2, 5)  # 0.5 .. 5 m
    np.testing.assert_allclose(focusplan.pilot_depths(five), [0.5, 1 / 1.1, 5.0])
    np.testing.assert_array_equal(focusplan.pilot_depths(np.array([1.0])), [1.0])
    assert len(focusplan.pilot_depths(np.array([0.5, 2.0]))) == 2


def test_config_defaults_a_range_to_auto_and_the_budget_follows_the_choice(tmp_path):
    cfg = tiny_config(tmp_path / "g.h5", focus_min=0.5, focus_max=INF)
    assert cfg.auto_focus() and cfg.focus_count() is None and cfg.least_focus_count() == 3
    assert tiny_config(tmp_path / "g.h5", focus_min=0.5, focus_max=INF, num_focus="auto").auto_focus()
    assert not tiny_config(tmp_path / "g.h5", focus_min=0.5, focus_max=INF, num_focus=4).auto_focus()
    chosen = resolve(cfg, num_focus=5)
    assert chosen.focus_m == (0.5, 2 / 3, 1.0, 2.0, INF) and chosen.num_focus is None  # no auto left
    with pytest.raises(ValueError, match="num_focus auto"):
        resolve(cfg)
    # The default budget is a single focus's times the F the pilot chose: each plane gets the same rays.
    free = dict(depths=None, grid_size=None, spp=None, noise_points=None, num_depths="auto", focus_min=0.5)
    auto = tiny_config(tmp_path / "g.h5", focus_max=INF, **free)
    one = tiny_config(tmp_path / "g.h5", **{**free, "focus_min": None})
    for f in (3, 5):
        assert auto.budget(f) == f * one.budget()
        got, single = resolve(auto, 3, num_focus=f), resolve(one, 3)
        assert (got.grid_size, got.spp) == (single.grid_size, single.spp)
    # A budget too small for the fewest focus settings the pilot may choose is refused before any pilot.
    with pytest.raises(InputError, match="at each of 2 depths x 3 focus settings"):
        tiny_config(tmp_path / "g.h5", spp=None, grid_size=None, ray_budget=20_000, focus_min=0.5, focus_max=INF)
    with pytest.raises(InputError, match="num_focus"):
        tiny_config(tmp_path / "g.h5", focus_min=0.5, focus_max=INF, num_focus="many")


RANGE = ["--focus-min", "0.5", "--focus-max", "inf"]


@pytest.mark.parametrize(
    "args, needles",
    [
        ([*RANGE, "--num-focus", "banana"], ("--num-focus must be a whole number or auto, got 'banana'",)),
        ([*RANGE, "--num-focus", "1"], ("--num-focus must be at least 2, got 1",)),
        ([*RANGE, "--num-focus", "2.5"], ("--num-focus must be a whole number or auto",)),
        (["--num-focus", "auto"], ("--num-focus needs focus_min and focus_max too",)),
        (["--focus-m", "1", "--num-focus", "auto"], ("--focus-m and --num-focus both give the focus settings",)),
        ([*RANGE, "--shard", "0/2"], ("'num_focus' auto cannot be combined with --shard",)),
    ],
)
def test_bad_num_focus_is_one_line_naming_the_option(tmp_path, args, needles):
    assert_one_line_error(run_cli([*tiny_args(tmp_path / "g.h5"), *args]), *needles)
    assert not list(tmp_path.iterdir())


def _fake_pilot(num_focus: int, seen: list):
    def pilot(lens_at, focus_min, focus_max, depths, kernel_size, kernel_size_small, seed):
        seen.append((focus_min, focus_max, tuple(depths)))
        return focusplan.FocusPlan(num_focus, {3: 0.2, 5: 0.01}, 0.03, 0.0, (float(depths[0]), float(depths[-1])))

    return pilot


def test_the_focus_pilot_follows_the_depth_pilot_and_the_file_records_it(tmp_path, monkeypatch):
    seen = {"depths": [], "focus": []}

    def depths(lens, depth_min, depth_max, kernel_size, kernel_size_small, seed, focus_m=None):
        seen["depths"].append(focus_m)
        return depthplan.DepthPlan(3, {3: 0.01}, 0.01, 0.0, focus_m)

    monkeypatch.setattr(depthplan, "pilot", depths)
    monkeypatch.setattr(focusplan, "pilot", _fake_pilot(5, seen["focus"]))
    cfg = tiny_config(
        tmp_path / "g.h5", depths=None, depth_min=0.5, depth_max=2.0, num_depths="auto", focus_min=0.5,
        focus_max=INF, grid_size=2, heldout=0, noise_points=0,
    )  # fmt: skip
    grid = GridFile.open(generate(cfg))
    assert seen["depths"] == [0.5, INF]  # the depth pilot at the range's ends, before the focus settings exist
    (focus_min, focus_max, pilot_depths), *again = seen["focus"]
    assert not again and (focus_min, focus_max) == (0.5, INF)
    np.testing.assert_allclose(pilot_depths, [0.5, 0.8, 2.0])  # the 3 depths the depth pilot chose
    assert grid.focus_plan["num_focus"] == grid.n_focus == 5
    np.testing.assert_allclose(1 / grid.focus, np.linspace(2.0, 0.0, 5))
    with h5py.File(grid.path) as f:
        assert json.loads(f.attrs["config"])["num_focus"] is None  # the resolved config: no auto left
    text = summary(grid.path)
    assert "focus plan  num_focus auto: 5 focus settings" in text and "3: 20.0%, 5: 1.0%" in text, text


def test_a_resumed_run_keeps_the_files_count_without_a_second_pilot(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(focusplan, "pilot", _fake_pilot(3, []))
    cfg = tiny_config(tmp_path / "g.h5", focus_min=0.5, focus_max=INF, grid_size=2, heldout=0, noise_points=0)
    first = GridFile.open(generate(cfg))
    assert first.n_focus == 3 and first.focus_plan["num_focus"] == 3
    with h5py.File(first.path, "r+") as f:  # as if killed before its last block
        f["blocks/done"][-1] = 0
    monkeypatch.setattr(focusplan, "pilot", lambda *a, **k: pytest.fail("a second pilot ran"))
    with caplog.at_level(logging.INFO, logger="psfgen"):
        again = GridFile.open(generate(cfg))
    assert again.done.all() and again.run_id == first.run_id and again.n_focus == 3
    assert "num_focus auto: 3 focus settings, as chosen when" in caplog.text
    with h5py.File(first.path, "r+") as f:  # a plan that disagrees with the file's focus settings is damage
        f.attrs["focus_plan"] = json.dumps({**first.focus_plan, "num_focus": 5})
    with pytest.raises(DamagedFile, match="focus_plan's num_focus is not the file's 3 focus settings"):
        GridFile.open(first.path)


def test_the_ray_budget_caps_the_pilots_choice(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(focusplan, "pilot", _fake_pilot(9, []))
    # 30 000 rays over 2 depths: 3 focus settings of 2 x 2 at 1250 rays a point, not 9 (at most 4000 rays a plane).
    cfg = tiny_config(
        tmp_path / "g.h5", focus_min=0.5, focus_max=INF, grid_size=None, spp=None, ray_budget=30_000, heldout=0,
        noise_points=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="psfgen"):
        grid = GridFile.open(generate(cfg))
    assert "num_focus auto: the ray budget affords 3 focus settings, not the 9 the pilot chose" in caplog.text
    assert grid.n_focus == grid.focus_plan["num_focus"] == 3 and (grid.grid_size, grid.spp) == (2, 1250)


def test_a_real_pilot_chooses_records_and_resumes(tmp_path, monkeypatch):
    # The real pilot at fewer rays, points and focus settings (9: nested 3, 5, 9): seconds, not a minute.
    monkeypatch.setattr(focusplan, "PILOT_SPP", 1000)
    monkeypatch.setattr(focusplan, "PILOT_FIELD", (0.0, 1.0))
    monkeypatch.setattr(focusplan, "PILOT_FOCUS", 9)
    out = tmp_path / "g.h5"
    args = [*tiny_args(out, grid_size=2, heldout=0, noise_points=0), *RANGE]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        plan = json.loads(f.attrs["focus_plan"])
        focus = f["focus"][:]
    assert plan["num_focus"] in (3, 5, 9) and len(focus) == plan["num_focus"]
    assert set(plan["errors"]) == {"3", "5"} and plan["depths_m"] == list(TINY["depths"])
    np.testing.assert_allclose(1 / focus, np.linspace(2.0, 0.0, len(focus)))
    assert f"focus plan  num_focus auto: {len(focus)} focus settings" in run_cli(["info", str(out)]).output
    monkeypatch.setattr(focusplan, "pilot", lambda *a, **k: pytest.fail("a second pilot ran"))
    again = run_cli(args)
    assert again.exit_code == 0, again.output
