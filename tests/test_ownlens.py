"""Your own lens: Zemax .zmx and CODE V .seq files, the sensor as options, physical coordinates."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from deeplens import GeoLens
from helpers import ROOT, assert_one_line_error, run_cli, tiny_args

from psfcvae import load_model
from psfcvae.optics import FieldMap, grid_optics
from psfgen import GridFile
from psfgen.config import DEFAULT_LENS
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2
from psfgen.trace.illumination import trace_counted
from psfgen.trace.lens import build_lens, read_lens_file

LENSES = ROOT / "data" / "lenses"


def deeplens_writes(name: str, fmt: str, tmp: Path) -> Path:
    """The shipped lens ``name`` as DeepLens writes it in ``fmt`` (.zmx or .seq), less two defects of its writers,
    undone here as a lens designer's file would have it: a glass Zemax's catalogs lack (DeepLens's hk51) is written
    as a model glass whose nd is not the glass's (its focal length moves by 4.5%), named here; and a floating
    entrance pupil is written 'EPD None', which DeepLens's own .seq reader cannot read, left out here."""
    with contextlib.redirect_stdout(io.StringIO()):
        lens = GeoLens(filename=str(LENSES / f"{name}.json"))
        out = tmp / f"{name}.{fmt}"
        (lens.write_lens_zmx if fmt == "zmx" else lens.write_lens_seq)(str(out))
    text = out.read_text()
    glasses = iter(s.mat2.get_name() for s in lens.surfaces if s.mat2.get_name() != "air" and not s.mat2.zmx_catalog())
    text = re.sub(r"GLAS ___BLANK", lambda m: f"GLAS {next(glasses).upper()}", text)
    out.write_text(text.replace("EPD   None\n", ""))
    return out


# acl12708u as .seq: its asphere has a 2nd-order term, which CODE V's A-J (4th order on) cannot hold, and DeepLens's
# .seq writer drops its coefficients altogether.
ROUND_TRIPS = [
    ("acl12708u", "zmx"),
    ("cooke_triplet_f5", "zmx"),
    ("cooke_triplet_f5", "seq"),
    ("la1131_f50", "zmx"),
    ("la1131_f50", "seq"),
]


def round_trip_ratio(name: str, fmt: str, tmp: Path) -> float:
    """Mean relative L2 between the file's PSFs and the .json's at one seed, over that between the .json's at two
    seeds (the Monte Carlo noise): 2 points (the axis, (0.7, -0.5)) at 1 m, spp 1000, a 64-px window."""
    data = json.loads((LENSES / f"{name}.json").read_text())
    sensor = dict(sensor_size_mm=tuple(data["sensor_size"]), sensor_res=tuple(data["sensor_res"]))
    lenses = [build_lens(read_lens_file(p, **sensor), torch.device("cpu")) for p in (LENSES / f"{name}.json",
              deeplens_writes(name, fmt, tmp))]  # fmt: skip
    xy, depth = np.array([[0.0, 0.0], [0.7, -0.5]]), np.ones(2)

    def psfs(lens, seed):
        torch.manual_seed(seed)
        return trace_counted(lens, xy, depth, 1000, 64)[0].numpy()

    ref = psfs(lenses[0], 1)
    return float(rel_l2(psfs(lenses[1], 1), ref).mean() / rel_l2(psfs(lenses[0], 2), ref).mean())


@pytest.mark.parametrize("name,fmt", ROUND_TRIPS)
def test_a_zmx_or_seq_written_by_deeplens_traces_the_psfs_of_the_json(name, fmt, tmp_path):
    # The round trip keeps the surfaces to float32 precision: the same rays give the same PSFs (measured ratio 0 to
    # 1e-4); a lost glass or coefficient gives 1 or more.
    assert round_trip_ratio(name, fmt, tmp_path) < 0.1


SINGLET_ZMX = """VERS 190513 80 123457 L123457
MODE SEQ
NAME LA1131 behind a stop
UNIT MM X W X CM MR CPMM
ENPD 6.25
SURF 0
  TYPE STANDARD
  CURV 0.0
  DISZ INFINITY
SURF 1
  STOP
  TYPE STANDARD
  CURV 0.0
  DISZ 35
  DIAM 3.125
SURF 2
  TYPE {type}
  CURV 0.03875968992
  DISZ 5.3
  GLAS {glass}
  DIAM 12.7
SURF 3
  TYPE STANDARD
  CURV 0.0
  DISZ 46.5
  DIAM 12.7
SURF 4
  TYPE STANDARD
  CURV 0.0
  DIAM 7.0
"""


def singlet(tmp: Path, type_: str = "STANDARD", glass: str = "N-BK7 1 0 1.5168 64.17", name="singlet.zmx") -> Path:
    """A hand-written Zemax file, UTF-16 as OpticStudio writes it: a stop, an N-BK7 plano-convex lens, a sensor of
    radius 7 mm (the image surface's DIAM) and no resolution."""
    path = tmp / name
    path.write_bytes(SINGLET_ZMX.format(type=type_, glass=glass).encode("utf-16"))
    return path


TINY_ONE_DEPTH = dict(grid_size=2, depths=(1.0,), spp=1000, heldout=2, heldout_spp=400, noise_points=0)


def test_a_hand_written_utf16_zmx_generates_and_info_says_what_was_read_and_where_the_sensor_came_from(tmp_path):
    lens, out = singlet(tmp_path), tmp_path / "g.h5"
    args = tiny_args(out, lens=lens, **TINY_ONE_DEPTH)
    assert_one_line_error(run_cli(args), "singlet.zmx gives no sensor resolution", "--sensor-res W,H")
    result = run_cli([*args, "--sensor-res", "400,300"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f["lens/file"][:].tobytes() == lens.read_bytes() and f.attrs["lens_format"] == "zmx"
    grid = GridFile.open(out)
    assert grid.sensor_res == (400, 300) and grid.sensor_size_mm == pytest.approx((11.2, 8.4))  # 2 x 7 mm diagonal
    assert [s["type"] for s in json.loads(grid.lens_json)["surfaces"]] == ["Aperture", "Spheric", "Spheric"]
    info = run_cli(["info", str(out)]).output
    for needle in (
        "read        Zemax .zmx file: 3 surfaces, glasses n-bk7",
        "11.2 x 8.4 mm, 400 x 300 px (28 um pixels): size from the lens file's sensor radius 7 mm, in the "
        "resolution's aspect, resolution from --sensor-res",
    ):
        assert needle in info, info


def test_a_surface_type_or_glass_deeplens_cannot_read_is_one_line_naming_the_surface(tmp_path):
    def refused(lens, *needles):
        args = [*tiny_args(tmp_path / "g.h5", lens=lens, **TINY_ONE_DEPTH), "--sensor-res", "400,300"]
        assert_one_line_error(run_cli(args), *needles)

    # DeepLens's own error lists the types without their surfaces; an unknown glass raises from deep inside.
    refused(singlet(tmp_path, type_="PARAXIAL"), "surface 2 (PARAXIAL) is of type PARAXIAL", "STANDARD and EVENASPH")
    # A glass record with nd and Vd is read as that model glass; a bare unknown name cannot be.
    refused(singlet(tmp_path, glass="UNOBTAINIUM"), "surface 2 (STANDARD) has glass 'unobtainium'")
    seq = deeplens_writes("la1131_f50", "seq", tmp_path)
    text = seq.read_text()
    # DeepLens's .seq reader would skip these surfaces, or their attributes, in silence and trace another lens.
    for change, needles in (
        (("N-BK7", "UNOBTAINIUM"), ("surface 2 (S) has glass 'unobtainium'",)),
        (("CIR 12.7\n", "CIR 12.7\n  SPS ZRN\n"), ("surface 2 (S) is of type ZRN (SPS)",)),
        (("CIR 12.7\n", "CIR 12.7\n  ADE 2.0\n"), ("surface 2 (S) is tilted (ADE)",)),
        (("CIR 12.7\n", "CIR 12.7\n  ASP\n  K 0.0\n  A 1e-5; B 0.0\n"), ("surface 2 (S) has aspheric", "(A)")),
    ):
        bad = tmp_path / f"bad{len(needles[0])}.seq"
        assert change[0] in text
        bad.write_text(text.replace(change[0], change[1], 1))
        refused(bad, *needles)
    assert not (tmp_path / "g.h5").exists()


def test_a_lens_without_a_sensor_takes_the_options_and_is_refused_without_them(tmp_path):
    data = json.loads(Path(DEFAULT_LENS).read_text())
    for key in ("sensor_size", "sensor_res"):
        data.pop(key)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    with pytest.raises(InputError, match="gives no sensor resolution"):
        read_lens_file(bare)
    with pytest.raises(InputError, match=r"gives no sensor size .*--sensor-size-mm W,H"):
        read_lens_file(bare, sensor_res=(640, 480))
    with pytest.raises(InputError, match="has pixels of 10 x 15 um; DeepLens needs square pixels"):
        read_lens_file(bare, sensor_size_mm=(6.4, 4.8), sensor_res=(640, 320))
    lens = read_lens_file(bare, sensor_size_mm=(6.4, 4.8), sensor_res=(640, 480))
    assert (lens.sensor_size_mm, lens.sensor_res) == ((6.4, 4.8), (640, 480))
    assert lens.sensor_from == {"size": "--sensor-size-mm", "res": "--sensor-res"}
    traced = build_lens(lens, torch.device("cpu"))
    assert traced.sensor_size == (6.4, 4.8) and traced.sensor_res == (640, 480) and traced.pixel_size == 0.01
    # The options override a lens file's own sensor too.
    shipped = read_lens_file(DEFAULT_LENS, sensor_res=(1000, 1000))
    assert shipped.sensor_res == (1000, 1000)
    assert shipped.sensor_from == {"size": "the lens file", "res": "--sensor-res"}


# Off the 4 x 4 grid, between its depths 0.5 and 2 m (the tiny grid's).
OFF_GRID = np.array([[0.55, -0.4], [-0.9, 0.85], [0.2, 0.1], [-0.3, -0.97]])


def test_image_height_is_where_bare_deeplens_lands_the_chief_ray_within_a_pixel(tiny_grid):
    """The conversion normalised (x, y) -> image height, from the 16 points x 2 depths of the tiny grid, against the
    chief ray bare DeepLens finds in a bundle of 2^17 rays (its own bundles of 8192 jitter by 2 px at the corners).
    Measured within 0.36 px; tolerance 1 px (2.5 um). And back: the height gives the point within a pixel."""
    field = FieldMap(grid_optics(GridFile.open(tiny_grid)))
    with contextlib.redirect_stdout(io.StringIO()):
        lens = GeoLens(filename=DEFAULT_LENS)
    w, h = lens.sensor_size
    for depth in (0.8, 1.3):
        scale = lens.calc_scale(-1000.0 * depth)  # DeepLens's point_source_grid: normalised to object [mm]
        obj = torch.tensor([[x * scale * w / 2, y * scale * h / 2, -1000.0 * depth] for x, y in OFF_GRID])
        torch.manual_seed(0)
        chief = -lens.calc_chief_ray(obj, num_rays=2**17).o[..., 0, :2].double().numpy()  # flipped: x right, y up
        got = field.height(OFF_GRID[:, 0], OFF_GRID[:, 1], depth)
        distortion = np.abs(chief - OFF_GRID * np.array([w, h]) / 2).max() / lens.pixel_size
        assert distortion > 20  # what the conversion accounts for: 47 px at the corners
        assert np.abs(got - chief).max() < lens.pixel_size, (got - chief) / lens.pixel_size
        back = field.coords_from_height(chief[:, 0], chief[:, 1], depth)
        assert np.abs(back - OFF_GRID).max() * w / 2 < lens.pixel_size
        # The field angle is DeepLens's own: its pinhole image of the object point is f tan(angle).
        pinhole = lens.psf_center(obj, method="pinhole").double().numpy()
        np.testing.assert_allclose(np.tan(np.radians(field.angle(*OFF_GRID.T))) * lens.foclen, pinhole, rtol=1e-5)
        np.testing.assert_allclose(field.coords_from_angle(*field.angle(*OFF_GRID.T).T), OFF_GRID, atol=1e-12)


def test_psfs_at_image_heights_and_field_angles_in_the_api_and_psf_sample(tiny_run, tmp_path):
    model = load_model(tiny_run / "latest.pt", "cpu")
    hx, hy = model.height_at(OFF_GRID[:, 0], OFF_GRID[:, 1], 1.0)
    x, y = model.coords_at_height(hx, hy, 1.0)
    np.testing.assert_allclose(np.stack([x, y], 1), OFF_GRID, atol=1e-9)
    torch.testing.assert_close(model.psf_at_height(hx, hy, 1.0), model.psf(x, y, 1.0))
    ax, ay = model.angle_at(OFF_GRID[:, 0], OFF_GRID[:, 1])
    torch.testing.assert_close(model.psf_at_angle(ax, ay, 1.0), model.psf(*OFF_GRID.T, 1.0))
    edge_x, _ = model.field.edge_heights(1.0)
    assert edge_x < model.info["optics"]["sensor_size_mm"][0] / 2  # the edge's chief ray lands inside the edge
    with pytest.raises(InputError, match=r"image height \(2.5, 0\) mm lies beyond the sensor's edges"):
        model.psf_at_height(2.5, 0.0, 1.0)
    assert model.psf_at_height(2.5, 0.0, 1.0, allow_extrapolation=True).shape == (1, 3, 15, 15)
    with pytest.raises(InputError, match="give depth_m"):
        model.coords_at_height(1.0, 0.0)
    out = tmp_path / "p.npz"
    base = ["sample", "--checkpoint", str(tiny_run / "latest.pt"), "--depth", "1", "--device", "cpu", "--out"]
    result = run_cli([*base, str(out), "--height-mm", f"{hx[0]},{hy[0]};0,0"])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    # (0, 0) mm: the axis, up to where its traced chief ray lands (0.01 um off)
    np.testing.assert_allclose(saved["coords"], [OFF_GRID[0], [0, 0]], atol=1e-5)
    np.testing.assert_allclose(saved["height_mm"], [[hx[0], hy[0]], [0, 0]], atol=1e-9)
    assert_one_line_error(run_cli([*base, str(tmp_path / "q.npz"), "--height-mm", "9,0"]), "--height-mm (9, 0) mm")
    assert_one_line_error(run_cli([*base, str(tmp_path / "q.npz"), "--angle-deg", "80,0"]), "--angle-deg (80, 0) deg")
    assert_one_line_error(
        run_cli([*base, str(tmp_path / "q.npz"), "--coords", "0,0", "--angle-deg", "1,0"]), "give one of --coords"
    )
