"""The whole pipeline on one lens: generate -> train (one or more configurations) -> eval.

Prints one table: each trained configuration's prior mean (the PSF `psf sample` returns)
and every interpolation baseline, as relative L2 on the file's test points (held-out points
the model never saw and that chose no checkpoint; psf eval scores nothing else),
noise-corrected and pooled (docs/metrics.md), overall, at grid depths and between them
(and, over several focus settings, at grid focus settings and between them); ray tracing at
the training spp; the model's PSFs/s over ray tracing's. Files go to --work (default
runs/bench_accuracy/LENS, LENS_focusF1,F2,... with --focus-m, LENS_seedS with --seed); an
existing grid file there is reused, so a second run only retrains and evaluates.

    python benchmarks/bench_accuracy.py [--lens acl12708u|cooke|la1131] [--configs default,cartesian,spec]
                                        [--work DIR] [--max-steps N] [--set key=value ...]
                                        [--grid-size N | --budget-rule] [--split-depths S | --auto-depths]
                                        [--focus-m 0.5,1,2,inf] [--seed S]

--focus-m traces every depth at each of these focus distances [m] (inf: focus at infinity;
psf generate --focus-m): the same rays per focus setting as the single-focus run, so F times
the rays in all; one model over them all.

Configurations: default (psf train's defaults), cartesian (the defaults conditioned on
(x, y[, d]) instead of the lens's symmetry), spec (configs/cvae_v1.yaml, verbatim), or a
variant of the defaults named NAME:key=value:key=value (e.g. nf5:num_frequencies=5).
--configs "" evaluates the interpolation baselines alone.

--split-depths S spends the same rays in all on more depths: each interval between the
lens's depths is split into S equal steps in 1/depth (3 depths become 2S + 1), the rays
per depth shrink by the same factor, the grid follows (--budget-rule) or keeps its size,
and the held-out points and their reference are those of the grid file without the split
(traced first when missing), so the two are scored on the same points. --auto-depths does
the same with psf generate's num_depths auto over the lens's depth range: the pilot picks
the depths, the same rays in all are spread over them by the rule.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from psfcvae import EvalConfig, TrainConfig, evaluate, train
from psfcvae.evaluation.metrics import focus_label
from psfgen import GenerateConfig, generate, gridfile
from psfgen.plan import budget
from psfgen.shared import configio

ROOT = Path(__file__).resolve().parent.parent
# About the same ray budget for both lenses (spp 1e5; 768 and 720 grid PSFs); 96 held-out
# points with a reference at spp 4e5 in two halves: 23 validation and 73 test points, the
# radius bands holding 8, 12, 29 and 24 test points from the axis out (psfgen/plan/grid.py;
# 40 points give each band 8, so 96 needs no raise). The condenser's PSFs change fast over
# the field and slowly with depth: 16 x 16 points at 3 depths. The triplet, refocused to
# 5 m, is the opposite (bicubic is within 1.5% over a 16 x 16 field, but a PSF between
# 5 m and 20 m is no blend of the two): 12 x 12 points at 5 depths from 3 to 20 m.
BUDGET = dict(spp=100_000, heldout=96, heldout_spp=400_000, noise_points=16, seed=0)
LENSES = {
    "acl12708u": dict(lens=str(ROOT / "data/lenses/acl12708u.json"), grid_size=16, depths=(0.5, 1.0, 5.0)),
    "cooke": dict(
        lens=str(ROOT / "data/lenses/cooke_triplet_f5.json"),
        grid_size=12,
        depth_min=3.0,
        depth_max=20.0,
        num_depths=5,
        focus_m=5.0,
    ),
    # A singlet with a front stop whose sensor corners are dark (vignetting): the errors are on its lit points.
    "la1131": dict(lens=str(ROOT / "data/lenses/la1131_f50.json"), grid_size=16, depths=(0.5, 1.0, 5.0)),
}
CONFIGS = {
    "default": (None, []),
    "cartesian": (None, ["condition_frame=cartesian"]),
    "spec": (ROOT / "configs/cvae_v1.yaml", []),
}


def _parser() -> argparse.ArgumentParser:
    """The command line: which lens, which configurations, where, and which grid."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="acl12708u", choices=sorted(LENSES))
    ap.add_argument(
        "--configs", default="default", help=f"comma separated, of {', '.join(CONFIGS)}; empty: generate only"
    )
    ap.add_argument("--work", default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="override every configuration's schedule")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="train config override key=value")
    ap.add_argument("--device", default="auto")
    grid = ap.add_mutually_exclusive_group()
    grid.add_argument(
        "--grid-size",
        type=int,
        default=None,
        help="another grid at the same rays per depth (spp scaled by the grid's points)",
    )
    grid.add_argument(
        "--budget-rule",
        action="store_true",
        help="the grid the budget rule picks for the same rays per depth (psf generate --ray-budget D x N² x spp; "
        "psfgen/plan/budget.py)",
    )
    depths = ap.add_mutually_exclusive_group()
    depths.add_argument(
        "--auto-depths",
        action="store_true",
        help="num_depths auto over the lens's depth range, at the same rays in all (see above)",
    )
    depths.add_argument(
        "--split-depths",
        type=int,
        default=1,
        help="split each depth interval into S steps in 1/depth, at the same rays in all (see above)",
    )
    ap.add_argument(
        "--focus-m",
        type=_focus_list,
        default=None,
        help="comma separated focus distances [m], inf allowed: every depth traced at each (the lens's own focus "
        "otherwise)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=BUDGET["seed"],
        help="the grid file's seed: its rays and its held-out points (another seed: a freshly drawn test set)",
    )
    ap.add_argument("--smoke", action="store_true", help="a 4x4 grid at spp 2000: checks this script, measures nothing")
    return ap


def _focus_list(text: str) -> tuple[float, ...]:
    """'0.5,1,inf' -> (0.5, 1.0, inf); psf generate checks the values."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma separated metres or inf, got {text!r}") from None


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configs = dict(CONFIGS)
    names = []
    for item in filter(None, args.configs.split(",")):
        name, *sets = item.split(":")
        if sets:
            if name in CONFIGS:
                ap.error(f"{name!r} names a built-in configuration; give the variant another name")
            configs[name] = (None, sets)
        elif name not in configs:
            ap.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)} or NAME:key=value")
        names.append(name)
    if args.split_depths < 1:
        ap.error(f"--split-depths must be at least 1, got {args.split_depths}")
    focus_tag = "" if args.focus_m is None else "_focus" + ",".join(f"{f:g}" for f in args.focus_m)
    seed_tag = "" if args.seed == BUDGET["seed"] else f"_seed{args.seed}"
    work = Path(args.work or f"runs/bench_accuracy/{args.lens}{focus_tag}{seed_tag}")
    grid_cfg = {**BUDGET, **LENSES[args.lens], "out": str(work / "grid.h5"), "device": args.device, "seed": args.seed}
    if args.focus_m is not None:
        grid_cfg["focus_m"] = args.focus_m
    if args.grid_size:
        rays = grid_cfg["grid_size"] ** 2 * grid_cfg["spp"]
        grid_cfg.update(grid_size=args.grid_size, spp=round(rays / args.grid_size**2))
    if args.budget_rule:
        grid_size, spp = budget.choose(grid_cfg["grid_size"] ** 2 * grid_cfg["spp"])
        grid_cfg.update(grid_size=grid_size, spp=spp)
    if args.smoke:
        grid_cfg.update(grid_size=4, spp=2000, heldout=8, heldout_spp=4000, noise_points=4)

    t0 = time.time()
    data = generate(configio.build(GenerateConfig, grid_cfg))
    heldout = (grid_cfg["heldout"], grid_cfg["heldout_spp"])  # the reference, also for a split grid
    tag = ""
    if args.split_depths > 1:
        grid_cfg, tag = split_depths(grid_cfg, args.split_depths, args.budget_rule), f"_split{args.split_depths}"
        data = gridfile.with_heldout_of(
            generate(configio.build(GenerateConfig, grid_cfg)), data, work / f"eval{tag}.h5"
        )
    if args.auto_depths:
        grid_cfg, tag = auto_depths(grid_cfg), "_auto"
        grid = generate(configio.build(GenerateConfig, grid_cfg))
        data = gridfile.with_heldout_of(grid, data, work / f"eval{tag}.h5")
        # the depths the pilot chose, and the grid the rule gave each
        grid_cfg = {**gridfile.GridFile.open(data).config, "ray_budget": None}
    times = {"generate": time.time() - t0}
    results = {}
    if not names:
        out = str(work / f"eval_baselines{tag}")
        results["baselines"] = evaluate(EvalConfig(data=str(data), out=out, device=args.device))
    for name in names:
        path, sets = configs[name]
        run_dir = work / f"run_{name}{tag}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = {"data": str(data), "run_dir": str(run_dir), "device": args.device, "max_steps": args.max_steps}
        cfg = configio.load(TrainConfig, path, overrides, [*sets, *args.sets])
        t = time.time()
        train(cfg)
        times[f"train {name}"] = time.time() - t
        results[name] = evaluate(
            EvalConfig(
                data=str(data),
                out=str(work / f"eval_{name}{tag}"),
                checkpoint=str(run_dir / "latest.pt"),
                device=args.device,
            )
        )
        results[name]["max_steps"] = results[name]["checkpoint"]["step"]  # the steps max_steps auto resolved to

    built = configio.build(GenerateConfig, grid_cfg)
    depths = ", ".join(f"{d:g}" for d in built.depth_values())
    focus = built.focus_values()
    focus = "" if focus is None else f" at focus {', '.join(focus_label(f) for f in focus)}"
    print(
        f"lens {args.lens}: grid {grid_cfg['grid_size']}x{grid_cfg['grid_size']}, depths {depths} m{focus}, "
        f"spp {grid_cfg['spp']}, {heldout[0]} held-out points at spp {heldout[1]} (scored: the "
        f"{next(iter(results.values()))['protocol']['test_points']} test points)"
        + (f"; train overrides {args.sets}" if args.sets else "")
    )
    print(summary_table(results))
    for name, r in results.items():
        speeds = r["speed_psfs_per_s"]
        trace = next(v for k, v in speeds.items() if k.startswith("raytrace"))
        for k, v in speeds.items():
            if k.startswith("cvae"):
                print(f"{name}: model / ray tracing speed ({k}): {v / trace:,.0f}x ({v:,.0f} vs {trace:.2f} PSFs/s)")
        if r.get("heldout_dark") or "illumination" in r:
            il = r.get("illumination", {})
            print(
                f"{name}: {r.get('heldout_dark', 0)} dark test points left out; illumination mean |error| "
                f"{il.get('abs_error', {}).get('mean', float('nan')):.3f}, lit/dark agreement "
                f"{100 * il.get('lit_agreement', float('nan')):.0f}%"
            )
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def split_depths(grid_cfg: dict, s: int, rule: bool) -> dict:
    """The generate config with each depth interval split into s equal steps in 1/depth and the same
    rays in all: rays per depth / (new depths / old depths); grid by the budget rule or kept; no held-out set
    of its own (it gets the unsplit file's)."""
    old = configio.build(GenerateConfig, grid_cfg).depth_values()  # [D] m, ascending
    inv = 1 / old[::-1]  # ascending in 1/depth
    new_inv = np.concatenate([np.linspace(a, b, s + 1)[:-1] for a, b in zip(inv[:-1], inv[1:])] + [inv[-1:]])
    depths = tuple(float(d) for d in np.sort(1 / new_inv))
    rays = round(grid_cfg["grid_size"] ** 2 * grid_cfg["spp"] * len(old) / len(depths))
    n = budget.choose(rays)[0] if rule else grid_cfg["grid_size"]
    out = str(Path(grid_cfg["out"]).with_name(f"grid_split{s}.h5"))
    return {**grid_cfg, "depths": depths, "grid_size": n, "spp": round(rays / n**2), "heldout": 0, "out": out}


def auto_depths(grid_cfg: dict) -> dict:
    """The generate config for num_depths auto over the same depth range, with the same rays in all (the rule
    splits each depth's share); no held-out set of its own (it gets the unsplit file's)."""
    old = configio.build(GenerateConfig, grid_cfg).depth_values()  # [D] m
    rays = len(old) * grid_cfg["grid_size"] ** 2 * grid_cfg["spp"]
    cfg = {k: v for k, v in grid_cfg.items() if k not in ("depths", "grid_size", "spp")}
    out = str(Path(grid_cfg["out"]).with_name("grid_auto.h5"))
    return {
        **cfg,
        "depth_min": float(old.min()),
        "depth_max": float(old.max()),
        "num_depths": "auto",
        "ray_budget": rays,
        "heldout": 0,
        "out": out,
    }


def summary_table(results: dict) -> str:
    """Markdown rows: each configuration's prior mean, then every evaluation's baselines (a canonical model's adds
    bicubic of the mirror-averaged grid), each from the first evaluation that has it; columns: all
    test points, at and between grid depths and (several focus settings) at and between grid focus settings."""
    first = next(iter(results.values()))
    groups = ["all", "at grid depths", "between grid depths"]
    groups += [g for g in ("at grid focus", "between grid focus") if g in first["heldout_groups"].get("focus", [])]
    lines = ["| method | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]

    def row(label, m):
        cells = [f"{100 * m[g]['corrected']['pooled']:.1f}%" if g in m else "—" for g in groups]
        return f"| {label} | " + " | ".join(cells) + " |"

    for name, r in results.items():
        if r["checkpoint"] is None:
            continue
        frame = r["checkpoint"]["frame"]
        lines.append(row(f"CVAE prior mean, {name} ({frame}, {r['max_steps']} steps)", r["heldout"]["cvae prior mean"]))
        if "cvae network alone" in r["heldout"]:  # the model blends with its grid: the network without
            lines.append(row(f"the network alone, {name}", r["heldout"]["cvae network alone"]))
    baselines: dict = {}  # every evaluation's (a model's adds bicubic of the mirror-averaged grid), the first's figure
    for r in results.values():
        for method, m in r["heldout"].items():
            if not method.startswith("cvae"):
                baselines.setdefault(method, m)
    for method, m in baselines.items():
        lines.append(row(method, m))
    rt = first.get("raytrace_at_training_spp", {})
    if rt:
        lines.append(
            f"| ray tracing at spp {first['data']['spp']} (mean over {rt['all']['n']} re-traced grid points, "
            f"not pooled) | {100 * rt['all']['mean']:.1f}% |" + " |" * (len(groups) - 1)
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
