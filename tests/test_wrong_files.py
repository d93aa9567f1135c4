"""A file given in the wrong place (a checkpoint as --data, a grid file as --checkpoint, a lens file as --data, a PNG
as --data, ...) is named for what it is, with the option that takes it, in one line: recognised by its content
(the HDF5 signature, the zip of a PyTorch file, the text of a lens), not by its name."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from helpers import ROOT, assert_one_line_error, run_cli
from PIL import Image

from psfgen.config import DEFAULT_LENS
from psfgen.shared.filekinds import refuse_other_kind, sniff

# A minimal Zemax prescription (OpticStudio writes UTF-16) and a CODE V one, as a user would pass them.
ZMX = """VERS 190513 80 123457 L123457
MODE SEQ
NAME singlet
UNIT MM X W X CM MR CPMM
ENPD 4
WAVM 1 0.5876 1
SURF 0
  TYPE STANDARD
  CURV 0.0
  DISZ INFINITY
SURF 1
  TYPE STANDARD
  CURV 0.02
  GLAS N-BK7 0 0 1.5168 64.17
  DISZ 4
SURF 2
  TYPE STANDARD
  CURV -0.02
  DISZ 48
SURF 3
  TYPE STANDARD
  CURV 0.0
"""
SEQ = """RDM; LEN "singlet"
EPD 4
DIM M
WL 656.3 587.6 486.1
SO 0 1e10
S 50 4 NBK7_SCHOTT
S -50 48
SI 0 0
GO
"""


@pytest.fixture(scope="module")
def files(tiny_grid, tiny_run, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("kinds")
    (d / "singlet.zmx").write_text(ZMX, encoding="utf-16")
    (d / "singlet.seq").write_text(SEQ)
    Image.new("RGB", (8, 8)).save(d / "scene.png")
    (d / "notes.txt").write_text("grid made on Tuesday\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "train.yaml").write_text(f"data: {tiny_run / 'best.pt'}\nrun_dir: {d / 'run'}\n")
    return {
        "GRID": str(tiny_grid),
        "CKPT": str(tiny_run / "best.pt"),
        "RENAMED": str(shutil.copy(tiny_run / "best.pt", d / "best.h5")),  # a checkpoint, whatever its name
        "LENS": str(shutil.copy(DEFAULT_LENS, d / "lens.json")),
        "ZMX": str(d / "singlet.zmx"),
        "SEQ": str(d / "singlet.seq"),
        "PNG": str(d / "scene.png"),
        "YAML": str(ROOT / "configs" / "generate.yaml"),
        "TRAIN_YAML": str(d / "train.yaml"),
        "TXT": str(d / "notes.txt"),
        "EMPTY": str(d / "empty.pt"),
        "OUT": str(d / "out"),
        "OUT.npz": str(d / "out.npz"),
        "OUT.png": str(d / "out.png"),
    }


def _args(line: str, files: dict[str, str]) -> list[str]:
    """The words of ``line`` with each %NAME replaced by that file's path."""
    return [files[w[1:]] if w.startswith("%") else w for w in line.split()]


CASES = [
    # the headline: psf eval --data best.pt
    ("eval --data %CKPT --checkpoint %CKPT --out %OUT",
     "--data expects a grid file from 'psf generate'; %CKPT is a checkpoint from 'psf train': pass it as --checkpoint"),
    ("eval --data %GRID --checkpoint %GRID --out %OUT",
     "--checkpoint expects a checkpoint from 'psf train'; %GRID is a grid file from 'psf generate': pass it as --data"),
    ("eval --data %LENS --baselines-only --out %OUT",
     "%LENS is a lens file (DeepLens JSON): give it to psf generate as --lens"),
    ("eval --data %PNG --baselines-only --out %OUT", "%PNG is a PNG image: give it to psf render as --image"),
    ("eval --data %TXT --baselines-only --out %OUT",
     "--data expects a grid file from 'psf generate'; %TXT is not an HDF5 file"),
    ("train --data %RENAMED --run-dir %OUT",
     "%RENAMED is a checkpoint from 'psf train': give it to psf eval, sample or render as --checkpoint"),
    ("train --data %ZMX --run-dir %OUT", "--data expects a grid file from 'psf generate'; %ZMX is a lens file (Zemax)"),
    ("train --data %YAML --run-dir %OUT", "%YAML is a YAML config: pass it as --config"),
    ("train --config %TRAIN_YAML", "config key 'data' expects a grid file from 'psf generate'; %CKPT is a checkpoint"),
    ("generate --lens %GRID --out %OUT",
     "--lens expects a lens file; %GRID is a grid file from 'psf generate': give it to psf train or psf eval as "
     "--data"),
    ("generate --lens %CKPT --out %OUT", "--lens expects a lens file; %CKPT is a checkpoint from 'psf train'"),
    ("generate --lens %YAML --out %OUT", "--lens expects a lens file; %YAML is a YAML config: pass it as --config"),
    ("sample --checkpoint %GRID --coords 0,0 --out %OUT.npz",
     "--checkpoint expects a checkpoint from 'psf train'; %GRID is a grid file from 'psf generate'"),
    ("sample --checkpoint %SEQ --coords 0,0 --out %OUT.npz", "%SEQ is a lens file (CODE V): give it to psf generate"),
    ("sample --checkpoint %EMPTY --coords 0,0 --out %OUT.npz", "--checkpoint expects a checkpoint from 'psf train'; "
     "%EMPTY is an empty file"),
    ("render --checkpoint %LENS --image %PNG --depth 1 --out %OUT.png", "--checkpoint expects a checkpoint"),
    ("render --checkpoint %CKPT --image %GRID --depth 1 --out %OUT.png",
     "--image expects a PNG image; %GRID is a grid file from 'psf generate'"),
    ("info %CKPT", "psf info expects a grid file from 'psf generate'; %CKPT is a checkpoint from 'psf train': give it "
     "to psf eval, sample or render as --checkpoint"),
    ("info %ZMX", "psf info expects a grid file from 'psf generate'; %ZMX is a lens file (Zemax): give it to psf "
     "generate as --lens"),
    ("merge %GRID %CKPT --out %OUT", "psf merge expects a grid file from 'psf generate'; %CKPT is a checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), CASES, ids=["-".join(c[0].split()[:3]) for c in CASES])
def test_a_file_in_the_wrong_place_is_named_with_the_option_that_takes_it(files, line, message):
    result = run_cli(_args(line, files))
    assert_one_line_error(result, " ".join(_args(message, files)))


def test_psf_samples_outputs_are_told_apart_from_grid_files(files, tmp_path):
    expected = {
        ".npz": "--data expects a grid file from 'psf generate'; {} is a file of PSFs from 'psf sample'",
        ".h5": "{} is not a psf-cvae grid file",  # HDF5 like a grid file: the grid file reader tells them apart
    }
    for suffix, message in expected.items():
        out = tmp_path / f"psfs{suffix}"
        result = run_cli(
            ["sample", "--checkpoint", files["CKPT"], "--coords", "0,0", "--depth", "1", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        result = run_cli(["eval", "--data", str(out), "--baselines-only", "--out", str(tmp_path / "e")])
        assert_one_line_error(result, message.format(out))
        result = run_cli(["sample", "--checkpoint", str(out), "--coords", "0,0", "--depth", "1", "--out", "x.npz"])
        assert_one_line_error(result, f"--checkpoint expects a checkpoint from 'psf train'; {out} is a")


def test_the_right_kinds_and_missing_paths_pass_to_their_readers(files, tmp_path):
    for path, wanted in [(files["GRID"], "grid"), (files["CKPT"], "checkpoint"), (files["LENS"], "lens"),
                         (files["ZMX"], "lens"), (files["SEQ"], "lens"), (files["PNG"], "image"),
                         (tmp_path / "missing.h5", "grid"), ("acl12708u", "lens")]:  # fmt: skip
        refuse_other_kind(path, wanted, "--x", {}, lambda _: True)
    # HDF5 after a user block is HDF5; another program's HDF5 file is left to the grid reader's own message
    with h5py.File(tmp_path / "block.h5", "w", userblock_size=512) as f:
        f["x"] = np.zeros(3)
    assert sniff(tmp_path / "block.h5").name == "hdf5"
    refuse_other_kind(tmp_path / "block.h5", "grid", "--x", {}, lambda _: False)
    assert sniff(files["RENAMED"]).name == "checkpoint" and sniff(files["GRID"]).name == "hdf5"
    np.save(tmp_path / "a.npy", np.zeros(2))
    assert sniff(tmp_path / "a.npy").name == "npy" and sniff(tmp_path) is None
