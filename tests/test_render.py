"""psf render: geometry, the per-pixel gather, tiling, --psf-every, depth maps, illumination, files and errors."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, sha

from psfcvae import load_model
from psfcvae.api.psfmodel import PSFModel
from psfcvae.rendering.chart import resolution_chart, rgbd_scene
from psfcvae.rendering.imageio import read_image, write_image
from psfcvae.rendering.quality import psnr, ssim
from psfcvae.rendering.render import pixel_coords, render, render_with, resample_matrix
from psfgen.trace.resample import area_matrix

# A window of the field 0.16 wide: with 24 pixels across it, the kernel spans about 9 pixels
# (the default lens's PSF is 161 um wide, its sensor 5 mm), so the blur is visible on tiny images.
FIELD = (0.30, 0.46, -0.20, -0.04)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run / "latest.pt")


def lit_kernel(model, x, y, d) -> np.ndarray:
    """The model's PSF at one point times its relative illumination: [3, k, k], each channel summing to it."""
    return (model.psf(x, y, d)[0] * model.illumination(x, y, d)[0][:, None, None]).double().numpy()


def naive_render(model, image, depth, field=FIELD):
    """out(p) = sum_u K_p(u) img(p - u), one pixel at a time, mirror padding: the oracle of the tiled gather."""
    optics = model.info["optics"]
    _, h, w = image.shape
    sw, sh = optics["sensor_size_mm"]
    ay = resample_matrix(optics["kernel_size_small"], optics["kernel_pitch_mm"], sh * (field[3] - field[2]) / 2 / h)
    ax = resample_matrix(optics["kernel_size_small"], optics["kernel_pitch_mm"], sw * (field[1] - field[0]) / 2 / w)
    cy, cx = ay.shape[0] // 2, ax.shape[0] // 2
    assert cx >= 2 and cy >= 2  # a real blur, not a one-pixel kernel
    pad = np.pad(image.numpy(), ((0, 0), (cy, cy), (cx, cx)), mode="reflect")
    xs, ys = pixel_coords(h, w, field)
    out = np.zeros(image.shape)
    for i in range(h):
        for j in range(w):
            d = depth if np.isscalar(depth) else float(depth[i, j])
            k = ay @ lit_kernel(model, xs[j], ys[i], d) @ ax.T  # [3, my, mx]
            for a in range(k.shape[1]):
                for b in range(k.shape[2]):  # u = (a - cy, b - cx); img(p - u) = pad[i + 2cy - a, j + 2cx - b]
                    out[:, i, j] += k[:, a, b] * pad[:, i + 2 * cy - a, j + 2 * cx - b]
    return torch.from_numpy(out).float()


def test_resample_matrix_keeps_energy_and_centre():
    for k, p_in, p_out in ((15, 10.0, 26.3), (15, 10.0, 4.1), (15, 1.0, 1.0), (64, 2.5, 11.0)):
        a = resample_matrix(k, p_in, p_out)
        assert a.shape[0] % 2 == 1
        assert np.allclose(a.sum(axis=0), 1.0)  # every input pixel fully inside the output: energy kept
        centre = np.zeros(k)
        centre[k // 2] = 1.0
        if k % 2:  # an odd kernel's centre pixel lands symmetric about the output's centre
            v = a @ centre
            assert np.allclose(v, v[::-1])
    assert np.allclose(resample_matrix(15, 1.0, 1.0), np.eye(15))
    # 64 -> 15 over the same span is exactly psfgen's area downsampling.
    assert np.allclose(resample_matrix(64, 1.0, 64 / 15), area_matrix(64, 15))


def test_checkpoint_stores_kernel_pitch(model, tiny_grid):
    from psfgen.gridfile import GridFile

    info = GridFile.open(tiny_grid)
    o = model.info["optics"]
    assert o["kernel_size"] == 64 and o["kernel_size_small"] == info.kernel_size_small == 15
    # The default lens: a 5.041671 mm sensor of 2000 pixels; 64 of them per 15 kernel pixels.
    assert o["kernel_pitch_mm"] == pytest.approx(64 * 5.041671 / 2000 / 15, rel=1e-9)


def test_gather_matches_per_pixel_oracle_and_tiles(model):
    torch.manual_seed(0)
    image = torch.rand(3, 9, 11)
    ref = naive_render(model, image, 1.0, field=FIELD)
    out = render(model, image, 1.0, field=FIELD)
    tiled = render(model, image, 1.0, tile_bytes=1, field=FIELD)  # 8x8 tiles: the seams are inside the image
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out, tiled, atol=1e-6)


def test_delta_lands_at_its_pixel_as_the_model_psf(model):
    h = w = 24
    i, j = 7, 15
    image = torch.zeros(3, h, w)
    image[:, i, j] = 1.0
    out = render(model, image, 2.0, field=FIELD)
    xs, ys = pixel_coords(h, w, FIELD)
    optics = model.info["optics"]
    ay = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][1] * (FIELD[3] - FIELD[2]) / 2 / h)
    ax = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][0] * (FIELD[1] - FIELD[0]) / 2 / w)
    kernel = torch.from_numpy(ay @ lit_kernel(model, xs[j], ys[i], 2.0) @ ax.T).float()
    cy, cx = kernel.shape[1] // 2, kernel.shape[2] // 2
    window = out[:, i - cy : i + cy + 1, j - cx : j + cx + 1]
    assert window.shape == kernel.shape
    # Exactly: output pixel p holds its own kernel's tap at p - q.
    exact = torch.zeros_like(window)
    for a in range(2 * cy + 1):
        for b in range(2 * cx + 1):
            kp = ay @ lit_kernel(model, xs[j - cx + b], ys[i - cy + a], 2.0) @ ax.T
            exact[:, a, b] = torch.from_numpy(kp[:, a, b])
    assert torch.allclose(window, exact, atol=1e-6)
    # And, the field barely changing over a few pixels, close to the kernel of the point's own pixel.
    assert torch.allclose(window, kernel, atol=0.05 * float(kernel.max()))
    energy = float(model.illumination(xs[j], ys[i], 2.0).sum())  # the point's light, 3 channels
    assert float(out.sum()) == pytest.approx(energy, rel=0.01)  # all of it, nearby
    rows = torch.arange(h, dtype=torch.float32)
    centroid = (out.sum((0, 2)) * rows).sum() / out.sum()
    assert abs(float(centroid) - i) < 1.0


def test_orientation_is_deeplens_conv_psf(tiny_grid):
    """A traced off-axis PSF through render_with equals DeepLens's own conv_psf with the same kernel."""
    from deeplens.imgsim.psf import conv_psf

    from psfcvae.optics import grid_optics
    from psfgen.generation import trace_points
    from psfgen.gridfile import GridFile
    from psfgen.trace.lens import build_lens, read_lens_file
    from psfgen.trace.resample import downsample

    optics = grid_optics(GridFile.open(tiny_grid))
    lens = build_lens(read_lens_file(optics_lens := GridFile.open(tiny_grid).lens_path), torch.device("cpu"))
    assert optics_lens.endswith(".json")
    traced = downsample(trace_points(lens, np.array([[0.8, -0.6]]), np.array([2.0]), 4000, 64), 15)[0]
    assert float((traced - traced.flip(-2, -1)).abs().sum()) > 0.1  # asymmetric: orientation matters
    h = w = 20
    image = torch.zeros(3, h, w)
    image[:, 6, 13] = 1.0
    ours = render_with(lambda x, y, d: traced.expand(len(x), 3, 15, 15), image, 2.0, optics, field=FIELD)
    ay = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][1] * (FIELD[3] - FIELD[2]) / 2 / h)
    ax = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][0] * (FIELD[1] - FIELD[0]) / 2 / w)
    kernel = torch.from_numpy(ay @ traced.double().numpy() @ ax.T).float()
    theirs = conv_psf(image[None], kernel)[0]
    assert torch.allclose(ours, theirs, atol=1e-6)
    # Pixel centres: row 0 at the top (y > 0), column 0 at the left (x < 0), as DeepLens's point grid.
    grid = lens.point_source_grid(depth=-2000.0, grid=(w, h), center=True)
    xs, ys = pixel_coords(h, w)
    assert np.array_equal(np.sign(grid[0, :, 0].numpy()), np.sign(xs))
    assert np.array_equal(np.sign(grid[:, 0, 1].numpy()), np.sign(ys))


def test_constant_image_stays_constant(model):
    out = render(model, torch.full((3, 24, 24), 0.4), 1.0, psf_every=1, field=FIELD)
    xs, ys = pixel_coords(24, 24, FIELD)
    xx, yy = np.meshgrid(xs, ys)
    lum = model.illumination(xx.ravel(), yy.ravel(), 1.0).T.reshape(3, 24, 24)  # each pixel's kernel sums to it
    assert torch.allclose(out[:, 4:-4, 4:-4], 0.4 * lum[:, 4:-4, 4:-4], atol=1e-5)


def test_psf_every_exact_at_nodes_and_close_between(model):
    torch.manual_seed(1)
    image = torch.rand(3, 24, 24)
    full = render(model, image, 1.0, field=FIELD)
    every = render(model, image, 1.0, psf_every=3, field=FIELD)
    assert torch.allclose(every[:, ::3, ::3], full[:, ::3, ::3], atol=1e-6)  # the model itself at the node pixels
    err = float((every - full).abs().max())
    assert 0 < err < 0.02 * float(full.max())


def test_depth_map_blurs_each_pixel_at_its_own_depth(model):
    h = w = 24
    near, far = 0.5, 2.0
    depth = torch.full((h, w), near, dtype=torch.float64)
    depth[:, w // 2 :] = far
    image = resolution_chart(h, w)
    out = render(model, image, depth, field=FIELD)
    at_near, at_far = render(model, image, near, field=FIELD), render(model, image, far, field=FIELD)
    assert torch.allclose(out[:, :, : w // 2], at_near[:, :, : w // 2], atol=1e-6)
    assert torch.allclose(out[:, :, w // 2 :], at_far[:, :, w // 2 :], atol=1e-6)
    assert not torch.allclose(at_near, at_far, atol=1e-3)  # the two depths blur differently
    # The slanted plane: interpolated depth levels stay close to the per-pixel depths.
    image, depth = rgbd_scene(h, w, near, far)
    exact = render(model, image, depth, field=FIELD)
    approx = render(model, image, depth, psf_every=2, depth_levels=16, field=FIELD)
    assert float((exact - approx).abs().max()) < 0.03


def test_illumination_scales_each_pixel_and_dark_points_are_black(model):
    class Vignetted(PSFModel):  # the trained network, with a relative illumination falling off with radius
        def illumination(self, x, y, depth_m, allow_extrapolation=False):
            r2 = np.asarray(x) ** 2 + np.asarray(y) ** 2
            return torch.from_numpy(np.stack([1 - 0.3 * r2, 1 - 0.4 * r2, 1 - 0.5 * r2], axis=1)).float()

        def psf_and_illumination(self, x, y, depth_m=None, mode="mean", allow_extrapolation=False):
            psf = super().psf(x, y, depth_m, allow_extrapolation=allow_extrapolation)
            lit = torch.from_numpy(np.hypot(np.atleast_1d(x), np.atleast_1d(y)) < 1.2)
            light = self.illumination(x, y, depth_m) * lit[:, None]
            return psf * lit[:, None, None, None], light, lit

    vig = Vignetted(model.net, model.info)
    h = w = 20
    out = render(vig, torch.ones(3, h, w), 1.0)  # the whole sensor: corners beyond r = 1.2 are dark
    xs, ys = pixel_coords(h, w)
    xx, yy = np.meshgrid(xs, ys)
    expect = vig.illumination(xx.ravel(), yy.ravel(), 1.0).T.reshape(3, h, w)
    expect = expect * torch.from_numpy(np.hypot(xx, yy) < 1.2)
    assert torch.allclose(out, expect, atol=1e-5)  # a constant scene: the kernel's sum, i.e. the illumination
    assert float(out[:, 0, 0].max()) == 0.0 and float(out[:, h // 2, w // 2].min()) > 0.9


def test_a_vignetting_lens_renders_its_own_illumination(vignetted_run):
    """The real illumination head of a model trained on the LA1131's partly dark field: a flat
    scene renders to the model's relative illumination at each pixel, black where it is dark."""
    vig = load_model(vignetted_run / "latest.pt")
    h = w = 16
    out = render(vig, torch.ones(3, h, w), 1.0)
    xs, ys = pixel_coords(h, w)
    xx, yy = np.meshgrid(xs, ys)
    lum = vig.illumination(xx.ravel(), yy.ravel(), 1.0)  # [h*w, 3]
    _, lit = vig.psf(xx.ravel(), yy.ravel(), 1.0, allow_dark=True)
    expect = (lum * lit[:, None]).T.reshape(3, h, w)
    assert float(expect.min()) < 0.5 * float(expect.max())  # the edges visibly darker than the centre
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_ssim_and_psnr_known_values():
    from skimage.metrics import structural_similarity

    torch.manual_seed(2)
    a = torch.rand(3, 32, 40, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == math.inf
    m1, m2 = 0.3, 0.6  # two flat images: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), the structure term is 1
    c1 = 0.01**2
    assert ssim(torch.full((1, 16, 16), m1), torch.full((1, 16, 16), m2)) == pytest.approx(
        (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rel=1e-9
    )
    theirs = structural_similarity(
        a.numpy(),
        b.numpy(),
        data_range=1.0,
        channel_axis=0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(a, b) == pytest.approx(theirs, abs=1e-9)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / float(((a - b) ** 2).mean())))


def test_cli_16_bit_round_trip_and_8_bit(model, tiny_run, tmp_path):
    from psfcvae.rendering.renderfile import cached_table

    image = resolution_chart(16, 16)
    src16, src8 = tmp_path / "in16.png", tmp_path / "in8.png"
    write_image(src16, image, 16)
    write_image(src8, image, 8)
    back, bits = read_image(src16)
    assert bits == 16 and torch.allclose(back, image, atol=0.5 / 65535)
    ckpt = str(tiny_run / "latest.pt")
    r = run_cli(
        [
            "render",
            "--checkpoint",
            ckpt,
            "--image",
            str(src16),
            "--depth",
            "1",
            "--out",
            str(tmp_path / "o16.png"),
            "--linear",
            "--psf-every",
            "2",
            "--field",
            ",".join(map(str, FIELD)),
        ]
    )
    assert r.exit_code == 0, r.output
    out, bits = read_image(tmp_path / "o16.png")
    table = cached_table(model, tiny_run / "latest.pt")  # the CLI's PSFs: the model's table, cached
    expect = render(model, back, 1.0, psf_every=2, field=FIELD, table=table).clamp(0, 1)
    assert bits == 16 and torch.allclose(out, expect, atol=0.51 / 65535)
    r = run_cli(
        [
            "render",
            "--checkpoint",
            ckpt,
            "--image",
            str(src8),
            "--depth",
            "1",
            "--out",
            str(tmp_path / "o8.png"),
            "--field",
            ",".join(map(str, FIELD)),
        ]
    )
    assert r.exit_code == 0, r.output
    out8, bits = read_image(tmp_path / "o8.png")
    assert bits == 8 and out8.shape == (3, 16, 16)
    assert not torch.equal(out8, read_image(src8)[0])  # blurred (in linear light, sRGB in and out)
    # A 16-bit depth PNG holds millimetres: 1000 everywhere is --depth 1.
    import cv2

    cv2.imwrite(str(tmp_path / "d.png"), np.full((16, 16), 1000, np.uint16))
    r = run_cli(
        [
            "render",
            "--checkpoint",
            ckpt,
            "--image",
            str(src8),
            "--depth-map",
            str(tmp_path / "d.png"),
            "--out",
            str(tmp_path / "od.png"),
            "--field",
            ",".join(map(str, FIELD)),
        ]
    )
    assert r.exit_code == 0, r.output
    assert torch.equal(read_image(tmp_path / "od.png")[0], out8)


def test_cli_bad_depth_maps_and_a_checkpoint_without_kernel_pitch(tiny_run, tiny_grid, tmp_path):
    src = tmp_path / "in.png"
    write_image(src, resolution_chart(12, 10), 8)
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    before = sha(out)
    ckpt = str(tiny_run / "latest.pt")
    good = np.full((12, 10), 1.0)
    cases = {
        "nan.npy": (np.where(np.eye(12, 10) > 0, np.nan, good), "NaN"),
        "zero.npy": (good * np.r_[0.0, np.ones(11)][:, None], "<= 0"),
        "size.npy": (np.ones((10, 12)), "(10, 12)"),
    }
    for name, (arr, needle) in cases.items():
        np.save(tmp_path / name, arr)
        r = run_cli(
            [
                "render",
                "--checkpoint",
                ckpt,
                "--image",
                str(src),
                "--depth-map",
                str(tmp_path / name),
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        assert_one_line_error(r, "--depth-map", needle)
        assert sha(out) == before  # nothing written, the old file kept
    r = run_cli(
        ["render", "--checkpoint", ckpt, "--image", str(src), "--depth", "50", "--out", str(tmp_path / "n.png")]
    )
    assert_one_line_error(r, "50 m", "--allow-extrapolation")
    r = run_cli(["render", "--checkpoint", ckpt, "--image", str(src), "--depth", "1", "--out", str(out)])
    assert_one_line_error(r, "exists", "--overwrite")
    for opt, value in (("--psf-every", "0"), ("--field", "0.5,0.2,-1,1"), ("--depth", "-1"), ("--error", "1.5")):
        r = run_cli(
            [
                "render",
                "--checkpoint",
                ckpt,
                "--image",
                str(src),
                "--depth",
                "1",
                opt,
                value,
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        assert_one_line_error(r, opt, value)
        assert sha(out) == before


def test_chart_figure(model, tiny_grid, tmp_path):
    from psfcvae.rendering.figure import chart_figure

    res = chart_figure(model, tmp_path / "chart.png", 2.0, data=tiny_grid, size=32, psf_every=4)
    assert (tmp_path / "chart.png").stat().st_size > 1000
    assert 10 < res["psnr_db"] < 80 and 0 < res["ssim"] <= 1


def test_a_lens_file_without_sensor_res_takes_it_from_the_option_and_the_kernel_pitch_follows(tmp_path):
    """DeepLens would fall back to its 2000-px default in silence: psf generate refuses the file without
    sensor_res, and with the option the grid file and the kernel pitch carry the option's resolution."""
    import json

    from helpers import tiny_config

    from psfcvae.optics import grid_optics
    from psfgen import generate
    from psfgen.config import DEFAULT_LENS
    from psfgen.gridfile import GridFile
    from psfgen.shared.errors import InputError

    data = json.loads(open(DEFAULT_LENS).read())
    data.pop("sensor_res")
    lens_path = tmp_path / "nores.json"
    lens_path.write_text(json.dumps(data))
    cfg = dict(lens=str(lens_path), grid_size=2, depths=(1.0,), heldout=2, noise_points=0)
    with pytest.raises(InputError, match=r"gives no sensor resolution .*--sensor-res W,H"):
        generate(tiny_config(tmp_path / "g.h5", **cfg))
    out = generate(tiny_config(tmp_path / "g.h5", sensor_res=(1000, 1000), **cfg))
    grid = GridFile.open(out)
    optics = grid_optics(grid)
    assert optics["sensor_res"] == [1000, 1000] and grid.sensor_from["res"] == "--sensor-res"
    assert optics["sensor_size_mm"] == pytest.approx(data["sensor_size"], rel=1e-9)
    assert optics["kernel_pitch_mm"] == pytest.approx(64 * data["sensor_size"][0] / 1000 / 15, rel=1e-9)


def test_the_patchwise_map_carries_the_files_illumination(vignetted_grid):
    """DeepLens's patch-wise rendering in the report is compared with the model's, which is lit by its
    illumination: the file's kernels must carry theirs (dark corners black, dim edges dim)."""
    import h5py

    from psfcvae.rendering.figure import grid_psf_map

    psf_map = grid_psf_map(vignetted_grid, 0.5)  # [4, 4, 3, k, k]
    with h5py.File(vignetted_grid) as f:
        light = f["grid/illumination"][0] * f["grid/valid"][0]  # [16, 3]
    np.testing.assert_allclose(psf_map.sum(dim=(-2, -1)).reshape(16, 3).numpy(), light, rtol=1e-5, atol=1e-6)
    assert light.min() == 0 and 0 < light[light > 0].min() < 0.5  # both dark and dim points are in the map


# --- the fast path: the low-rank expansion ---------------------------------------------------------------------------


def skewed_kernel(seed: int = 0) -> torch.Tensor:
    """A lopsided 15 x 15 RGB kernel [3, 15, 15] summing to 1 per channel: a flip or a transpose changes it."""
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(3, 15, 15, generator=g) ** 4
    k[:, 2:6, 9:13] += 0.5  # a bright blob up and right of the centre
    return k / k.sum((-2, -1), keepdim=True)


def test_fast_path_is_deeplens_convolution_for_one_kernel(tiny_grid):
    """A spatially invariant PSF: the expansion needs one kernel per distinct channel and is DeepLens's conv_psf
    (a flipped or transposed basis, or weights on the input instead of the output, would not be)."""
    from deeplens.imgsim.psf import conv_psf

    from psfcvae.optics import grid_optics
    from psfgen.gridfile import GridFile

    optics = grid_optics(GridFile.open(tiny_grid))
    kern = skewed_kernel()
    torch.manual_seed(3)
    image = torch.rand(3, 26, 26)  # square: DeepLens's conv_psf takes square kernels
    ours = render_with(lambda x, y, d: kern.expand(len(x), 3, 15, 15), image, 1.0, optics, method="fast", field=FIELD)
    h, w = image.shape[1:]
    ay = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][1] * (FIELD[3] - FIELD[2]) / 2 / h)
    ax = resample_matrix(15, optics["kernel_pitch_mm"], optics["sensor_size_mm"][0] * (FIELD[1] - FIELD[0]) / 2 / w)
    kernel = torch.from_numpy(ay @ kern.double().numpy() @ ax.T).float()
    assert kernel.shape[-1] >= 7  # a real blur
    assert torch.allclose(ours, conv_psf(image[None], kernel)[0], atol=1e-5)


def test_fast_path_equals_the_gather_with_as_many_kernels_as_distinct_ones(tiny_grid):
    """Two kernels (the same in each channel), one left of x = 0.38 and its mirror image right of it, at any
    illumination: K = 2 is exact."""
    from psfcvae.optics import grid_optics
    from psfgen.gridfile import GridFile

    optics = grid_optics(GridFile.open(tiny_grid))
    left = skewed_kernel(1)[:1].expand(3, 15, 15)
    right = left.flip(-1)

    def kernel_fn(x, y, d):
        side = torch.from_numpy(np.asarray(x) < 0.38)[:, None, None, None]
        light = torch.from_numpy(0.6 + 0.4 * np.asarray(y, dtype=np.float32))[:, None, None, None]  # dimmer below
        return torch.where(side, left, right) * light

    torch.manual_seed(4)
    image = torch.rand(3, 20, 26)
    exact = render_with(kernel_fn, image, 1.0, optics, method="exact", field=FIELD)
    for every in (1, 3):
        fast = render_with(kernel_fn, image, 1.0, optics, method="fast", rank=2, psf_every=every, field=FIELD)
        interp = render_with(kernel_fn, image, 1.0, optics, method="exact", psf_every=every, field=FIELD)
        assert torch.allclose(fast, interp, atol=1e-5)
    assert (
        torch.allclose(fast, interp, atol=1e-5)
        and every == 3
        and torch.allclose(
            render_with(kernel_fn, image, 1.0, optics, method="fast", rank=2, psf_every=1, field=FIELD),
            exact,
            atol=1e-5,
        )
    )
    one = render_with(kernel_fn, image, 1.0, optics, method="fast", rank=1, psf_every=1, field=FIELD)
    assert float((one - exact).abs().max()) > 1e-2  # one kernel is not enough: the test can tell


def test_fast_path_converges_to_the_exact_one_on_the_model(model):
    torch.manual_seed(5)
    image = torch.rand(3, 21, 24)
    exact = render(model, image, 1.0, method="exact", field=FIELD)
    errs = []
    for rank in (1, 3, 226):  # 226: every component of the 15 x 15 kernels and the mean one
        fast = render(model, image, 1.0, method="fast", rank=rank, psf_every=1, field=FIELD)
        errs.append(float((fast - exact).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5
    default = render(model, image, 1.0, method="fast", psf_every=1, field=FIELD)  # DEFAULT_ERROR on the kernels
    assert psnr(default, exact) > 50


def test_fast_path_keeps_energy_whatever_k(model):
    """A flat scene renders to each pixel's illumination even with one basis kernel: the mean kernel carries each
    kernel's sum, the other components sum to zero."""
    xs, ys = pixel_coords(24, 24, FIELD)
    xx, yy = np.meshgrid(xs, ys)
    lum = model.illumination(xx.ravel(), yy.ravel(), 1.0).T.reshape(3, 24, 24)
    for rank in (1, 2):
        out = render(model, torch.full((3, 24, 24), 0.4), 1.0, method="fast", rank=rank, psf_every=1, field=FIELD)
        assert torch.allclose(out[:, 4:-4, 4:-4], 0.4 * lum[:, 4:-4, 4:-4], atol=1e-5)


def test_fast_path_with_a_depth_map_and_vignetting_agrees_with_the_exact_one(model):
    """On the fast path a pixel's weights are those of its own depth's kernel, lit by its illumination: the two-plane
    and slanted scenes and a vignetted flat field agree with the exact gather to 45 dB."""
    h = w = 24
    image, depth = rgbd_scene(h, w, 0.5, 2.0)
    exact = render(model, image, depth, method="exact", field=FIELD)
    fast = render(model, image, depth, method="fast", psf_every=1, field=FIELD)
    assert psnr(fast, exact) > 45
    two = torch.full((h, w), 0.5, dtype=torch.float64)
    two[:, w // 2 :] = 2.0
    exact = render(model, image, two, method="exact", field=FIELD)
    fast = render(model, image, two, method="fast", psf_every=3, field=FIELD)
    assert psnr(fast, exact) > 45
    near = render(model, image, 0.5, method="fast", psf_every=3, field=FIELD)
    assert psnr(fast[:, :, : w // 2 - 4], near[:, :, : w // 2 - 4]) > 45  # away from the edge between the planes


def test_fast_path_on_a_vignetting_lens(vignetted_run):
    vig = load_model(vignetted_run / "latest.pt")
    out = render(vig, torch.ones(3, 16, 16), 1.0, method="fast", psf_every=1)
    exact = render(vig, torch.ones(3, 16, 16), 1.0, method="exact")
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)  # a flat scene: the illumination, energy kept
    torch.manual_seed(6)
    image = torch.rand(3, 16, 16)
    assert psnr(render(vig, image, 1.0, method="fast"), render(vig, image, 1.0, method="exact")) > 45


def test_the_cli_default_error_is_the_librarys():
    import cli
    from psfcvae.rendering.lowrank import DEFAULT_ERROR

    assert cli.DEFAULT_RENDER_ERROR == DEFAULT_ERROR


def test_batch_renders_a_folder_resumes_and_refuses_bad_entries(model, tiny_run, tmp_path):
    """A folder of PNGs, one with <stem>.npy as its depth map: all rendered (the table built once and cached
    beside the checkpoint), a second run skips what is written; a bad list entry is one line, nothing written."""
    import shutil

    from psfcvae.rendering.renderfile import cached_table, table_path

    ckpt = tmp_path / "run" / "latest.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run / "latest.pt", ckpt)
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("a", "b")):
        write_image(src / f"{name}.png", resolution_chart(12 + i, 14), 16)
    np.save(src / "b.npy", np.full((13, 14), 2.0))
    out = tmp_path / "out"
    args = ["render", "--checkpoint", str(ckpt), "--images", str(src), "--out", str(out), "--depth", "1"]
    args += ["--field", ",".join(map(str, FIELD)), "--linear"]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert "2 image(s) written" in r.output and table_path(ckpt).is_file()
    table = cached_table(model, ckpt)
    for name, depth in (("a", 1.0), ("b", 2.0)):
        img, bits = read_image(src / f"{name}.png")
        expect = render(model, img, depth, field=FIELD, table=table).clamp(0, 1)
        got, bits_out = read_image(out / f"{name}.png")
        assert bits_out == 16 and torch.allclose(got, expect, atol=0.51 / 65535)
    (out / "a.png").unlink()
    before = sha(out / "b.png"), (out / "b.png").stat().st_mtime_ns
    r = run_cli(args)
    assert r.exit_code == 0 and "1 image(s) written" in r.output, r.output
    assert (out / "a.png").is_file() and (sha(out / "b.png"), (out / "b.png").stat().st_mtime_ns) == before
    listing = tmp_path / "list.txt"
    listing.write_text("# image [depth]\nin/a.png\nin/missing.png in/b.npy\n")
    r = run_cli([*args[:4], str(listing), "--out", str(tmp_path / "out2"), "--depth", "1"])
    assert_one_line_error(r, "line 3", "missing.png", "does not exist")
    assert not (tmp_path / "out2").exists()
    listing.write_text("in/a.png in/nothing.npy\n")
    r = run_cli([*args[:4], str(listing), "--out", str(tmp_path / "out2")])
    assert_one_line_error(r, "line 1", "nothing.npy")
    r = run_cli([*args[:4], str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2"), "--depth", "1"])
    assert_one_line_error(r, "--images", "does not exist")


def test_field_mm_is_the_same_part_of_the_sensor_as_field(model, tiny_run, tmp_path):
    image = tmp_path / "in.png"
    write_image(image, resolution_chart(16, 16), 8)
    w, h = model.info["optics"]["sensor_size_mm"]
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(image), "--depth", "1"]
    assert run_cli([*args, "--field", "0.2,0.6,-0.4,0", "--out", str(tmp_path / "a.png")]).exit_code == 0
    mm = f"{0.1 * w},{0.3 * w},{-0.2 * h},0"
    assert run_cli([*args, "--field-mm", mm, "--out", str(tmp_path / "b.png")]).exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    beyond = run_cli([*args, "--field-mm", f"0,{w},0,1", "--out", str(tmp_path / "c.png")])
    assert_one_line_error(beyond, "--field-mm", "beyond the", "mm sensor")
    both = run_cli([*args, "--field", "0,1,0,1", "--field-mm", "0,1,0,1", "--out", str(tmp_path / "c.png")])
    assert_one_line_error(both, "--field or --field-mm, not both")


def test_batch_refuses_an_out_folder_that_holds_its_inputs(tiny_run, tmp_path):
    """--out the folder of the images: each output would be its own input, skipped as written or, with --overwrite,
    the sharp image replaced by its blur. One line, before any work; the images stay as they were."""
    src = tmp_path / "in"
    src.mkdir()
    write_image(src / "a.png", resolution_chart(12, 14), 8)
    before = sha(src / "a.png")
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--images", str(src), "--depth", "1"]
    for extra in ([], ["--overwrite"]):
        r = run_cli([*args, "--out", str(src), *extra])
        assert_one_line_error(r, "--out", "would be the input")
        assert sha(src / "a.png") == before and sorted(p.name for p in src.iterdir()) == ["a.png"]
    listing = tmp_path / "list.txt"  # a list naming an image inside --out: the same
    listing.write_text("in/a.png\n")
    r = run_cli([*args[:4], str(listing), "--depth", "1", "--out", str(tmp_path / "." / "in"), "--overwrite"])
    assert_one_line_error(r, "--out", "would be the input")
    assert sha(src / "a.png") == before


def test_a_table_that_cannot_be_cached_is_built_and_used_all_the_same(model, tiny_run, tmp_path, monkeypatch, caplog):
    from psfcvae.rendering import renderfile

    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes((tiny_run / "latest.pt").read_bytes())

    def full_disk(obj, f, *a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(renderfile.torch, "save", full_disk)
    with caplog.at_level(logging.INFO, logger="psfcvae.rendering.renderfile"):
        table = renderfile.cached_table(model, ckpt)
    assert table is not None and "not cached" in caplog.text and "file write failed" in caplog.text
    assert not renderfile.table_path(ckpt).exists() and not list(tmp_path.glob(".*.tmp"))
