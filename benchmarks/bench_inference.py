"""PSFs per second of a trained model against ray tracing, in one process on one device.

Traces a few field points of the model's own lens (from its grid file) with DeepLens at spp
10^5, the accuracy issue's yardstick, then times the model's prior mean for a batch of
random field points at the trained depths' geometric mean: through the network
(``model.psf``) and through its table (``model.tabulate()``, psfcvae/api/table.py; canonical
models only). Prints PSFs/s of each, the ratio to tracing, the
table's build time, size and its deviation from the network at random points.

    python benchmarks/bench_inference.py --checkpoint runs/cvae/best.pt
        [--lens LENS.json [--focus-m M]] [--spp 100000] [--trace-points 8]
        [--batch 4096] [--target 0.005]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

import psfcvae
from psfgen.generation import trace_points
from psfgen.gridfile import GridFile
from psfgen.trace.lens import build_lens, read_lens_file


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lens", default=None, help="lens file traced for the yardstick (default: the model's own)")
    ap.add_argument("--focus-m", type=float, default=None, help="with --lens (default: the model's own)")
    ap.add_argument("--spp", type=int, default=100_000)
    ap.add_argument("--trace-points", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument(
        "--target", type=float, default=None, help="the table's target deviation (default: psfcvae.api.table's)"
    )
    return ap


def yardstick(args, model) -> tuple[str, float | None, int]:
    """(lens file, focus [m] or None, traced window [px]): the model's own, read from its grid file (its first
    focus setting), unless --lens gives another."""
    if args.lens is not None:
        return args.lens, args.focus_m, 64
    data = model.info["config"].get("data", "")
    if not Path(data).is_file():
        raise SystemExit(f"the model's grid file {data!r} is not here: give --lens (and --focus-m)")
    cfg = GridFile.open(data).config
    focus = cfg.get("focus_m") or [None]  # a list of focus settings: tracing at the first is the yardstick
    return cfg["lens"], focus[0], int(cfg["kernel_size"])


def best_rate(fn, n: int, repeats: int = 5) -> float:
    """Items per second of the fastest of ``repeats`` calls of fn (after one warm-up call)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = psfcvae.load_model(args.checkpoint, device=cpu)
    lo, hi = model.depth_range
    depth = float(np.sqrt(lo * hi))

    # ray tracing: the yardstick, the points in one block as psf generate traces them
    lens_path, focus_m, window = yardstick(args, model)
    lens = build_lens(read_lens_file(lens_path), cpu, focus_m=focus_m)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-0.9, 0.9, (args.trace_points, 2))
    trace_points(lens, xy[:1], np.array([depth]), args.spp, window)  # warm-up
    t0 = time.perf_counter()
    trace_points(lens, xy, np.full(len(xy), depth), args.spp, window)
    tracing = args.trace_points / (time.perf_counter() - t0)

    # the network's prior mean, batched
    n = args.batch
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    d = np.full(n, depth)
    # A model over focus is asked at the focus the yardstick traced (its nearest when that is the lens file's own).
    at = {} if len(model.focus) == 1 else {"focus_m": float(model.focus[0] if focus_m is None else focus_m)}
    network = best_rate(lambda: model.psf(x, y, d, allow_dark=True, **at), n, repeats=3)

    # model.psf: with its blend, or the network alone without one
    label = "model prior mean" if model.blend is not None else "network prior mean"
    rows = [("ray tracing, spp %d" % args.spp, tracing), (label, network)]
    if model.net.canonical:
        # the table: built once, then every query is a lookup
        t0 = time.perf_counter()
        table = model.tabulate(**at, **({} if args.target is None else {"target": args.target}))
        build = time.perf_counter() - t0
        rows.append(("table prior mean", best_rate(lambda: table.psf(x, y, d, allow_dark=True), n)))
        dx, dy = rng.uniform(-1, 1, 2048), rng.uniform(-1, 1, 2048)
        dd = 1 / rng.uniform(1 / hi, 1 / lo, 2048)
        R, A, D = table.shape
        logging.info(
            "table: %d x %d x %d (radii x angles x depths), %.0f MiB, built in %.1f s; %.2f%% from model.psf "
            "(pooled relative L2, 2048 random points and depths)",
            R,
            A,
            D,
            table.nbytes / 2**20,
            build,
            100 * table.deviation(dx, dy, dd),
        )
    logging.info(
        "%d threads; batch %d; depth %.3g m; tracing %s, %d-px window",
        torch.get_num_threads(),
        n,
        depth,
        Path(lens_path).name,
        window,
    )
    for name, rate in rows:
        logging.info("%-24s %12.1f PSFs/s   %10.0fx ray tracing", name, rate, rate / tracing)


if __name__ == "__main__":
    main()
