"""Stage 1: the grid file's layout and invariants, faithfulness to DeepLens, determinism."""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import combinations

import h5py
import numpy as np
import pytest
import torch
from deeplens import GeoLens
from helpers import assert_deeplens_psfs, tiny_config

from psfgen import GridFile, generate
from psfgen.analysis.info import summary
from psfgen.config import DEFAULT_LENS
from psfgen.generation import block_seed, plan_blocks, trace_points
from psfgen.plan.grid import (
    RADIUS_BANDS,
    TEST,
    VALIDATION,
    band_counts,
    grid_coords,
    heldout_points,
    neighbour_pairs,
    radius_band,
)
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2
from psfgen.trace import illumination
from psfgen.trace.lens import build_lens, read_lens_file
from psfgen.trace.resample import area_matrix, downsample


def test_file_layout_and_invariants(tiny_grid):
    N, D, k = 4, 2, 15
    with h5py.File(tiny_grid, "r") as f:
        a = f.attrs
        assert a["format"] == "psf-cvae.grid" and a["schema_version"] == 9
        assert set(json.loads(a["versions"])) >= {"psf-cvae", "deeplens-core", "torch", "h5py"}
        lens_bytes = open(DEFAULT_LENS, "rb").read()
        assert a["lens_sha256"] == hashlib.sha256(lens_bytes).hexdigest()
        assert f["lens/file"][:].tobytes() == lens_bytes and a["lens_format"] == "json"
        # The normalised JSON DeepLens writes of the lens it read: the same surfaces, the sensor resolved.
        lens, normal = json.loads(lens_bytes), json.loads(a["lens_json"])
        assert [s["type"] for s in normal["surfaces"]] == ["Aperture", "Aspheric", "Spheric"]  # "Stop" is read so
        assert normal["sensor_res"] == lens["sensor_res"] and normal["r_sensor"] > 0
        assert json.loads(a["sensor_from"]) == {"size": "the lens file", "res": "the lens file"}
        # [D, P, 2] mm: where the chief ray lands, on the pinhole position's side of the axis but inside it
        # (this lens's barrel distortion: 46 px at the corners)
        centre = f["grid/chief"][:]
        pinhole = grid_coords(N) * np.array(json.loads(a["sensor_size_mm"])) / 2
        assert centre.shape == (D, N * N, 2) and (np.sign(centre) == np.sign(pinhole)).all()
        assert (np.abs(centre) < np.abs(pinhole)).all() and (np.abs(centre) > 0.9 * np.abs(pinhole)).all()
        assert json.loads(a["config"])["spp"] == 2000 and a["seed"] == 7
        for key in ("device", "started_at", "downsample_method"):
            assert key in a
        psf = f["grid/psf"][:]
        assert psf.shape == (D, N * N, 3, k, k) and psf.dtype == np.float32
        assert (psf >= 0).all()
        np.testing.assert_allclose(psf.sum(axis=(-2, -1)), 1.0, atol=1e-5)
        np.testing.assert_array_equal(f["grid/coords"][:], grid_coords(N))
        np.testing.assert_allclose(
            f["grid/coords"][N + 2], [1 / 3, 1 / 3], rtol=1e-12
        )  # row 1, col 2: y falls down the rows
        np.testing.assert_array_equal(f["depths"][:], [0.5, 2.0])
        assert f["depths"].attrs["units"] == "m"
        np.testing.assert_allclose(f["wvln"][:], [0.656, 0.587, 0.486])
        assert f["grid/neighbors"].shape == (2 * N * (N - 1) + 2 * (N - 1) ** 2, 2)
        # The share of valid rays inside the 64-px window, stored for every group: the default lens's 64-px window
        # loses light at every one of these points (its corners keep ~10-20%), yet no lit channel keeps nothing.
        for name, shape in (("grid/kept", (D, N * N, 3)), ("noise/kept", (D, 4, 3)), ("heldout/kept_a", (8, 3))):
            kept = f[name][:]
            assert kept.shape == shape and kept.dtype == np.float32, name
            assert ((kept > 0) & (kept <= 1)).all(), name
        assert (f["grid/kept"][:] < 0.99).any() and (f["heldout/kept_b"][:] > 0).all()
        assert f["blocks/done"][:].all()
        # The default lens lights its whole field: every channel valid, none darker than 90% of the axis.
        assert f["grid/valid"][:].all() and f["heldout/valid_a"][:].all()
        assert f["grid/illumination"].shape == (D, N * N, 3) and (f["grid/illumination"][:] > 0.9).all()
        # The noise re-trace is an independent trace of the same points: close, not equal.
        idx = f["noise/index"][:]
        again, first = f["noise/psf"][:], psf[:, idx]
        assert again.shape == (D, 4, 3, k, k) and not np.array_equal(again, first)
        err = rel_l2(again, first)  # spp 2000: 10-90% Monte Carlo noise; another point's PSF is ~140% off
        assert 0 < err.mean() < 0.8, err
        # Held-out: off the grid, two independent halves, half between grid depths, the generator's split.
        xy, depth, at = f["heldout/coords"][:], f["heldout/depth"][:], f["heldout/at_grid_depth"][:]
        step = 2 / (N - 1)
        assert np.abs(xy[:, None, :] - grid_coords(N)[None]).max(axis=-1).min() >= 0.1 * step
        assert at.sum() == 4 and set(depth[at]) <= {0.5, 2.0}
        assert ((depth[~at] > 0.5) & (depth[~at] < 2.0)).all()
        want = heldout_points(N, np.array([0.5, 2.0]), 8, 7)
        for got, expected in zip((xy, depth, at, f["heldout/part"][:]), want):
            np.testing.assert_array_equal(got, expected)
        assert f["heldout/part"].dtype == np.uint8 and f["heldout/part"][:].tolist() == [1, 0] * 4
    grid = GridFile.open(tiny_grid)  # the parts as GridFile reads them: the validation and test points, together all
    val, test, every = (grid.heldout(part) for part in ("validation", "test", "all"))
    assert val["index"].tolist() == [1, 3, 5, 7] and test["index"].tolist() == [0, 2, 4, 6]
    assert (grid.n_part("validation"), grid.n_part("test"), grid.n_part("all")) == (4, 4, 8)
    for key in ("coords", "depth", "ref", "illumination", "lit"):
        np.testing.assert_array_equal(test[key], every[key][test["index"]])
        np.testing.assert_array_equal(val[key], every[key][val["index"]])
    with pytest.raises(ValueError, match="part must be one of"):
        grid.heldout("train")
        pa, pb = f["heldout/psf_a"][:], f["heldout/psf_b"][:]
        np.testing.assert_allclose(pa.sum(axis=(-2, -1)), 1.0, atol=1e-5)
        assert not np.array_equal(pa, pb)


def test_neighbour_table_matches_brute_force():
    for n in (2, 3, 5):
        coords = [(r, c) for r in range(n) for c in range(n)]
        brute = {
            frozenset((i, j))
            for i, j in combinations(range(n * n), 2)
            if max(abs(coords[i][0] - coords[j][0]), abs(coords[i][1] - coords[j][1])) == 1
        }
        table = neighbour_pairs(n)
        got = [frozenset(map(int, p)) for p in table]
        assert len(got) == len(set(got)) == 2 * n * (n - 1) + 2 * (n - 1) ** 2
        assert set(got) == brute


def test_downsampling_preserves_energy_and_matches_supersampling():
    a = area_matrix(64, 15)
    np.testing.assert_allclose(a.sum(axis=0), 1.0)  # every input pixel fully distributed
    np.testing.assert_allclose(a.sum(axis=1), 64 / 15)
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 64, 64))
    y = a @ x @ a.T
    np.testing.assert_allclose(y.sum(axis=(-2, -1)), x.sum(axis=(-2, -1)))
    # Independent check: split each input pixel into 15x15 equal parts, sum 64x64 blocks.
    fine = np.repeat(np.repeat(x, 15, axis=-1), 15, axis=-2) / 225.0
    blocks = fine.reshape(2, 3, 15, 64, 15, 64).sum(axis=(-3, -1))
    np.testing.assert_allclose(y, blocks, rtol=1e-10)
    out = downsample(torch.as_tensor(x), 15).numpy()
    np.testing.assert_allclose(out, blocks / blocks.sum(axis=(-2, -1), keepdims=True), rtol=1e-5)


def test_kept_is_the_share_of_valid_rays_in_the_window_and_0_without_any():
    rays = np.array([[2000.0, 1000.0, 0.0], [4000.0, 3.0, 100.0]])  # valid rays [B, 3]
    window = np.array([[1500.0, 1000.0002, 0.0], [4000.0, 0.0, 25.0]])  # a float32 sum may pass the count by ~1e-7
    kept = illumination.kept(rays, window)
    assert kept.dtype == np.float32
    np.testing.assert_array_equal(kept, np.array([[0.75, 1.0, 0.0], [1.0, 0.0, 0.25]], np.float32))


def test_grid_psfs_are_deeplens_psfs(tiny_grid):
    """Block 0 again, straight from DeepLens with the block's seed."""
    cfg = tiny_config(tiny_grid)
    block = plan_blocks(cfg, 2, cfg.heldout)[0]
    lens = build_lens(read_lens_file(DEFAULT_LENS), torch.device("cpu"))
    pts = torch.as_tensor(
        np.concatenate([grid_coords(4)[block.start : block.stop], np.full((block.stop - block.start, 1), -500.0)], 1),
        dtype=torch.float32,
    )
    with h5py.File(tiny_grid, "r") as f:
        got = f["grid/psf"][0, block.start : block.stop]
    assert_deeplens_psfs(lens, pts, cfg.spp, block_seed(cfg.seed, block), got)
    # And statistically: an independent trace at 10x the rays lies within the noise.
    torch.manual_seed(12345)
    fine = downsample(trace_points(lens, grid_coords(4)[: block.stop], np.full(block.stop, 0.5), 20000, 64), 15).numpy()
    err = rel_l2(got, fine)
    assert err.mean() < 0.8, err


def test_same_seed_same_psfs_whatever_ran_before(tmp_path, tiny_grid):
    torch.manual_seed(999)  # disturb the global generator: blocks must not depend on it
    torch.rand(1000)
    other = generate(tiny_config(tmp_path / "again.h5"))
    with h5py.File(tiny_grid, "r") as f, h5py.File(other, "r") as g:
        for name in ("grid/psf", "noise/psf", "heldout/psf_a", "heldout/psf_b", "grid/kept", "heldout/kept_a"):
            np.testing.assert_array_equal(f[name][:], g[name][:])
    different = generate(tiny_config(tmp_path / "seed8.h5", seed=8, heldout=0, noise_points=0))
    with h5py.File(tiny_grid, "r") as f, h5py.File(different, "r") as g:
        assert not np.array_equal(f["grid/psf"][:], g["grid/psf"][:])


def test_block_seeds_are_distinct():
    cfg = tiny_config("x.h5")
    blocks = plan_blocks(cfg, 2, cfg.heldout)
    assert len(blocks) == 8 + 2 + 4
    assert len({block_seed(0, b) for b in blocks}) == len(blocks)
    assert block_seed(0, blocks[3]) != block_seed(1, blocks[3])


def test_info_summary(tiny_grid):
    text = summary(tiny_grid)
    for needle in ("4 x 4 points", "0.5, 2", "2000 (grid)", "14/14 traced", "light kept", "noise floor", "acl12708u"):
        assert needle in text, needle
    assert GridFile.open(tiny_grid).complete


def test_run_params_ignore_where_it_runs(tmp_path):
    a = tiny_config(tmp_path / "a.h5", device="cpu")
    b = tiny_config(tmp_path / "b.h5", device="auto", overwrite=True)
    assert a.run_params() == b.run_params()
    assert a.run_params() != tiny_config(tmp_path / "a.h5", spp=3000).run_params()
    # A depth range is stored as the resolved list, spaced uniformly in 1/depth.
    r = tiny_config(tmp_path / "c.h5", depths=None, depth_min=0.5, depth_max=2.0, num_depths=3)
    np.testing.assert_allclose(1 / r.depth_values(), [2.0, 1.25, 0.5])


def test_deeplens_notes_during_tracing_go_to_the_log(capsys, caplog):
    from psfgen.generation import trace_points

    class Talkative:  # stands in for the lens only to check where its prints go
        device = "cpu"

        def psf_rgb(self, points, ks, spp):
            print("Point source is too close, pinhole model may be inaccurate")
            return torch.zeros(len(points), 3, ks, ks)

    with caplog.at_level("WARNING", logger="psfgen.generation"):
        out = trace_points(Talkative(), np.zeros((2, 2)), np.ones(2), 10, 4)
    assert out.shape == (2, 3, 4, 4) and capsys.readouterr().out == ""
    assert "deeplens: Point source is too close" in caplog.text


def test_another_tracer_does_not_resume_a_file(tmp_path, tiny_grid, monkeypatch):
    """The tracer's version is part of the run's identity: PSFs traced another way are never mixed into a file."""
    copy = tmp_path / "copy.h5"
    shutil.copy(tiny_grid, copy)
    assert generate(tiny_config(copy)) == copy  # the same tracer: complete, nothing to do
    monkeypatch.setattr(illumination, "TRACER_VERSION", illumination.TRACER_VERSION + 1)
    with pytest.raises(InputError, match="holds another run"):
        generate(tiny_config(copy))


def _bare_deeplens_counts(lens, x: float, y: float, depth_m: float, spp: int, sides=(64, 400)) -> np.ndarray:
    """Valid rays per channel (R, G, B) of the point (x, y) [normalised] at depth_m [m] that land inside square
    windows of ``sides`` [px] around its chief ray, counted with DeepLens alone as ``GeoLens.psf_geometric`` frames
    its PSF: rays sampled from the point into the pupil, traced to the sensor, x and y flipped, a window of side ks
    keeping |offset| < (ks / 2 - 0.5) px (DeepLens's ``forward_integral``). Returns [3, len(sides)]."""
    z = torch.tensor([-1000.0 * depth_m], dtype=lens.dtype)
    scale = lens.calc_scale(z)
    w, h = lens.sensor_size
    obj = torch.stack([x * scale * w / 2, y * scale * h / 2, z], dim=-1)  # [1, 3] mm, as psf_geometric builds it
    counts = np.zeros((3, len(sides)))
    with torch.no_grad():
        centre = lens.psf_center(obj, method="chief_ray")[0]  # its own bundle at the primary wavelength [mm]
        for c, wvln in enumerate(lens.wvln_rgb):
            ray = lens.sample_from_points(points=obj, num_rays=spp, wvln=wvln)
            ray.is_coherent = False
            ray = lens.trace2sensor(ray)
            hit = -ray.o[0, :, :2][ray.is_valid[0] > 0]  # [valid rays, 2] mm, flipped as DeepLens bins them
            offset = (hit - centre).abs().max(dim=-1).values / lens.pixel_size  # Chebyshev distance [px]
            counts[c] = [int((offset < ks / 2 - 0.5).sum()) for ks in sides]
    return counts


def test_kept_is_what_bare_deeplens_counts_in_a_much_wider_window(tmp_path):
    """The stored kept share against an independent count: the default lens's axis and corner (−1, −1) at 1 and 5 m,
    traced by DeepLens alone, valid rays inside the 64-px window over those inside a 400-px one (all of them)."""
    spp, depths = 4000, (1.0, 5.0)
    out = generate(tiny_config(tmp_path / "k.h5", grid_size=3, depths=depths, spp=spp, heldout=0, noise_points=0))
    with h5py.File(out) as f:
        stored = f["grid/kept"][:]  # [2, 9, 3]
        coords = f["grid/coords"][:]
    lens = GeoLens(filename=DEFAULT_LENS, device="cpu")
    torch.manual_seed(2024)  # not the file's seeds: an independent Monte Carlo draw
    expected = np.zeros((2, 2, 3))
    for d, depth in enumerate(depths):
        for i, p in enumerate((4, 6)):  # (0, 0) and (−1, −1)
            assert tuple(coords[p]) == ((0.0, 0.0), (-1.0, -1.0))[i]
            n64, n400 = _bare_deeplens_counts(lens, *coords[p], depth, spp).T
            assert (n400 >= 0.999 * spp).all()  # the wide window holds (nearly) every launched ray: all valid here
            expected[d, i] = n64 / n400
            # Two independent binomial draws of about spp rays each, and a chief ray found in other bundles.
            sigma = np.sqrt(2 * expected[d, i] * (1 - expected[d, i]) / spp)
            np.testing.assert_array_less(np.abs(stored[d, p] - expected[d, i]), 4 * sigma + 0.01)
    # What the window loses (issue's bare-DeepLens figures): a fifth of R on the axis at 1 m, most of the corners.
    assert 0.7 < expected[0, 0, 0] < 0.9 and expected[0, 0, 2] > 0.93 and (expected[:, 1] < 0.25).all(), expected


def test_heldout_points_by_radius_band_split_and_depth():
    """Every radius band holds 8 test points or more from 40 points on, with test points near the axis and in the
    corners; a quarter of each band validates; each band and part alternates between grid depths and between
    them; every point stays off the grid; the same seed gives the same points."""
    depths = np.array([0.5, 1.0, 5.0])
    for m in (40, 48, 96, 256):
        for n in (5, 8, 16, 17):
            xy, depth, at, part = heldout_points(n, depths, m, seed=3)
            assert xy.shape == (m, 2) and depth.shape == at.shape == part.shape == (m,)
            band, r = radius_band(xy), np.hypot(xy[:, 0], xy[:, 1])
            assert (np.diff(band) >= 0).all() and np.bincount(band, minlength=4).tolist() == band_counts(m).tolist()
            assert np.abs(xy[:, None] - grid_coords(n)[None]).max(axis=-1).min() >= 0.1 * 2 / (n - 1) - 1e-12
            test = part == TEST
            for b in range(4):
                inside = band == b
                lo, hi = RADIUS_BANDS[b], RADIUS_BANDS[b + 1]
                assert ((r[inside] >= lo) & (r[inside] <= hi)).all()
                assert (inside & test).sum() >= 8
                assert (inside & ~test).sum() == max(1, inside.sum() // 4)  # a quarter validates
                for which in (test, ~test):
                    group = inside & which
                    assert abs(int(at[group].sum()) - int((~at[group]).sum())) <= 1  # half at grid depths
                    # every grid depth, every interval between two of them, once the group has room for each
                    if at[group].sum() >= 3:
                        assert set(depth[group & at]) == set(depths)
                    between = depth[group & ~at]
                    assert ((between > 0.5) & (between < 5.0) & ~np.isin(between, depths)).all()
                    if len(between) >= 2:
                        assert (between < 1.0).any() and (between > 1.0).any()
            if n % 2 == 0 or n >= 9:  # on an odd grid of 5 the axis is a grid point 0.05 from its keep-out edge
                assert (r[test] < 0.05).any()
            # the corner band's outermost ring (a tenth of its 1.46 of area at most) lies in the corners' squares
            assert (np.abs(xy[test]).min(axis=1) > 0.7).any()
            assert 0.2 <= (~test).mean() <= 0.25
    again = heldout_points(8, depths, 96, seed=3)
    for a, b in zip(heldout_points(8, depths, 96, seed=3), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(heldout_points(8, depths, 96, seed=4)[0], again[0])
    # The positions do not depend on the depths; one depth: all at it.
    one = heldout_points(8, np.array([2.0]), 96, seed=3)
    np.testing.assert_array_equal(one[0], again[0])
    assert one[2].all() and (one[1] == 2.0).all()
    assert [len(x) for x in heldout_points(8, depths, 0, seed=3)] == [0, 0, 0, 0]
    assert (heldout_points(8, depths, 8, seed=3)[3] == VALIDATION).sum() == 4  # one per band of two


def test_few_held_out_points_warn_that_the_bands_stand_on_few_test_points(caplog):
    from psfgen.generation import _warn_few_test_points

    with caplog.at_level("WARNING", logger="psfgen.generation"):
        _warn_few_test_points(40)
        _warn_few_test_points(0)
        assert not caplog.records
        _warn_few_test_points(16)
    assert len(caplog.records) == 1 and "3/3/3/3 test points" in caplog.text and "--heldout 40" in caplog.text


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_tracing(tmp_path, monkeypatch):
    """Python cannot raise KeyboardInterrupt out of a finalizer (a __del__): it prints "Exception ignored in" and
    goes on. A SIGINT that lands there during block 2 must still stop psf generate before block 3, keeping both."""
    import os
    import signal

    from psfgen import generation

    trace = generation._trace_block
    calls = []

    def swallowing(run, lens, index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 2:
            try:  # as a finalizer that the signal interrupts: the KeyboardInterrupt goes no further
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            except KeyboardInterrupt:
                pass
        return trace(run, lens, index, *args, **kwargs)

    monkeypatch.setattr(generation, "_trace_block", swallowing)
    out = tmp_path / "g.h5"
    # Python's own handler, as in a terminal: a shell that runs the tests in the background starts them with SIGINT
    # ignored, and then no KeyboardInterrupt arises at all (psf generate relies on Python's handler)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(tiny_config(out, block_rays=4000, spp=4000))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler back
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(calls) == 2
    with h5py.File(out) as f:
        assert f["blocks/done"][:].sum() == 2
