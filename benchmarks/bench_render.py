"""psf render against ray tracing: one scene rendered three ways, PSNR/SSIM against a dense traced reference.

    python benchmarks/bench_render.py [--work runs/bench_render] [--size 192] [--depth 1.0] [--ref-grid 48]
                                      [--ref-spp 10000] [--memory 512,1024]

Needs a grid file and a trained model: by default the `make demo` settings (configs/demo.yaml,
configs/demo_train.yaml) in --work (grid.h5, cvae/latest.pt), made first when missing. For the
resolution chart and a natural image (scikit-image's astronaut), both covering the sensor:

  model      psfcvae.render, every pixel its own PSF (and with --psf-every 4)
  patch-file DeepLens's conv_psf_map with the grid file's N x N traced PSFs (the rays the model learnt from)
  patch-dl   DeepLens's conv_psf_map with its own psf_map_rgb (an N x N point_source_grid traced at the file's spp)
  reference  DeepLens's conv_psf_map on a dense --ref-grid map traced at each patch's centre at --ref-spp,
             traced in the grid file's window, downsampled to at most 64 px, then resampled to the image pitch

Times: model = PSF evaluation + gather; patch-* = tracing the N x N map + convolution. --memory
renders larger images in subprocesses and prints their peak resident memory.

Then the whole sensor at its native resolution (--sensor, default the lens's own pixels, 2000 x 2000
for the default lens): the fast path (low-rank, PSFs from the model's table cached beside the checkpoint)
timed with the table's loading; its PSNR against the exact per-pixel gather on two --crop x --crop
crops (centre, corner; the exact path only there, both paths given the crop and its field window);
DeepLens's patch-wise conv_psf_map with the file's N x N map at the same size, timed in this process;
the exact path's time at that size estimated from the crops' (it is H·W·m²); and --big x --big (4096)
in a fresh process: time and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from psfcvae import load_model, render
from psfcvae.rendering.chart import resolution_chart, rgbd_scene
from psfcvae.rendering.figure import grid_psf_map, patchwise_render
from psfcvae.rendering.imageio import linear_to_srgb, srgb_to_linear, write_image
from psfcvae.rendering.quality import psnr, ssim
from psfgen.generation import trace_points
from psfgen.gridfile import GridFile
from psfgen.trace.lens import build_lens, read_lens_file
from psfgen.trace.resample import downsample

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_render")


def prepare(work: Path) -> tuple[Path, Path]:
    """grid.h5 and cvae/latest.pt in work, with the demo's settings; made by the CLI when missing."""
    grid, ckpt = work / "grid.h5", work / "cvae" / "latest.pt"
    psf = [sys.executable, "-c", "from cli import main; main()"]
    if not grid.exists():
        subprocess.run(psf + ["generate", "--config", "configs/demo.yaml", "--out", str(grid)], cwd=ROOT, check=True)
    if not ckpt.exists():
        subprocess.run(
            psf
            + ["train", "--data", str(grid), "--config", "configs/demo_train.yaml", "--run-dir", str(work / "cvae")],
            cwd=ROOT,
            check=True,
        )
    return grid, ckpt


def natural_image(size: int) -> torch.Tensor:
    """scikit-image's astronaut (a DeepLens dependency ships it), area-resized, in linear light: [3, size, size]."""
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return srgb_to_linear(torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 255.0))


# The traced maps are kept at most this many pixels across: a wider traced window is area-downsampled to it (a
# 318-px window of 2.52-um pixels to 64 pixels of 12.5 um, still finer than the 192-px image's 26 um).
MAP_PX = 64


def traced_map(lens, xy: np.ndarray, depth_m: float, spp: int, ks: int) -> torch.Tensor:
    """RGB PSFs [n, 3, m, m] traced in the ks-px window at the field points xy [n, 2], in blocks of 64 points,
    area-downsampled to m = min(ks, MAP_PX) pixels of ks/m sensor pixels (map_pitch)."""
    m = min(ks, MAP_PX)
    return torch.cat(
        [
            downsample(trace_points(lens, xy[i : i + 64], np.full(len(xy[i : i + 64]), depth_m), spp, ks), m)
            for i in range(0, len(xy), 64)
        ]
    ).cpu()


def map_pitch(optics: dict, ks: int) -> float:
    """The pixel pitch [mm] of traced_map's kernels."""
    return optics["sensor_size_mm"][0] / optics["sensor_res"][0] * ks / min(ks, MAP_PX)


def centres(g: int) -> np.ndarray:
    """Patch centres of a g x g map over the field, row-major, row 0 at the top: [g*g, 2]."""
    c = -1 + (2 * np.arange(g) + 1) / g
    gx, gy = np.meshgrid(c, c[::-1])
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def memory_probe(ckpt: Path, size: int, every: int | None, method: str = "exact") -> dict:
    """Render a size x size chart in a fresh process: its resident memory after loading and at its peak [MiB]
    (VmHWM, which starts afresh at exec, unlike ru_maxrss that inherits this process's peak) and the time [s].
    method "fast": PSFs from the table cached beside the checkpoint, its loading in the time."""
    table = "cached_table(m, ckpt)" if method == "fast" else "None"
    code = (
        "import time, torch\n"
        "from psfcvae import load_model, render; from psfcvae.rendering.chart import resolution_chart\n"
        "from psfcvae.rendering.renderfile import cached_table\n"
        "def hwm(): return next(int(v.split()[1]) for v in open('/proc/self/status') if v.startswith('VmHWM'))\n"
        f"ckpt = {str(ckpt)!r}; m = load_model(ckpt); img = resolution_chart({size}, {size}); base = hwm()\n"
        f"t = time.perf_counter(); render(m, img, 1.0, psf_every={every}, method={method!r}, table={table})\n"
        "print(base / 1024, hwm() / 1024, time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {
        "size": size,
        "psf_every": every,
        "method": method,
        "rss_before_mib": float(out[0]),
        "peak_rss_mib": float(out[1]),
        "seconds": float(out[2]),
    }


def _parser() -> argparse.ArgumentParser:
    """The command line: the work directory, the chart, the reference and the memory probe."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_render"))
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--depth", type=float, default=1.0, help="a depth of the grid file [m]")
    ap.add_argument("--ref-grid", type=int, default=48)
    ap.add_argument("--ref-spp", type=int, default=10000)
    ap.add_argument("--memory", default="512,1024", help="image sizes for the memory probe ('' to skip; 2048: ~17 min)")
    ap.add_argument(
        "--sensor",
        type=int,
        default=0,
        help="the whole-sensor image's side [px] (0: the lens's own; -1: skip that part)",
    )
    ap.add_argument("--crop", type=int, default=256, help="side of the crops where the exact path is computed [px]")
    ap.add_argument("--big", type=int, default=4096, help="side of the large image timed in a fresh process (0: skip)")
    return ap


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    work = Path(args.work)
    grid, ckpt = prepare(work)
    info = GridFile.open(grid)
    model = load_model(ckpt)
    optics = model.info["optics"]
    lens = build_lens(read_lens_file(info.lens_path), torch.device("cpu"))
    n, size, d = info.grid_size, args.size, args.depth
    args.grid_n = n
    ks = info.kernel_size  # the file's traced window: every traced map keeps the light the file keeps
    map_mm, sensor = map_pitch(optics, ks), optics["sensor_size_mm"]

    t = time.perf_counter()
    file_map = grid_psf_map(grid, d)  # [n, n, 3, 15, 15]
    t_file = (time.perf_counter() - t) + _trace_seconds(lens, n, d, info.spp, ks)
    t = time.perf_counter()
    dl_map = lens.psf_map_rgb(grid=(n, n), ks=ks, depth=-1000.0 * d, spp=info.spp)  # [n, n, 3, ks, ks]
    dl_map = downsample(dl_map, min(ks, MAP_PX)).cpu()
    t_dl_trace = time.perf_counter() - t
    t = time.perf_counter()
    ref_map = traced_map(lens, centres(args.ref_grid), d, args.ref_spp, ks)
    ref_map = ref_map.reshape(args.ref_grid, args.ref_grid, *ref_map.shape[1:])
    t_ref_trace = time.perf_counter() - t

    rows, results = [], {}
    for name, image in (("chart", resolution_chart(size, size)), ("astronaut", natural_image(size))):
        out = {}
        t = time.perf_counter()
        ref = patchwise_render(image, ref_map, map_mm, sensor)
        out["reference"] = (ref, t_ref_trace + time.perf_counter() - t)
        for every in (1, 4):
            t = time.perf_counter()
            out[f"model (psf every {every})"] = (render(model, image, d, psf_every=every), time.perf_counter() - t)
        t = time.perf_counter()
        out[f"patch-file ({n}x{n})"] = (
            patchwise_render(image, file_map, optics["kernel_pitch_mm"], sensor),
            t_file + time.perf_counter() - t,
        )
        t = time.perf_counter()
        out[f"patch-dl ({n}x{n})"] = (
            patchwise_render(image, dl_map, map_mm, sensor),
            t_dl_trace + time.perf_counter() - t,
        )
        out["no blur"] = (image, 0.0)
        for method, (img, secs) in out.items():
            row = {"image": name, "method": method, "psnr_db": psnr(img, ref), "ssim": ssim(img, ref), "seconds": secs}
            rows.append(row)
            write_image(
                work / f"{name}_{method.split(' ')[0]}{'4' if 'every 4' in method else ''}.png", linear_to_srgb(img), 8
            )
        results[name] = out
    print(
        f"depth {d:g} m, {size}x{size} px covering the sensor, reference {args.ref_grid}x{args.ref_grid} traced "
        f"PSFs at spp {args.ref_spp}; grid file {n}x{n} at spp {info.spp}; model step {model.info['step']}"
    )
    print(f"{'image':10s} {'method':24s} {'PSNR dB':>8s} {'SSIM':>7s} {'time s':>8s}")
    for r in rows:
        print(f"{r['image']:10s} {r['method']:24s} {r['psnr_db']:8.2f} {r['ssim']:7.4f} {r['seconds']:8.2f}")
    for name, out in results.items():  # what --psf-every costs, against the model's own per-pixel rendering
        a, b = out["model (psf every 4)"][0], out["model (psf every 1)"][0]
        print(
            f"{name}: --psf-every 4 against per pixel: PSNR {psnr(a, b):.1f} dB, SSIM {ssim(a, b):.5f}, "
            f"max |diff| {float((a - b).abs().max()):.2e}"
        )

    table, table_note = timed_table(model, ckpt)
    for name in results:  # the fast path against the same reference: no more than 0.5 dB below the exact one
        image = resolution_chart(size, size) if name == "chart" else natural_image(size)
        ref = results[name]["reference"][0]
        t = time.perf_counter()
        fast = render(model, image, d, method="fast", table=table)
        secs = time.perf_counter() - t
        exact_db = psnr(results[name]["model (psf every 1)"][0], ref)
        row = {"image": name, "method": "model, fast (table)", "psnr_db": psnr(fast, ref), "ssim": ssim(fast, ref)}
        rows.append({**row, "seconds": secs})
        print(
            f"{name}: fast path (table) {row['psnr_db']:.2f} dB / SSIM {row['ssim']:.4f} against the reference "
            f"({secs:.2f} s), exact per pixel {exact_db:.2f} dB: {row['psnr_db'] - exact_db:+.2f} dB"
        )

    depth_rows = rgbd(model, work, size)
    sensor_rows = whole_sensor(model, ckpt, grid, table, table_note, args) if args.sensor >= 0 else []
    memory = [memory_probe(ckpt, int(s), 16) for s in args.memory.split(",") if s.strip()]
    for m in memory:
        above = m["peak_rss_mib"] - m["rss_before_mib"]
        print(
            f"memory: {m['size']}x{m['size']} at --psf-every {m['psf_every']}: peak RSS {m['peak_rss_mib']:.0f} MiB, "
            f"{above:.0f} MiB above the {m['rss_before_mib']:.0f} MiB after loading; {m['seconds']:.1f} s"
        )
    (work / "bench_render.json").write_text(
        json.dumps(
            {"rows": rows, "depth": depth_rows, "memory": memory, "sensor": sensor_rows, "args": vars(args)}, indent=1
        )
    )


def _trace_seconds(lens, n: int, d: float, spp: int, ks: int) -> float:
    """Seconds to trace the file's n x n map at one depth in its ks-px window, as psf generate does."""
    lin = np.linspace(-1, 1, n)
    gx, gy = np.meshgrid(lin, lin[::-1])
    t = time.perf_counter()
    traced_map(lens, np.stack([gx.ravel(), gy.ravel()], axis=1), d, spp, ks)
    return time.perf_counter() - t


def timed_table(model, ckpt: Path):
    """(the model's table, a line saying whether it was built or loaded and in how long)."""
    from psfcvae.rendering.renderfile import cached_table, table_path

    cached = table_path(ckpt).is_file()
    t = time.perf_counter()
    table = cached_table(model, ckpt)
    secs = time.perf_counter() - t
    return table, f"table {'loaded from its cache' if cached else 'built and cached'} in {secs:.1f} s"


def whole_sensor(model, ckpt: Path, grid: Path, table, table_note: str, args) -> list[dict]:
    """The fast path over the whole sensor at its native resolution, against the exact one on two crops, the
    patch-wise map at the same size, and a large image in a fresh process (time, peak memory)."""
    from psfcvae.rendering.renderfile import cached_table

    optics = model.info["optics"]
    size, crop, d = args.sensor or optics["sensor_res"][0], args.crop, args.depth
    t = time.perf_counter()
    cached_table(model, ckpt)  # what a fresh `psf render` pays: the table loaded from beside the checkpoint
    t_load = time.perf_counter() - t
    file_map = grid_psf_map(grid, d)
    print(f"whole sensor {size}x{size} px at depth {d:g} m; {table_note}; loading the cached table {t_load:.1f} s")
    rows = []
    for name, image in (("chart", resolution_chart(size, size)), ("astronaut", natural_image(size))):
        t = time.perf_counter()
        fast = render(model, image, d, method="fast", table=table)
        t_fast = time.perf_counter() - t + t_load
        write_image(Path(args.work) / f"sensor_{name}_fast.png", linear_to_srgb(fast), 8)
        t = time.perf_counter()
        patchwise_render(image, file_map, optics["kernel_pitch_mm"], optics["sensor_size_mm"])
        t_patch = time.perf_counter() - t
        row = {"image": name, "size": size, "fast_s": t_fast, "patchwise_s": t_patch, "crops": []}
        exact_s = 0.0
        for where, (r0, c0) in (("centre", ((size - crop) // 2, (size - crop) // 2)), ("corner", (0, 0))):
            window = (-1 + 2 * c0 / size, -1 + 2 * (c0 + crop) / size, 1 - 2 * (r0 + crop) / size, 1 - 2 * r0 / size)
            part = image[:, r0 : r0 + crop, c0 : c0 + crop]
            t = time.perf_counter()
            exact = render(model, part, d, method="exact", field=window, table=table)
            exact_s += time.perf_counter() - t
            fast_crop = render(model, part, d, method="fast", field=window, table=table)
            row["crops"].append({"where": where, "psnr_db": psnr(fast_crop, exact)})
        row["exact_s_estimated"] = exact_s / (2 * crop * crop) * size * size  # the gather's cost is per pixel
        rows.append(row)
        crops = ", ".join(f"{c['where']} {c['psnr_db']:.1f} dB" for c in row["crops"])
        print(
            f"{name} {size}x{size}: fast {t_fast:.1f} s (with the table's loading); against the exact path on "
            f"{crop}x{crop} crops: {crops}; patch-wise {args.grid_n}x{args.grid_n} {t_patch:.1f} s (fast path's "
            f"speed-up {t_patch / t_fast:.2f}x); exact ~{row['exact_s_estimated']:.0f} s estimated from the crops "
            f"(speed-up {row['exact_s_estimated'] / t_fast:.0f}x)"
        )
    if args.big:
        big = memory_probe(ckpt, args.big, None, method="fast")
        rows.append({"image": "chart", "size": args.big, **big})
        print(
            f"chart {args.big}x{args.big} (fresh process, fast path, table loaded): {big['seconds']:.1f} s, peak RSS "
            f"{big['peak_rss_mib']:.0f} MiB ({big['rss_before_mib']:.0f} MiB after loading the model and the chart)"
        )
    return rows


def rgbd(model, work: Path, size: int) -> dict:
    """The RGB-D scene (two planes and a slanted one) over the model's depth range; per-pixel and interpolated."""
    lo, hi = model.depth_range
    image, depth = rgbd_scene(size, size, lo, hi)
    t = time.perf_counter()
    exact = render(model, image, depth)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    approx = render(model, image, depth, psf_every=4, depth_levels=16)
    t_approx = time.perf_counter() - t
    write_image(work / "rgbd_input.png", linear_to_srgb(image), 8)
    write_image(work / "rgbd_model.png", linear_to_srgb(exact), 8)
    res = {
        "near_m": lo,
        "far_m": hi,
        "seconds_per_pixel_psf": t_exact,
        "seconds_every4": t_approx,
        "psnr_every4_vs_exact_db": psnr(approx, exact),
        "ssim_every4_vs_exact": ssim(approx, exact),
    }
    print(
        f"RGB-D scene {lo:g}-{hi:g} m: per pixel {t_exact:.1f} s; --psf-every 4 with 16 depth levels "
        f"{t_approx:.1f} s, PSNR {res['psnr_every4_vs_exact_db']:.1f} dB / SSIM {res['ssim_every4_vs_exact']:.4f} "
        "against per pixel"
    )
    return res


if __name__ == "__main__":
    main()
