"""Shared fixtures: one tiny grid file traced once per test session (4x4, two depths)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psfcvae import TrainConfig, train  # noqa: E402
from psfgen import GenerateConfig, configio, generate  # noqa: E402

TINY = dict(
    grid_size=4,
    depths=(0.5, 2.0),
    spp=2000,
    heldout=8,
    heldout_spp=4000,
    noise_points=4,
    block_rays=8000,  # 4 points per block: several blocks per depth
    seed=7,
    device="cpu",
)


def tiny_config(out, **changes) -> GenerateConfig:
    return configio.build(GenerateConfig, {**TINY, "out": str(out), **changes})


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory) -> Path:
    """A finished tiny grid file. Read-only for tests: copy it before changing it."""
    logging.getLogger("psfgen").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("grid") / "tiny.h5"
    return generate(tiny_config(out))


# A small network for CPU tests; recon_weight lifts the tiny pixel MSE above the KL term.
SMALL = dict(recon_weight=1000.0, latent_dim=8, hidden_dim=64, num_layers=2, num_frequencies=4, batch_size=16,
             learning_rate=1e-3, log_every=5, val_every=10, checkpoint_every=10, max_steps=40, device="cpu", seed=3)


def small_config(data, run_dir, **changes) -> TrainConfig:
    return configio.build(TrainConfig, {**SMALL, "data": str(data), "run_dir": str(run_dir), **changes})


@pytest.fixture(scope="session")
def tiny_run(tiny_grid, tmp_path_factory) -> Path:
    """A small model trained for 40 steps on the tiny grid: its run directory."""
    return train(small_config(tiny_grid, tmp_path_factory.mktemp("run") / "small"))
