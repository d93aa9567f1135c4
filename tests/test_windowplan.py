"""kernel_size auto (psfgen.plan.windowplan): the window rule by hand, against the tracer's own count, and real
pilots whose grids keep their light."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from helpers import VIGNETTED_LENS, run_cli, tiny_args

from psfgen import GridFile
from psfgen.config import DEFAULT_LENS
from psfgen.gridfile import KEPT_LIMIT
from psfgen.plan import windowplan
from psfgen.trace import illumination
from psfgen.trace.lens import build_lens, read_lens_file


def test_kept_by_side_by_hand_with_the_tracers_recentring():
    inf = np.inf
    # Channel 0: rays 0.2, 1.4, 2.6 px from the chief ray and one invalid; a 4-px window holds d < 1.499.
    # Channel 1: the chief ray far from the light (rays 50 and 60 px away) but 0.1 px from the rays' centroid: with
    # min_rays 2, a window holding fewer than 2 rays on the chief ray is recentred on the centroid and holds all;
    # one holding 2 or more stays on the chief ray (at 104 px: 3 of 4), as in the tracer.
    # Channel 2: no valid ray.
    chief = np.array([[[0.2, 1.4, 2.6, inf], [50.0, 50.0, 50.0, 60.0], [inf] * 4]])  # [1, 3, 4]
    centroid = np.array([[[0.3, 1.3, 2.7, inf], [0.1, 0.1, 0.1, 0.1], [inf] * 4]])
    sides = np.array([2, 4, 6, 104])
    kept = windowplan.kept_by_side(chief, centroid, sides, min_rays=2)
    np.testing.assert_allclose(kept[0, 0], [1 / 3, 2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(kept[0, 1], [1.0, 1.0, 1.0, 0.75])
    np.testing.assert_array_equal(kept[0, 2], 0.0)
    lit = np.array([[True, True, False]])
    assert windowplan.choose(kept[:, :1], lit[:, :1], sides) == 3  # channel 0 needs the 104-px window
    assert windowplan.choose(kept[:, 1:], lit[:, 1:], sides) == 0  # channel 1 any but it; a dark one asks nothing
    assert windowplan.choose(kept, lit, sides) == 3  # no side serves both: the largest


def test_pilot_depths_are_the_ends_and_the_focus_between_them():
    assert windowplan.pilot_depths(0.4, 20.0, None) == (0.4, 20.0)
    assert windowplan.pilot_depths(3.0, 20.0, 5.0) == (3.0, 5.0, 20.0)
    assert windowplan.pilot_depths(3.0, 20.0, 50.0) == (3.0, 20.0)
    assert windowplan.pilot_depths(1.0, 1.0, None) == (1.0,)


def test_the_pilots_count_is_the_tracers():
    """The window rule the pilot applies to its rays' distances counts what trace_counted bins in that window, ray
    for ray (the same seed, the same rays): on the default lens's axis and corner, and on the singlet at (1, 1/3),
    whose chief ray is blocked so that its window is recentred on the light (docs/dataset.md)."""
    for path, xy in ((DEFAULT_LENS, [(0.0, 0.0), (-1.0, -1.0)]), (VIGNETTED_LENS, [(1.0, 1 / 3)])):
        lens = build_lens(read_lens_file(path), torch.device("cpu"))
        xy, depth, spp = np.array(xy), np.ones(len(xy)), 2000
        for ks in (16, 64):
            torch.manual_seed(5)
            _, valid, window = illumination.trace_counted(lens, xy, depth, spp, ks)
            torch.manual_seed(5)
            chief, centroid = illumination.ray_offsets(lens, xy, depth, spp)
            np.testing.assert_array_equal(np.isfinite(chief).sum(axis=-1), valid.numpy())
            kept = windowplan.kept_by_side(chief, centroid, np.array([ks]), illumination.min_rays(spp))[..., 0]
            np.testing.assert_allclose(kept * valid.numpy(), window.numpy(), atol=0.01)  # window: float32 sums
        if path == VIGNETTED_LENS:  # the recentring happened: the chief-ray window alone holds too few rays
            near = windowplan.kept_by_side(chief, chief, np.array([64]), 0)[..., 0] * valid.numpy()
            assert (near < illumination.min_rays(spp)).all() and (window.numpy() >= illumination.min_rays(spp)).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "lens, depths",
    [("acl12708u", (0.4, 20.0)), ("la1131_f50", (0.4, 20.0)), ("cooke_triplet_f5", (0.4, 20.0))],
)
def test_the_auto_window_keeps_the_light_of_a_grid_and_is_recorded(tmp_path, lens, depths):
    """psf generate's default window on each shipped lens over the default depth range: every lit grid PSF of a
    4 x 4 grid (its inner points are none of the pilot's) keeps 99% of its valid rays; the side is the file's
    kernel_size, recorded with the pilot's figures, and psf info says it was chosen."""
    out = tmp_path / "g.h5"
    args = tiny_args(out, lens=lens, depths=depths, heldout=0, noise_points=0)
    i = args.index("--kernel-size")
    del args[i : i + 2]  # the default: auto
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    grid = GridFile.open(out)
    kept = grid.light_kept()
    assert kept.total > 0 and kept.below == 0 and kept.worst >= KEPT_LIMIT, kept
    with h5py.File(out) as f:
        plan = json.loads(f.attrs["window_plan"])
        assert json.loads(f.attrs["run_params"])["kernel_size"] == plan["kernel_size"] == grid.kernel_size
        assert json.loads(f.attrs["config"])["kernel_size"] == grid.kernel_size  # the resolved config: auto decided
    assert grid.kernel_size >= plan["needed"] and grid.kernel_size % 2 == 0
    assert "(kernel_size auto" in run_cli(["info", str(out)]).output
