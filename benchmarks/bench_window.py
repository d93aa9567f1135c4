"""The traced window against the stored kernel's resolution: what keeping the light costs the sharp centre.

One kernel pitch per file (kernel_size x sensor pixel / kernel_size_small): a window wide enough
for the corners' blur spreads every stored pixel over many sensor pixels, also on the axis where
the PSF is sharp. For a few points of the lens (axis, r = 0.5, the corner (-1, -1)) at a few
depths this traces the fine PSF at sensor pitch in the window kernel_size auto picks (W, over the
depth range given), at high spp, and measures:

- kept: the least channel's share of valid rays inside W, and inside the original design's 64 px;
- for each kernel_size_small S: a test image (a resolution chart: a Siemens star and bar groups;
  a natural-ish texture: 1/f noise), S x S px at sensor pitch, blurred with the fine PSF, against
  the same image blurred with the stored kernel (the fine PSF area-downsampled W -> S as psf
  generate stores it) resampled back to sensor pitch by the same exact-area rule
  (psfgen.trace.resample.overlap_matrix): the PSNR [dB] of the second against the first, with
  periodic borders. The original design's 64 -> 15 (traced in 64 px, so truncated) for reference.

    python benchmarks/bench_window.py [--lens acl12708u] [--depth-min 0.4 --depth-max 20] [--depths 1,5]
        [--small 15,23,31] [--spp 200000] [--size 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from psfgen.plan import windowplan
from psfgen.shared.devices import resolve_device
from psfgen.trace import illumination
from psfgen.trace.lens import build_lens, read_lens_file
from psfgen.trace.resample import downsample, overlap_matrix

POINTS = {"axis": (0.0, 0.0), "r=0.5": (0.5, 0.0), "corner": (-1.0, -1.0)}
ORIGINAL = (64, 15)  # the original design's traced and stored sides [px]


def chart(n: int) -> np.ndarray:
    """A resolution chart [n, n] in 0..1: a 72-spoke Siemens star in the left half, bar groups of periods 2 to 32 px
    in the right half."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    star = (np.sin(36 * np.arctan2(y - n / 2, x - n / 4)) > 0).astype(float)
    img = np.where(x < n / 2, star, 0.0)
    periods = (2, 3, 4, 6, 8, 12, 16, 24, 32)
    band = n // len(periods)
    for i, p in enumerate(periods):
        rows = (y >= i * band) & (y < (i + 1) * band) & (x >= n / 2)
        img = np.where(rows, (np.floor(x / (p / 2)) % 2).astype(float), img)
    return img


def texture(n: int, seed: int = 0) -> np.ndarray:
    """A natural-ish texture [n, n] in 0..1: Gaussian noise with a 1/f amplitude spectrum."""
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    spectrum = np.fft.fft2(rng.standard_normal((n, n))) / np.maximum(f, 1.0 / n)
    img = np.real(np.fft.ifft2(spectrum))
    return (img - img.min()) / (img.max() - img.min())


def to_sensor_pitch(small: np.ndarray, side: int) -> np.ndarray:
    """A stored kernel [..., S, S] spanning ``side`` sensor px -> [..., side, side] at sensor pitch: each stored
    pixel's energy spread over the sensor pixels by their overlap (the exact-area rule); the sum is kept."""
    s = small.shape[-1]
    a = overlap_matrix(np.arange(side) * s / side, s / side, s)  # [side, S]: sensor pixel j over stored pixel i
    return a @ small @ a.T


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """img [n, n] convolved with kernel [k, k] (k even, centred between its middle pixels), periodic borders."""
    n, k = img.shape[-1], kernel.shape[-1]
    canvas = np.zeros((n, n))
    idx = (np.arange(k) - k // 2) % n  # kernel pixel i lies at offset i - k/2 from the centre
    np.add.at(canvas, (idx[:, None], idx[None, :]), kernel)
    return np.real(np.fft.ifft2(np.fft.fft2(img) * np.fft.fft2(canvas)))


def psnr(img: np.ndarray, ref: np.ndarray) -> float:
    """[dB] for images in 0..1."""
    return float(10 * np.log10(1.0 / np.mean((img - ref) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", default="acl12708u")
    ap.add_argument("--depth-min", type=float, default=0.4, help="the range kernel_size auto's pilot sees [m]")
    ap.add_argument("--depth-max", type=float, default=20.0)
    ap.add_argument("--depths", default="1,5", help="depths of the measured points [m]")
    ap.add_argument("--small", default="15,23,31", help="kernel_size_small values")
    ap.add_argument("--spp", type=int, default=200_000, help="rays per fine PSF and colour")
    ap.add_argument("--size", type=int, default=256, help="test image side [px]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    lens = build_lens(read_lens_file(args.lens), device)
    plan = windowplan.pilot(lens, (args.depth_min, args.depth_max), min(map(int, args.small.split(","))), args.seed)
    side = plan.kernel_size
    smalls = [int(s) for s in args.small.split(",")]
    pixel_um = 1000.0 * lens.pixel_size
    images = {"chart": chart(args.size), "texture": texture(args.size, args.seed)}
    print(f"lens {args.lens}; {plan.describe()}")
    print(f"sensor pixel {pixel_um:.3g} um; kernel pitch W/S px: " + ", ".join(
        f"S={s}: {side / s:.1f} px = {side / s * pixel_um:.1f} um" for s in smalls
    ) + f"; 64/15: {64 / 15:.2f} px = {64 / 15 * pixel_um:.1f} um")  # fmt: skip
    print(f"PSNR [dB] chart / texture ({args.size} px, periodic) of the stored kernel against the fine PSF, spp "
          f"{args.spp}")  # fmt: skip
    head = f"{'depth':>6} {'point':>7} {'kept W':>7} {'kept 64':>8} " + " ".join(
        f"{f'W={side}->{s}':>13}" for s in smalls
    ) + f" {'64->15':>13}"  # fmt: skip
    print(head)
    for depth in (float(d) for d in args.depths.split(",")):
        for name, xy in POINTS.items():
            torch.manual_seed(args.seed + 1)
            at = (np.array([xy]), np.array([depth]))
            fine, valid, window = illumination.trace_counted(lens, *at, args.spp, side)  # [1, 3, W, W]
            old, valid64, window64 = illumination.trace_counted(lens, *at, args.spp, ORIGINAL[0])
            kept = illumination.kept(valid.cpu().numpy(), window.cpu().numpy()).min()
            kept64 = illumination.kept(valid64.cpu().numpy(), window64.cpu().numpy()).min()
            fine64 = fine[0].double().cpu().numpy()  # [3, W, W]
            cells = []
            stored = [(side, downsample(fine, s)) for s in smalls] + [(ORIGINAL[0], downsample(old, ORIGINAL[1]))]
            for span, small in stored:
                kernel = to_sensor_pitch(small[0].double().cpu().numpy(), span)  # [3, span, span]
                scores = []
                for img in images.values():
                    ref = np.stack([blur(img, fine64[c]) for c in range(3)])
                    got = np.stack([blur(img, kernel[c]) for c in range(3)])
                    scores.append(psnr(got, ref))
                cells.append(f"{scores[0]:6.1f}/{scores[1]:<6.1f}")
            print(f"{depth:6g} {name:>7} {100 * kept:6.1f}% {100 * kept64:7.1f}% " + " ".join(cells))


if __name__ == "__main__":
    main()
