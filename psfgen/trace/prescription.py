"""What a lens file describes, read here before DeepLens reads it: its surfaces and its sensor.

DeepLens reads DeepLens JSON, Zemax ``.zmx`` and CODE V ``.seq`` files (``GeoLens(filename=...)``), but not
every failure is said usefully: its ``.seq`` reader skips a surface it cannot build and goes on, and its
``.zmx`` reader names unsupported surface types without their surface numbers. This module lists the lens's
surfaces as the file numbers them (the ``surfaces`` index of a .json, ``SURF n`` of a .zmx, the n-th ``S`` of a
.seq), so that a surface type or glass DeepLens cannot read is refused naming its surface, and so that the
number of surfaces DeepLens builds can be checked against the file.

It also says what sensor the file gives: DeepLens replaces a missing one with an 8 mm, 2000-px default
(a .zmx or .seq carries only the image surface's radius, never a resolution).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from deeplens.geolens_pkg.io import GeoLensIO
from deeplens.material import Material

from psfgen.shared.errors import InputError

FORMATS = {".json": "json", ".zmx": "zmx", ".seq": "seq"}
# The surface types DeepLens's readers build (GeoLensIO.read_lens_json / read_lens_zmx).
JSON_TYPES = ("Aperture", "Aspheric", "Binary2Phase", "Cubic", "Phase", "Plane", "Spheric", "Stop", "ThinLens")
ZMX_TYPES = ("STANDARD", "EVENASPH")
# CODE V surface attributes DeepLens's .seq reader passes over in silence, though they change the surface:
# special surface types, diffractive and holographic surfaces, mirrors, decentres and tilts.
SEQ_UNREAD = {
    "SPS": None,  # the special surface type follows: SPS ZRN, SPS XYP, ...
    "DIF": "diffractive",
    "HOE": "holographic",
    "REFL": "mirror",
    "CYL": "cylindrical",
    "XDE": "decentred",
    "YDE": "decentred",
    "ZDE": "decentred",
    "ADE": "tilted",
    "BDE": "tilted",
    "CDE": "tilted",
}
# DeepLens's .seq reader puts CODE V's aspheric coefficient A (4th order) on the 6th-order term, B on the 8th, ...
SEQ_COEFFICIENTS = tuple("ABCDEFGHIJ")


@dataclass(frozen=True)
class Surface:
    number: int  # as the file numbers it (see the module's docstring)
    kind: str  # the file's own type name (Spheric, EVENASPH, S, ...)
    glass: str | None  # the material behind it as DeepLens names it; None for air


@dataclass(frozen=True)
class Prescription:
    """A lens file's surfaces and sensor, as the file gives them.

    surfaces: the lens's surfaces (object and image surfaces left out); built: how many surfaces DeepLens
    makes of them (a .seq surface with air on both sides and no stop is none); sensor_radius_mm: the image
    surface's radius (.zmx, .seq) or r_sensor (.json), half the sensor's diagonal [mm]; sensor_size_mm
    (w, h) and sensor_res (columns, rows): what a .json gives."""

    format: str  # json, zmx, seq
    surfaces: tuple[Surface, ...]
    built: int
    sensor_radius_mm: float | None = None
    sensor_size_mm: tuple[float, float] | None = None
    sensor_res: tuple[int, int] | None = None


def unreadable(path, surface: Surface, what: str) -> InputError:
    """One line naming the surface DeepLens cannot read, and the ways out."""
    return InputError(
        f"lens file {path}: surface {surface.number} ({surface.kind}) {what}; DeepLens cannot read it: "
        "change it in the lens design program, or pass another --lens"
    )


def check_glasses(path, surfaces: tuple[Surface, ...]) -> None:
    """Every glass is one DeepLens knows (its catalogs, or an 'nd/Vd' model glass)."""
    known: dict[str, bool] = {}
    for s in surfaces:
        if s.glass is None:
            continue
        if s.glass not in known:
            try:
                Material(s.glass)
                known[s.glass] = True
            except (NotImplementedError, ValueError, KeyError, IndexError):
                known[s.glass] = False
        if not known[s.glass]:
            raise unreadable(path, s, f"has glass '{s.glass}', which is not in DeepLens's glass catalogs")


def parse(path, fmt: str, raw: bytes) -> Prescription:
    """The prescription of a lens file of format ``fmt`` from its bytes, or an InputError naming the file."""
    if fmt == "json":
        return _parse_json(path, raw)
    text = decode(path, raw, fmt)
    return _parse_zmx(path, text) if fmt == "zmx" else _parse_seq(path, text)


def decode(path, raw: bytes, fmt: str) -> str:
    """A .zmx is UTF-8 or UTF-16 (OpticStudio writes UTF-16 with a byte order mark); a .seq UTF-8 or Latin-1.
    DeepLens's readers try the same encodings."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if fmt == "seq":
        return raw.decode("latin-1")
    try:
        return raw.decode("utf-16")
    except UnicodeDecodeError:
        raise InputError(f"lens file {path} is neither UTF-8 nor UTF-16 text; it is not a Zemax .zmx file") from None


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _parse_json(path, raw: bytes) -> Prescription:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        if isinstance(exc, RecursionError):
            where = " (nested too deeply)"
        raise InputError(f"lens file {path} is not valid JSON{where}; fix the file or pass another --lens") from None
    if not isinstance(data, dict) or not isinstance(data.get("surfaces"), list) or not data["surfaces"]:
        raise InputError(f"lens file {path} has no 'surfaces' list; it is not a DeepLens lens JSON file")
    surfaces = []
    for i, s in enumerate(data["surfaces"]):
        if not isinstance(s, dict):
            raise InputError(f"lens file {path}: surface {i} is not a JSON object; it is not a DeepLens lens")
        kind = str(s.get("type", "<missing>"))
        glass = s.get("mat2", "air")
        surface = Surface(i, kind, None if str(glass).lower() in ("air", "vacuum") else str(glass).lower())
        if kind not in JSON_TYPES:
            raise unreadable(path, surface, f"is of type {kind} (DeepLens reads {', '.join(JSON_TYPES)})")
        surfaces.append(surface)
    size = data.get("sensor_size", data.get("(sensor_size)"))
    size = tuple(_positive(v) for v in size) if isinstance(size, list) and len(size) == 2 else None
    res = data.get("sensor_res")
    ok_res = isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)
    return Prescription(
        "json",
        tuple(surfaces),
        built=len(surfaces),
        sensor_radius_mm=_positive(data.get("r_sensor")),
        sensor_size_mm=size if size is not None and None not in size else None,
        sensor_res=tuple(res) if ok_res else None,
    )


def _parse_zmx(path, text: str) -> Prescription:
    """SURF 0 is the object, the last SURF the image (the sensor); those between are the lens."""
    records: dict[int, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        words = line.strip().split(maxsplit=1)
        if not words:
            continue
        if words[0] == "SURF":
            try:
                current = int(words[1].split()[0])
            except (IndexError, ValueError):
                raise InputError(f"lens file {path}: a SURF line without a surface number ({line.strip()!r})") from None
            records[current] = {}
        elif current is not None and len(words) == 2 and words[0] in ("TYPE", "GLAS", "DIAM"):
            records[current][words[0]] = words[1]
    if len(records) < 3:
        raise InputError(
            f"lens file {path} holds {len(records)} SURF records, not an object, a lens and an image surface; "
            "it is not a Zemax sequential lens file"
        )
    image = max(records)
    surfaces = []
    for n in sorted(records):
        if not 0 < n < image:
            continue
        rec = records[n]
        kind = rec.get("TYPE", "<missing>").split()[0]
        glass = GeoLensIO._resolve_zmx_glass(rec["GLAS"]) if "GLAS" in rec else None
        surface = Surface(n, kind, glass)
        if kind not in ZMX_TYPES:
            raise unreadable(path, surface, f"is of type {kind} (DeepLens reads {' and '.join(ZMX_TYPES)} surfaces)")
        surfaces.append(surface)
    diam = records[image].get("DIAM", "").split()
    return Prescription("zmx", tuple(surfaces), len(surfaces), sensor_radius_mm=_positive(diam[0]) if diam else None)


def _parse_seq(path, text: str) -> Prescription:
    """The S surfaces between SO (the object, surface 0) and SI (the image), numbered from 1 as CODE V does."""
    lines = re.sub(r"&\s*\n", " ", text).splitlines()  # a line ending in & goes on in the next
    surfaces: list[dict] = []
    image: dict | None = None
    current: dict | None = None
    for line in lines:
        line = line.strip()
        head = line.split(maxsplit=1)[0].rstrip(";") if line else ""
        if head == "S":
            parts = line.split()
            current = {"material": parts[3].upper() if len(parts) > 3 else "AIR", "stop": False, "unread": None}
            current["number"] = len(surfaces) + 1
            current["asp_terms"] = []
            surfaces.append(current)
        elif head == "SI":
            image = current = {"number": len(surfaces) + 1, "radius": None}
        elif head == "SO":
            current = None
        elif current is not None and current is not image:
            for part in line.split(";"):
                words = part.split()
                if not words:
                    continue
                key = words[0].upper()
                if key == "STO":
                    current["stop"] = True
                elif key in SEQ_UNREAD and current["unread"] is None:
                    kind = SEQ_UNREAD[key] or f"of type {words[1] if len(words) > 1 else '?'}"
                    current["unread"] = f"is {kind} ({key})" if SEQ_UNREAD[key] else f"is {kind} (SPS)"
                elif key in SEQ_COEFFICIENTS and len(words) > 1:
                    current["asp_terms"] += [k for k, v in zip(words[::2], words[1::2]) if _nonzero(v)]
        elif current is image and line.upper().startswith("CIR"):
            image["radius"] = _positive(line.split()[1].rstrip(";")) if len(line.split()) > 1 else None
    if image is None:
        raise InputError(f"lens file {path} has no image surface (SI); it is not a CODE V sequential lens file")
    if not surfaces:
        raise InputError(f"lens file {path} has no lens surface (S); it is not a CODE V sequential lens file")
    out, built, before = [], 0, "AIR"
    for s in surfaces:
        material = s["material"]
        glass = None if material in ("AIR", "0.0", "") else material.lower()
        surface = Surface(s["number"], "S", glass)
        if s["unread"]:
            raise unreadable(path, surface, s["unread"])
        if s["asp_terms"]:
            raise unreadable(
                path,
                surface,
                f"has aspheric coefficients ({', '.join(s['asp_terms'])}), which DeepLens's CODE V reader shifts by "
                "one order (A read as the 6th-order term); give the lens as a .zmx or DeepLens .json file",
            )
        # DeepLens builds a surface where the material changes, or a stop in air; a dummy plane adds its gap.
        if (s["stop"] and material == before == "AIR") or material != before:
            built += 1
        before = material
        out.append(surface)
    return Prescription("seq", tuple(out), built, sensor_radius_mm=image["radius"])


def _nonzero(value: str) -> bool:
    try:
        return float(value) != 0.0
    except ValueError:
        return True  # not a number DeepLens can read: it is not nothing
