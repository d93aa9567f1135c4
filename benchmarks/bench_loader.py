"""Does training ever wait on data? Loader samples/s against training-step samples/s.

Builds a grid file of 100 x 100 points x 10 depths = 100 000 PSFs (270 MB) in the real
schema-1 layout: a small grid is ray-traced with psfgen and its PSFs are tiled into the
large file's blocks through psfgen's own writer (tracing 100 000 PSFs takes half an hour
on this CPU, and the loader's speed depends on the layout, not on the values). Then, in
the same process: samples/s that ``GridBatches`` delivers from disk (0 and 2 workers),
and samples/s that one optimiser step of the default CVAE consumes. Target: loader >= 10x.

    python benchmarks/bench_loader.py [--device auto] [--batches 300] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from psfcvae import CVAE, TrainConfig
from psfcvae.training.data import Conditions, GridBatches, make_loader
from psfcvae.training.loop import model_args_for, resolve
from psfgen import GenerateConfig, GridFile, generate, gridfile
from psfgen.generation import plan_blocks
from psfgen.plan.grid import grid_coords, neighbour_pairs
from psfgen.shared import configio
from psfgen.shared.devices import resolve_device


def build_big_file(tmp: Path, n: int, depths: tuple) -> Path:
    small = generate(
        configio.build(
            GenerateConfig,
            dict(
                out=str(tmp / "small.h5"), grid_size=8, depths=(1.0,), spp=2000, heldout=0, noise_points=0, device="cpu"
            ),
        )
    )
    attrs = gridfile.header(GridFile.open(small))
    traced = GridFile.open(small).grid_psf(0)  # [64, 3, 15, 15]
    window = GridFile.open(small).kernel_size  # the small run's window (kernel_size auto chose it): the header's
    cfg = configio.build(
        GenerateConfig,
        dict(grid_size=n, depths=depths, spp=2000, heldout=0, noise_points=0, block_rays=4_000_000, kernel_size=window),
    )
    params = cfg.run_params()
    attrs.update(run_params=json.dumps(params, sort_keys=True), run_id="bench-loader", config=configio.to_json(cfg))
    blocks = plan_blocks(cfg, len(depths), 0)
    big = tmp / "big.h5"
    arrays = {
        "depths": np.array(depths),
        "focus": np.array([np.nan]),  # one focus: the lens file's own
        "wvln": np.array([0.656, 0.587, 0.486]),
        "grid/coords": grid_coords(n),
        "grid/neighbors": neighbour_pairs(n),
        "noise/index": np.zeros(0, np.int64),
        "heldout/coords": np.zeros((0, 2)),
        "heldout/depth": np.zeros(0),
        "heldout/at_grid_depth": np.zeros(0, bool),
        "heldout/focus": np.zeros(0),
        "heldout/at_grid_focus": np.zeros(0, bool),
        "heldout/part": np.zeros(0, np.uint8),
        "axis/fraction": np.ones((len(depths), 3)),
        "lens/file": np.frombuffer(GridFile.open(small).lens_bytes, np.uint8),
    }
    gridfile.create(
        big, attrs=attrs, arrays=arrays, sizes=dict(planes=len(depths), P=n * n, S=0, M=0, k=15), blocks=blocks
    )
    for i, b in enumerate(blocks):
        psf = traced[np.arange(b.start, b.stop) % len(traced)]
        lit = np.ones((len(psf), 3), np.float32)
        gridfile.write_block(
            big, i, b, psf, np.zeros((len(psf), 3), np.float32), 0.0, lit, lit.astype(np.uint8), np.zeros((len(psf), 2))
        )
    return big


def loader_rate(ds: GridBatches, workers: int, batches: int) -> float:
    it = iter(make_loader(ds, start=0, num_workers=workers))
    next(it)  # worker start-up is not steady state
    t0 = time.perf_counter()
    n = sum(len(next(it)["psf"]) for _ in range(batches))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        big = build_big_file(Path(tmp), 100, (0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0, 20.0))
        info = GridFile.open(big)
        # the defaults (batch 64), streamed from disk: read_run auto is the streaming run
        cfg = resolve(configio.build(TrainConfig, {"data": str(big), "in_memory": "false"}), info)
        n_psf = info.n_planes * info.grid_size**2
        print(
            f"file: {n_psf} PSFs, {big.stat().st_size / 2**20:.0f} MiB; batch {cfg.batch_size}, read_run {cfg.read_run}"
        )
        rates = {}
        for workers in (0, 2):
            ds = GridBatches(info, cfg.batch_size, cfg.read_run, seed=0, in_memory=False)
            rates[f"loader, disk, {workers} workers"] = loader_rate(ds, workers, args.batches)

        model = CVAE(model_args_for(cfg, info)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        conds = Conditions(info.coords, info.depths, info.neighbors, True, device, focus=info.focus)
        ds = GridBatches(info, cfg.batch_size, cfg.read_run, seed=0, in_memory=False)
        batches = [ds[g] for g in range(args.steps + 5)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = 0.0
        for i, batch in enumerate(batches):
            if i == 5:  # warm-up done
                sync()
                t0 = time.perf_counter()
            psf = batch["psf"].to(device)
            point, plane = batch["point"].to(device), batch["plane"].to(device)
            src, pc = conds.pairs(point, plane)
            out = model(psf, conds(point, plane), src, pc)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        sync()
        step_rate = args.steps * cfg.batch_size / (time.perf_counter() - t0)
        print(
            f"{'training step (' + str(device) + ')':28s} {step_rate:10.0f} samples/s  "
            f"({step_rate / cfg.batch_size:.1f} steps/s)"
        )
        for name, rate in rates.items():
            print(f"{name:28s} {rate:10.0f} samples/s  = {rate / step_rate:6.1f}x the step  (target >= 10x)")


if __name__ == "__main__":
    main()
