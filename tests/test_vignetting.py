"""Lenses that do not light the whole sensor: illumination measured, stored and reported (issue 13)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    VIGNETTED_LENS,
    assert_deeplens_psfs,
    assert_one_line_error,
    run_cli,
    scalars,
    small_config,
    tiny_args,
)

from psfcvae import load_model, train
from psfgen import GridFile, gridfile
from psfgen.plan.grid import grid_coords, neighbour_pairs
from psfgen.shared.errors import InputError
from psfgen.trace.illumination import axis_fraction, min_rays, trace_counted
from psfgen.trace.lens import build_lens, read_lens_file


@pytest.fixture(scope="module")
def singlet():
    return build_lens(read_lens_file(VIGNETTED_LENS), torch.device("cpu"))


def test_the_dark_set_is_where_bare_deeplens_traces_no_ray(vignetted_grid, singlet):
    with h5py.File(vignetted_grid, "r") as f:
        illum, valid, psf = f["grid/illumination"][:], f["grid/valid"][:].astype(bool), f["grid/psf"][:]
        depths = f["depths"][:]
    for d, depth in enumerate(depths):
        pts = torch.as_tensor(
            np.concatenate([grid_coords(4), np.full((16, 1), -1000.0 * depth)], 1), dtype=torch.float32
        )
        torch.manual_seed(4242)  # another seed than the file's blocks: an independent trace
        # A 512-px window (12 mm) catches every ray that reaches the sensor near the point, wherever
        # DeepLens centres it: a channel gets no PSF only where no ray arrives.
        bare = singlet.psf_rgb(points=pts, ks=512, spp=2000).sum(dim=(-2, -1)).numpy()  # [16, 3]
        np.testing.assert_array_equal(valid[d], bare > 0)
    dark = ~valid.all(axis=-1)  # [D, P]
    corners = np.zeros(16, bool)
    corners[[0, 3, 12, 15]] = True
    np.testing.assert_array_equal(dark, np.broadcast_to(corners, dark.shape))
    # Stored as dark, never as a normalised PSF of zeros: a channel sums to 1 exactly where it is valid.
    np.testing.assert_allclose(psf.sum(axis=(-2, -1)), valid.astype(np.float32), atol=1e-5)
    # The corners get no light at all; at (±1, ±1/3) about a fifth arrives with the chief ray blocked:
    # DeepLens would centre its window on the pinhole image and miss that light; psfgen centres it
    # on the valid rays, so those points are lit, dim PSFs.
    assert (illum[:, [0, 3, 12, 15]] == 0).all()
    side = illum[:, [4, 7, 8, 11]]
    assert (side > 0.1).all() and (side < 0.4).all(), side


def test_illumination_is_one_on_axis_and_falls_monotonically_along_a_radius(vignetted_grid, singlet):
    with h5py.File(vignetted_grid, "r") as f:
        np.testing.assert_allclose(f["axis/fraction"][:], 1.0, atol=1e-6)  # a front stop is the entrance pupil
        centre = f["grid/illumination"][:, [5, 6, 9, 10]]  # (±1/3, ±1/3)
    np.testing.assert_allclose(centre, 1.0, atol=0.01)
    torch.manual_seed(0)
    r = np.linspace(0.0, 1.5, 16)
    axis, _ = axis_fraction(singlet, np.array([1.0]), 4000, 64)
    _, rays, _ = trace_counted(singlet, np.stack([r * 0.8, r * 0.6], axis=1), np.ones(16), 4000, 64)
    illum = rays.numpy() / 4000 / axis
    np.testing.assert_allclose(illum[0], 1.0, atol=1e-6)
    assert (np.diff(illum, axis=0) <= 0.03).all(), illum  # non-increasing within the Monte Carlo noise (~1%)
    assert illum[-1].max() == 0 and ((illum > 0.2) & (illum < 0.95)).any(), illum


def test_counted_psfs_are_deeplens_psfs(singlet):
    xy, depth = np.array([[0.0, 0.0], [0.5, -0.5], [0.3, 0.6], [1.0, 1.0]]), np.array([0.5, 2.0, 1.0, 1.0])
    torch.manual_seed(11)
    psf, rays, window = trace_counted(singlet, xy, depth, 3000, 64)
    points = torch.as_tensor(np.concatenate([xy, -1000 * depth[:, None]], 1), dtype=torch.float32)
    assert_deeplens_psfs(singlet, points, 3000, 11, psf.numpy())
    assert rays[3].max() == 0 and (window <= rays + 1e-3).all() and rays[0].min() == 3000


def test_dark_channels_keep_0_and_are_never_called_truncated(vignetted_grid):
    grid = GridFile.open(vignetted_grid)
    corners = [0, 3, 12, 15]  # no valid ray at all (test above)
    assert (grid.illumination[:, corners] == 0).all() and (grid.kept[:, corners] == 0).all()
    others = np.delete(grid.kept, corners, axis=1)
    assert (others > 0.5).all() and (others < 1).any()  # lit points; (±1/3, ±1) lose some light at 2 m
    kept = grid.light_kept()
    assert (kept.total, kept.dark) == (2 * 12, 0) and kept.point not in corners
    assert kept.below == int((others.min(axis=-1) < 0.99).sum()) and kept.worst == others.min()


def test_info_reports_the_lit_field(vignetted_grid):
    result = run_cli(["info", str(vignetted_grid)])
    assert result.exit_code == 0, result.output
    lit = [line for line in result.output.splitlines() if line.startswith("lit field")]
    assert len(lit) == 2 and all("4 of 16 grid points dark" in line for line in lit), lit
    # (±1, ±1/3), 18.44 mm from the axis, lit (dimly); the corners, 21.63 mm, dark: the circle lies between.
    assert "image circle radius 1.02-1.20 (18.44-21.63 mm)" in lit[0], lit[0]
    assert "nan" not in result.output


def test_min_rays_is_stated_in_rays():
    assert min_rays(2000) == 100 and min_rays(10**5) == 1000


def test_a_lens_that_lights_nothing_is_one_line_and_leaves_no_file(tmp_path):
    lens = json.loads(Path(VIGNETTED_LENS).read_text())
    lens["surfaces"][2]["d_next"] = 19.7
    lens["surfaces"].append({"type": "Aperture", "r": 0.01, "d": 60.0, "mat2": "air", "d_next": 26.8})  # a pinhole
    path = tmp_path / "dark.json"
    path.write_text(json.dumps(lens))
    result = run_cli(tiny_args(tmp_path / "g.h5", lens=path))
    assert_one_line_error(result, "no ray of channel", "from the axis at 0.5 m", "vignettes completely", "apertures")
    assert not (tmp_path / "g.h5").exists()


def test_a_file_of_another_schema_version_is_refused_in_one_line(tiny_grid, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(tiny_grid, old)
    with h5py.File(old, "r+") as f:
        f.attrs["schema_version"] = 4  # the schema before grid/kept
    before = old.read_bytes()
    for args in (["info", str(old)], ["train", "--data", str(old), "--run-dir", str(tmp_path / "r")], tiny_args(old)):
        assert_one_line_error(
            run_cli(args),
            "schema version 4",
            f"this psf-cvae reads {gridfile.SCHEMA_VERSION}",
            "regenerate it with 'psf generate'",
        )
    assert old.read_bytes() == before and not (tmp_path / "r").exists()


def test_training_on_a_partly_dark_file_leaves_dark_points_out_and_writes_best(vignetted_run, caplog):
    ckpt = torch.load(vignetted_run / "best.pt", weights_only=True)
    assert ckpt["model"]["illumination.any_dark"]
    heldout = scalars(vignetted_run, "val_points_rel_l2")
    assert len(heldout) == 3 and all(np.isfinite(v) and 0 < v < 2 for _, v in heldout), heldout
    illum = [v for _, v in scalars(vignetted_run, "loss_illumination")]
    assert illum[-1] < illum[0], illum  # the head learns


def test_the_dark_point_count_is_logged_once(vignetted_grid, tmp_path, caplog):

    with caplog.at_level(logging.INFO, logger="psfcvae"):
        train(small_config(vignetted_grid, tmp_path / "r", max_steps=2, val_every=2, checkpoint_every=2))
    lines = [r.getMessage() for r in caplog.records if "dark points left out" in r.getMessage()]
    # 4 of 16 points dark at each of 2 depths; validation: the file's own count of its validation points (part 0)
    # not valid in both halves.
    with h5py.File(vignetted_grid) as f:
        val = f["heldout/part"][:] == 0
        dark_ho = int((~(f["heldout/valid_a"][:] & f["heldout/valid_b"][:]).all(axis=1))[val].sum())
    # Pairs: the field pairs touching a dark point at each of the 2 depths, plus each dark point's pair across depths.
    pairs = neighbour_pairs(4)
    dark = np.zeros(16, bool)
    dark[[0, 3, 12, 15]] = True  # the corners
    field = int((dark[pairs[:, 0]] | dark[pairs[:, 1]]).sum())
    assert lines == [
        (
            f"dark points left out: 8 of 32 grid PSFs (their {2 * field + 4} neighbour pairs too) from the "
            f"PSF losses, {dark_ho} of {int(val.sum())} validation points from validation"
        )
    ], lines


def test_the_api_refuses_a_dark_point_unless_asked_and_gives_illumination(vignetted_run, vignetted_grid):
    model = load_model(vignetted_run / "best.pt")
    with pytest.raises(InputError, match=r"1 of 2 points lie outside the lens's lit field.*allow_dark=True"):
        model.psf([0.0, 1.0], [0.0, 1.0], 0.5)
    psf, lit = model.psf([0.0, 1.0], [0.0, 1.0], 0.5, allow_dark=True)
    assert lit.tolist() == [True, False] and psf.shape == (2, 3, 15, 15)
    assert psf[1].abs().max() == 0
    np.testing.assert_allclose(psf[0].sum(dim=(-2, -1)).numpy(), 1.0, atol=1e-4)
    # At grid points (1/3, 1/3), (1, 1) and (1, 1/3): a 4x4 grid says nothing near the axis itself.
    illum = model.illumination([1 / 3, 1.0, 1.0], [1 / 3, 1.0, 1 / 3], 0.5)
    assert illum.shape == (3, 3) and illum.dtype == torch.float32
    xy = grid_coords(4)
    at = [int(np.argmin(np.abs(xy - p).sum(axis=1))) for p in ([1 / 3, 1 / 3], [1, 1], [1, 1 / 3])]
    with h5py.File(vignetted_grid) as f:
        traced = f["grid/illumination"][0][at]  # [3 points, 3 channels] at 0.5 m
    assert (illum[1] == 0).all()
    np.testing.assert_allclose(illum.numpy(), traced, atol=0.15)
    assert model.psf(0.0, 0.0, 0.5).shape == (1, 3, 15, 15)  # unchanged without allow_dark: a tensor


def test_eval_leaves_dark_points_out_and_reports_illumination(vignetted_run, vignetted_grid, tmp_path):
    out = tmp_path / "eval"
    result = run_cli(
        ["eval", "--checkpoint", str(vignetted_run / "best.pt"), "--data", str(vignetted_grid), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    with h5py.File(vignetted_grid) as f:  # the test points (part 1) alone are scored
        test = f["heldout/part"][:] == 1
        lit = (f["heldout/valid_a"][:] & f["heldout/valid_b"][:]).all(axis=1)[test]
    assert len(lit) == 24 and 0 < metrics["heldout_dark"] == int((~lit).sum()) < 24
    assert metrics["heldout"]["bilinear"]["all"]["raw"]["n"] == int(lit.sum())
    assert np.isfinite(metrics["heldout"]["cvae prior mean"]["all"]["raw"]["mean"])
    assert "bicubic (mirror-averaged)" not in metrics["heldout"]  # a cartesian model assumes no symmetry
    il = metrics["illumination"]
    assert il["n"] == 24 and il["n_lit"] == int(lit.sum()) and il["abs_error"]["mean"] < 0.3
    assert f"dark test points left out (outside the lit field): {int((~lit).sum())}" in result.output
    assert "illumination, model vs traced: mean |error|" in result.output
    assert f"scored: {int(lit.sum())} lit of 24 test points, reference at spp" in result.output  # what they stand on


def test_sample_writes_illumination_and_refuses_a_dark_point(vignetted_run, tmp_path):
    ckpt = str(vignetted_run / "best.pt")
    result = run_cli(["sample", "--checkpoint", ckpt, "--grid", "5", "--depth", "0.5", "--out", str(tmp_path / "m.h5")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "m.h5") as f:
        psf, illum = f["psf"][:], f["illumination"][:]
        model = f.attrs["model"]

    def not_json(constant):  # strict JSON has no NaN or Infinity: another reader would refuse the file
        raise ValueError(constant)

    assert json.loads(model, parse_constant=not_json)["data_fingerprint"]["focus"] == [None]  # one focus: the lens's
    assert psf.shape == (25, 3, 15, 15) and illum.shape == (25, 3)
    dark = (illum == 0).all(axis=1)
    assert dark[[0, 4, 20, 24]].all() and not dark[12]  # corners dark, the centre lit
    np.testing.assert_array_equal(psf.sum(axis=(1, 2, 3)) == 0, dark)  # zeros exactly where dark
    bad = run_cli(
        ["sample", "--checkpoint", ckpt, "--coords", "1,1", "--depth", "0.5", "--out", str(tmp_path / "p.npy")]
    )
    assert_one_line_error(
        bad, "1 of the --coords points lie outside the lens's lit field, e.g. (1, 1) at --depth 0.5", "--grid map"
    )
    assert not (tmp_path / "p.npy").exists()


def test_the_symmetry_check_compares_only_points_lit_at_both_ends():
    from psfgen.analysis.symmetry import grid_symmetry_errors

    rng = np.random.default_rng(0)
    psf = rng.random((1, 9, 3, 5, 5)).astype(np.float32)
    psf = psf + psf[:, :, :, :, ::-1]  # every kernel mirror-symmetric in x
    g = psf.reshape(1, 3, 3, 3, 5, 5)
    g[:, :, 2] = g[:, :, 0]  # column 2 mirrors column 0: the field is symmetric under x -> -x
    psf = g.reshape(1, 9, 3, 5, 5)
    psf[0, 0, 1] = 0  # one channel of the top-left point dark (e.g. fewer rays than the threshold); its mirror lit
    errors = grid_symmetry_errors(psf, 3, square=False)
    assert errors["mirror x"] == 0.0  # the half-dark pair is left out, not counted as 100% (or inf)


def test_merging_shards_reports_the_dark_field_as_one_run_does(tmp_path, caplog):
    from helpers import tiny_config

    from psfgen import generate
    from psfgen.generation import shard_path
    from psfgen.merge import merge

    cfg = dict(lens=VIGNETTED_LENS, depths=(1.0,), heldout=2, noise_points=0)
    for k in range(2):
        generate(tiny_config(tmp_path / "s.h5", shard=f"{k}/2", **cfg))
    with caplog.at_level(logging.WARNING, logger="psfgen"):
        merge([shard_path(tmp_path / "s.h5", k, 2) for k in range(2)], tmp_path / "m.h5")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dark grid points")]
    assert len(lines) == 1 and "1 m: 4" in lines[0], lines  # the four corners of the 4x4 grid
