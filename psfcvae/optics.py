"""The physical scale of a model's kernels, from the grid file's provenance.

A stored kernel is the DeepLens PSF traced on ``kernel_size`` sensor pixels, area-downsampled
to ``kernel_size_small`` pixels (psfgen/trace/resample.py), so one kernel pixel is
``kernel_size / kernel_size_small`` sensor pixels wide: pitch [mm] = kernel_size * (sensor
width [mm] / sensor columns) / kernel_size_small. ``psf train`` stores this dict in every
checkpoint (key ``optics``); ``psf render`` and the API read it from there.
"""

from __future__ import annotations

from psfgen.gridfile import GridFile
from psfgen.shared.errors import InputError

VERSION = 1


def grid_optics(grid: GridFile) -> dict:
    """{version, sensor_size_mm [w, h], sensor_res [w, h], kernel_size, kernel_size_small [px], kernel_pitch_mm}
    of a grid file."""
    return {
        "version": VERSION,
        "sensor_size_mm": list(grid.sensor_size_mm),
        "sensor_res": list(grid.sensor_res),
        "kernel_size": grid.kernel_size,
        "kernel_size_small": grid.kernel_size_small,
        "kernel_pitch_mm": grid.kernel_pitch_mm,
    }


def model_optics(model) -> dict:
    """The model's optics dict, from its checkpoint."""
    optics = model.info["optics"]
    if optics.get("version") != VERSION:
        raise InputError(
            f"checkpoint {model.info.get('path')} has optics version {optics.get('version')}, "
            f"this psf-cvae reads {VERSION}; retrain with 'psf train'"
        )
    return optics
