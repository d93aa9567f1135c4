"""Loading a DeepLens lens file, with user-facing errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from deeplens import GeoLens

from psfgen.config import shipped_lens_dir
from psfgen.shared.errors import InputError
from psfgen.shared.reading import read_user_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LensFile:
    path: str
    text: str  # the file's exact text, stored in every output
    sha256: str  # of the file's bytes


def read_lens_file(path: str | Path) -> LensFile:
    """Read and syntax-check a DeepLens lens JSON file (no tracing, no torch)."""
    path = Path(path)
    if not path.exists():
        shipped = shipped_lens_dir()
        named = shipped / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if path.parent == Path(".") and named.exists():
            path = named  # a bare name such as "cooke_triplet_f5" picks a lens that ships with psf-cvae
        else:
            names = ", ".join(sorted(p.stem for p in shipped.glob("*.json")))
            raise InputError(
                f"lens file {path} does not exist; pass --lens with a DeepLens JSON file "
                f"or the name of a shipped lens ({names})"
            )
    raw = read_user_file(path, "lens file")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        if isinstance(exc, RecursionError):
            where = " (nested too deeply)"
        raise InputError(f"lens file {path} is not valid JSON{where}; fix the file or pass another --lens") from None
    if not isinstance(data, dict) or not isinstance(data.get("surfaces"), list) or not data["surfaces"]:
        raise InputError(f"lens file {path} has no 'surfaces' list; it is not a DeepLens lens JSON file")
    return LensFile(str(path), text, hashlib.sha256(raw).hexdigest())


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
    """A DeepLens ``GeoLens`` on ``device``, refocused to ``focus_m`` [m] if given."""
    if not lens_file.path.endswith(".json"):
        raise InputError(f"lens file {lens_file.path} must be a DeepLens .json file")
    try:
        with deeplens_notes(log, logging.INFO):
            lens = GeoLens(filename=lens_file.path, device=str(device))
    except NotImplementedError as exc:
        m = re.match(r"Material (.+) not implemented", str(exc))
        if m:
            raise InputError(
                f"lens file {lens_file.path}: unknown glass '{m.group(1)}'; use a material name "
                "from DeepLens's glass catalogs"
            ) from None
        raise InputError(f"lens file {lens_file.path}: {exc}") from None
    except Exception as exc:  # DeepLens raises bare Exception too (an unknown surface type): all mean a bad file
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
        raise InputError(f"lens file {lens_file.path} is not a valid DeepLens lens: {detail}") from None
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
