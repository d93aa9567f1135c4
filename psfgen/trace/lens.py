"""Loading a lens file (DeepLens .json, Zemax .zmx, CODE V .seq), with user-facing errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from deeplens import GeoLens

from psfgen.config import shipped_lens_dir
from psfgen.gridfile import LENS_FORMATS
from psfgen.shared.errors import InputError
from psfgen.shared.reading import read_user_file
from psfgen.trace import prescription

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LensFile:
    """A lens file as read: its bytes, and DeepLens's lens of it as normalised DeepLens JSON.

    Everything that parses the lens (tracing, the symmetry check, evaluation) reads ``lens_json``, whatever
    the file's format; ``raw`` is the file itself, stored beside it."""

    path: str
    format: str  # json, zmx or seq (prescription.FORMATS)
    raw: bytes  # the file's exact bytes (a .zmx is often UTF-16)
    sha256: str  # of raw
    lens_json: str  # DeepLens's JSON of the lens it read, the sensor resolved
    sensor_size_mm: tuple[float, float]  # (width, height) [mm]
    sensor_res: tuple[int, int]  # (columns, rows)
    sensor_from: dict  # {"size": where the size came from, "res": where the resolution came from}


def read_lens_file(
    path: str | Path,
    sensor_size_mm: tuple[float, float] | None = None,
    sensor_res: tuple[int, int] | None = None,
) -> LensFile:
    """Read a DeepLens .json, Zemax .zmx or CODE V .seq lens file through DeepLens (on the CPU, no tracing
    beyond DeepLens's own set-up), with the sensor the options give (sensor_size_mm (w, h) [mm], sensor_res
    (columns, rows)) over what the file gives. A surface or glass DeepLens cannot read, or a sensor neither
    gives, is an InputError in one line."""
    path = Path(path)
    if not path.exists():
        shipped = shipped_lens_dir()
        named = shipped / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if path.parent == Path(".") and named.exists():
            path = named  # a bare name such as "cooke_triplet_f5" picks a lens that ships with psf-cvae
        else:
            names = ", ".join(sorted(p.stem for p in shipped.glob("*.json")))
            raise InputError(
                f"lens file {path} does not exist; pass --lens with a DeepLens .json, Zemax .zmx or CODE V .seq "
                f"file, or the name of a shipped lens ({names})"
            )
    raw = read_user_file(path, "lens file")
    fmt = prescription.FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"lens file {path} is not a .json, .zmx or .seq file; pass --lens with a DeepLens .json, Zemax .zmx "
            "or CODE V .seq lens file"
        )
    described = prescription.parse(path, fmt, raw)
    prescription.check_glasses(path, described.surfaces)
    size, res, origin = resolve_sensor(path, described, sensor_size_mm, sensor_res)
    with tempfile.TemporaryDirectory(prefix="psf-lens-") as tmp:
        lens = _read_deeplens(path, Path(tmp), raw, described, size, res)
        apply_sensor(lens, size, res)
        normal = Path(tmp) / "normalised.json"
        with deeplens_notes(log, logging.DEBUG):
            lens.write_lens_json(str(normal))
        lens_json = normal.read_text()
    return LensFile(str(path), fmt, raw, hashlib.sha256(raw).hexdigest(), lens_json, size, res, origin)


def resolve_sensor(path, described: prescription.Prescription, size_opt, res_opt):
    """((w, h) [mm], (columns, rows), where each came from): the options over the file. DeepLens's own
    precedence within a .json (r_sensor before sensor_size); a radius (a .zmx or .seq image surface) is half
    the diagonal, the size following in the resolution's aspect."""
    kind = LENS_FORMATS[described.format]
    if res_opt is not None:
        res, res_from = (int(res_opt[0]), int(res_opt[1])), "--sensor-res"
    elif described.sensor_res is not None:
        res, res_from = described.sensor_res, "the lens file"
    else:
        why = "it has no sensor_res" if described.format == "json" else f"a {kind} file carries none"
        raise InputError(
            f"lens file {path} gives no sensor resolution ({why}); give it with --sensor-res W,H "
            "(config key sensor_res), e.g. --sensor-res 2000,2000"
        )
    radius = described.sensor_radius_mm
    if size_opt is not None:
        size, size_from = (float(size_opt[0]), float(size_opt[1])), "--sensor-size-mm"
    elif radius is not None:
        diagonal = math.hypot(*res)
        size = (2.0 * radius * res[0] / diagonal, 2.0 * radius * res[1] / diagonal)
        size_from = f"the lens file's sensor radius {radius:g} mm, in the resolution's aspect"
    elif described.sensor_size_mm is not None:
        size, size_from = described.sensor_size_mm, "the lens file"
    else:
        raise InputError(
            f"lens file {path} gives no sensor size (no image surface radius, r_sensor or sensor_size); give it "
            "with --sensor-size-mm W,H (config key sensor_size_mm), e.g. --sensor-size-mm 6.4,4.8"
        )
    pitch = (size[0] / res[0], size[1] / res[1])
    if abs(pitch[0] - pitch[1]) > 1e-4 * max(pitch):
        raise InputError(
            f"a {size[0]:g} x {size[1]:g} mm sensor of {res[0]} x {res[1]} px has pixels of "
            f"{1000 * pitch[0]:.4g} x {1000 * pitch[1]:.4g} um; DeepLens needs square pixels: give "
            "--sensor-size-mm and --sensor-res of one aspect ratio"
        )
    return size, res, {"size": size_from, "res": res_from}


def apply_sensor(lens, size: tuple[float, float], res: tuple[int, int]) -> None:
    """DeepLens's ``set_sensor``, without its exact float test of the aspect ratio (resolve_sensor checks it)."""
    lens.sensor_size = (float(size[0]), float(size[1]))
    lens.sensor_res = (int(res[0]), int(res[1]))
    lens.pixel_size = lens.sensor_size[0] / lens.sensor_res[0]
    lens.r_sensor = float(np.sqrt(lens.sensor_size[0] ** 2 + lens.sensor_size[1] ** 2)) / 2
    lens.calc_fov()


def _read_deeplens(path: Path, tmp: Path, raw: bytes, described, size, res, device: str = "cpu"):
    """DeepLens's GeoLens of the file, its surfaces counted against the file's. A .json goes with its sensor
    replaced by the resolved one (DeepLens refuses a .json without one), a .zmx whose image surface has no
    DIAM with one added (DeepLens needs it; the resolved sensor replaces it)."""
    source = path
    if described.format == "json":
        data = json.loads(raw.decode("utf-8"))
        for key in ("sensor_size", "(sensor_size)"):
            data.pop(key, None)
        data.update(r_sensor=math.hypot(*size) / 2, sensor_res=list(res))
        source = tmp / "lens.json"
        source.write_text(json.dumps(data))
    elif described.format == "zmx" and described.sensor_radius_mm is None:
        text = prescription.decode(path, raw, "zmx")
        last = max(i for i, line in enumerate(text.splitlines()) if line.strip().startswith("SURF"))
        lines = text.splitlines()
        lines.insert(last + 1, "    DIAM 1.0")
        source = tmp / "lens.zmx"
        source.write_text("\n".join(lines) + "\n")
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            lens = GeoLens(filename=str(source), device=device)
    except NotImplementedError as exc:
        m = re.match(r"Material (.+) not implemented", str(exc))
        if m:
            raise InputError(
                f"lens file {path}: unknown glass '{m.group(1)}'; use a material name from DeepLens's glass catalogs"
            ) from None
        raise InputError(f"lens file {path}: {exc}") from None
    except Exception as exc:  # DeepLens raises bare Exception too (an unknown surface type): all mean a bad file
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
        raise InputError(f"lens file {path} is not a lens DeepLens can read: {detail}") from None
    finally:
        for line in dict.fromkeys(said.getvalue().splitlines()):
            if line.strip():
                log.debug("deeplens: %s", line)
    if not hasattr(lens, "float_enpd"):  # a .seq without EPD: the pupil floats (DeepLens traces through the stop)
        lens.enpd, lens.float_enpd = None, True
    if len(lens.surfaces) != described.built:
        failed = re.search(r"Processing surface(\d+) \((\w+)\).*?Failed to create surface: ([^\n]*)", said.getvalue(),
                           re.S)  # fmt: skip
        where = f"; surface {failed.group(1)} ({failed.group(2)}): {failed.group(3)}" if failed else ""
        raise InputError(
            f"lens file {path}: DeepLens built {len(lens.surfaces)} of the {described.built} surfaces the file "
            f"describes{where}; fix the file or pass another --lens"
        )
    return lens


@contextlib.contextmanager
def deeplens_notes(logger: logging.Logger, level: int):
    """DeepLens prints notes on stdout, which belongs to our output: pass them to the log,
    once per distinct note, also when the call fails."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            yield
    finally:
        for line in dict.fromkeys(said.getvalue().splitlines()):
            logger.log(level, "deeplens: %s", line)


def build_lens(lens_file: LensFile, device: torch.device, focus_m: float | None = None):
    """A DeepLens ``GeoLens`` of the file's normalised JSON on ``device``, with its resolved sensor, refocused
    to ``focus_m`` [m] if given."""
    with tempfile.TemporaryDirectory(prefix="psf-lens-") as tmp:
        source = Path(tmp) / "lens.json"
        source.write_text(lens_file.lens_json)
        with deeplens_notes(log, logging.INFO):
            lens = GeoLens(filename=str(source), device=str(device))
    apply_sensor(lens, lens_file.sensor_size_mm, lens_file.sensor_res)
    if focus_m is not None:
        # DeepLens: object distance [mm], negative; +inf takes its own infinite-focus path (it tests depth == inf).
        distance = float("inf") if focus_m == float("inf") else -focus_m * 1000.0
        try:
            lens.refocus(foc_dist=distance)
        except (AssertionError, ValueError, RuntimeError, ZeroDivisionError, OverflowError):
            raise InputError(
                f"cannot focus this lens at {focus_m:g} m; choose a farther --focus-m, or inf for infinity"
            ) from None
    log.debug("lens %s: foclen %.4f mm, sensor %s mm", lens_file.path, float(lens.foclen), lens.sensor_size)
    return lens
