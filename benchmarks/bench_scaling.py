"""Throughput against the number of processes: sharded generation and DDP training.

Runs each under torchrun with 1, 2, ... processes (CPU here: gloo; one GPU per process
where there are GPUs) and prints PSFs/s (generation, merged) and samples/s (training),
with the speed-up over one process measured in this same run.

    python benchmarks/bench_scaling.py [--procs 1,2] [--grid-size 8] [--spp 20000] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(n: int) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={n}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
    ]


def run(cmd: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # one core per process: a fair split
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--grid-size", type=int, default=8)
    ap.add_argument("--spp", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    n_psf = 2 * args.grid_size**2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = {}
        for n in procs:
            out = tmp / f"g{n}" / "grid.h5"
            base = [
                "-m",
                "cli",
                "-q",
                "generate",
                "--grid-size",
                str(args.grid_size),
                "--depths",
                "0.5,2",
                "--spp",
                str(args.spp),
                "--heldout",
                "0",
                "--noise-points",
                "0",
                "--set",
                "block_rays=200000",
                "--device",
                args.device,
                "--out",
                str(out),
                "--shard",
                "auto",
            ]
            seconds = run(torchrun(n) + base)
            shards = sorted(str(p) for p in out.parent.glob("grid.shard*.h5"))
            seconds += run([sys.executable, "-m", "cli", "-q", "merge", *shards, "--out", str(out)])
            gen[n] = n_psf / seconds
        data = tmp / f"g{procs[0]}" / "grid.h5"
        trn = {}
        for n in procs:
            cmd = torchrun(n) + [
                "--no-python",
                str(Path(sys.executable).parent / "psf"),
                "train",
                "--data",
                str(data),
                "--run-dir",
                str(tmp / f"r{n}"),
                "--max-steps",
                str(args.steps),
                "--device",
                args.device,
                "--set",
                f"val_every={args.steps}",
                "--set",
                f"checkpoint_every={args.steps}",
            ]
            trn[n] = args.steps * 64 / run(cmd)
    print(
        f"generation: {n_psf} PSFs ({args.grid_size}x{args.grid_size} x 2 depths, spp {args.spp}), shards + "
        f"merge, wall clock incl. start-up"
    )
    for n in procs:
        print(f"  {n} process(es): {gen[n]:8.2f} PSFs/s   x{gen[n] / gen[procs[0]]:.2f}")
    print(
        f"training: default network, global batch 64, {args.steps} steps, wall clock incl. start-up and one validation"
    )
    for n in procs:
        print(f"  {n} process(es): {trn[n]:8.0f} samples/s  x{trn[n] / trn[procs[0]]:.2f}")


if __name__ == "__main__":
    main()
