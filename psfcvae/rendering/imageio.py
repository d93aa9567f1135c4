"""Images and depth maps for ``psf render``: PNG in and out at 8 or 16 bits, sRGB <-> linear.

Images are float32 tensors [3, H, W] in [0, 1]. OpenCV (a DeepLens dependency) does the
PNG coding because it keeps 16-bit RGB (Pillow reduces it to 8 bits). The blur happens in
linear light: an sRGB file is decoded with the IEC 61966-2-1 curve before and encoded after.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from psfgen.shared import tempfiles
from psfgen.shared.errors import InputError, os_reason

DEPTH_PNG_SCALE_M = 1e-3  # a 16-bit depth PNG holds millimetres (the Kinect / NYU / TUM convention)


def srgb_to_linear(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(v: torch.Tensor) -> torch.Tensor:
    v = v.clamp(0.0, 1.0)
    return torch.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


# The largest image read [pixels]: 8192 x 8192. A PNG of a few kilobytes can declare 20000 x 20000 pixels, 1.2 GB
# decoded and several GB as float; its header is read first.
MAX_PIXELS = 8192 * 8192


def _check_png_size(path: Path, option: str) -> tuple[int, int]:
    """(height, width) from the PNG's header alone; an image of more than MAX_PIXELS is refused."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise InputError(f"{option} {path} is not a readable PNG image")
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if w * h > MAX_PIXELS:
        raise InputError(f"{option} {path} is {w}x{h} pixels, more than {MAX_PIXELS:,} in all; give a smaller image")
    return h, w


def check_png(path: str | Path, option: str = "--image") -> tuple[int, int]:
    """(height, width) of the PNG image ``path`` from its header, or one line: missing, not a PNG, too large."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path} does not exist")
    if path.suffix.lower() != ".png":
        raise InputError(f"{option} {path}: only PNG images are read (8 or 16 bits per channel)")
    return _check_png_size(path, option)


def read_image(path: str | Path, option: str = "--image") -> tuple[torch.Tensor, int]:
    """(image [3, H, W] float32 in [0, 1] as stored, bit depth 8 or 16). Grey becomes RGB, alpha is dropped."""

    path = Path(path)
    check_png(path, option)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{option} {path} is not a readable PNG image")
    if img.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{option} {path} has {img.dtype} pixels; give an 8- or 16-bit PNG")
    bits = 8 if img.dtype == np.uint8 else 16
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    img = img[:, :, ::-1]  # OpenCV's BGR -> RGB
    arr = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / (2**bits - 1)
    return torch.from_numpy(arr), bits


def write_image(path: str | Path, image: torch.Tensor, bits: int = 8) -> Path:
    """Write image [3, H, W] (values in [0, 1], clipped) as an RGB PNG of ``bits`` 8 or 16; atomic."""

    path = Path(path)
    if bits not in (8, 16):
        raise InputError(f"bit depth must be 8 or 16, got {bits}")
    dtype = np.uint8 if bits == 8 else np.uint16
    arr = image.detach().cpu().clamp(0.0, 1.0).numpy().transpose(1, 2, 0)[:, :, ::-1]  # RGB -> BGR
    arr = np.rint(arr * (2**bits - 1)).astype(dtype)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise InputError(f"cannot encode {path} as PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfiles.replacing(path) as tmp:  # whole or not at all: written beside, renamed onto the target
            tmp.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise InputError(f"cannot write {path}: {os_reason(exc)}") from None
    return path


def read_depth_map(path: str | Path, shape: tuple[int, int], option: str = "--depth-map") -> torch.Tensor:
    """Depth [H, W] in metres from .npy (metres, float) or a 16-bit PNG (millimetres, DEPTH_PNG_SCALE_M).

    Checks: the image's shape, finite, every value > 0, in the user's words.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            depth = np.load(path, allow_pickle=False, mmap_mode="r")  # the header only, until its size is known
        except (OSError, ValueError) as exc:
            raise InputError(f"{option} {path} is not a readable .npy array ({exc})") from None
        if depth.size > MAX_PIXELS:
            raise InputError(f"{option} {path} holds {depth.size:,} values, more than {MAX_PIXELS:,} pixels")
        if depth.dtype.kind not in "fiu":
            raise InputError(f"{option} {path} holds {depth.dtype} values; give depths in metres as numbers")
        depth = depth.astype(np.float64)
    elif path.suffix.lower() == ".png":
        _check_png_size(path, option)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.ndim != 2 or raw.dtype != np.uint16:
            raise InputError(f"{option} {path} must be a single-channel 16-bit PNG of millimetres")
        depth = raw.astype(np.float64) * DEPTH_PNG_SCALE_M
    else:
        raise InputError(f"{option} {path}: give a .npy array of metres or a 16-bit PNG of millimetres")
    return checked_depth(depth, shape, f"{option} {path}")


def checked_depth(depth, shape: tuple[int, int], what: str = "depth") -> torch.Tensor:
    """depth [H, W] (metres) as float64, or one line naming what is wrong."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.shape != tuple(shape):
        raise InputError(f"{what} has shape {depth.shape}, the image is {tuple(shape)} (height, width)")
    if not np.isfinite(depth).all():
        n = int((~np.isfinite(depth)).sum())
        raise InputError(f"{what} holds {n} NaN or infinite value(s); every pixel needs a depth in metres")
    if (depth <= 0).any():
        raise InputError(
            f"{what} holds {int((depth <= 0).sum())} value(s) <= 0 (min {depth.min():g}); depths are positive metres"
        )
    return torch.from_numpy(depth)
