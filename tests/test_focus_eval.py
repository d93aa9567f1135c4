"""psf eval over focus settings: the baselines extended to focus, on synthetic grids."""

from __future__ import annotations

import numpy as np
import pytest

from psfcvae.evaluation import baselines as B
from psfgen.plan.grid import grid_coords

FOCUS = np.array([0.5, 1.0, 2.0, np.inf])  # [F] m, ascending, inf last
DEPTHS = np.array([0.4, 1.5, 20.0])  # [D] m
N = 6  # field lattice N x N


def _psf_field(g: np.ndarray, seed: int = 4) -> np.ndarray:
    """PSFs base + g * pattern [..., 3, 5, 5] for values g [...]: the pattern sums to 0 per channel, so every
    PSF sums to 1 and interpolating the PSFs is interpolating g."""
    rng = np.random.default_rng(seed)
    base = rng.random((3, 5, 5)) + 1.0
    base /= base.sum(axis=(-2, -1), keepdims=True)
    pattern = rng.normal(size=(3, 5, 5)) * 0.002  # small enough that no pixel goes below 0
    pattern -= pattern.mean(axis=(-2, -1), keepdims=True)
    return base + g[..., None, None, None] * pattern


def _g(x, y, depth_m, focus_m, quadratic: bool):
    """Quadratic (or linear) in the field, bilinear in (1/depth, 1/focus), 1/inf = 0."""
    u, v = 1.0 / depth_m, 1.0 / focus_m
    field = 0.7 * x**2 - 0.4 * x * y + 0.3 * y**2 if quadratic else 0.0
    return 1.0 + field + 0.2 * x - 0.1 * y + 0.3 * u - 0.5 * v + 0.4 * u * v


def _grid(quadratic: bool) -> np.ndarray:
    """[F*D, P, 3, 5, 5] on the planes p = f*D + d."""
    coords = grid_coords(N)
    f, d = np.divmod(np.arange(len(FOCUS) * len(DEPTHS)), len(DEPTHS))
    g = _g(coords[None, :, 0], coords[None, :, 1], DEPTHS[d][:, None], FOCUS[f][:, None], quadratic)
    return _psf_field(g)


def _queries(m: int = 60, seed: int = 1):
    """Points inside the lattice's interior cells, at depths and focus settings between the grid's (and on them)."""
    rng = np.random.default_rng(seed)
    step = 2.0 / (N - 1)
    x, y = rng.uniform(-1 + step, 1 - step, m), rng.uniform(-1 + step, 1 - step, m)
    depth = 1.0 / rng.uniform(1 / DEPTHS[-1], 1 / DEPTHS[0], m)
    focus = 1.0 / rng.uniform(0.0, 1 / FOCUS[0], m)  # 1/focus from 0 (inf) to 2 dioptres
    focus[:4] = FOCUS  # on each grid focus, inf included
    focus[4] = np.inf
    return x, y, depth, focus


@pytest.mark.parametrize("method, quadratic", [("bicubic", True), ("bilinear", False)])
def test_a_field_linear_in_inverse_focus_is_reproduced_between_focus_settings(method, quadratic):
    """The oracle: PSFs exactly bilinear in (1/depth, 1/focus) (and quadratic over the field for bicubic, linear
    for bilinear) are what the baselines give anywhere between the grid's depths and focus settings, inf too."""
    grid = _grid(quadratic)
    x, y, depth, focus = _queries()
    want = _psf_field(_g(x, y, depth, focus, quadratic))
    got = getattr(B, method)(grid, DEPTHS, N, x, y, depth, focus=FOCUS, focus_m=focus)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Eigen-PSF with every component: its coefficients are linear in the PSFs, so as exact.
    eigen = B.EigenPSF(grid, DEPTHS, N, components=1000, focus=FOCUS)
    if quadratic:
        np.testing.assert_allclose(eigen(x, y, depth, focus_m=focus), want, atol=1e-6)
    # Not the nearest focus: between two settings the PSF is a blend of both.
    nearest_focus = FOCUS[np.abs(1 / FOCUS - 1 / focus[:, None]).argmin(1)]
    near = getattr(B, method)(grid, DEPTHS, N, x, y, depth, focus=FOCUS, focus_m=nearest_focus)
    between = ~np.isin(focus, FOCUS)
    assert np.abs(got[between] - near[between]).max() > 1e-4


def test_beyond_the_focus_range_the_end_focus_is_used():
    grid = _grid(True)
    x, y, depth, _ = _queries(8)
    near = B.bicubic(grid, DEPTHS, N, x, y, depth, focus=FOCUS, focus_m=np.full(8, 0.2))
    at = B.bicubic(grid, DEPTHS, N, x, y, depth, focus=FOCUS, focus_m=np.full(8, FOCUS[0]))
    np.testing.assert_array_equal(near, at)


def test_nearest_takes_the_plane_nearest_in_inverse_depth_and_focus():
    grid = _grid(True)
    coords = grid_coords(N)
    p = 7  # a grid point
    for f, d, focus_m, depth_m in ((0, 0, 0.55, 0.41), (2, 1, 2.5, 1.2), (3, 2, 30.0, 25.0), (3, 0, np.inf, 0.3)):
        got = B.nearest(
            grid, DEPTHS, N, coords[p : p + 1, 0] + 0.05, coords[p : p + 1, 1], np.array([depth_m]), FOCUS, focus_m
        )
        np.testing.assert_allclose(got[0], grid[f * len(DEPTHS) + d, p], rtol=1e-6)


def test_one_focus_ignores_the_query_focus_and_gives_the_depth_only_figures():
    """A single-focus file (/focus = [nan], or one distance) scores as a file without focus did."""
    grid = _grid(True)[: len(DEPTHS)]  # the first focus's planes
    x, y, depth, focus = _queries(20)
    for method in (B.nearest, B.bilinear, B.bicubic):
        plain = method(grid, DEPTHS, N, x, y, depth)
        np.testing.assert_array_equal(method(grid, DEPTHS, N, x, y, depth, focus=[np.nan], focus_m=np.nan), plain)
        np.testing.assert_array_equal(method(grid, DEPTHS, N, x, y, depth, focus=[2.0], focus_m=focus), plain)
    eigen = B.EigenPSF(grid, DEPTHS, N, components=4)
    np.testing.assert_array_equal(
        B.EigenPSF(grid, DEPTHS, N, components=4, focus=[np.nan])(x, y, depth, np.nan), eigen(x, y, depth)
    )


def test_a_grid_that_is_not_focus_by_depth_planes_is_refused():
    grid = _grid(True)
    with pytest.raises(ValueError, match="12 planes, not 3 focus x 3 depths"):
        B.bicubic(grid, DEPTHS, N, np.zeros(1), np.zeros(1), np.ones(1), focus=FOCUS[:3], focus_m=1.0)


def test_test_points_are_grouped_at_and_between_grid_focus_settings():
    from psfcvae.evaluation.evaluate import heldout_groups

    focus = np.array([0.5, 2.0, np.inf])
    point_focus = np.array([0.5, 0.8, 2.0, 4.0, np.inf, np.inf, 0.5, 0.8])  # 0.8 and 4: midway in 1/focus
    heldout = {
        "coords": np.zeros((8, 2)),
        "depth": np.ones(8),
        "at_grid_depth": np.ones(8, bool),
        "focus": point_focus,
        "at_grid_focus": np.isin(point_focus, focus),
    }
    groups = heldout_groups(heldout, np.array([1.0]), focus)["focus"]
    want = {
        "all": [0, 1, 2, 3, 4, 5, 6, 7],
        "at grid focus": [0, 2, 4, 5, 6],
        "between grid focus": [1, 3, 7],
        "at focus 0.5 m": [0, 6],
        "between focus 0.5 and 2 m": [1, 7],
        "at focus 2 m": [2],
        "between focus 2 m and ∞": [3],
        "at focus ∞": [4, 5],
    }
    assert list(groups) == list(want)  # nearest first, as the tables show them
    assert {g: np.flatnonzero(m).tolist() for g, m in groups.items()} == want
    # One focus: no focus groups, the depth and radius-band groups as a single-focus file had them.
    assert set(heldout_groups(heldout, np.array([1.0]), np.array([np.nan]))) == {"depth", "radius band"}
    assert set(heldout_groups(heldout, np.array([1.0]))) == {"depth", "radius band"}


def test_bench_accuracy_table_shows_the_focus_groups():
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "bench_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._parser().parse_args(["--focus-m", "0.5,2,inf"]).focus_m == (0.5, 2.0, np.inf)
    cell = lambda v: {"corrected": {"pooled": v}}  # noqa: E731
    groups = ("all", "at grid depths", "between grid depths", "at grid focus", "between grid focus")
    result = {
        "checkpoint": None,
        "heldout": {"bicubic": {g: cell(0.01 * (i + 1)) for i, g in enumerate(groups)}},
        "heldout_groups": {"depth": list(groups[:3]), "focus": ["all", *groups[3:]]},
    }
    lines = bench.summary_table({"baselines": result}).splitlines()
    assert lines[0] == "| method | all | at grid depths | between grid depths | at grid focus | between grid focus |"
    assert lines[2] == "| bicubic | 1.0% | 2.0% | 3.0% | 4.0% | 5.0% |"
    del result["heldout_groups"]["focus"]  # a single-focus file: the three columns of before
    assert bench.summary_table({"baselines": result}).splitlines()[2] == "| bicubic | 1.0% | 2.0% | 3.0% |"


@pytest.fixture(scope="module")
def focus_grid(tmp_path_factory):
    """A tiny grid file at focus 0.5 m and inf (2 focus x 2 depths planes), held-out points at both and at 1 m."""
    from helpers import make_focus_grid

    return make_focus_grid(tmp_path_factory.mktemp("focus"))


def test_eval_scores_points_at_and_between_grid_focus(focus_grid, tmp_path):
    """Baselines alone on a 2-focus file: every figure is the baselines' own at each test point's focus, grouped at
    and between grid focus in metrics.json, the text table and the report."""
    import json

    from click.testing import CliRunner

    from cli import main
    from psfcvae.evaluation.metrics import rel_l2_corrected
    from psfgen import GridFile

    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["eval", "--baselines-only", "--data", str(focus_grid), "--out", str(out)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    info = GridFile.open(focus_grid)
    test = info.heldout("test")
    test = {k: v[test["lit"]] for k, v in test.items()}
    at = test["at_grid_focus"]
    assert at.any() and (~at).any()  # the tiny file holds both kinds of test points
    assert metrics["data"]["focus_m"] == [0.5, "inf"]
    groups = metrics["heldout_groups"]["focus"]
    assert (
        {"all", "at grid focus", "between grid focus"}
        <= set(groups)
        <= {
            "all",
            "at grid focus",
            "between grid focus",
            "at focus 0.5 m",
            "between focus 0.5 m and ∞",
            "at focus ∞",
        }
    )
    (x, y), depth, focus = test["coords"].T, test["depth"], test["focus"]
    pred = B.bicubic(info.grid_psfs(), info.depths, info.grid_size, x, y, depth, info.focus, focus)
    for name, mask in (("all", np.ones(len(at), bool)), ("at grid focus", at), ("between grid focus", ~at)):
        _, pooled = rel_l2_corrected(pred[mask], test["psf_a"][mask], test["psf_b"][mask])
        assert metrics["heldout"]["bicubic"][name]["corrected"]["pooled"] == pytest.approx(pooled, rel=1e-6)
        assert metrics["heldout"]["bicubic"][name]["raw"]["n"] == mask.sum()
    # Tracing at the training spp, per plane: all, per depth over both focus settings, per focus over both depths.
    rt = metrics["raytrace_at_training_spp"]
    assert {"all", "at 0.5 m", "at 2 m", "at focus 0.5 m", "at focus ∞"} == set(rt)
    assert (
        rt["all"]["n"] == rt["at focus 0.5 m"]["n"] + rt["at focus ∞"]["n"] == rt["at 0.5 m"]["n"] + rt["at 2 m"]["n"]
    )
    assert "by focus distance" in r.stdout and "grid focus" in r.stdout and "0.5 m–∞" in r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 100, r.stdout
    page = (out / "report.html").read_text()
    per_focus = page[page.index('id="per-focus"') : page.index('id="per-band"')]
    assert "<th>between grid focus</th>" in per_focus and "<td>ray tracing (grid points)</td>" in per_focus
    assert "at 0.5, 2 m, spp 2000 (rays per point and colour), at focus 0.5 m and ∞" in page
    assert {"grid_focus0_0.5m_depth0_0.5m.png", "grid_focus1_inf_depth1_2m.png"} <= {p.name for p in out.glob("*.png")}


@pytest.mark.slow  # trains a model: about 15 s
def test_eval_calls_a_multi_focus_model_at_each_points_focus(focus_grid, tmp_path):
    """A 2-focus model, end to end: the CVAE's figures are the model's at each test point's own focus, its table is
    built at each focus the points hold, and the groups at and between grid focus hold every method."""
    import json

    from click.testing import CliRunner
    from helpers import small_config

    from cli import main
    from psfcvae import load_model, train
    from psfcvae.evaluation.metrics import rel_l2_corrected
    from psfgen import GridFile

    run_dir = train(small_config(focus_grid, tmp_path / "run", max_steps=10, val_every=5, checkpoint_every=5))
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        main, ["eval", "--checkpoint", str(run_dir / "best.pt"), "--data", str(focus_grid), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    test = GridFile.open(focus_grid).heldout("test")
    test = {k: v[test["lit"]] for k, v in test.items()}
    (x, y), depth, focus, at = test["coords"].T, test["depth"], test["focus"], test["at_grid_focus"]
    model = load_model(run_dir / "best.pt")
    pred = model.psf(x, y, depth, focus_m=focus, allow_extrapolation=True).numpy()
    table = np.zeros_like(pred)
    for f in np.unique(focus):
        table[focus == f] = model.tabulate(focus_m=f).psf(x[focus == f], y[focus == f], depth[focus == f]).numpy()
    for name, want in (("cvae prior mean", pred), ("cvae prior mean (table)", table)):
        for group, mask in (("at grid focus", at), ("between grid focus", ~at)):
            _, pooled = rel_l2_corrected(want[mask], test["psf_a"][mask], test["psf_b"][mask])
            assert metrics["heldout"][name][group]["corrected"]["pooled"] == pytest.approx(pooled, rel=1e-4, abs=1e-7)
    assert all({"at grid focus", "between grid focus"} <= set(m) for m in metrics["heldout"].values())
    assert metrics["illumination"]["n"] == len(GridFile.open(focus_grid).heldout("test")["lit"])
    assert "cvae prior mean" in r.stdout and "by focus distance" in r.stdout
    # The chart is rendered at the middle grid focus, beside the file's traced PSFs of that focus.
    middle = float(model.focus[len(model.focus) // 2])
    assert metrics["render_chart"]["focus_m"] == ("inf" if np.isinf(middle) else middle)
    assert metrics["render_chart"]["psnr_db_vs_patchwise"] is not None and (out / "render_chart.png").is_file()
