"""``pip install .`` outside the checkout: the package, its default lens and the CLI work from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import pytest
from helpers import ROOT


@pytest.mark.slow
def test_installed_package_generates_from_another_directory(tmp_path):
    target, work, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    work.mkdir()
    # A copy of the source, so the build's leftovers (build/, *.egg-info) stay out of the checkout.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__"))
    # --no-deps: torch and DeepLens come from this environment; what is tested is the package itself.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=work,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import psfgen, cli; print(psfgen.__file__, cli.__file__)"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where  # not the checkout's copy
    cmd = [
        sys.executable,
        "-c",
        "from cli import main; main()",
        "generate",
        "--grid-size",
        "4",
        "--depths",
        "1",
        "--spp",
        "2000",
        "--out",
        "g.h5",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with h5py.File(work / "g.h5", "r") as f:
        assert f["grid/psf"].shape == (1, 16, 3, 15, 15)  # [depths, points, RGB, k, k]
        assert "psfgen/lenses/acl12708u.json" in f.attrs["lens_path"].replace(os.sep, "/")
