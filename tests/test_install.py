"""The built wheel, installed into a fresh virtualenv, works from another directory.

The development environment's editable install resolves any module from the checkout
(its finder is registered by a ``.pth`` file), so a module or lens the wheel leaves out
goes unnoticed there. Here the wheel is installed into a new virtualenv that has no
editable install; the dependencies (torch, DeepLens, h5py, ...) come from this
environment's site-packages through a plain path line, which adds the directory but
processes none of its ``.pth`` files: the editable finder stays off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import h5py
import pytest
from helpers import ROOT

PACKAGES = ("psfgen", "psfcvae")

# Run by the new virtualenv's python from another directory: where each top-level module comes
# from, and every module of the packages, imported one by one (a subpackage the wheel lacks is
# missing from the walk, one that fails to import raises).
PROBE = """
import importlib, json, pkgutil
import cli, psfcvae, psfgen
from psfgen.config import shipped_lens_dir

def fail(name):
    raise ImportError(name)

files = {m.__name__: m.__file__ for m in (cli, psfgen, psfcvae)}
for package in (psfgen, psfcvae):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=fail):
        files[info.name] = importlib.import_module(info.name).__file__
print(json.dumps({"files": files, "lenses": str(shipped_lens_dir())}))
"""


def source_modules() -> set[str]:
    """Every module of psfgen and psfcvae in the checkout: the .py files of the directories
    that are packages (an ``__init__.py`` there and in each parent)."""
    names = set()
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT).parts
            if all((ROOT.joinpath(*parts[: i + 1]) / "__init__.py").is_file() for i in range(len(parts))):
                names.update(".".join(parts + (py.stem,)).removesuffix(".__init__") for py in init.parent.glob("*.py"))
    return names


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points Python at the checkout or at another venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_generates_from_another_directory(tmp_path):
    source, wheels, venv, work = (tmp_path / name for name in ("source", "wheels", "venv", "elsewhere"))
    work.mkdir()
    # A copy of the source, so the build's leftovers (build/, *.egg-info) stay out of the checkout.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source]
    subprocess.run(build, check=True, capture_output=True, cwd=work, env=clean_env())
    (wheel,) = wheels.glob("psf_cvae-*.whl")

    # A venv of its own with pip (ensurepip: offline), so the wheel goes in the way a user installs it.
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, env=clean_env())
    python = venv / "bin" / "python"
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel]
    subprocess.run(install, check=True, capture_output=True, cwd=work, env=clean_env())
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            env=clean_env(),
        ).stdout.strip()
    )
    # The dependencies: this environment's site-packages, after the venv's own (so the wheel's
    # modules come first) and as a path line, so that its .pth files (the editable finder) stay off.
    deps = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz_test_dependencies.pth").write_text("".join(f"{path}\n" for path in deps))

    probe = subprocess.run([python, "-c", PROBE], cwd=work, capture_output=True, text=True, env=clean_env())
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout)
    outside = {name: path for name, path in found["files"].items() if not Path(path).is_relative_to(site)}
    assert not outside, outside  # every module from the installed wheel, none from the checkout
    assert set(found["files"]) - {"cli"} == source_modules()  # no module or subpackage left out of the wheel
    lenses = Path(found["lenses"])
    assert lenses.is_relative_to(site)
    shipped = sorted(p.name for p in (ROOT / "data" / "lenses").glob("*.json"))
    assert sorted(p.name for p in lenses.glob("*.json")) == shipped

    cmd = [venv / "bin" / "psf", "generate", "--grid-size", "4", "--depths", "1", "--spp", "2000"]
    result = subprocess.run(
        [*cmd, "--out", "g.h5", "--device", "cpu"], cwd=work, capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with h5py.File(work / "g.h5", "r") as f:
        assert f["grid/psf"].shape == (1, 16, 3, 15, 15)  # [depths, points, RGB, k, k]
        assert Path(f.attrs["lens_path"]) == lenses / "acl12708u.json"
