"""The packages' public names can be found: dir() lists them without loading torch, help() and
the module docstrings describe each, and a loaded model says what it is."""

from __future__ import annotations

import json
import pydoc
import re
import subprocess
import sys

import pytest
from helpers import ROOT, TINY

import psfcvae
import psfgen
from psfcvae import load_model

PUBLIC = {
    psfcvae: {
        "load_model",
        "PSFModel",
        "render",
        "train",
        "TrainConfig",
        "TrainingError",
        "evaluate",
        "EvalConfig",
        "CVAE",
        "ModelArgs",
        "ModelOutput",
    },
    psfgen: {"generate", "GenerateConfig", "GridFile", "InputError"},
}


def listed(package) -> set[str]:
    """The names of the docstring's "Public names:" list: each line's first word."""
    block = package.__doc__.split("Public names:\n\n", 1)[1].split("\n\n", 1)[0]
    return {re.match(r"\s+(\w+)", line).group(1) for line in block.splitlines()}


@pytest.mark.slow
def test_dir_lists_the_public_names_without_importing_torch():
    probe = (
        "import json, sys, psfcvae, psfgen\n"
        "names = {p.__name__: dir(p) for p in (psfcvae, psfgen)}\n"
        "heavy = sorted(m for m in ('torch', 'deeplens', 'matplotlib') if m in sys.modules)\n"
        "print(json.dumps({'names': names, 'heavy': heavy}))"
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["heavy"] == []
    for package, names in PUBLIC.items():
        assert names <= set(found["names"][package.__name__]), package.__name__


@pytest.mark.parametrize("package", list(PUBLIC), ids=lambda p: p.__name__)
def test_docstring_and_help_list_every_public_name(package):
    assert set(package.__all__) == PUBLIC[package]
    assert listed(package) == PUBLIC[package]  # one line each, none stale
    text = pydoc.render_doc(package, renderer=pydoc.plaintext)
    for name in PUBLIC[package]:
        assert re.search(rf"^ +{name}\b", text, re.M), name


def test_repr_names_the_lens_depths_frame_and_kernel(tiny_run):
    model = load_model(tiny_run / "latest.pt", device="cpu")
    text = repr(model)
    pitch = model.info["optics"]["kernel_pitch_mm"]
    lo, hi = min(TINY["depths"]), max(TINY["depths"])
    assert text.startswith("<PSFModel lens acl12708u.json, "), text
    assert f"depths [{lo:g}, {hi:g}] m, " in text, text
    assert f" {model.net.args.frame} frame, " in text, text
    assert f"kernel 15x15 px of {pitch:.4g} mm" in text, text
