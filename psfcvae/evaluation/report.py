"""report.html of ``psf eval``: one self-contained page (PNGs embedded) a colleague can read
without the README. Its first screen (1400 px wide) answers how good (the headline sentence and
every method's error), where (the error by radius band and depth), how fast (PSFs/s against ray
tracing) and in what units (µm, the light the traced window keeps); below it the breakdowns, the
physical context, the figures and every definition on the page.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from psfcvae.evaluation.figures import BAND_FIGURE
from psfcvae.evaluation.metrics import measured_points

DEFINITIONS = [
    ("error", "relative L2: ‖P − R‖ / ‖R‖ over the three colour channels and all pixels of the kernel, in %."),
    (
        "noise-corrected, pooled",
        "the reference R is itself ray-traced, as the mean of two independent traces A and B; "
        "its Monte Carlo noise, estimated from ‖A − B‖²/4, is subtracted from ‖P − R‖² and ‖R‖², summed over "
        "the points "
        "of a group before the ratio is taken. This is the one figure quoted on this page; it is lower than the raw "
        "comparison because the raw one also counts the reference's own noise (psf-cvae repository, docs/metrics.md).",
    ),
    (
        "prior mean",
        "the CVAE's PSF from position and depth (and focus, for a model over focus settings) alone: the decoder at "
        "the mean of its learned prior p(z | x, y, depth[, focus]). This is what the model gives a user.",
    ),
    (
        "prior mean (table)",
        "canonical models only: the same prior mean precomputed over (radius, angle, depth) and "
        "interpolated, as model.tabulate() gives it (psfcvae/api/table.py, docs/speed.md): tens of "
        "times faster on a CPU; its deviation from the model (model.psf) is in metrics.json ('tabulated').",
    ),
    (
        "posterior recon",
        "the CVAE's reconstruction of a training PSF through its encoder: it sees the PSF itself, "
        "so it shows what the decoder can draw, not what the model predicts.",
    ),
    (
        "prior samples, spread",
        "PSFs decoded from random draws z ~ p(z | x, y, depth); their per-pixel standard "
        "deviation shows where the model is unsure.",
    ),
    (
        "nearest, bilinear, bicubic",
        "the grid PSF nearest the point (in a file of several focus settings: at the grid focus nearest in "
        "1/focus); bilinear or bicubic (Catmull-Rom) interpolation of the grid PSFs over the field, then linear in "
        "1/depth between the two nearest grid depths and, in a file of several focus settings, linear in 1/focus "
        "between the two grid focus settings around the point's.",
    ),
    (
        "bicubic (mirror-averaged)",
        "for a rotationally symmetric model: bicubic interpolation of the grid whose every PSF is first averaged "
        "with its lit mirror images (x to -x, y to -y, and the diagonal on a square sensor), which a symmetric lens "
        "makes copies of one PSF with their own ray noise; the model's blend starts from this grid.",
    ),
    (
        "eigen-PSF (K)",
        "the grid PSFs' K leading principal components; their coefficients interpolated bicubically "
        "over the field and linearly in 1/depth (and in 1/focus).",
    ),
    (
        "ray tracing at the training spp",
        "the error of tracing a point directly with the grid's rays per point: two "
        "independent traces of the same grid points differ by √2 times it.",
    ),
    (
        "field coordinates",
        "(x, y) in [−1, 1]: ±1 are the sensor's edges, x to the right, y up; (0, 0) is the optical "
        "axis. Mosaics put y = +1 at the top.",
    ),
    (
        "held-out points",
        "positions off the training grid (at least 0.1 grid step from every grid point), traced with more rays "
        "than the grid; in each radius band half at grid depths and half between them (in a file of several focus "
        "settings, likewise half at grid focus settings and half between two, midway in 1/focus). A quarter of "
        "each band are validation points: training chose its best checkpoint on them. The rest, the test points, are "
        "the only ones scored on this page: no method saw them, and they chose nothing.",
    ),
    (
        "radius bands",
        "r = √(x² + y²) in field coordinates (√2 at the corners of the sensor), in bands [0, 0.15), [0.15, 0.5), "
        "[0.5, 0.9) and [0.9, √2]: each holds test points (8 or more once the file has 40 held-out points), "
        "the axis's band more than its share of the field's area, so the error near the axis is measured.",
    ),
]

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}h1{font-size:1.5em;margin:.2em 0}
.meta,.note{font-size:.85em;color:#555;margin:.2em 0}.headline{font-size:1.25em;margin:.4em 0}
.warn{background:#fff4e0;border-left:4px solid #e89a00;padding:.5em 1em}dt{font-weight:bold}
summary{cursor:pointer;font-weight:bold;margin:.5em 0}figcaption{font-size:.9em;color:#444}
#summary{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,7fr);gap:0 2em;align-items:start}
#summary h2{font-size:1.05em;margin:.4em 0 0}#summary table{font-size:.9em;margin:.3em 0}
#summary figure{margin:.3em 0}#summary .what{text-align:left;color:#555}
#headline-table td:first-child,#summary th{white-space:nowrap}#summary tr.named td{background:#eaf2fb}"""


def write_report(result: dict, out: Path, figures: list[tuple[str, str, str]], extra_figures: list = ()) -> Path:
    """Write ``out``/report.html; returns its path.

    figures: (PNG file name in ``out``, title, caption), from eval_figures.make_figures.
    extra_figures: (title, png, caption) shown after them; png is PNG bytes, a path, or a
    matplotlib figure (saved into ``out`` next to the others).
    """
    out = Path(out)
    band = next(((out / n, t, c) for n, t, c in figures if n == BAND_FIGURE), None)  # on the first screen
    shown = [(out / name, title, caption) for name, title, caption in figures if name != BAND_FIGURE]
    for i, (title, png, caption) in enumerate(extra_figures):
        path = out / f"extra{i}_{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')[:40]}.png"
        path.write_bytes(_png_bytes(png))
        shown.append((path, title, caption))
    body = [
        _header(result),
        _summary(result, band),
        _truncation(result),
        _breakdown(result),
        _context(result),
        "<h2>Figures</h2>",
        *(_figure(p, t, c) for p, t, c in shown),
        _definitions(),
    ]
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>psf-cvae evaluation</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _png_bytes(png) -> bytes:
    if isinstance(png, bytes):
        return png
    if hasattr(png, "savefig"):
        buf = io.BytesIO()
        png.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    return Path(png).read_bytes()


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _header(result: dict) -> str:
    o, d, ck = result["optics"], result["data"], result["checkpoint"]
    model = (
        f"checkpoint <code>{html.escape(ck['path'])}</code> at step {ck['step']} (chosen by "
        f"{html.escape(ck['selection']['chosen_by'])} on {ck['selection']['n_points']} validation points)"
        + (f"; blend: {html.escape(ck['blend']['description'])}" if ck.get("blend") else "; the network alone")
        if ck
        else "no model (interpolation baselines only)"
    )
    return (
        f"<h1>{'The learned PSF' if ck else 'Interpolated PSFs (no model)'} of "
        f"{html.escape(Path(o['lens_path']).stem)}: how good, where, how fast, in what units</h1>"
        f'<p class="meta">{model}; data <code>{html.escape(d["path"])}</code>; {html.escape(result["created_at"])}.</p>'
    )


# What each method is, beside its error in the first table.
WHAT = {
    "cvae prior mean": "the model: what its API returns",
    "cvae network alone": "the network without the blend with its grid",
    "cvae prior mean (table)": "the prior mean, tabulated (model.tabulate())",
    "cvae prior sample": "one random draw of the model, not what it returns",
    "nearest": "the nearest grid PSF",
    "bilinear": "interpolation of the grid",
    "bicubic": "interpolation of the grid",
    "bicubic (mirror-averaged)": "interpolation of the grid averaged over its mirror images (a symmetric lens)",
}


def _summary(result: dict, band) -> str:
    """The first screen: the headline sentence, then how good (every method's error, the named one in bold),
    where (the error per radius band and depth: ``band``, (path, title, caption) of BAND_FIGURE, or None), how
    fast (PSFs/s against ray tracing) and in what units (µm, the light the traced window keeps)."""
    where = (
        f'<h2>{html.escape(band[1])}</h2><figure><img id="band-plot" alt="{html.escape(band[1])}" '
        f'src="data:image/png;base64,{base64.b64encode(band[0].read_bytes()).decode()}">'
        f'<figcaption class="note">{html.escape(band[2])} <code>{html.escape(band[0].name)}</code></figcaption>'
        "</figure>"
        if band
        else ""
    )
    noise = result["reference_noise"].get("mean")
    return (
        f'<p class="headline" id="headline">{html.escape(result["headline"]["sentence"])}</p>'
        '<section id="summary">'
        f"<div><h2>How good: error on the test points</h2>{_methods(result)}"
        f'<p class="note" id="protocol">{html.escape(result["protocol"]["statement"])}.</p></div>'
        f"<div>{where}</div>"
        f"<div><h2>How fast</h2>{_speed(result)}</div>"
        f"<div><h2>In what units</h2>{_units(result['optics'])}</div>"
        "</section>"
        f'<p class="note">Error: relative L2 at {measured_points(result)} held out, with the '
        f"reference's own ray-tracing noise removed (noise-corrected, pooled; every error on this page is this "
        f"figure). The raw comparison reads higher because the reference itself is noisy "
        f"({_pct(noise)} on average, traced at spp {result['data']['heldout_spp']}).</p>"
    )


def _methods(result: dict) -> str:
    """Every method's pooled error, best first, the one the headline names in bold; ray tracing last."""
    h = result["headline"]
    rows = []
    for name, v in h["pooled"].items():
        tr, a, b = ('<tr class="named">', "<b>", "</b>") if name == h["named"] else ("<tr>", "", "")
        what = WHAT.get(name, "eigen-PSF interpolation of the grid" if name.startswith("eigen-psf") else "")
        rows.append(
            f"{tr}<td>{a}{html.escape(name)}{b}</td><td>{a}{_pct(v)}{b}</td>"
            f'<td class="what">{html.escape(what)}</td></tr>'
        )
    if h["raytrace"] is not None:
        rows.append(
            f'<tr><td>ray tracing</td><td>{_pct(h["raytrace"])}</td><td class="what">tracing the point at the '
            f"grid's spp {result['data']['spp']} (measured on grid points)</td></tr>"
        )
    head = '<tr><th>method</th><th>error</th><th class="what">what it is</th></tr>'
    return f'<table id="headline-table">{head}{"".join(rows)}</table>'


def _speed(result: dict) -> str:
    """PSFs/s of the model and its table, each against the ray tracing that made the file (its provenance)."""
    speeds = result["speed_psfs_per_s"]
    trace_key, trace = next(iter(speeds.items()))  # the file's ray tracing comes first
    names = {
        "cvae prior mean (cpu)": "the model (prior mean), CPU",
        "cvae prior mean (cuda)": "the model (prior mean), CUDA",
        "cvae prior mean, table (cpu)": "its table, CPU",
    }
    times = lambda v: f"{v / trace:,.0f}×" if v >= 10 * trace else f"{v / trace:.2g}×"  # noqa: E731
    rows = "".join(
        f"<tr><td>{names[k]}</td><td>{v:,.0f}</td><td>{times(v)}</td></tr>"
        for k, v in speeds.items()
        if k in names and trace > 0
    )
    rows += (
        f"<tr><td>ray tracing {html.escape(trace_key.removeprefix('raytrace '))}</td><td>{trace:,.1f}</td>"
        "<td>1×</td></tr>"
    )
    return f'<table id="speed"><tr><th>method</th><th>PSFs/s</th><th>× ray tracing</th></tr>{rows}</table>'


def units(optics: dict) -> list[tuple[str, str]]:
    """(what, value) pairs: the sensor pixel, the kernel pitch and span in µm, the light the traced window keeps;
    the report's units table and psf eval's units line. optics: metrics.json's "optics"."""
    o, t = optics, optics["truncation"]
    span = o["kernel_px"] * o["kernel_pitch_um"]  # [µm]: traced_kernel_px sensor pixels
    pairs = [
        ("sensor pixel", f"{o['sensor_pixel_um']:.2f} µm"),
        ("kernel pixel (pitch)", f"{o['kernel_pitch_um']:.2f} µm"),
        (
            "kernel span",
            f"{o['kernel_px']} × {o['kernel_px']} px = {span:.0f} µm = {span / o['sensor_pixel_um']:.0f} sensor pixels",
        ),
    ]
    if t["total"]:
        pairs.append(
            (
                "light kept in the traced window",
                f"mean {100 * t['mean_kept']:.1f}%, worst {100 * t['worst_kept']:.1f}%; {t['truncated']} of "
                f"{t['total']} lit grid PSFs under {100 * t['kept_limit']:.0f}%",
            )
        )
    return pairs


def _units(optics: dict) -> str:
    rows = "".join(f'<tr><td>{k}</td><td style="text-align:left">{v}</td></tr>' for k, v in units(optics))
    return f'<table id="units">{rows}</table>'


def _truncation(result: dict) -> str:
    t, o = result["optics"]["truncation"], result["optics"]
    if not t["truncated"]:
        return ""
    at = t["worst_at"]
    return (
        f'<p class="warn" id="truncation">Truncated PSFs: {t["truncated"]} of {t["total"]} lit grid PSFs keep less '
        f"than {100 * t['kept_limit']:.0f}% of their valid rays inside the {o['traced_kernel_px']}-px traced window "
        + (
            f"({t['dark_by_window']} of them stored as dark: too few rays in the window for a PSF) "
            if t["dark_by_window"]
            else ""
        )
        + f"(worst {100 * t['worst_kept']:.1f}%, channel {at['channel']} of point ({at['x']:.3g}, {at['y']:.3g}) at "
        f"{at['depth_m']:g} m; mean {100 * t['mean_kept']:.1f}%). DeepLens drops the rays beyond the window, so "
        "these PSFs (often the field corners or strong defocus) are clipped, for every method and the reference "
        "alike. Trace with a larger kernel (<code>psf generate --kernel-size</code>, at a coarser kernel pitch: "
        "kernel_size × sensor pixel / kernel_size_small) to avoid it.</p>"
    )


def _group_table(result: dict, groups: list[str]) -> str:
    """Every method's pooled error in each of ``groups`` (columns), ray tracing's where it has the group."""
    head = "".join(f"<th>{html.escape(g)}</th>" for g in groups)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(f"<td>{_pct(m[g]['corrected']['pooled']) if g in m else '—'}</td>" for g in groups)
        + "</tr>"
        for n, m in result["heldout"].items()
    )
    first = next(iter(result["heldout"].values()))
    rows += "<tr><td>test points</td>" + "".join(f"<td>{first[g]['raw']['n']}</td>" for g in groups) + "</tr>"
    rt = result.get("raytrace_at_training_spp", {})
    if rt and any(g in rt for g in groups):
        rows += (
            "<tr><td>ray tracing (grid points)</td>"
            + "".join(f"<td>{_pct(rt[g]['pooled']) if g in rt else '—'}</td>" for g in groups)
            + "</tr>"
        )
    return f"<table><tr><th>method</th>{head}</tr>{rows}</table>"


def _breakdown(result: dict) -> str:
    kinds = result["heldout_groups"]
    stats = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(g)}</td><td>{s['raw']['n']}</td>"
        f"<td>{_pct(s['corrected']['pooled'])}</td><td>{_pct(s['corrected']['median'])}</td>"
        f"<td>{_pct(s['corrected']['p95'])}</td><td>{_pct(s['raw']['mean'])}</td></tr>"
        for n, m in result["heldout"].items()
        for g, s in m.items()
    )
    return (
        f'<details id="per-depth"><summary>Per depth</summary>{_group_table(result, kinds["depth"])}</details>'
        + (
            '<details id="per-focus" open><summary>Per focus distance: at the grid\'s focus settings and between '
            f"them</summary>{_group_table(result, kinds['focus'])}</details>"
            if "focus" in kinds
            else ""
        )
        + '<details id="per-band" open><summary>Per radius band: r = √(x² + y²), √2 at the corners</summary>'
        f"{_group_table(result, kinds['radius band'])}</details>"
        "<details><summary>Per-point statistics and the raw figures</summary>"
        "<p>Per-point corrected values are clipped at 0 and noisy (one point's own noise is one draw): the pooled "
        "figure is the one to quote. Raw: against the noisy reference, uncorrected.</p><table><tr><th>method</th>"
        "<th>points</th><th>n</th><th>pooled</th><th>median (corr.)</th><th>p95 (corr.)</th><th>mean (raw)</th>"
        f"</tr>{stats}</table></details>"
    )


def _context(result: dict) -> str:
    o, d = result["optics"], result["data"]
    wl = ", ".join(f"{c} {1000 * w:.0f} nm" for c, w in zip("RGB", o["wavelengths_um_rgb"]))
    size = o["sensor_size_mm"]
    pitch = (
        f"{o['kernel_pitch_um']:.2f} µm per kernel pixel ({o['traced_kernel_px']} traced sensor pixels of "
        f"{o['sensor_pixel_um']:.2f} µm, area-downsampled to {o['kernel_px']}; the kernel spans "
        f"{o['kernel_pitch_um'] * o['kernel_px']:.0f} µm)"
        if o["kernel_pitch_um"]
        else "unknown"
    )
    items = [
        ("lens", f"{html.escape(o['lens_path'])} — {html.escape(o['lens_description'])}"),
        ("lens file sha256", f"<code>{o['lens_sha256']}</code>"),
        ("focal length", f"{o['focal_length_mm']:.3f} mm" if o["focal_length_mm"] else "—"),
        ("wavelengths", wl),
        ("sensor", f"{size[0]:g} × {size[1]:g} mm" if size else "—"),
        ("kernel", f"{o['kernel_px']} × {o['kernel_px']} px RGB, {pitch}"),
        (
            "training grid",
            f"{d['grid_size']} × {d['grid_size']} field points at "
            f"{', '.join(f'{v:g}' for v in d['depths_m'])} m, spp {d['spp']} (rays per point and colour)"
            + (f", at focus {_focus_list(d['focus_m'])}" if len(d["focus_m"]) > 1 else ""),
        ),
        ("held-out reference", f"{measured_points(result)} at spp {d['heldout_spp']}, in two independent halves"),
        ("data run", f"<code>{d['run_id']}</code>"),
        ("software", html.escape(", ".join(f"{k} {v}" for k, v in result["versions"].items()))),
    ]
    rows = "".join(f'<tr><td>{k}</td><td style="text-align:left">{v}</td></tr>' for k, v in items)
    return f'<h2>What was measured</h2><table id="context">{rows}</table>'


def _focus_list(focus_m: list) -> str:
    """metrics.json's data.focus_m ('inf' for infinity) as '0.5, 1, 2 m and ∞'."""
    finite = [f"{f:g}" for f in focus_m if f != "inf"]
    return ", ".join(finite) + " m" + (" and ∞" if "inf" in focus_m else "")


def _figure(path: Path, title: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<h3>{html.escape(title)}</h3><figure><img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)} '
        f"<code>{html.escape(path.name)}</code></figcaption></figure>"
    )


def _definitions() -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in DEFINITIONS)
    return f'<h2>Definitions</h2><dl id="definitions">{items}</dl>'
