"""psfgen's throughput against a bare DeepLens ``psf_rgb`` loop over the same points.

Both run in this process, on the same device, over the same blocks of points, alternating
(bare, psfgen, bare, psfgen, ...) so that warm-up and machine noise hit both alike; the
best repetition of each counts. Prints, at each spp, PSFs/s of each, their ratio and the
peak resident memory of each phase. psfgen searches each point's chief ray once where
``psf_rgb`` searches it for each colour (8192 rays at a time), so the ratio is above 1 and
grows as spp falls; the wrapper's own work (downsampling, kept shares, illumination
counts, HDF5 writes) must cost nothing next to tracing.

    python benchmarks/bench_generate.py [--grid-size 7] [--spp 10000,100000] [--device auto]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from psfgen import GenerateConfig, generate
from psfgen.generation import plan_blocks
from psfgen.gridfile import GridFile
from psfgen.plan.grid import grid_coords
from psfgen.shared import configio
from psfgen.shared.devices import resolve_device
from psfgen.shared.metrics import rel_l2
from psfgen.trace.lens import build_lens, read_lens_file
from psfgen.trace.resample import downsample


class PeakRSS:
    """Peak resident set size [MiB] while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid-size", type=int, default=7)
    ap.add_argument("--spp", default="10000,100000", help="rays per point and colour, comma-separated")
    ap.add_argument("--depth", type=float, default=1.0, help="object depth [m]")
    ap.add_argument("--block-rays", type=int, default=4_000_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.getLogger("psfgen").setLevel(logging.ERROR)  # generate's truncation warning, once per run, is not news here
    for spp in (int(float(v)) for v in args.spp.split(",")):
        _compare(args, spp)


def _compare(args, spp: int) -> None:
    """Time psfgen against the bare loop at ``spp`` and print the two rates and their ratio."""
    cfg = configio.build(
        GenerateConfig,
        dict(
            grid_size=args.grid_size,
            depths=(args.depth,),
            spp=spp,
            heldout=0,
            noise_points=0,
            block_rays=args.block_rays,
            device=args.device,
            overwrite=True,
        ),
    )
    device = resolve_device(cfg.device)
    lens = build_lens(read_lens_file(cfg.lens), device)
    blocks = plan_blocks(cfg, 1, 0)
    coords = grid_coords(cfg.grid_size)
    n = cfg.grid_size**2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    draws = []  # the bare loop's PSFs of each repetition, downsampled as the file's: [n, 3, k, k]

    def bare() -> None:
        psfs = []
        for b in blocks:
            xy = coords[b.start : b.stop]
            pts = np.concatenate([xy, np.full((len(xy), 1), -1000.0 * args.depth)], axis=1)
            with torch.no_grad():
                psf = lens.psf_rgb(
                    points=torch.as_tensor(pts, dtype=torch.float32, device=device), ks=cfg.kernel_size, spp=spp
                )
            psfs.append(downsample(psf, cfg.kernel_size_small).cpu().numpy())
        sync()
        draws.append(np.concatenate(psfs))

    results = {"bare psf_rgb": [], "psfgen": []}
    peaks = {"bare psf_rgb": 0.0, "psfgen": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.h5"
        run_cfg = configio.build(GenerateConfig, {**configio.to_dict(cfg), "out": str(out)})
        for _ in range(args.repeats):
            for name, fn in (("bare psf_rgb", bare), ("psfgen", lambda: generate(run_cfg))):
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    results[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], mem.peak)
        ours = GridFile.open(out).grid_psf(0)  # [n, 3, k, k]
    print(
        f"device {device}, {n} points in {len(blocks)} blocks, spp {spp}, kernel_size {cfg.kernel_size} px, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats (best counts)"
    )
    rate = {k: n / min(v) for k, v in results.items()}
    for name in results:
        extra = ""
        if device.type == "cuda":
            extra = f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (both)"
        print(f"{name:13s} {rate[name]:8.2f} PSFs/s   peak RSS {peaks[name]:7.0f} MiB{extra}")
    print(f"ratio psfgen / bare = {rate['psfgen'] / rate['bare psf_rgb']:.3f}  (target >= 1)")
    if len(draws) > 1:  # the same PSFs: psfgen differs from a bare draw as much as two bare draws differ
        print(
            f"PSFs at {cfg.kernel_size_small} px, mean relative L2: "
            f"psfgen vs bare {rel_l2(ours, draws[0]).mean():.4f}, "
            f"bare vs bare {rel_l2(draws[1], draws[0]).mean():.4f} (Monte Carlo noise)"
        )


if __name__ == "__main__":
    main()
