"""``psf render``: PNGs (and optionally depth maps) through the model to PNGs of the same bit depth.

One image (``render_file``) or many (``render_batch``: a folder or a list, the model and its
table loaded once, resumable). The PSFs come from the model's table when the model has one
(a canonical-frame model: psfcvae/api/table.py), cached beside the checkpoint, else from the network.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
from pathlib import Path

import torch
from tqdm import tqdm

from psfcvae.api.psfmodel import load_model
from psfcvae.api.table import PSFTable
from psfcvae.rendering.imageio import (
    check_png,
    linear_to_srgb,
    read_depth_map,
    read_image,
    srgb_to_linear,
    write_image,
)
from psfcvae.rendering.lowrank import DEFAULT_ERROR
from psfcvae.rendering.render import render
from psfgen.shared import tempfiles
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError

log = logging.getLogger(__name__)

# Of the cached table's file; another version is rebuilt. 2: the table's focus; 3: a blended model's depth nodes on
# the grid's depths, and the blend's turn to the network past the grid (the same checkpoint, another table); 4: a
# model over focus refocused between its focus settings
TABLE_VERSION = 4


def table_path(checkpoint: Path, focus_m: float | None = None) -> Path:
    """Where the table of a checkpoint at focus focus_m [m] is cached: beside it, ``<name>.table`` (a single-focus
    model), ``<name>.focus-<focus_m>.table`` (one per focus of a model over focus)."""
    checkpoint = Path(checkpoint)
    focus = "" if focus_m is None else f".focus-{focus_m:.9g}"
    return checkpoint.with_name(f"{checkpoint.name}{focus}.table")


def cached_table(model, checkpoint, focus_m=None) -> PSFTable | None:
    """The model's PSFTable at focus focus_m [m] (as model.tabulate takes it), read from beside the checkpoint when
    it was built from the same checkpoint bytes at the same focus, else built and saved there (a folder that cannot
    be written only costs the rebuild next time). None for a model without the canonical frame (its PSFs come
    from the network), or at a focus outside the trained range (the network extrapolates)."""
    if not model.net.canonical:
        log.info("PSFs from the network (the model has no canonical frame, so no table)")
        return None
    focus = model._focus(focus_m, 1, allow_extrapolation=True)
    focus_m = None if focus is None else float(focus[0])
    lo, hi = model.focus_range
    if focus_m is not None and not lo * (1 - 1e-9) <= focus_m <= hi * (1 + 1e-9):
        log.info("PSFs from the network (focus %g m is beyond the trained focus, where a table has none)", focus_m)
        return None
    checkpoint = Path(checkpoint)
    key = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    path = table_path(checkpoint, focus_m)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            same = state.get("checkpoint_sha256") == key and state.get("focus_m") == focus_m
            if state.get("version") == TABLE_VERSION and same:
                table = PSFTable.from_state(model, state)
                log.info("PSFs from the table cached in %s (%s kernels)", path, "x".join(map(str, table.shape)))
                return table
        except (OSError, RuntimeError, ValueError, AttributeError, InputError):
            pass  # unreadable or stale: built again below
    t0 = time.perf_counter()
    table = model.tabulate(focus_m=focus_m)
    built = time.perf_counter() - t0
    try:
        with tempfiles.replacing(path) as tmp:
            torch.save({"version": TABLE_VERSION, "checkpoint_sha256": key, **table.state()}, tmp)
        where = f"cached in {path}"
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        where = f"not cached ({path}: {getattr(exc, 'strerror', None) or str(exc).splitlines()[0]})"
    log.info("PSFs from the table: built in %.1f s (%s kernels), %s", built, "x".join(map(str, table.shape)), where)
    return table


class Renderer:
    """The model (and its table) loaded once; ``render_one`` per image. Options as ``render_file``'s."""

    def __init__(
        self,
        checkpoint,
        *,
        srgb: bool = True,
        method: str = "auto",
        error: float = DEFAULT_ERROR,
        psf_every: int | None = None,
        field: str | None = None,
        field_mm: str | None = None,
        device: str = "auto",
        allow_extrapolation: bool = False,
        focus_m: float | None = None,
    ):
        if field is not None and field_mm is not None:
            raise InputError("give --field or --field-mm, not both")
        self.window = parse_field(field)
        mm = parse_field_mm(field_mm)
        if psf_every is not None and psf_every < 1:
            raise InputError(f"--psf-every must be at least 1, got {psf_every}")
        if not 0 < error < 1:
            raise InputError(f"--error must be between 0 and 1, got {error:g}")
        self.model = load_model(checkpoint, resolve_device(device))
        if mm is not None:
            self.window = window_of_mm(mm, self.model.info["optics"]["sensor_size_mm"])
        # The focus checked once, before any table is built (the CLI's --focus-m): every image is at this focus.
        self.model._focus(focus_m, 1, allow_extrapolation)
        self.table = cached_table(self.model, checkpoint, focus_m)
        self.options = dict(
            method=method, error=error, psf_every=psf_every, allow_extrapolation=allow_extrapolation, focus_m=focus_m
        )
        self.srgb = srgb

    def render_one(self, image, out, depth_m=None, depth_map=None, progress: bool = False) -> Path:
        """Read ``image``, blur it at depth_m [m] or per pixel at depth_map, write ``out`` (atomically)."""
        img, bits = read_image(image)
        depth = depth_m if depth_map is None else read_depth_map(depth_map, tuple(img.shape[1:]))
        linear = srgb_to_linear(img) if self.srgb else img
        t0 = time.perf_counter()
        blurred = render(
            self.model, linear, depth, field=self.window, table=self.table, progress=progress, **self.options
        )
        log.debug("rendered %s (%dx%d) in %.1f s", image, img.shape[2], img.shape[1], time.perf_counter() - t0)
        return write_image(out, linear_to_srgb(blurred) if self.srgb else blurred, bits)


def render_file(
    checkpoint, image, out, depth_m=None, depth_map=None, *, overwrite: bool = False, progress: bool = True, **options
) -> Path:
    """Read ``image`` (PNG, 8/16 bit), blur it at depth_m [m] or per pixel at depth_map (.npy metres,
    16-bit PNG millimetres), write ``out`` at the input's bit depth. options: ``Renderer``'s: focus_m (the
    distance the camera is focused at [m], inf allowed: a model over focus needs it; with a depth map, a
    refocused photograph), srgb (the
    PNG is sRGB-encoded: decoded to linear light before the blur, encoded after; False: its values are
    linear already), field ('x0,x1,y0,y1', the part of the sensor the image covers), method, error,
    psf_every (as ``psfcvae.render``), device, allow_extrapolation. Everything is checked before anything
    is written; an existing ``out`` is kept unless overwrite."""
    out = Path(out)
    if (depth_m is None) == (depth_map is None):
        raise InputError("give either --depth (metres) or --depth-map (a file)")
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the output is a PNG; name it .png")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; choose another --out or pass --overwrite to replace it")
    _check_depth(depth_m)
    tempfiles.make_parent(out, "--out")  # before the work: a path that cannot be written is said at once
    parse_field(options.get("field"))
    parse_field_mm(options.get("field_mm"))
    h, w = check_png(image)
    if depth_map is not None:
        read_depth_map(depth_map, (h, w))
    renderer = Renderer(checkpoint, **options)
    t0 = time.perf_counter()
    path = renderer.render_one(image, out, depth_m, depth_map, progress=progress)
    log.info("rendered %dx%d in %.1f s", w, h, time.perf_counter() - t0)
    return path


def batch_entries(images, depth_m=None) -> list[tuple[Path, Path | None]]:
    """(image, depth map or None) of a folder (its *.png, each with ``<stem>.npy`` beside it as depth map when
    present) or of a text list (one entry a line: an image and optionally its depth map, .npy or 16-bit PNG;
    relative paths from the list's folder; blank lines and # comments skipped). Each entry is checked here:
    the files exist, the images are PNGs, and an image without a depth map has --depth."""
    images = Path(images)
    if images.is_dir():
        pngs = sorted(p for p in images.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        if not pngs:
            raise InputError(f"--images {images} holds no .png images")
        entries = [(p, p.with_suffix(".npy") if p.with_suffix(".npy").is_file() else None) for p in pngs]
        where = {p: f"--images {p}" for p, _ in entries}
    elif images.is_file():
        entries, where = [], {}
        try:
            lines = images.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--images {images} is not a readable text list ({exc})") from None
        for n, line in enumerate(lines, 1):
            at = f"--images {images} line {n}"
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                raise InputError(f"{at}: {exc}") from None
            if not words:
                continue
            if len(words) > 2:
                raise InputError(f"{at}: expected 'image.png [depth.npy]', got {len(words)} fields")
            paths = [p if p.is_absolute() else images.parent / p for p in map(Path, words)]
            entries.append((paths[0], paths[1] if len(paths) == 2 else None))
            where[paths[0]] = at
        if not entries:
            raise InputError(f"--images {images} lists no images")
    else:
        raise InputError(f"--images {images} does not exist; give a folder of PNGs or a text list of them")
    stems: dict[str, Path] = {}
    for image, depth in entries:
        at = where[image]
        check_png(image, f"{at}:")
        if depth is not None and not depth.is_file():
            raise InputError(f"{at}: depth map {depth} does not exist")
        if depth is not None and depth.suffix.lower() not in (".npy", ".png"):
            raise InputError(f"{at}: depth map {depth}: give a .npy array of metres or a 16-bit PNG of millimetres")
        if depth is None and depth_m is None:
            raise InputError(f"{at}: {image.name} has no depth map; give --depth for such images")
        if image.stem in stems:
            raise InputError(f"{at}: {image.name} has the output name of {stems[image.stem]} (both {image.stem}.png)")
        stems[image.stem] = image
    return entries


def render_batch(checkpoint, images, out_dir, depth_m=None, *, overwrite: bool = False, **options) -> list[Path]:
    """Render every entry of ``images`` (``batch_entries``) into out_dir/<stem>.png, the model loaded once.

    Resumable: an output already written is skipped (each one is written whole or not at all), unless
    overwrite. options: as ``Renderer``'s. Returns the outputs written now."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; with --images give a folder")
    _check_depth(depth_m)
    entries = batch_entries(images, depth_m)
    _refuse_outputs_onto_inputs(entries, out_dir)
    tempfiles.make_parent(out_dir / "x.png", "--out")
    todo = [(img, dep) for img, dep in entries if overwrite or not (out_dir / f"{img.stem}.png").exists()]
    if len(todo) < len(entries):
        log.info("%d of %d outputs already in %s: skipped", len(entries) - len(todo), len(entries), out_dir)
    if not todo:
        return []
    renderer = Renderer(checkpoint, **options)
    written = []
    method_log = logging.getLogger("psfcvae.rendering.render")
    level = method_log.level
    try:
        for i, (image, depth) in enumerate(tqdm(todo, desc="render", unit="image")):
            if i == 1:  # the method line once, not once per image
                method_log.setLevel(logging.WARNING)
            out = out_dir / f"{image.stem}.png"
            written.append(renderer.render_one(image, out, None if depth else depth_m, depth))
    finally:
        method_log.setLevel(level)
    return written


def _refuse_outputs_onto_inputs(entries: list[tuple[Path, Path | None]], out_dir: Path) -> None:
    """An output out_dir/<stem>.png that is one of the inputs (--out the folder of the images) would be taken for
    an output already written and skipped, or with --overwrite replace the sharp image: refused before any work."""
    inputs = {p.resolve() for entry in entries for p in entry if p is not None}
    for image, _ in entries:
        out = out_dir / f"{image.stem}.png"
        if out.resolve() in inputs:
            raise InputError(
                f"--out {out_dir}: the output {out} would be the input {out.resolve()}; give an --out folder that "
                "holds none of the inputs"
            )


def _check_depth(depth_m) -> None:
    if depth_m is not None and not 0 < depth_m < float("inf"):
        raise InputError(f"--depth must be a positive, finite number of metres, got {depth_m}")


def _four_numbers(text: str) -> tuple[float, ...]:
    """'a,b,c,d' -> its numbers; () when a part is no number (the callers say what four they expected)."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        return ()


def parse_field_mm(text: str | None) -> tuple[float, float, float, float] | None:
    """'x0,x1,y0,y1' [mm] on the sensor (x right, y up, 0 on the axis) -> those four numbers; None -> None."""
    if text is None:
        return None
    v = _four_numbers(text)
    if len(v) != 4 or not (v[0] < v[1] and v[2] < v[3]) or not all(abs(x) < float("inf") for x in v):
        raise InputError(f"--field-mm {text!r}: expected 'x0,x1,y0,y1' in mm with x0 < x1 and y0 < y1")
    return v


def window_of_mm(mm: tuple[float, float, float, float], sensor_size_mm) -> tuple[float, float, float, float]:
    """A part of the sensor in mm -> the same part in normalised coordinates (±1 at the sensor's edges: x·w/2 mm,
    y·h/2 mm, as the image covers the sensor); refused beyond the sensor."""
    w, h = (float(s) for s in sensor_size_mm)
    window = (2 * mm[0] / w, 2 * mm[1] / w, 2 * mm[2] / h, 2 * mm[3] / h)
    if not all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in window):
        raise InputError(
            f"--field-mm {','.join(f'{v:g}' for v in mm)}: beyond the {w:g} x {h:g} mm sensor "
            f"(x within ±{w / 2:g} mm, y within ±{h / 2:g} mm)"
        )
    return tuple(min(1.0, max(-1.0, v)) for v in window)


def parse_field(text: str | None) -> tuple[float, float, float, float]:
    """'x0,x1,y0,y1' -> the field window; None -> the whole sensor."""
    if text is None:
        return (-1.0, 1.0, -1.0, 1.0)
    v = _four_numbers(text)
    if len(v) != 4 or not (-1 <= v[0] < v[1] <= 1 and -1 <= v[2] < v[3] <= 1):
        raise InputError(f"--field {text!r}: expected 'x0,x1,y0,y1' with x0 < x1 and y0 < y1 in [-1, 1]")
    return v
