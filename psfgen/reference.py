"""One held-out reference for several grid files: two grids are compared on the same points.

psfgen draws each file's held-out points away from its own grid and seeds their traces by
block, so two grids (another N, another spp) would otherwise be scored on different
points against different references. ``with_reference`` writes a copy of a grid file
whose held-out group is another file's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np


def with_reference(grid: Path, ref: Path, out: Path) -> Path:
    """A copy of the grid file whose held-out group is the reference's: same lens, kernel and
    wavelengths; the grid's depths span the reference's (a grid with other depths is scored on the
    same points, and a held-out point counts as at a grid depth when it is at one of the grid's)."""
    if out.exists() and out.stat().st_mtime >= max(grid.stat().st_mtime, ref.stat().st_mtime):
        return out
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(grid, tmp)
    with h5py.File(tmp, "r+") as f, h5py.File(ref, "r") as r:
        # All but the grid's own sampling must agree (lens, kernel, focus, wavelengths); depths may be added.
        own = {"grid_size", "spp", "heldout", "heldout_spp", "noise_points", "seed", "block_rays", "depths"}
        mine, theirs = ({k: v for k, v in json.loads(x.attrs["run_params"]).items() if k not in own} for x in (f, r))
        same_lens = f.attrs["lens_sha256"] == r.attrs["lens_sha256"] and np.array_equal(f["wvln"], r["wvln"])
        depths = f["depths"][:]  # [D] m
        theirs_d = r["depths"][:]
        spans = depths.min() <= theirs_d.min() * (1 + 1e-9) and depths.max() >= theirs_d.max() * (1 - 1e-9)
        if mine != theirs or not same_lens or not spans:
            raise RuntimeError(
                f"{ref} and {grid} differ in lens, kernel or wavelengths, or the grid's depths do not span the "
                "reference's: no common reference"
            )
        del f["heldout"]
        r.copy(r["heldout"], f, "heldout")
        at = np.isclose(f["heldout/depth"][:][:, None], depths[None]).any(axis=1)  # [M]
        f["heldout/at_grid_depth"][...] = at
        rp = json.loads(r.attrs["run_params"])
        for attr in ("config", "run_params"):
            d = json.loads(f.attrs[attr])
            d.update(heldout=rp["heldout"], heldout_spp=rp["heldout_spp"])
            f.attrs[attr] = json.dumps(d, sort_keys=True)
        f.attrs["heldout_from"] = f"{ref.name} (run {r.attrs['run_id']})"
        f.attrs["valid_min_rays_heldout"] = r.attrs["valid_min_rays_heldout"]
    tmp.replace(out)
    return out
