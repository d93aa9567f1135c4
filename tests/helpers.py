"""Helpers shared by the tests: tiny settings, config builders, CLI and TensorBoard readers.

Fixtures live in conftest.py; everything a test imports by name lives here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import main
from psfcvae import TrainConfig
from psfgen import GenerateConfig
from psfgen.shared import configio
from psfgen.shared.metrics import rel_l2
from psfgen.trace.resample import downsample

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(
    grid_size=4,
    depths=(0.5, 2.0),
    spp=2000,
    heldout=8,
    heldout_spp=4000,
    noise_points=4,
    kernel_size=64,  # the original design's window: no pilot, and the figures the tests know
    block_rays=8000,  # 4 points per block: several blocks per depth
    seed=7,
    device="cpu",
)


VIGNETTED_LENS = str(ROOT / "data" / "lenses" / "la1131_f50.json")  # a singlet whose sensor corners are dark


def tiny_config(out, **changes) -> GenerateConfig:
    return configio.build(GenerateConfig, {**TINY, "out": str(out), **changes})


# A small network for CPU tests; recon_weight lifts the tiny pixel MSE above the KL term.
SMALL = dict(
    recon_weight=1000.0,
    latent_dim=8,
    hidden_dim=64,
    num_layers=2,
    num_frequencies=4,
    batch_size=16,
    learning_rate=1e-3,
    log_every=5,
    val_every=10,
    checkpoint_every=10,
    max_steps=40,
    device="cpu",
    seed=3,
)


def small_config(data, run_dir, **changes) -> TrainConfig:
    return configio.build(TrainConfig, {**SMALL, "data": str(data), "run_dir": str(run_dir), **changes})


def tiny_args(out, **changes):
    opts = {**TINY, **changes}
    args = ["generate", "--out", str(out)]
    for key, value in opts.items():
        if key == "depths":
            value = ",".join(map(str, value))
        args += (
            ["--set", f"{key}={value}"]
            if key in ("block_rays",)
            else [
                {
                    "grid_size": "--grid-size",
                    "depths": "--depths",
                    "spp": "--spp",
                    "heldout": "--heldout",
                    "heldout_spp": "--heldout-spp",
                    "noise_points": "--noise-points",
                    "seed": "--seed",
                    "device": "--device",
                    "kernel_size": "--kernel-size",
                    "kernel_size_small": "--kernel-size-small",
                    "lens": "--lens",
                    "depth_min": "--depth-min",
                    "shard": "--shard",
                }[key],
                str(value),
            ]
        )
    return args


def run_cli(args):
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err[0], err[0]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def scalars(run_dir, tag):
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def assert_deeplens_psfs(lens, points: torch.Tensor, spp: int, seed: int, got: np.ndarray) -> None:
    """``got`` [B, 3, k, k], traced by psfgen from DeepLens ``points`` [B, 3] (normalised x, y; z [mm]) at ``spp``
    rays with torch seed ``seed`` on a 64-px window, downsampled to k px (or not: k = 64), is DeepLens's own PSF:
    the primary wavelength bit for bit (``psf_geometric`` with the same seed); red and blue, centred on that
    channel's chief ray where DeepLens's ``psf_rgb`` searches it again, as close to ``psf_rgb`` as a second
    ``psf_rgb`` draw is (mean relative L2 over the lit points within 30% of it)."""
    k = got.shape[-1]

    def small(psf):
        return (psf if k == psf.shape[-1] else downsample(psf, k)).numpy()

    green = list(lens.wvln_rgb).index(lens.primary_wvln)
    torch.manual_seed(seed)
    primary = small(lens.psf_geometric(points=points, ks=64, wvln=lens.primary_wvln, spp=spp))
    np.testing.assert_allclose(got[:, green], primary, atol=1e-7)
    draws = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        draws.append(small(lens.psf_rgb(points=points, ks=64, spp=spp)))
    others = [c for c in range(3) if c != green]
    lit = (draws[0].sum(axis=(-2, -1)) > 0).all(axis=-1)
    ref, second, got = draws[0][lit][:, others], draws[1][lit][:, others], got[lit][:, others]
    ours, noise = rel_l2(got, ref), rel_l2(second, ref)
    assert ours.mean() < 1.3 * noise.mean(), (ours, noise)


def as_schema_2(src, dst) -> Path:
    """A copy of grid file ``src`` as psf generate wrote it before schema 3: the kernel sizes are
    named ks and ks_small in its run_params and config attributes (nothing else changed)."""
    shutil.copy(src, dst)
    old = {"kernel_size": "ks", "kernel_size_small": "ks_small"}
    with h5py.File(dst, "r+") as f:
        f.attrs["schema_version"] = 2
        for key in ("run_params", "config"):
            params = {old.get(k, k): v for k, v in json.loads(f.attrs[key]).items()}
            assert {"ks", "ks_small"} <= set(params), params  # src was a schema-3 file
            f.attrs[key] = json.dumps(params, sort_keys=True)
    return Path(dst)


def make_focus_grid(tmp, focus=(0.5, float("inf")), name: str = "focus.h5", **changes) -> Path:
    """A finished tiny grid file traced at several focus settings (focus [m], inf allowed): TINY's 4x4 grid, two
    depths and 8 held-out points at each focus, so 2 x 2 planes by default. tmp: the folder it is written in."""
    from psfgen import generate

    return generate(tiny_config(Path(tmp) / name, focus_m=tuple(focus), **changes))
