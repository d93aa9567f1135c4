"""Shared fixtures: one tiny grid file traced once per test session (4x4, two depths)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

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
