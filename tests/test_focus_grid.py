"""Focus as a plane axis of the grid file: psf generate over several focus distances (schema 8)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from helpers import assert_one_line_error, make_focus_grid, run_cli, tiny_args, tiny_config

from psfgen import GridFile, generate, gridfile
from psfgen.analysis.info import summary
from psfgen.config import resolve
from psfgen.gridfile import DamagedFile
from psfgen.merge import merge
from psfgen.plan import budget, depthplan, windowplan
from psfgen.plan.grid import TEST, VALIDATION, band_counts, focus_midpoints, heldout_focus, heldout_points
from psfgen.shared.errors import InputError

INF = float("inf")
PLANE_DATASETS = (
    "grid/psf",
    "grid/kept",
    "grid/illumination",
    "grid/valid",
    "grid/chief",
    "noise/psf",
    "noise/illumination",
    "noise/chief",
    "axis/fraction",
)


@pytest.fixture(scope="module")
def focus_grid(tmp_path_factory):
    """TINY's 4x4 grid at depths 0.5 and 2 m, focused at 0.5 m and at infinity: 4 planes. Read-only."""
    return make_focus_grid(tmp_path_factory.mktemp("focus"))


def test_planes_are_focus_major_and_each_is_a_run_at_that_focus_alone(focus_grid, tmp_path):
    grid = GridFile.open(focus_grid)
    np.testing.assert_array_equal(grid.focus, [0.5, INF])
    assert (grid.n_focus, grid.n_planes, grid.plane(1, 0)) == (2, 4, 2)
    np.testing.assert_array_equal(grid.plane_focus, [0.5, 0.5, INF, INF])
    np.testing.assert_array_equal(grid.plane_depth, [0.5, 2.0, 0.5, 2.0])
    np.testing.assert_array_equal(grid.depths, [0.5, 2.0])  # the unique depths, as before
    assert grid.grid_psfs().shape == (4, 16, 3, 15, 15) and grid.noise()["psf"].shape == (4, 4, 3, 15, 15)
    assert grid.illumination.shape == grid.valid.shape == grid.kept.shape == (4, 16, 3)
    assert grid.chief_mm.shape == (4, 16, 2) and grid.axis_fraction.shape == (4, 3)
    # The oracle: psf generate at 0.5 m alone, from the command line, with the same seed.
    alone = tmp_path / "alone.h5"
    result = run_cli([*tiny_args(alone), "--focus-m", "0.5"])
    assert result.exit_code == 0, result.output
    with h5py.File(focus_grid, "r") as f, h5py.File(alone, "r") as g:
        np.testing.assert_array_equal(g["focus"][:], [0.5])
        for name in PLANE_DATASETS:
            assert f[name].shape[0] == 4 and g[name].shape[0] == 2, name
            np.testing.assert_array_equal(f[name][:2], g[name][:], err_msg=name)  # planes 0, 1: focus 0.5 m
        # Planes 2, 3 are the lens at infinity: other PSFs (not the same rays again), the sensor nearer the lens,
        # so every off-axis chief ray lands nearer the axis than at 0.5 m (magnification, docs/dataset.md).
        near, far = f["grid/psf"][:2], f["grid/psf"][2:]
        assert not np.isclose(near, far).all(axis=(-3, -2, -1)).any()
        chief = f["grid/chief"][:]
        off = np.abs(chief[0]).sum(axis=-1) > 0.1
        assert (np.abs(chief[2][off]) < np.abs(chief[0][off])).all()


def test_held_out_points_sit_at_and_between_grid_focus_grouped_by_focus(focus_grid):
    grid = GridFile.open(focus_grid)
    focus, at = grid.heldout_focus, grid.heldout_at_grid_focus
    assert at.any() and (~at).any()
    assert set(focus[at]) <= {0.5, INF}
    np.testing.assert_array_equal(focus[~at], 1.0)  # the midpoint in 1/focus of 0.5 m and infinity
    assert ((focus[~at] > 0.5) & (focus[~at] < INF)).all()
    assert (np.diff(focus) >= 0).all()  # grouped by focus, ascending
    for block in grid.blocks:  # each held-out block traces one focus
        if block.kind.startswith("heldout"):
            assert len(set(focus[block.start : block.stop])) == 1, block
    test = grid.heldout("test")
    np.testing.assert_array_equal(test["focus"], focus[grid.heldout_part == TEST])
    np.testing.assert_array_equal(test["at_grid_focus"], at[grid.heldout_part == TEST])


def test_held_out_focus_alternates_in_pairs_across_the_depths_alternation():
    focus = np.array([0.5, 1.0, 2.0, INF])
    depths = np.array([0.5, 1.0, 2.0])
    m = 96
    _, depth, at_depth, part = heldout_points(8, depths, m, seed=3)
    values, at = heldout_focus(part, focus, seed=3)
    mids = focus_midpoints(focus)
    np.testing.assert_allclose(mids, [2 / 3, 4 / 3, 4.0])
    assert set(values[at]) == set(focus) and set(values[~at]) == set(mids)
    assert abs(at.mean() - 0.5) < 0.1
    for a in (True, False):  # every kind of point: at or between grid depth and grid focus
        for b in (True, False):
            assert ((at_depth == a) & (at == b)).sum() >= m // 8, (a, b)
    counts = band_counts(m)
    for b in range(4):  # each band and part of 3 points or more holds both kinds (they go in pairs)
        band = slice(counts[:b].sum(), counts[: b + 1].sum())
        for which in (VALIDATION, TEST):
            kinds = at[band][part[band] == which]
            assert len(kinds) < 3 or (kinds.any() and not kinds.all()), (b, which)
    again = heldout_focus(part, focus, seed=3)
    np.testing.assert_array_equal(again[0], values)
    one, every = heldout_focus(part, np.array([np.nan]), seed=3)
    assert np.isnan(one).all() and every.all()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--focus-m", "0,1"], ("--focus-m must be positive metres or inf, got 0.0",)),
        (["--focus-m", "1,inf,1"], ("--focus-m must not repeat",)),
        (["--focus-m", "nan"], ("--focus-m must be positive",)),
        (["--focus-m", "near"], ("--focus-m must be a number", "near")),
        (["--focus-min", "0.5"], ("--focus-min needs focus_max too",)),
        (["--focus-m", "1", "--num-focus", "3"], ("--focus-m and --num-focus both give the focus settings",)),
        (["--focus-min", "2", "--focus-max", "1", "--num-focus", "3"], ("--focus-max (1.0) must be beyond",)),
        (["--focus-min", "1", "--focus-max", "inf", "--num-focus", "1"], ("--num-focus must be at least 2",)),
    ],
)
def test_bad_focus_settings_are_one_line_naming_the_option(tmp_path, args, needles):
    assert_one_line_error(run_cli([*tiny_args(tmp_path / "g.h5"), *args]), *needles)
    assert not (tmp_path / "g.h5").exists()


def test_a_focus_range_is_uniform_in_inverse_focus_and_the_same_run_as_its_list(tmp_path):
    ranged = tiny_config(tmp_path / "a.h5", focus_min=0.5, focus_max=INF, num_focus=3)
    listed = tiny_config(tmp_path / "b.h5", focus_m=(INF, 1.0, 0.5))
    np.testing.assert_array_equal(ranged.focus_values(), [0.5, 1.0, INF])
    assert resolve(ranged, kernel_size=None).run_params() == resolve(listed).run_params()
    assert resolve(ranged).focus_m == (0.5, 1.0, INF) and resolve(ranged).num_focus is None
    assert tiny_config(tmp_path / "c.h5", focus_m=2.0).focus_values().tolist() == [2.0]  # one value still works


def test_the_ray_budget_covers_every_plane():
    one = tiny_config("g.h5", depths=None, grid_size=None, spp=None)
    two = tiny_config("g.h5", depths=None, grid_size=None, spp=None, focus_m=(0.5, INF))
    assert two.budget() == 2 * one.budget()  # the default: a single-focus run's rays at each focus
    # ray_budget is the total over focus x depths: each of 2 x 2 planes gets a quarter of it
    assert budget.resolve(25_600_000, None, None, 2, 2) == budget.resolve(6_400_000, None, None)
    assert "over 2 depths x 2 focus settings" in budget.explain(25_600_000, 32, 6250, 2, 2)
    with pytest.raises(InputError, match="at each of 2 depths x 2 focus settings"):
        budget.resolve(15_000, None, None, 2, 2)


def test_pilots_run_at_the_nearest_and_farthest_focus_and_the_larger_choice_wins(tmp_path, monkeypatch):
    seen = {"window": [], "depths": []}

    def window(lens, depths, kernel_size_small, seed, focus_m=None):
        seen["window"].append(focus_m)
        side = 48 if focus_m == INF else 32
        return windowplan.WindowPlan(side, side, 1.0, (0.0, 0.0, 1.0, 0), tuple(depths), 2000, 0.0, focus_m)

    def depths(lens, depth_min, depth_max, kernel_size, kernel_size_small, seed, focus_m=None):
        seen["depths"].append(focus_m)
        return depthplan.DepthPlan(3 if focus_m == INF else 5, {3: 0.1, 5: 0.03}, 0.01, 0.0, focus_m)

    monkeypatch.setattr(windowplan, "pilot", window)
    monkeypatch.setattr(depthplan, "pilot", depths)
    cfg = tiny_config(
        tmp_path / "g.h5", focus_m=(INF, 0.5, 1.0), depths=None, depth_min=0.5, depth_max=2.0,
        num_depths="auto", kernel_size="auto", grid_size=3, heldout=0, noise_points=0,
    )  # fmt: skip
    grid = GridFile.open(generate(cfg))
    assert seen == {"window": [0.5, INF], "depths": [0.5, INF]}
    assert grid.kernel_size == 48 and grid.window_plan["focus_m"] == INF  # the larger side: at infinity
    assert len(grid.depths) == 5 and grid.depth_plan["focus_m"] == 0.5  # the more depths: at 0.5 m
    text = summary(grid.path)
    assert grid.n_planes == 15 and "3 x 5 = 15 planes" in text
    assert "num_depths auto at focus 0.5 m, the larger count" in text, text


def test_info_shows_the_focus_settings(focus_grid, tiny_grid):
    text = summary(focus_grid)
    assert "focus [m]   0.5, inf:" in text and "2 x 2 = 4 planes" in text, text
    assert "held-out: 4 at a grid focus, 4 between" in text
    assert "2 m at focus infinity" in text  # lit field and noise floor per plane
    assert "2 focus settings x 2 depths" in text
    assert "focus       the lens file's sensor position" in summary(tiny_grid)


def test_an_interrupted_multi_focus_run_resumes_to_the_identical_file(focus_grid, tmp_path, monkeypatch):
    out = tmp_path / "resumed.h5"
    write, calls = gridfile.write_block, []

    def fails(*args, **kwargs):  # the disk fills up at a held-out block of the second focus group
        calls.append(1)
        if len(calls) == 23:
            raise OSError(28, "No space left on device")
        return write(*args, **kwargs)

    monkeypatch.setattr(gridfile, "write_block", fails)
    with pytest.raises(InputError, match="No space left on device"):
        make_focus_grid(tmp_path, name=out.name)
    assert 0 < GridFile.open(out).blocks_done < GridFile.open(out).blocks_total
    monkeypatch.setattr(gridfile, "write_block", write)
    make_focus_grid(tmp_path, name=out.name)
    with h5py.File(out, "r") as f, h5py.File(focus_grid, "r") as g:
        assert f.attrs["run_id"] == g.attrs["run_id"] and f["blocks/done"][:].all()
        for name in (*PLANE_DATASETS, *gridfile.FIXED, "heldout/psf_a", "heldout/psf_b", "heldout/valid_b"):
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)


def test_shards_of_a_multi_focus_run_merge_into_the_same_file(focus_grid, tmp_path):
    shards = [make_focus_grid(tmp_path, name="g.h5", shard=f"{k}/2") for k in range(2)]
    merged = merge([str(s) for s in shards], tmp_path / "merged.h5")
    with h5py.File(merged, "r") as f, h5py.File(focus_grid, "r") as g:
        for name in (*PLANE_DATASETS, *gridfile.FIXED, "heldout/psf_a", "heldout/psf_b"):
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)
    assert GridFile.open(merged).n_planes == 4


def _altered(src, dst, change):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
    return dst


def test_an_older_schema_or_an_inconsistent_focus_is_refused_in_one_line(focus_grid, tmp_path):
    old = _altered(focus_grid, tmp_path / "old.h5", lambda f: f.attrs.__setitem__("schema_version", 8))
    with pytest.raises(InputError, match="has schema version 8, this psf-cvae reads 9; regenerate it with"):
        GridFile.open(old)

    def replace(name, value):
        def change(f):
            del f[name]
            f[name] = value

        return change

    for name, value, why in (
        ("focus", [np.nan, 1.0], "focus must be positive metres"),
        ("focus", [INF, 0.5], "strictly ascending"),
        ("heldout/focus", np.full(8, 5.0), "heldout/focus holds values outside"),  # at_grid_focus disagrees
        ("heldout/at_grid_focus", np.ones(8, bool), "at_grid_focus disagrees"),
    ):
        bad = _altered(focus_grid, tmp_path / "bad.h5", replace(name, value))
        with pytest.raises(DamagedFile, match=why):
            GridFile.open(bad)


@pytest.mark.slow  # traces bench_loader's small 8 x 8 grid (its window pilot too): a few seconds
def test_bench_loaders_big_file_is_a_schema_8_file(tmp_path):
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "benchmarks" / "bench_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    big = GridFile.open(bench.build_big_file(tmp_path, 4, (1.0, 2.0)))
    assert big.n_planes == 2 and np.isnan(big.focus).all() and big.done.all()
