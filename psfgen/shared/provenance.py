"""Versions and time stamps stamped into every output (HDF5 files, checkpoints)."""

from __future__ import annotations

import datetime
import platform
from importlib import metadata


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    return {
        "psf-cvae": package_version("psf-cvae"),
        "deeplens-core": package_version("deeplens-core"),
        "torch": package_version("torch"),
        "h5py": package_version("h5py"),
        "numpy": package_version("numpy"),
        "python": platform.python_version(),
    }


def now() -> str:
    """UTC time stamp, ISO 8601."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
