"""One model over focus against a model trained at one focus alone, at the same rays per focus setting.

Traces two grid files of one lens with the same depths, grid, spp and seed: a multi-focus file over --focus-m
and a single-focus file at one of its focus settings (--single; default the middle one). The seed fixes the
held-out points' positions and depths, so the single-focus file's test points are the multi-focus file's
points, all at that focus. The single-focus file is traced in the multi-focus file's window (kernel_size): its
own pilot would choose a smaller one (the multi-focus window covers the largest PSF over every focus setting),
and two models whose 15x15 pixels span different areas of the sensor cannot be scored on the same points.
It trains a model on each (the multi-focus one for F times the steps: the same
passes over each PSF) and prints:

1. ``psf eval`` of the multi-focus model on its own test points, at grid focus settings and between them,
   against the interpolation baselines (bicubic in the field x linear in 1/depth x linear in 1/focus) and
   tracing the point at the grid's spp;
2. on the single-focus file's test points (all at the --single focus): the multi-focus model, the model trained
   at that focus alone, the single-focus file's best interpolation and tracing at the grid's spp, each
   noise-corrected and pooled (docs/metrics.md).

    python benchmarks/bench_focus.py [--lens acl12708u] [--focus-m 0.5,2,inf] [--single 2]
                                     [--config configs/demo.yaml] [--depths 3,5,20] [--grid-size N] [--spp N]
                                     [--heldout M] [--heldout-spp N] [--seed S] [--steps-per-focus 1500]
                                     [--set key=value] [--work DIR]

The default grid is the demo's (configs/demo.yaml: 8x8 points, depths 0.5, 1, 5 m, spp 20 000), a CPU-sized
check of the design, not the accuracy of psf generate's defaults.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import yaml

from psfcvae import EvalConfig, TrainConfig, evaluate, load_model, train
from psfcvae.evaluation.metrics import rel_l2_corrected
from psfgen import GenerateConfig, generate
from psfgen.gridfile import GridFile
from psfgen.shared import configio

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="acl12708u", help="a shipped lens's name or a lens file")
    ap.add_argument("--focus-m", default="0.5,2,inf", help="the multi-focus file's focus settings [m]")
    ap.add_argument("--single", default=None, help="the single-focus file's focus [m], one of --focus-m")
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"), help="psf generate config of both files")
    ap.add_argument("--depths", default=None, help="the config's depths replaced [m], e.g. 3,5,20")
    ap.add_argument("--grid-size", type=int, default=None, help="the config's grid_size replaced")
    ap.add_argument("--spp", type=int, default=None, help="the config's spp (rays per grid point) replaced")
    ap.add_argument("--heldout", type=int, default=None, help="the config's number of held-out points replaced")
    ap.add_argument("--heldout-spp", type=int, default=None, help="the config's held-out reference spp replaced")
    ap.add_argument("--seed", type=int, default=None, help="the config's seed replaced: other rays, held-out points")
    ap.add_argument("--steps-per-focus", type=int, default=1500, help="training steps per focus setting")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="train config override key=value (both models)"
    )
    ap.add_argument("--work", default=None)
    ap.add_argument("--device", default="auto")
    return ap


def _focus(text: str) -> float:
    return float("inf") if text.strip().lower() in ("inf", "infinity") else float(text)


def _trained(data: Path, run_dir: Path, steps: int, device: str, sets: list[str]) -> Path:
    """latest.pt of psf train's defaults (and ``sets``, key=value) on ``data`` for ``steps`` steps."""
    overrides = {"data": str(data), "run_dir": str(run_dir), "max_steps": steps, "device": device}
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
    train(configio.load(TrainConfig, None, overrides, sets))
    return run_dir / "latest.pt"


def _pooled_on(model, grid: GridFile, focus_m: float) -> tuple[float, int]:
    """The model's noise-corrected pooled relative L2 on ``grid``'s lit test points, called at ``focus_m``."""
    ho = grid.heldout("test")
    lit = ho["lit"]
    kwargs = {} if len(model.focus) == 1 else {"focus_m": focus_m}
    pred = model.psf(ho["coords"][lit, 0], ho["coords"][lit, 1], ho["depth"][lit], **kwargs).cpu().numpy()
    return rel_l2_corrected(pred, ho["psf_a"][lit], ho["psf_b"][lit])[1], int(lit.sum())


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    focus = [_focus(f) for f in args.focus_m.split(",")]
    single = _focus(args.single) if args.single else sorted(focus)[len(focus) // 2]
    if single not in focus:
        raise SystemExit(f"--single {single:g} is not one of --focus-m {args.focus_m}")
    work = Path(args.work or f"runs/bench_focus/{Path(args.lens).stem}")
    base = yaml.safe_load(Path(args.config).read_text())
    base.update(lens=args.lens, device=args.device)
    if args.depths:
        base["depths"] = [float(d) for d in args.depths.split(",")]
    changes = (
        ("grid_size", args.grid_size),
        ("spp", args.spp),
        ("heldout", args.heldout),
        ("heldout_spp", args.heldout_spp),
        ("seed", args.seed),
    )
    base.update({k: v for k, v in changes if v is not None})

    t0 = time.time()
    multi = generate(configio.build(GenerateConfig, {**base, "focus_m": focus, "out": str(work / "multi.h5")}))
    window = GridFile.open(multi).kernel_size  # [px]: both files in one frame (the module's docstring)
    one = generate(
        configio.build(
            GenerateConfig, {**base, "focus_m": [single], "kernel_size": window, "out": str(work / "single.h5")}
        )
    )
    times = {"generate": time.time() - t0}

    t = time.time()
    tag = "".join(f"_{s.replace('=', '-')}" for s in args.sets)
    multi_ckpt = _trained(multi, work / f"run_multi{tag}", args.steps_per_focus * len(focus), args.device, args.sets)
    times["train multi"] = time.time() - t
    t = time.time()
    one_ckpt = _trained(one, work / f"run_single{tag}", args.steps_per_focus, args.device, args.sets)
    times["train single"] = time.time() - t

    ev_multi = evaluate(EvalConfig(data=str(multi), checkpoint=str(multi_ckpt), out=str(work / f"eval_multi{tag}")))
    ev_one = evaluate(EvalConfig(data=str(one), checkpoint=str(one_ckpt), out=str(work / f"eval_single{tag}")))

    grid = GridFile.open(one)
    m_multi, n = _pooled_on(load_model(multi_ckpt, device="cpu"), grid, single)
    m_one, _ = _pooled_on(load_model(one_ckpt, device="cpu"), grid, single)
    heldout = {k: v["all"]["corrected"]["pooled"] for k, v in ev_one["heldout"].items() if not k.startswith("cvae")}
    best = min(heldout, key=heldout.get)
    trace = ev_one.get("raytrace_at_training_spp", {}).get("all", {}).get("pooled", float("nan"))  # as psf eval's

    n_grid = base["grid_size"]
    print(
        f"lens {args.lens}: focus {args.focus_m} m; {n_grid}x{n_grid} grid, depths {base.get('depths')}, "
        f"spp {base['spp']} per focus setting; {args.steps_per_focus} steps per focus"
        + (f"; train overrides {args.sets}" if args.sets else "")
    )
    print("\n1. the multi-focus model on its own test points (psf eval):")
    print(ev_multi["table"])
    print(f"\n2. on the {n} lit test points of the file traced at focus {single:g} m alone:")
    print(f"| multi-focus model ({len(focus)} focus settings) | {100 * m_multi:.1f}% |")
    print(f"| model trained at {single:g} m alone | {100 * m_one:.1f}% |")
    print(f"| best interpolation of the {single:g} m grid ({best}) | {100 * heldout[best]:.1f}% |")
    print(f"| tracing the point at the grid's spp (pooled over the re-traced grid points) | {100 * trace:.1f}% |")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
