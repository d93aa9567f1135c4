"""psf eval, the baselines, the metrics, the PSF API and psf sample."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, assert_one_line_error, tiny_config

from cli import main
from psfcvae import load_model
from psfcvae.evaluation import baselines as B
from psfcvae.evaluation.evaluate import MIRRORED
from psfcvae.evaluation.metrics import rel_l2_corrected, spearman
from psfgen import GridFile, generate
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2


def grid_of(path):
    with h5py.File(path) as f:
        return f["grid/psf"][:], f["depths"][:], f["grid/coords"][:]


# --- metrics ---------------------------------------------------------------------------
def test_reference_itself_scores_zero():
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 3, 5, 5)), rng.random((20, 3, 5, 5))
    ref = 0.5 * (a + b)
    assert rel_l2(ref, ref).max() == 0
    per_point, pooled = rel_l2_corrected(ref, a, b)
    assert per_point.max() == 0 and pooled == 0


def test_noise_corrected_estimator_recovers_injected_error():
    rng = np.random.default_rng(1)
    M = 2000
    truth = rng.random((M, 3, 5, 5)) + 0.5
    norm = np.sqrt((truth**2).reshape(M, -1).sum(1))[:, None, None, None]
    sigma = 0.15 * norm / np.sqrt(75)  # each half: 15% noise
    a = truth + rng.normal(size=truth.shape) * sigma
    b = truth + rng.normal(size=truth.shape) * sigma
    err = rng.normal(size=truth.shape)
    err *= 0.10 * norm / np.sqrt((err**2).reshape(M, -1).sum(1))[:, None, None, None]  # exactly 10% per point
    raw = rel_l2(truth + err, 0.5 * (a + b)).mean()
    _, pooled = rel_l2_corrected(truth + err, a, b)
    assert raw > 0.13  # the reference's own noise inflates the raw figure
    assert pooled == pytest.approx(0.10, abs=0.005)


def test_spearman():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ties share their mean rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3); by hand 4.5 / sqrt(4.5 * 5).
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(4.5 / np.sqrt(22.5))


# --- baselines ------------------------------------------------------------------------
def test_baselines_exact_at_grid_points(tiny_grid):
    grid, depths, coords = grid_of(tiny_grid)
    for d, depth in enumerate(depths):
        q = (coords[:, 0], coords[:, 1], np.full(len(coords), depth))
        np.testing.assert_allclose(B.nearest(grid, depths, 4, *q), grid[d], atol=1e-6)
        np.testing.assert_allclose(B.bilinear(grid, depths, 4, *q), grid[d], atol=1e-6)
        np.testing.assert_allclose(B.bicubic(grid, depths, 4, *q), grid[d], atol=1e-6)
        np.testing.assert_allclose(B.EigenPSF(grid, depths, 4, components=1000)(*q), grid[d], atol=1e-5)
    # Truncated eigen-PSF: at grid points it is the rank-K projection, not the PSF.
    low = B.EigenPSF(grid, depths, 4, components=2)
    assert low.components == 2 and 0 < low.explained < 1
    assert np.abs(low(coords[:, 0], coords[:, 1], np.full(16, depths[0])) - grid[0]).max() > 1e-3


def test_bilinear_interpolates_field_and_inverse_depth(tiny_grid):
    grid, depths, coords = grid_of(tiny_grid)
    mid = 0.5 * (coords[0] + coords[1])  # halfway between points 0 and 1 of the top row
    got = B.bilinear(grid, depths, 4, np.array([mid[0]]), np.array([mid[1]]), np.array([depths[0]]))[0]
    want = 0.5 * (grid[0, 0] + grid[0, 1])
    np.testing.assert_allclose(got, want / want.sum(axis=(-2, -1), keepdims=True), atol=1e-6)
    z = 1.0 / (0.25 / depths[0] + 0.75 / depths[1])  # a quarter of the way in 1/depth
    got = B.bilinear(grid, depths, 4, coords[5:6, 0], coords[5:6, 1], np.array([z]))[0]
    want = 0.25 * grid[0, 5] + 0.75 * grid[1, 5]
    np.testing.assert_allclose(got, want / want.sum(axis=(-2, -1), keepdims=True), atol=1e-6)
    # Nearest: the closest grid point and depth.
    got = B.nearest(grid, depths, 4, np.array([coords[6, 0] + 0.1]), np.array([coords[6, 1] - 0.1]), np.array([0.55]))
    np.testing.assert_allclose(got[0], grid[0, 6], atol=1e-7)


def test_bicubic_reproduces_a_quadratic_field_that_bilinear_cuts_across():
    # PSFs = base + f(x, y) * pattern, with pattern summing to 0 per channel, so every PSF
    # sums to 1 and interpolating the PSFs is interpolating f. Catmull-Rom reproduces
    # quadratics exactly inside the lattice (all four taps on the grid).
    n = 6
    rng = np.random.default_rng(4)
    base = rng.random((3, 5, 5)) + 1.0
    base /= base.sum(axis=(-2, -1), keepdims=True)
    pattern = rng.normal(size=(3, 5, 5)) * 0.002  # small enough that no pixel goes below 0
    pattern -= pattern.mean(axis=(-2, -1), keepdims=True)
    from psfgen.plan.grid import grid_coords

    coords = grid_coords(n)
    f = lambda x, y: 1.0 + 0.7 * x**2 - 0.4 * x * y + 0.3 * y**2 + 0.2 * x  # noqa: E731
    grid = (base[None] + f(coords[:, 0], coords[:, 1])[:, None, None, None] * pattern[None])[None]  # [1, P, 3, 5, 5]
    step = 2.0 / (n - 1)
    x = rng.uniform(-1 + step, 1 - step, 50)  # interior cells: every tap is a grid point
    y = rng.uniform(-1 + step, 1 - step, 50)
    want = base[None] + f(x, y)[:, None, None, None] * pattern[None]
    got = B.bicubic(grid, np.array([1.0]), n, x, y, np.ones(50))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(B.bilinear(grid, np.array([1.0]), n, x, y, np.ones(50)) - want).max() > 1e-5


# --- the API --------------------------------------------------------------------------
def test_api_shapes_modes_ranges(tiny_run):
    model = load_model(tiny_run / "latest.pt").to("cpu").eval()
    assert model.depth_range == (0.5, 2.0)
    psf = model.psf([0.5, -0.3, 0.0], [0.5, 0.8, 0.0], depth_m=1.0)
    assert psf.shape == (3, 3, 15, 15) and psf.device.type == "cpu" and not psf.requires_grad
    assert (psf >= 0).all()
    torch.testing.assert_close(psf.sum(dim=(-2, -1)), torch.ones(3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.psf(0.5, 0.5, 1.0), psf[:1])  # mean: deterministic
    torch.manual_seed(0)
    draws = model.psf(0.5, 0.5, 1.0, mode="sample", n_samples=4)
    assert draws.shape == (1, 4, 3, 15, 15) and not torch.equal(draws[0, 0], draws[0, 1])
    assert model.psf(0.5, 0.5, 1.0, mode="sample").shape == (1, 3, 15, 15)
    std = model.prior_std([0.0, 0.9], [0.0, -0.9], [1.0, 1.0])
    _, logvar = model.net.prior_params(model.conditions([0.0, 0.9], [0.0, -0.9], [1.0, 1.0]))
    sigma = torch.exp(0.5 * logvar.double())  # [2, Z]: the prior's standard deviation per latent dimension
    torch.testing.assert_close(std.double(), sigma.pow(2).mean(dim=1).sqrt(), rtol=1e-5, atol=0)  # their RMS
    cond = model.conditions([0.2], [0.1], 1.0)
    assert model.sample_from_prior(cond).shape == (1, 3, 15, 15)
    # Same point through the network directly: the API adds nothing but the condition.
    torch.testing.assert_close(model.psf(0.2, 0.1, 1.0), model.net.sample_from_prior(cond, mean=True))
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        model.psf(1.2, 0.0, 1.0)
    with pytest.raises(InputError, match="trained range"):
        model.psf(0.0, 0.0, 10.0)
    with pytest.raises(InputError, match="give depth_m"):
        model.psf(0.0, 0.0)
    with pytest.raises(InputError, match="mode"):
        model.psf(0.0, 0.0, 1.0, mode="median")
    assert model.psf(1.2, 0.0, 10.0, allow_extrapolation=True).shape == (1, 3, 15, 15)
    for bad in (
        dict(x=[np.nan], y=[0.1], depth_m=1.0),
        dict(x=[0.1], y=[np.inf], depth_m=1.0),
        dict(x=[0.1], y=[0.1], depth_m=np.nan),
    ):
        with pytest.raises(InputError, match="finite"):
            model.psf(**bad)


def test_checkpoint_round_trip(tiny_run):
    ckpt = torch.load(tiny_run / "latest.pt", weights_only=True)
    model = load_model(tiny_run / "latest.pt")
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(model.net.state_dict()[key], value)
    assert model.info["step"] == 40 and model.net.args.cond_dim == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_api_on_cuda(tiny_run):
    model = load_model(tiny_run / "latest.pt", device="cuda")
    assert model.psf(0.1, 0.1, 1.0).device.type == "cuda"


# --- psf sample ------------------------------------------------------------------------
def test_sample_cli(tiny_run, tmp_path):
    run = lambda *a: CliRunner().invoke(main, ["sample", "--checkpoint", str(tiny_run / "latest.pt"), *a])
    r = run("--coords", "0.5,0.5;-0.3,0.8", "--depth", "1.0", "--out", str(tmp_path / "p.npy"))
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "p.npy")
    assert arr.shape == (2, 3, 15, 15)
    np.testing.assert_allclose(arr, load_model(tiny_run / "latest.pt").psf([0.5, -0.3], [0.5, 0.8], 1.0).numpy())
    assert run("--grid", "5", "--depth", "2", "--out", str(tmp_path / "m.h5")).exit_code == 0
    with h5py.File(tmp_path / "m.h5") as f:
        assert f["psf"].shape == (25, 3, 15, 15) and f["coords"].shape == (25, 2)
        np.testing.assert_allclose(f["coords"][0], [-1, 1])
    assert run("--grid", "5", "--depth", "2", "--out", str(tmp_path / "m.png")).exit_code == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run("--coords", "0.5", "--depth", "1", "--out", str(tmp_path / "x.npy")), "--coords")
    assert_one_line_error(run("--coords", "1.5,0", "--depth", "1", "--out", str(tmp_path / "x.npy")), "[-1, 1]")
    assert_one_line_error(run("--coords", "0,0", "--depth", "1", "--out", str(tmp_path / "x.txt")), ".npy")
    assert not (tmp_path / "x.npy").exists()


# --- psf eval ---------------------------------------------------------------------------
def test_eval_cli_writes_report(tiny_run, tiny_grid, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(
        main, ["eval", "--checkpoint", str(tiny_run / "latest.pt"), "--data", str(tiny_grid), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "bilinear" in r.stdout and "cvae prior mean" in r.stdout and "report.html" in r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 100, r.stdout  # a terminal's width, with the table's columns
    metrics = json.loads((out / "metrics.json").read_text())
    # Only the test points are scored (part 1 of heldout/part): the validation points chose the checkpoint.
    with h5py.File(tiny_grid) as f:
        test = f["heldout/part"][:] == 1
        xy, d, a, b = (f[f"heldout/{x}"][:][test] for x in ("coords", "depth", "psf_a", "psf_b"))
        at = f["heldout/at_grid_depth"][:][test]
    assert test.sum() == 4
    per_depth = {f"at {v:g} m" for v in d[at]} | ({"between 0.5 and 2 m"} if (~at).any() else set())
    radius = np.hypot(xy[:, 0], xy[:, 1])
    bands = {
        label
        for label, lo, hi in (
            ("r [0, 0.15)", 0, 0.15),
            ("r [0.15, 0.5)", 0.15, 0.5),
            ("r [0.5, 0.9)", 0.5, 0.9),
            ("r [0.9, 1.41]", 0.9, 2),
        )
        if ((radius >= lo) & (radius < hi)).any()
    }
    assert len(bands) == 4  # one test point per band in the tiny file
    # a canonical model: its lens is symmetric, so bicubic of the mirror-averaged grid is a baseline too
    for method in ("cvae prior mean", "cvae prior sample", "nearest", "bilinear", "eigen-psf (32)", MIRRORED):
        m = metrics["heldout"][method]
        assert set(m) == {"all", "at grid depths", "between grid depths"} | per_depth | bands
        assert m["all"]["raw"]["n"] == 4 and sum(m[g]["raw"]["n"] for g in bands) == 4
    assert metrics["heldout_groups"]["radius band"] == ["r [0, 0.15)", "r [0.15, 0.5)", "r [0.5, 0.9)", "r [0.9, 1.41]"]
    assert metrics["raytrace_at_training_spp"]["all"]["n"] == 8
    assert metrics["checkpoint"]["step"] == 40 and metrics["data"]["run_id"]
    assert metrics["data"]["n_test"] == 4 and metrics["data"]["n_validation"] == 4
    assert metrics["protocol"] == {
        "scored": "test",
        "test_points": 4,
        "validation_points": 4,
        "statement": "test points: 4, never seen in training nor used to choose this checkpoint",
    }
    assert metrics["checkpoint"]["selection"]["part"] == "validation"
    assert metrics["checkpoint"]["selection"]["n_points"] == 4
    assert "test points: 4, never seen in training nor used to choose this checkpoint" in r.stdout
    assert metrics["headline"]["sentence"] in " ".join(r.stdout.splitlines())  # the report's sentence, wrapped
    assert "points lower" in metrics["headline"]["sentence"] or "points higher" in metrics["headline"]["sentence"]
    assert "cvae prior mean (cpu)" in metrics["speed_psfs_per_s"]
    # The CVAE's figures recomputed from the file and the model, with the noise correction written out.
    model = load_model(tiny_run / "latest.pt")
    pred = model.psf(xy[:, 0], xy[:, 1], d, allow_extrapolation=True).numpy()
    ref, sq = 0.5 * (a + b), lambda v: (v.astype(np.float64) ** 2).sum(axis=(1, 2, 3))
    num, den = sq(pred - ref) - sq(a - b) / 4, sq(ref) - sq(a - b) / 4
    pooled = metrics["heldout"]["cvae prior mean"]["all"]["corrected"]["pooled"]
    assert pooled == pytest.approx(np.sqrt(max(num.sum(), 0) / den.sum()), rel=1e-4)
    for label, lo, hi in (("r [0, 0.15)", 0, 0.15), ("r [0.9, 1.41]", 0.9, 2)):  # a band's figure, pooled alike
        inside = (radius >= lo) & (radius < hi)
        band = metrics["heldout"]["cvae prior mean"][label]["corrected"]["pooled"]
        assert band == pytest.approx(np.sqrt(max(num[inside].sum(), 0) / den[inside].sum()), rel=1e-4, abs=1e-9)
    raw = np.sqrt(sq(pred - ref) / sq(ref))  # per point; continuous values, so no ties to rank
    std = model.prior_std(xy[:, 0], xy[:, 1], d, allow_extrapolation=True).numpy()
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    expected = np.corrcoef(rank(std), rank(raw))[0, 1]
    assert metrics["uncertainty"]["spearman_prior_std_vs_error"] == pytest.approx(expected, abs=1e-6)
    # The table (canonical model): scored on the same points, its deviation from the network recomputed.
    table = model.tabulate()
    got = table.psf(xy[:, 0], xy[:, 1], d, allow_extrapolation=True).numpy()
    assert metrics["tabulated"]["shape"] == list(table.shape)
    deviation = np.sqrt(sq(got - pred).sum() / sq(pred).sum())
    assert metrics["tabulated"]["deviation_from_model"] == pytest.approx(deviation, rel=1e-3)
    assert 0 < deviation < 0.05
    assert metrics["heldout"]["cvae prior mean (table)"]["all"]["raw"]["n"] == 4
    assert "cvae prior mean, table (cpu)" in metrics["speed_psfs_per_s"] and "x the file's ray tracing" in r.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"error_maps.png", "heldout.png", "prior_std.png", "grid_depth0_0.5m.png", "grid_depth1_2m.png"} <= set(pngs)
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(pngs)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted((out / p).read_bytes() for p in pngs)
    for p in pngs:
        assert p in page


class _Page(HTMLParser):
    """The report's text by element id, its table rows, bold cells and image titles."""

    def __init__(self):
        super().__init__()
        self.ids, self.rows, self.bold, self.imgs, self._open, self._in_b = {}, [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for entry in self._open:  # [id, tag, nesting of that tag inside it]
            entry[2] += entry[1] == tag
        if "id" in a:
            self.ids[a["id"]] = ""
            self._open.append([a["id"], tag, 0])
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self.rows[-1].append("")
        self._in_b = self._in_b or tag == "b"
        if tag == "img":
            self.imgs.append(a["alt"])

    def handle_endtag(self, tag):
        self._in_b = self._in_b and tag != "b"
        for entry in self._open:
            entry[2] -= entry[1] == tag
        self._open = [e for e in self._open if e[2] >= 0]

    def handle_data(self, data):
        for key, _, _ in self._open:
            self.ids[key] += data
        if self.rows and self.rows[-1]:
            self.rows[-1][-1] += data
        if self._in_b:
            self.bold.append(data)


def test_report_opens_with_the_headline_and_shows_held_out_points(tiny_run, tiny_grid, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(tiny_run / "latest.pt"), "--data", str(tiny_grid), "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    page = _Page()
    page.feed((out / "report.html").read_text())
    pooled = {n: 100 * m["all"]["corrected"]["pooled"] for n, m in metrics["heldout"].items()}
    best_interp = min((n for n in pooled if not n.startswith("cvae")), key=pooled.get)
    # Ray tracing at the training spp, recomputed from the file: two traces differ by sqrt(2) x one's error.
    with h5py.File(tiny_grid) as f:
        idx, again, grid = f["noise/index"][:], f["noise/psf"][:].astype(float), f["grid/psf"][:].astype(float)
        kept, lit = f["grid/kept"][:], f["grid/valid"][:].astype(bool).all(axis=-1)
    # Truncated: a lit PSF with a channel keeping under 99% of its valid rays (every grid point is lit on this lens).
    assert lit.all()
    cut = kept.min(axis=-1) < 0.99
    trace = 100 * np.sqrt(((again - grid[:, idx]) ** 2).sum() / (grid[:, idx] ** 2).sum() / 2)
    # The headline in points (not a relative %), from the figures as the sentence shows them, recomputed here.
    cvae, b = round(pooled["cvae prior mean"], 1), round(pooled[best_interp], 1)
    points = round(b - cvae, 1)
    assert points == metrics["headline"]["points_lower"]
    change = f"{abs(points):.1f} points {'lower' if points > 0 else 'higher'}" if points else "the same to 0.1 points"
    label = best_interp.replace("eigen-psf (32)", "eigen-PSF, 32 components")
    assert page.ids["headline"] == (
        f"CVAE {cvae:.1f}% against the best interpolation's {b:.1f}% ({label}): {change}; tracing the point at "
        f"the training spp: {trace:.1f}% (the CVAE's error is {pooled['cvae prior mean'] / trace:.1f}× that)."
    )
    table = {row[0]: row[1] for row in page.rows if len(row) == 3 and row[1].endswith("%")}
    for name, value in pooled.items():
        assert table[name] == f"{value:.1f}%"
    assert table["ray tracing"] == f"{trace:.1f}%"
    # Bold: the prior mean the sentence quotes, whichever method scored lowest (a prior sample may, by chance).
    assert page.bold == ["cvae prior mean", f"{pooled['cvae prior mean']:.1f}%"]
    # The first screen: how good (above), where (the band plot), how fast (PSFs/s against tracing), in what units.
    html_text = (out / "report.html").read_text()
    first = html_text[html_text.index('<section id="summary">') : html_text.index("</section>")]
    assert 'id="band-plot"' in first and base64.b64encode((out / "error_by_band.png").read_bytes()).decode() in first
    speeds = metrics["speed_psfs_per_s"]
    trace_speed = next(iter(speeds.values()))
    for key, label in (
        ("cvae prior mean (cpu)", "the model (prior mean), CPU"),
        ("cvae prior mean, table (cpu)", "its table, CPU"),
    ):
        row = next(r for r in page.rows if r and r[0] == label)
        ratio = speeds[key] / trace_speed
        assert row[1:] == [f"{speeds[key]:,.0f}", f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2g}×"]
    assert "PSFs/s" in page.ids["speed"] and "ray tracing (file provenance, device " in page.ids["speed"]
    # 64 traced px of 2.52 um (5.041671 mm / 2000 px), downsampled to 15: 10.76 um per kernel pixel; 161 um span.
    assert "sensor pixel2.52 µm" in page.ids["units"] and "kernel pixel (pitch)10.76 µm" in page.ids["units"]
    assert "15 × 15 px = 161 µm = 64 sensor pixels" in page.ids["units"]
    t = metrics["optics"]["truncation"]
    assert f"mean {100 * t['mean_kept']:.1f}%, worst {100 * t['worst_kept']:.1f}%" in page.ids["units"]
    assert all(f'id="{i}"' in first for i in ("headline-table", "speed", "units", "protocol"))
    assert "The model where it was not trained" in page.imgs and "Where each method errs, per depth" in page.imgs
    t = metrics["optics"]["truncation"]
    assert (t["truncated"], t["total"], t["kept_limit"]) == (int(cut.sum()), cut.size, 0.99)
    assert t["worst_kept"] == pytest.approx(float(kept.min())) and t["mean_kept"] == pytest.approx(kept.mean())
    assert ("truncation" in page.ids) == bool(cut.any())
    if cut.any():  # the default lens's 64-px window cuts these PSFs (docs/dataset.md)
        assert (
            f"{int(cut.sum())} of {cut.size} lit grid PSFs keep less than 99% of their valid rays"
            in page.ids["truncation"]
        )
        assert f"worst {100 * t['worst_kept']:.1f}%, channel " in page.ids["truncation"]
    assert "sha256" in page.ids["context"] and metrics["data"]["lens_sha256"] in page.ids["context"]
    with h5py.File(tiny_grid) as f:
        nm = [f"{1000 * w:.0f} nm" for w in f["wvln"][:]]
    assert all(w in page.ids["context"] for w in nm)
    # 64 traced px of 2.52 um (5.041671 mm / 2000 px), downsampled to 15: 10.76 um per kernel pixel.
    assert "10.76 µm per kernel pixel" in page.ids["context"]
    for term in ("posterior recon", "prior mean", "eigen-PSF (K)", "noise-corrected, pooled", "field coordinates"):
        assert term in page.ids["definitions"]
    # What was scored, what chose the checkpoint, and the error per radius band.
    assert page.ids["protocol"] == "test points: 4, never seen in training nor used to choose this checkpoint."
    assert "radius bands" in page.ids["definitions"] and "validation points" in page.ids["definitions"]
    for label in metrics["heldout_groups"]["radius band"]:
        assert label in page.ids["per-band"]
    band_row = next(row for row in page.rows if row and row[0] == "cvae prior mean" and len(row) == 5)
    assert band_row[1:] == [
        f"{100 * metrics['heldout']['cvae prior mean'][g]['corrected']['pooled']:.1f}%"
        for g in metrics["heldout_groups"]["radius band"]
    ]
    # The report function alone, with an extra figure (e.g. a resolution chart): embedded like the others.
    from psfcvae.evaluation.report import write_report

    png = (out / "heldout.png").read_bytes()
    (tmp_path / "alone").mkdir()
    write_report(metrics, tmp_path / "alone", [], [("Resolution chart", png, "a chart")])
    alone = (tmp_path / "alone" / "report.html").read_text()
    assert base64.b64encode(png).decode() in alone and "Resolution chart" in alone


def test_log_scale_colourbars_read_real_values_and_error_scales_are_stated():
    from psfcvae import plots

    rng = np.random.default_rng(0)
    psf = rng.random((4, 3, 5, 5)).astype(np.float32) + 1e-4
    err = np.zeros_like(psf)
    err[:, 0] = rng.random((4, 5, 5)) * 0.2
    err[0, 0, 0, 0] = 5.0  # one outlier: the scale ends at the 99th percentile, not at it
    fig = plots.grid_panels({"ground truth": psf, "prior mean": psf, "|error|": err}, 2, 1.0, log=True)
    fig.canvas.draw()
    bars = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel().startswith(("PSF value", "|error|"))}
    psf_bar = bars["PSF value / its peak (per tile)"]
    assert psf_bar.get_yscale() == "log"
    ticks = [t for t in psf_bar.get_yticks() if 1e-3 * 0.999 <= t <= 1.001]
    np.testing.assert_allclose(ticks, [1e-3, 1e-2, 1e-1, 1.0])
    labels = [t.get_text() for t in psf_bar.get_yticklabels() if t.get_text()]
    assert any("10^{-3}" in t for t in labels) and any("10^{0}" in t for t in labels), labels
    top = np.percentile(err.max(axis=1), 99)
    error_bar = next(ax for name, ax in bars.items() if name.startswith("|error|"))
    np.testing.assert_allclose(error_bar.get_ylim(), (top * 1e-3, top), rtol=1e-6)
    assert top < 1.0  # the outlier (5.0) does not set the scale
    linear = plots.grid_panels({"ground truth": psf, "|error|": err}, 2, 1.0, log=False)
    linear.canvas.draw()
    lin_bar = next(ax for ax in linear.axes if ax.get_ylabel().startswith("|error|"))
    assert lin_bar.get_yscale() == "linear" and lin_bar.get_ylim()[0] == 0
    std = plots.std_maps([np.full((4, 4), 0.06), np.full((4, 4), 0.07)], [1.0, 2.0], np.zeros((1, 2)))
    std.canvas.draw()
    std_bar = next(ax for ax in std.axes if ax.get_ylabel().startswith("prior spread"))
    np.testing.assert_allclose(std_bar.get_ylim(), (0.0, 0.07))  # from 0, not from the smallest value


def test_import_psfcvae_keeps_the_callers_matplotlib_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); import sys, psfcvae, psfcvae.evaluation.evaluate, psfcvae.plots, "
        "psfcvae.evaluation.report, psfcvae.evaluation.figures, numpy as np; "
        "psfcvae.plots.save(psfcvae.plots.std_maps([np.ones((2, 2))], [1.0], np.zeros((1, 2))), '/dev/null'); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )  # DeepLens, which the chart figure's patch-wise anchor needs, imports pyplot itself: the backend is what counts
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_headline_compares_with_the_best_interpolation_and_tracing():
    from psfcvae.evaluation.evaluate import headline

    m = lambda v: {"all": {"corrected": {"pooled": v}}}  # noqa: E731
    result = {
        "heldout": {
            "cvae prior mean": m(0.3114),
            "cvae prior sample": m(0.29),  # a random draw that happened to score lower: never the named method
            "nearest": m(0.4),
            "eigen-psf (32)": m(0.3586),
            "bilinear": m(0.372),
        },
        "raytrace_at_training_spp": {"all": {"pooled": 0.032}},
    }
    h = headline(result)
    assert h["named"] == "cvae prior mean" and h["best_interpolation"] == "eigen-psf (32)"
    assert list(h["pooled"]) == ["cvae prior sample", "cvae prior mean", "eigen-psf (32)", "bilinear", "nearest"]
    # Points, of the figures as the sentence shows them: 35.9 - 31.1 = 4.8, not the unrounded 4.72 ("4.7").
    assert h["points_lower"] == 4.8
    assert h["sentence"] == (
        "CVAE 31.1% against the best interpolation's 35.9% (eigen-PSF, 32 components): 4.8 points lower; "
        "tracing the point at the training spp: 3.2% (the CVAE's error is 9.7× that)."
    )
    result["heldout"]["cvae prior mean"] = m(0.3964)
    result["heldout"]["bilinear"] = m(0.3449)
    h = headline(result)
    assert h["points_lower"] == -5.1 and h["best_interpolation"] == "bilinear"
    assert "CVAE 39.6% against the best interpolation's 34.5% (bilinear): 5.1 points higher;" in h["sentence"]
    result["heldout"]["cvae prior mean"] = m(0.34504)
    assert "34.5% (bilinear): the same to 0.1 points;" in headline(result)["sentence"]
    del result["raytrace_at_training_spp"]
    assert headline(result)["sentence"].endswith("(bilinear): the same to 0.1 points.")
    # Without a model: the best interpolation is named (and bold in the report).
    baselines = {"heldout": {k: v for k, v in result["heldout"].items() if not k.startswith("cvae")}}
    h = headline(baselines)
    assert h["named"] == "bilinear" and h["sentence"] == "Best interpolation: bilinear 34.5%."
    baselines["raytrace_at_training_spp"] = {"all": {"pooled": 0.032}}
    assert headline(baselines)["sentence"] == (
        "Best interpolation: bilinear 34.5%; tracing the point at the training spp: 3.2% (its error is 10.8× that)."
    )


def test_heldout_maps_share_one_colour_scale():
    """The held-out figure's |error| and spread columns read on one colour scale: a spread 40x smaller than the
    error looks 40x smaller, not as large on a scale of its own."""
    from psfcvae import plots
    from psfcvae.evaluation.figures import _one_map_scale

    rng = np.random.default_rng(3)
    maps = {"|error|": 0.4 * rng.random((2, 5, 5)), "spread": 0.01 * rng.random((2, 5, 5))}
    for log in (False, True):
        fig = plots.heldout_panels({"reference": rng.random((2, 3, 5, 5))}, {}, ["a", "b"], maps, log)
        _one_map_scale(fig, maps, log)
        fig.canvas.draw()
        top = np.percentile(np.concatenate([m.ravel() for m in maps.values()]), 99)
        bars = [ax for ax in fig.axes if ax.get_ylabel().startswith("/ reference peak")]
        assert len(bars) == 2
        for bar in bars:
            np.testing.assert_allclose(bar.get_ylim(), (top * 1e-3 if log else 0.0, top), rtol=1e-6)
        maps_shown = [im for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 2]
        assert len(maps_shown) == 4 and all(im.norm.vmax == pytest.approx(top) for im in maps_shown)


def test_eval_baselines_only_and_bad_input(tiny_run, tiny_grid, tmp_path):
    run = lambda *a: CliRunner().invoke(main, ["eval", *a])
    r = run("--baselines-only", "--data", str(tiny_grid), "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "cvae" not in metrics["heldout"]
    page = _Page()
    page.feed((tmp_path / "b" / "report.html").read_text())  # no model: the best interpolation is named and bold
    best = metrics["headline"]["best_interpolation"]
    assert page.bold == [best, f"{100 * metrics['headline']['pooled'][best]:.1f}%"]
    assert page.ids["headline"].startswith("Best interpolation: ") and "band-plot" in page.ids
    assert not any(row and row[0].startswith("the model") for row in page.rows)  # no model speed
    ck = str(tiny_run / "latest.pt")
    assert_one_line_error(
        run("--checkpoint", str(tmp_path / "none.pt"), "--data", str(tiny_grid), "--out", str(tmp_path / "e")),
        "does not exist",
    )
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert_one_line_error(
        run("--checkpoint", str(junk), "--data", str(tiny_grid), "--out", str(tmp_path / "e")),
        "--checkpoint expects a checkpoint from 'psf train'",
        "is not a PyTorch file",
    )
    other = generate(tiny_config(tmp_path / "other.h5", seed=99, noise_points=0))
    assert_one_line_error(
        run("--checkpoint", ck, "--data", str(other), "--out", str(tmp_path / "e")), "trained on another dataset"
    )
    no_heldout = generate(tiny_config(tmp_path / "noheld.h5", heldout=0, noise_points=0))
    assert_one_line_error(
        run("--baselines-only", "--data", str(no_heldout), "--out", str(tmp_path / "e")), "no held-out set"
    )
    assert_one_line_error(
        run("--data", str(tiny_grid), "--out", str(tmp_path / "e")), "--checkpoint or --baselines-only"
    )
    assert not (tmp_path / "e").exists()


def test_xy_only_model_on_a_multi_depth_file(tiny_grid, tmp_path):
    from conftest import small_config

    from psfcvae import train

    with pytest.raises(InputError, match="config key 'blend' is bicubic, which needs the depth"):
        train(small_config(tiny_grid, tmp_path / "xy", max_steps=5, condition_on_depth="false", blend="bicubic"))
    run_dir = train(small_config(tiny_grid, tmp_path / "xy", max_steps=5, condition_on_depth="false"))
    model = load_model(run_dir / "latest.pt")
    assert model.blend is None and model.info["config"]["blend"] == "none"  # blend auto: the network alone
    assert model.net.args.cond_dim == 2
    torch.testing.assert_close(model.psf(0.1, 0.2, 2.0), model.psf(0.1, 0.2, 0.5))  # depth is not an input
    with pytest.raises(InputError, match="trained range"):
        model.psf(0.1, 0.2, 7.0)
    r = CliRunner().invoke(
        main,
        ["eval", "--checkpoint", str(run_dir / "latest.pt"), "--data", str(tiny_grid), "--out", str(tmp_path / "e")],
    )
    assert r.exit_code == 0, r.output


def test_api_names_the_bad_argument(tiny_run):
    model = load_model(tiny_run / "latest.pt")
    for kwargs, needle in (
        (dict(x=[], y=[], depth_m=1.0), "non-empty"),
        (dict(x=[0.1, 0.2], y=[0.1, 0.2], depth_m=[1.0, 1.0, 1.0]), "depth_m must be one depth or one per point"),
        (dict(x="left", y=0.1, depth_m=1.0), "x must be a real number"),
        (dict(x=0.1, y=0.1, depth_m="far"), "depth_m must be a real number"),
    ):
        with pytest.raises(InputError, match=needle):
            model.psf(**kwargs)


def test_edited_checkpoints_are_refused_in_one_line(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "latest.pt", weights_only=True)
    for edit, needle in (
        (lambda c: c.pop("versions"), "lacks 'versions'"),
        (lambda c: c["data_fingerprint"].update(depths=[]), "no valid training depths"),
        (lambda c: c["data_fingerprint"].update(depths="far"), "no valid training depths"),
    ):
        bad = {**ckpt, "data_fingerprint": dict(ckpt["data_fingerprint"])}
        edit(bad)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=needle):
            load_model(tmp_path / "bad.pt")


def test_metrics_json_has_no_nan_tokens(tmp_path):
    from psfcvae.evaluation.evaluate import _json_safe

    text = json.dumps(
        _json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": np.float64("nan")}}), allow_nan=False
    )
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_sample_cli_refuses_nan_and_a_protocol_4_pickle_in_one_line(tiny_run, tmp_path):
    import pickle
    import warnings

    ck = str(tiny_run / "latest.pt")
    run = lambda *a: CliRunner().invoke(main, ["sample", "--checkpoint", *a])  # noqa: E731
    assert_one_line_error(run(ck, "--coords", "nan,0.1", "--depth", "1", "--out", str(tmp_path / "a.npy")), "finite")
    assert_one_line_error(run(ck, "--coords", "0.1,0.1", "--depth", "nan", "--out", str(tmp_path / "b.npy")), "--depth")
    assert not list(tmp_path.glob("*.npy"))
    with open(tmp_path / "p4.pt", "wb") as f:
        pickle.dump({"format": "psf-cvae.checkpoint"}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # torch's warning would show if it were not silenced
        result = run(str(tmp_path / "p4.pt"), "--coords", "0,0", "--out", str(tmp_path / "c.npy"))
    assert_one_line_error(result, "not a readable psf-cvae checkpoint")


def test_second_round_of_bad_inputs(tiny_run, tiny_grid, tmp_path):
    ck = str(tiny_run / "latest.pt")
    run = lambda *a: CliRunner().invoke(main, list(a))  # noqa: E731
    out = str(tmp_path / "p.npy")
    # Far outside the field the encoding overflows: no NaN PSFs written.
    assert_one_line_error(
        run("sample", "--checkpoint", ck, "--coords", "1e20,0", "--depth", "1", "--allow-extrapolation", "--out", out),
        "no finite PSF",
    )
    # The API's words become the command's options.
    assert_one_line_error(
        run("sample", "--checkpoint", ck, "--coords", "1.5,0", "--depth", "1", "--out", out), "--allow-extrapolation"
    )
    assert_one_line_error(run("sample", "--checkpoint", ck, "--coords", "0,0", "--out", out), "give --depth")
    # An existing file is never replaced without --overwrite (it may be the training grid).
    grid_copy = tmp_path / "grid.h5"
    shutil.copy(tiny_grid, grid_copy)
    assert_one_line_error(
        run("sample", "--checkpoint", ck, "--coords", "0,0", "--depth", "1", "--out", str(grid_copy)),
        "exists",
        "--overwrite",
    )
    assert h5py.is_hdf5(grid_copy) and GridFile.open(grid_copy).complete
    assert (
        run(
            "sample", "--checkpoint", ck, "--coords", "0,0", "--depth", "1", "--out", str(grid_copy), "--overwrite"
        ).exit_code
        == 0
    )
    assert_one_line_error(
        run("sample", "--checkpoint", ck, "--grid", "5000", "--depth", "1", "--out", out),
        "--grid 5000 makes 25000000 PSFs",
        "smaller --grid",
    )
    assert_one_line_error(
        run("sample", "--checkpoint", str(tiny_run), "--coords", "0,0", "--depth", "1", "--out", out),
        "is a directory",
        "latest.pt",
    )
    # Corrupted PSF values: eval says so in one line, as train does.
    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_grid, bad)
    with h5py.File(bad, "r+") as f:
        f["heldout/psf_a"][2] = np.nan
    assert_one_line_error(
        run("eval", "--baselines-only", "--data", str(bad), "--out", str(tmp_path / "ev")),
        "heldout/psf_a at point 2",
        "holds NaN or inf",
    )
    # A config file that is not text; a band count that overflows float32.
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary")
    assert_one_line_error(run("train", "--data", str(tiny_grid), "--config", str(tmp_path / "bin.yaml")), "not UTF-8")
    assert_one_line_error(
        run("train", "--data", str(tiny_grid), "--run-dir", str(tmp_path / "r"), "--set", "num_frequencies=130"),
        "'num_frequencies' must be between 0 and 24",
    )
    assert not (tmp_path / "r").exists()


def test_nearest_never_answers_with_a_dark_grid_point():
    rng = np.random.default_rng(2)
    grid = rng.random((1, 9, 3, 5, 5)).astype(np.float32)  # 3x3 grid, one depth
    grid[0, 4] = 0.0  # the centre (0, 0) is dark
    out = B.nearest(grid, np.array([1.0]), 3, np.array([0.1, 0.9]), np.array([0.05, 0.9]), np.array([1.0, 1.0]))
    # (0.1, 0.05) is nearest the dark centre; of the lit points, (1, 0) (index 5) is nearest; (0.9, 0.9) -> (1, 1).
    np.testing.assert_allclose(out[0], grid[0, 5] / grid[0, 5].sum(axis=(-2, -1), keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(out[1], grid[0, 2] / grid[0, 2].sum(axis=(-2, -1), keepdims=True), rtol=1e-6)


def test_eval_refuses_a_checkpoint_chosen_on_the_points_it_would_score(tiny_run, tiny_grid, tmp_path):
    """A checkpoint chosen on the points psf eval would score (another file's split of the same held-out points, or
    all of them) is refused in one line, as is resuming its run on that split; an edited selection is refused."""
    from helpers import small_config

    from psfcvae import train

    flipped = tmp_path / "flipped.h5"  # the same points, validation and test swapped
    shutil.copy(tiny_grid, flipped)
    with h5py.File(flipped, "r+") as f:
        f["heldout/part"][...] = 1 - f["heldout/part"][:]
    out = tmp_path / "e"
    run = lambda ck, data: CliRunner().invoke(  # noqa: E731
        main, ["eval", "--checkpoint", str(ck), "--data", str(data), "--out", str(out)]
    )
    want = f"checkpoint {tiny_run / 'best.pt'} was chosen on 4 of the 4 test points of {flipped}"
    assert_one_line_error(run(tiny_run / "best.pt", flipped), want, "retrain on this file")
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    info = GridFile.open(tiny_grid)
    every = np.column_stack([info.heldout_coords, info.heldout_depth]).tolist()
    torch.save({**ckpt, "selection": {**ckpt["selection"], "part": "all", "points": every}}, tmp_path / "all.pt")
    assert_one_line_error(run(tmp_path / "all.pt", tiny_grid), "was chosen on 4 of the 4 test points", "all points'")
    assert not out.exists()
    for bad in ([[0.1, 0.2]], "everything", [[0.1, 0.2, "far"]]):
        torch.save({**ckpt, "selection": {**ckpt["selection"], "points": bad}}, tmp_path / "bad.pt")
        with pytest.raises(InputError, match="holds no valid 'selection'"):
            load_model(tmp_path / "bad.pt")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    with pytest.raises(InputError, match="chose best.pt on other validation points than"):
        train(small_config(flipped, run_dir), resume=True)
