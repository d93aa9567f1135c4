"""The physical scale of a model's kernels, from the grid file's provenance.

A stored kernel is the DeepLens PSF traced on ``kernel_size`` sensor pixels, area-downsampled
to ``kernel_size_small`` pixels (psfgen/resample.py), so one kernel pixel is
``kernel_size / kernel_size_small`` sensor pixels wide: pitch [mm] = kernel_size * (sensor
width [mm] / sensor columns) / kernel_size_small. ``psf train`` stores this dict in every
checkpoint (key ``optics``); for one trained on a file that does not record the sensor,
:func:`model_optics` reads it from the grid file given as ``data``.
"""

from __future__ import annotations

import json
from pathlib import Path

from psfgen.shared.errors import InputError
from psfgen.store import GridInfo, open_info

VERSION = 1


def grid_optics(info: GridInfo, strict: bool = True) -> dict | None:
    """{version, sensor_size_mm [w, h], sensor_res [w, h], kernel_size, kernel_size_small [px], kernel_pitch_mm}
    of a grid file.

    A file that does not record them is an InputError, or None with strict=False (training
    never fails for want of what only ``psf render`` needs).
    """
    try:
        params = json.loads(info.attrs["run_params"])
        size = [float(v) for v in json.loads(info.attrs["sensor_size_mm"])]
        # The resolution DeepLens used (files from this version on); older files: the lens file's.
        stored = info.attrs.get("sensor_res") or json.dumps(json.loads(info.attrs["lens_json"]).get("sensor_res", []))
        res = [int(v) for v in json.loads(stored)]
        traced, stored = int(params["kernel_size"]), int(params["kernel_size_small"])
    except (KeyError, TypeError, ValueError, AttributeError):
        size, res, traced, stored = [], [], 0, 0
    if len(size) != 2 or len(res) != 2 or min(size + res) <= 0 or min(traced, stored) <= 0:
        if strict:
            raise InputError(f"{info.path} does not record the sensor's size and resolution; regenerate it")
        return None
    return {
        "version": VERSION,
        "sensor_size_mm": size,
        "sensor_res": res,
        "kernel_size": traced,
        "kernel_size_small": stored,
        "kernel_pitch_mm": traced * (size[0] / res[0]) / stored,
    }


def model_optics(model, data: str | Path | None = None) -> dict:
    """The model's optics dict: from its checkpoint, else from the grid file ``data`` it was trained on."""
    optics = model.info.get("optics")
    if optics is not None:
        if optics.get("version") != VERSION:
            raise InputError(
                f"checkpoint {model.info.get('path')} has optics version {optics.get('version')}, "
                f"this psf-cvae reads {VERSION}; retrain with this version"
            )
        return optics
    if data is None:
        raise InputError(
            f"checkpoint {model.info.get('path')} holds no kernel geometry (trained on a file that "
            "does not record the sensor); give --data with the grid file it was "
            "trained on (the kernel pitch is read from there)"
        )
    info = open_info(data)
    if info.run_id != model.info["data_fingerprint"]["run_id"]:
        raise InputError(
            f"{data} is not the grid file this checkpoint was trained on (run id "
            f"{info.run_id}, the checkpoint's {model.info['data_fingerprint']['run_id']})"
        )
    return grid_optics(info)
