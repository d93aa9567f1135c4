"""Held-out error against grid density at a fixed ray budget (rays per depth per colour: one depth's
share; psf generate's --ray-budget counts every depth's rays).

For a lens, its depth(s), a budget R and grid sizes N: traces an N x N grid at spp = R / N²
for each N, trains `psf train`'s defaults on it, evaluates, and prints one table: N, spp,
tracing time, and the noise-corrected pooled relative L2 on the reference's test points
(psf eval scores those alone; the quarter that validates chooses best.pt) (docs/metrics.md) of the
CVAE prior mean, bicubic, bilinear, and of tracing a point at that spp; then where the CVAE's
and bicubic's minimum lie. docs/ray_budget.md holds the measured tables.

Every grid is scored on the SAME held-out points and the SAME reference: psfgen draws its
held-out points away from its own grid (so they would differ with N) and seeds their traces
by block (so the references would too). Hence the reference is traced once, into
ref_seedS.h5 (a 2 x 2 grid at spp 2000, plus the held-out set; S is REF_SEED, whose points
lie at least a tenth of a grid step from every point of every grid in REF_SIZES, or else
the first seed that keeps them off the grids asked for), each grid is traced without
held-out points, and eval_N_sppS.h5 is the grid file with the reference's held-out group
copied in (its split into validation and test points too; its config and run_params then
state the reference's held-out count and spp, and the attribute heldout_from names the
reference's run). The budgets of one lens share its reference; the held-out positions
depend on the seed, their count and that 2 x 2 grid alone, so every lens has the same ones. Files go to
--work; existing grid and reference files are reused, so a second run only retrains and
evaluates (--max-steps 0: the interpolation baselines alone, no training).

    python benchmarks/bench_budget.py [--lens acl12708u|cooke] [--depths 1] [--budget 6.4e6]
        [--sizes 8,12,16,24,32,48,64] [--heldout 32] [--heldout-spp 200000] [--max-steps 2000] [--work DIR]
    python benchmarks/bench_budget.py --plot WORK/results_R6.4e+06_steps0.json ... --figure docs/ray_budget.png
    python benchmarks/bench_budget.py --fit WORK/results_R6.4e+06_steps0.json WORK/results_R1.6e+06_steps0.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from psfcvae import EvalConfig, TrainConfig, evaluate, train
from psfgen import GenerateConfig, generate, gridfile
from psfgen.plan.grid import grid_coords, heldout_points
from psfgen.shared import configio

log = logging.getLogger("bench_budget")
ROOT = Path(__file__).resolve().parent.parent
LENSES = {
    "acl12708u": dict(lens=str(ROOT / "data/lenses/acl12708u.json")),
    "cooke": dict(lens=str(ROOT / "data/lenses/cooke_triplet_f5.json"), focus_m=5.0),
}
METHODS = ("cvae prior mean", "bicubic", "bilinear")


# Grid sizes the default reference keeps its 32 held-out points away from, and the first seed that does so
# (reference_seed(REF_SIZES, ...) searches ~27 000 seeds): sweeps at several budgets share one reference.
REF_SIZES = (8, 12, 16, 24, 32, 40, 48, 64)
REF_SEED = 27358


def off_grids(seed: int, sizes, depths: np.ndarray, m: int) -> bool:
    """Whether the m held-out points psfgen draws with ``seed`` (for the reference's 2 x 2 grid) lie at least
    a tenth of a grid step (Chebyshev) from every grid point of every N in sizes."""
    coords = heldout_points(2, depths, m, seed)[0]
    return all(np.abs(grid_coords(n)[None] - coords[:, None]).max(axis=-1).min() >= 0.2 / (n - 1) for n in sizes)


def reference_seed(sizes, depths: np.ndarray, m: int) -> int:
    """REF_SEED when it keeps the points off these grids, else the first seed that does."""
    for seed in (REF_SEED, *range(200_000)):
        if off_grids(seed, sizes, depths, m):
            return seed
    raise RuntimeError(f"no seed below 200000 keeps {m} held-out points off every grid of {sizes}")


def measure(base: dict, n: int, budget: float, work: Path, ref: Path, max_steps: int, device: str) -> dict:
    """Trace (or reuse) the N x N grid at spp = budget / N², train the defaults, evaluate."""
    spp = round(budget / n**2)
    name = f"{n}_spp{spp}"
    cfg = {**base, "grid_size": n, "spp": spp, "heldout": 0, "out": str(work / f"grid_{name}.h5")}
    grid = generate(configio.build(GenerateConfig, cfg))
    written = gridfile.GridFile.open(grid)  # the grid blocks' tracing time, without the noise re-traces
    trace_s = float(sum(s for b, s in zip(written.blocks, written.seconds) if b.kind == "grid"))
    data = gridfile.with_heldout_of(grid, ref, work / f"eval_{name}.h5")
    run_dir, train_s, checkpoint = work / f"run_{name}", 0.0, None
    if max_steps > 0:  # 0: the interpolation baselines alone
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = {"data": str(data), "run_dir": str(run_dir), "device": device, "max_steps": max_steps}
        t = time.time()
        train(configio.load(TrainConfig, None, overrides))
        train_s, checkpoint = time.time() - t, str(run_dir / "latest.pt")
    out = str(work / f"evalout_{name}")
    r = evaluate(EvalConfig(data=str(data), out=out, checkpoint=checkpoint, device=device))
    ho = r["heldout"]
    err = {k: ho[k]["all"]["corrected"]["pooled"] if k in ho else float("nan") for k in METHODS}
    rt = r.get("raytrace_at_training_spp", {}).get("all", {})
    err["tracing"] = rt.get("pooled", float("nan"))
    return dict(n=n, spp=spp, trace_s=trace_s, train_s=train_s, err=err, n_heldout=r["data"]["n_heldout"])


def table(rows: list[dict]) -> str:
    lines = [
        "| N | spp | tracing [s] | CVAE prior mean | bicubic | bilinear | tracing at that spp |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["err"]
        cells = ["—" if np.isnan(e[k]) else f"{100 * e[k]:.1f}%" for k in (*METHODS, "tracing")]
        lines.append(f"| {r['n']}×{r['n']} | {r['spp']:,} | {r['trace_s']:.0f} | " + " | ".join(cells) + " |")
    for k in ("cvae prior mean", "bicubic"):
        if all(np.isnan(r["err"][k]) for r in rows):
            continue
        best = min(rows, key=lambda r: np.nan_to_num(r["err"][k], nan=np.inf))
        lines.append(f"\n{k}: minimum {100 * best['err'][k]:.1f}% at N = {best['n']} (spp {best['spp']:,})")
    return "\n".join(lines)


def fit(results: list[str], method: str) -> str:
    """Fit err^2 = A N^(-2p) + B N^2 / R to ``method``'s errors in the results files (one lens; any
    budgets): p by a grid search, A and B by least squares on the relative residual. Returns the
    fit and its optimum N* = (p A R / B)^(1 / (2p + 2)) at each budget, the numbers psfgen/plan/budget.py cites."""
    pts = []
    for path in results:
        budget = float(Path(path).stem.split("_R")[1].split("_steps")[0])
        pts += [(r["n"], budget, r["err"][method]) for r in json.loads(Path(path).read_text())]
    n, budget, e = (np.array(v, dtype=float) for v in zip(*pts))
    best = None
    for p in np.arange(0.3, 3.0, 0.01):
        terms = np.stack([n ** (-2 * p), n**2 / budget], axis=1)
        coef = np.linalg.lstsq(terms / e[:, None] ** 2, np.ones_like(e), rcond=None)[0]
        resid = np.sqrt(np.maximum(terms @ coef, 1e-12)) / e - 1
        if best is None or (resid**2).sum() < best[0]:
            best = ((resid**2).sum(), p, coef)
    ss, p, (a, b) = best
    lines = [f"{method}: p = {p:.2f}, A = {a:.4g}, B = {b:.4g}, rms relative residual {np.sqrt(ss / len(e)):.3f}"]
    for r in sorted(set(budget)):
        lines.append(f"  R = {r:.3g}: N* = {(p * a * r / b) ** (1 / (2 * p + 2)):.1f} (N* ~ R^{1 / (2 * p + 2):.3f})")
    return "\n".join(lines)


def merged(results: list[str]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (lens folder, budget): files of one lens and budget (e.g. steps 0 and 2000) merged by N,
    a measured value (not NaN) winning."""
    panels: dict[tuple[str, str], dict[int, dict]] = {}
    for path in results:
        key = (Path(path).parent.name, Path(path).stem.split("_R")[1].split("_steps")[0])
        rows = panels.setdefault(key, {})
        steps = int(Path(path).stem.split("_steps")[1])  # the CVAE's training steps, for the legend
        for r in json.loads(Path(path).read_text()):
            old = rows.setdefault(r["n"], r)
            if steps:
                old["steps"] = steps
            old["err"] = {k: v if np.isnan(old["err"].get(k, np.nan)) else old["err"][k] for k, v in r["err"].items()}
    return {k: [rows[n] for n in sorted(rows)] for k, rows in panels.items()}


def plot(results: list[str], out: str) -> None:
    """Error against N, one panel per lens and budget (results_R*_steps*.json in --work folders)."""
    from psfcvae.plots import figure, save

    panels = merged(results)
    fig = figure(4.2 * len(panels), 3.4)
    for i, ((lens, budget), rows) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ns = [r["n"] for r in rows]
        for j, (k, style) in enumerate(zip((*METHODS, "tracing"), ("o-", "s-", "^--", "x:"))):
            e = np.array([100 * r["err"][k] for r in rows])
            if not np.isnan(e).all():
                ok = ~np.isnan(e)
                steps = next((r["steps"] for r in rows if r.get("steps")), 0)
                label = {"cvae prior mean": f"CVAE prior mean, {steps} steps", "tracing": "tracing a point at that spp"}
                ax.plot(np.array(ns)[ok], e[ok], style, color=f"C{j}", label=label.get(k, k))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [f"{n}\n{r['spp'] / 1000:.3g}k" for n, r in zip(ns, rows)])
        ax.minorticks_off()
        ax.set_xlabel("grid N (N x N); spp below")
        ax.set_ylabel("held-out relative L2 [%]")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{lens}: {float(budget):.3g} rays per depth per colour", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, Path(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="acl12708u", choices=sorted(LENSES))
    ap.add_argument("--depths", default="1", help="object depths [m], comma separated")
    ap.add_argument("--budget", type=float, default=16**2 * 25_000, help="rays per depth per colour (N² × spp)")
    ap.add_argument("--sizes", default="8,12,16,24,32,48,64", help="grid sizes N, comma separated")
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--heldout-spp", type=int, default=200_000)
    ap.add_argument("--max-steps", type=int, default=2000, help="0: interpolation baselines only, no training")
    ap.add_argument("--work", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--smoke", action="store_true", help="sizes 3,4 at a budget of 16 000 rays, 20 steps: checks the script"
    )
    ap.add_argument("--plot", nargs="+", metavar="RESULTS_JSON", help="draw these results into --figure; trace nothing")
    ap.add_argument("--figure", default="docs/ray_budget.png")
    ap.add_argument("--fit", nargs="+", metavar="RESULTS_JSON", help="fit the error model to one lens's results")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.figure)
        return
    if args.fit:
        for method in ("bicubic", "bilinear"):
            print(fit(args.fit, method))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        sizes, args.budget, args.heldout, args.heldout_spp, args.max_steps = [3, 4], 16_000, 4, 2000, 20
    depths = tuple(float(d) for d in args.depths.split(","))
    work = Path(args.work or f"runs/bench_budget/{args.lens}")
    # 16 re-traced grid points per depth: enough for the "tracing at that spp" column, at a third of the default's rays.
    base = {**LENSES[args.lens], "depths": depths, "device": args.device, "noise_points": 16}

    if args.smoke:
        base["noise_points"] = 4
    seed = reference_seed(sizes, np.array(depths), args.heldout)
    ref_cfg = dict(grid_size=2, spp=2000, noise_points=0, heldout=args.heldout, heldout_spp=args.heldout_spp, seed=seed)
    t = time.time()
    ref = generate(configio.build(GenerateConfig, {**base, **ref_cfg, "out": str(work / f"ref_seed{seed}.h5")}))
    ref_s = time.time() - t
    rows = []
    for n in sizes:  # each row is saved as it comes, so a stopped run keeps what it measured
        rows.append(measure(base, n, args.budget, work, ref, args.max_steps, args.device))
        log.warning("N=%d: %s", n, rows[-1])
        (work / f"results_R{args.budget:.3g}_steps{args.max_steps}.json").write_text(json.dumps(rows, indent=1))

    print(
        f"lens {args.lens}, depths {args.depths} m, budget {args.budget:.3g} rays per depth per colour; "
        f"{rows[0]['n_heldout']} held-out points (seed {seed}) at spp {args.heldout_spp:,} (reference: {ref_s:.0f} s); "
        f"psf train defaults, {args.max_steps} steps; errors: noise-corrected pooled relative L2"
    )
    print(table(rows))
    print("train time: " + ", ".join(f"N={r['n']} {r['train_s']:.0f} s" for r in rows))


if __name__ == "__main__":
    main()
