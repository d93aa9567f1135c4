"""Test scenes drawn procedurally: a resolution chart and an RGB-D scene of planes.

All images are float32 tensors [3, H, W] in linear light, values in [0, 1]; depths in metres.
"""

from __future__ import annotations

import numpy as np
import torch


def resolution_chart(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A chart [3, h, w]: slanted-edge squares, bar groups of rising frequency (both directions),
    a lattice of single bright pixels, text-like rows of short bars and three colour patches."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 0.18)  # mid grey, so edges go both ways
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    # Slanted-edge squares (5 degrees) in the four corners: the edge response over the field.
    for cy, cx in ((0.2, 0.2), (0.2, 0.8), (0.8, 0.2), (0.8, 0.8)):
        u = (xx - cx) * np.cos(0.087) + (yy - cy) * np.sin(0.087)
        v = -(xx - cx) * np.sin(0.087) + (yy - cy) * np.cos(0.087)
        img[(np.abs(u) < 0.09) & (np.abs(v) < 0.09)] = 0.9
    # Bars: a period of 2..8 pixels, horizontal along the top middle, vertical along the left middle.
    for n, period in enumerate((8, 6, 4, 3, 2)):  # groups 0.075 of the image apart, 0.045 wide (>= 2 periods)
        r0, c0 = int(0.05 * h), int((0.32 + 0.075 * n) * w)
        cols = np.arange(c0, min(w, c0 + max(2 * period, int(0.045 * w))))
        img[r0 : r0 + int(0.12 * h), cols[(cols // period) % 2 == 0]] = 1.0
        r0, c0 = int((0.32 + 0.075 * n) * h), int(0.05 * w)
        rows = np.arange(r0, min(h, r0 + max(2 * period, int(0.045 * h))))
        img[rows[(rows // period) % 2 == 0], c0 : c0 + int(0.12 * w)] = 1.0
    # Single bright pixels on a lattice over the centre: the PSF itself, seen in the image.
    step = max(6, min(h, w) // 12)
    img[int(0.35 * h) : int(0.65 * h) : step, int(0.35 * w) : int(0.65 * w) : step] = 1.0
    # "Text": rows of short dark bars of random length in the bottom middle.
    for r in range(int(0.72 * h), int(0.95 * h), 4):
        c = int(0.32 * w)
        while c < int(0.68 * w):
            n = int(rng.integers(1, 5))
            img[r : r + 2, c : c + n] = 0.02
            c += n + int(rng.integers(1, 3))
    rgb = np.repeat(img[None], 3, axis=0)
    for ch, (cy, cx) in enumerate(((0.42, 0.73), (0.50, 0.73), (0.58, 0.73))):  # red, green, blue patches
        sl = (slice(int(cy * h), int((cy + 0.06) * h)), slice(int(cx * w), int((cx + 0.08) * w)))
        rgb[:, sl[0], sl[1]] = 0.05
        rgb[ch, sl[0], sl[1]] = 0.8
    return torch.from_numpy(rgb.astype(np.float32))


def rgbd_scene(h: int, w: int, near_m: float, far_m: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3, h, w], depth [h, w] metres): the chart on three planes.

    Top-left: a plane at near_m; top-right: a plane at far_m (a depth edge down the middle);
    bottom third: a plane slanted from near_m at the left to far_m at the right, uniform in
    1/depth, so the defocus changes continuously along it.
    """
    image = resolution_chart(h, w, seed)
    depth = np.full((h, w), float(near_m))
    depth[:, w // 2 :] = far_m
    inv = np.linspace(1 / near_m, 1 / far_m, w)
    depth[2 * h // 3 :, :] = 1 / inv[None, :]
    return image, torch.from_numpy(depth)
