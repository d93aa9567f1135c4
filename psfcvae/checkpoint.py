"""Checkpoints: self-describing, written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from psfgen.gridfile import GridFile
from psfgen.shared import tempfiles
from psfgen.shared.errors import InputError, os_reason

FORMAT = "psf-cvae.checkpoint"
# What every checkpoint written by psf train holds (optimizer, rng and loss_window: what --resume needs).
REQUIRED = (
    "model",
    "model_args",
    "optimizer",
    "step",
    "best_val",
    "config",
    "data_fingerprint",
    "versions",
    "rng",
    "loss_window",
    "optics",
    "selection",  # the validation points and score that chose it (psfcvae/training/loop.py selection())
    "blend",  # None, or the blend's grid, smooth, detail and the network's weight per radius band (api/blend.py)
)
# The only one read: a checkpoint of another is refused (retrain). 6: optics v2 (chief rays); 7: focus settings
# (data_fingerprint focus, model_args has_focus / focus_min / focus_max, optics v3 per plane); 8: blend;
# 9: the illumination head: a canonical model's sees the radius code, not (x, y); depth and focus in its lowest band;
# 10: the blend's smooth and detail, its grid the smoothed grid less detail of the network's (psfcvae/api/blend.py);
# 11: a model over focus answers between its focus settings from them (blend.refocused), its blend fitted so.
# 12: between focus settings, a side that misses the point's defocus weighs less (the blend's sigma).
SCHEMA_VERSION = 12


def data_fingerprint(info: GridFile) -> dict:
    """What a model is tied to: the grid run, its lens, grid, kernel, depths and focus settings (focus [F] m, inf
    allowed; [nan]: one focus, where the lens file puts the sensor)."""
    return {
        "run_id": info.run_id,
        "lens_sha256": info.lens_sha256,
        "lens_file": Path(info.lens_path).name,  # for people (PSFModel's repr); the hash is what ties
        "grid_size": info.grid_size,
        "kernel_size_small": info.kernel_size_small,
        "depths": [float(d) for d in info.depths],
        "focus": [float(f) for f in info.focus],
        "spp": info.spp,
    }


def save(path: Path, payload: dict) -> None:
    """Write to a temporary file in the same directory, then rename: never a torn file."""
    path = Path(path)
    tempfiles.remove_stale(path)
    tmp = tempfiles.temp_path(path)
    try:
        torch.save({"format": FORMAT, "schema_version": SCHEMA_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk, a file size limit: torch says RuntimeError
        tempfiles.discard(tmp)
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise InputError(
            f"cannot write checkpoint {path} ({os_reason(exc)}){kept}: free space and run with --resume"
        ) from None
    except BaseException:
        tempfiles.discard(tmp)
        raise


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a directory; give a .pt file in it (latest.pt or best.pt)")
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; give a .pt file written by 'psf train'")
    try:
        with warnings.catch_warnings():  # torch warns about some files it then refuses: one line is ours to print
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises many types for a file that is not a checkpoint
        raise InputError(
            f"{path} is not a readable psf-cvae checkpoint; give a .pt file written by 'psf train'"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path} is not a psf-cvae checkpoint; give a .pt file written by 'psf train'")
    version = ckpt.get("schema_version")
    if version != SCHEMA_VERSION:
        which = "a later" if isinstance(version, int) and version > SCHEMA_VERSION else "an earlier"
        raise InputError(f"checkpoint {path} has schema version {version} ({which} psf-cvae); retrain with 'psf train'")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise InputError(f"checkpoint {path} lacks '{missing[0]}'; it was not written by 'psf train' or was edited")
    if not _valid_selection(ckpt["selection"]):
        raise InputError(
            f"checkpoint {path} holds no valid 'selection'; it was not written by 'psf train' or was edited"
        )
    bad = [name for name, t in ckpt["model"].items() if torch.is_tensor(t) and not torch.isfinite(t).all()]
    if bad:
        raise InputError(f"checkpoint {path} holds non-finite weights ({bad[0]}); use another checkpoint or retrain")
    return ckpt


def _valid_selection(sel) -> bool:
    """A selection record: its part and metric, and its points as [x, y, depth] number triples."""
    if not (isinstance(sel, dict) and isinstance(sel.get("part"), str) and isinstance(sel.get("metric"), str)):
        return False
    points = sel.get("points")
    return isinstance(points, list) and all(
        isinstance(p, list) and len(p) == 3 and all(isinstance(v, float) for v in p) for p in points
    )


def check_same_data(ckpt: dict, info: GridFile, what: str) -> None:
    """Refuse a checkpoint (or its ``data_fingerprint``) trained on another dataset, naming what differs."""
    mine = ckpt["data_fingerprint"]
    theirs = data_fingerprint(info)
    keys = ("lens_sha256", "grid_size", "kernel_size_small", "depths", "focus", "spp", "run_id")
    diff = [k for k in keys if not _same(mine.get(k), theirs[k])]
    if diff:
        names = {
            "lens_sha256": "lens",
            "run_id": "grid run",
            "kernel_size_small": "kernel size",
            "focus": "focus settings",
        }
        raise InputError(
            f"{what} was trained on another dataset than {info.path} (different "
            f"{', '.join(names.get(d, d) for d in diff)}); use the matching data file or another checkpoint"
        )


def _same(a, b) -> bool:
    """a == b, where a list of numbers may hold nan (the focus of a single-focus file), equal to nan."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b))
    return a == b
