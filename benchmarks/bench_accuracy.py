"""The whole pipeline on the default lens, sized for this CPU (about 15 minutes):
generate -> train (the default configuration of `psf train`) -> eval.

Prints the table of methods (relative L2 on held-out points, noise-corrected) and the
model's PSFs/s over ray tracing's. Files go to --work (default runs/bench_accuracy);
an existing grid file there is reused, so a second run only retrains and evaluates.

    python benchmarks/bench_accuracy.py [--work DIR] [--max-steps N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psfcvae import EvalConfig, TrainConfig, evaluate, train  # noqa: E402
from psfgen import GenerateConfig, configio, generate  # noqa: E402

GRID = dict(grid_size=16, depths=(0.5, 1.0, 5.0), spp=100_000, heldout=96, heldout_spp=400_000, noise_points=16, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench_accuracy")
    ap.add_argument("--max-steps", type=int, default=None, help="override the default schedule")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="train config override key=value")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    t0 = time.time()
    data = generate(configio.build(GenerateConfig, {**GRID, "out": str(work / "grid.h5"), "device": args.device}))
    t1 = time.time()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"data": str(data), "run_dir": str(run_dir), "device": args.device}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    cfg = configio.load(TrainConfig, None, overrides, args.sets)
    train(cfg)
    t2 = time.time()
    result = evaluate(EvalConfig(data=str(data), out=str(work / "eval"), checkpoint=str(run_dir / "latest.pt"), device=args.device))
    t3 = time.time()
    speeds = result["speed_psfs_per_s"]
    trace = next(v for k, v in speeds.items() if k.startswith("raytrace"))
    print(f"grid {GRID['grid_size']}x{GRID['grid_size']}, depths {GRID['depths']} m, spp {GRID['spp']}, "
          f"{GRID['heldout']} held-out points at spp {GRID['heldout_spp']}; train config: defaults of `psf train`"
          + (f" with {args.sets}" if args.sets else "") + f", {cfg.max_steps} steps")
    print(result["table"])
    for k, v in speeds.items():
        if k.startswith("cvae"):
            print(f"model / ray tracing speed ({k}): {v / trace:,.0f}x")
    print(f"time: generate {t1 - t0:.0f} s, train {t2 - t1:.0f} s, eval {t3 - t2:.0f} s; report {work / 'eval' / 'report.html'}")


if __name__ == "__main__":
    main()
