"""Shared fixtures: one tiny grid file traced once per test session (4x4, two depths)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import VIGNETTED_LENS, small_config, tiny_config

from psfcvae import train
from psfgen import generate


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory) -> Path:
    """A finished tiny grid file. Read-only for tests: copy it before changing it."""
    logging.getLogger("psfgen").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("grid") / "tiny.h5"
    return generate(tiny_config(out))


@pytest.fixture(scope="session")
def vignetted_grid(tmp_path_factory) -> Path:
    """A tiny grid (4x4, two depths) of the LA1131 singlet: the four corners dark, the edges
    partly vignetted. Read-only for tests."""
    logging.getLogger("psfgen").setLevel(logging.WARNING)
    out = tmp_path_factory.mktemp("vignetted") / "vignetted.h5"
    # 32: the corner band's outermost ring reaches the dark corners (a test point among them is dark)
    return generate(tiny_config(out, lens=VIGNETTED_LENS, heldout=32))


@pytest.fixture(scope="session")
def vignetted_run(vignetted_grid, tmp_path_factory) -> Path:
    """A small model trained on the partly dark grid: its run directory."""
    return train(
        small_config(
            vignetted_grid, tmp_path_factory.mktemp("vrun") / "v", max_steps=150, val_every=50, checkpoint_every=50
        )
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_grid, tmp_path_factory) -> Path:
    """A small model trained for 40 steps on the tiny grid: its run directory."""
    return train(small_config(tiny_grid, tmp_path_factory.mktemp("run") / "small"))
