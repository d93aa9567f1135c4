"""``psf generate`` / ``psf info`` through the CLI: bad input, refusal, resume after kill -9."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT, TINY, assert_one_line_error, run_cli, sha, tiny_args, tiny_config

from cli import main
from psfgen import generate
from psfgen.config import DEFAULT_LENS
from psfgen.plan.grid import grid_coords


@pytest.fixture()
def bad_lenses(tmp_path):
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"surfaces": [')
    data = json.loads(open(DEFAULT_LENS).read())
    data["surfaces"][1]["mat2"] = "unobtainium"
    glass = tmp_path / "glass.json"
    glass.write_text(json.dumps(data))
    nodir = tmp_path / "adir.json"
    nodir.mkdir()
    data = json.loads(Path(DEFAULT_LENS).read_text())
    data["surfaces"][2]["type"] = "Wormhole"
    wormhole = tmp_path / "wormhole.json"
    wormhole.write_text(json.dumps(data))
    return {"invalid": invalid, "glass": glass, "dir": nodir, "wormhole": wormhole}


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"lens": "/nonexistent/lens.json"}, ("does not exist", "--lens")),
        ({"lens": "@dir"}, ("lens file", "is a directory, not a file")),
        ({"lens": "@invalid"}, ("not valid JSON",)),
        ({"lens": "@glass"}, ("surface 1 (Aspheric) has glass 'unobtainium'",)),
        ({"lens": "@wormhole"}, ("surface 2 (Wormhole) is of type Wormhole", "DeepLens reads")),
        ({"grid_size": 1}, ("--grid-size must be at least 2, got 1",)),
        ({"depths": (0.0, 1.0)}, ("--depths must be positive", "got 0.0")),
        ({"depths": None, "depth_min": -1.0}, ("--depth-min must be positive", "got -1.0")),
        ({"spp": 0}, ("--spp must be at least 1, got 0",)),
        (
            {"kernel_size": 16, "kernel_size_small": 17},
            ("--kernel-size-small (17) must be between 1 and --kernel-size (16)",),
        ),
        ({"device": "gpu"}, ("--device must be", "gpu")),
        ({"kernel_size": "abc"}, ("--kernel-size must be a whole number of pixels or auto, got 'abc'",)),
        ({"kernel_size": 0}, ("--kernel-size must be at least 2, got 0",)),
        ({"kernel_size": 3}, ("kernel_size_small' (15) must be between 1 and --kernel-size (3)",)),
        ({"kernel_size": "auto", "shard": "0/2"}, ("--kernel-size auto cannot be combined with --shard",)),
    ],
)
def test_bad_input_one_line_exit_2_no_file(tmp_path, bad_lenses, change, needles):
    change = {k: (str(bad_lenses[v[1:]]) if isinstance(v, str) and v.startswith("@") else v) for k, v in change.items()}
    if change.get("depths", ()) is None:
        change.pop("depths")
        args = ["generate", "--out", str(tmp_path / "g.h5"), "--depth-min", str(change["depth_min"]), "--spp", "2000"]
    else:
        args = tiny_args(tmp_path / "g.h5", **change)
    result = run_cli(args)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "g.h5").exists()
    assert list(tmp_path.glob("*.tmp")) == []


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    result = run_cli(tiny_args(blocker / "grid.h5"))
    assert_one_line_error(result, "--out", "file.txt is a file, not a directory")
    assert blocker.read_text() == "not a directory"


def test_config_errors(tmp_path):
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5") + ["--set", "sppp=3"]), "unknown key 'sppp'")
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5") + ["--set", "spp=many"]), "'spp'", "integer")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("grid_size: 4\nkernel: 3\n")
    assert_one_line_error(run_cli(["generate", "--config", str(cfg)]), "unknown key 'kernel'", str(cfg))
    assert not (tmp_path / "g.h5").exists()


def test_existing_file_from_another_run_is_refused(tmp_path, tiny_grid):
    out = tmp_path / "grid.h5"
    shutil.copy(tiny_grid, out)
    before = sha(out)
    assert_one_line_error(run_cli(tiny_args(out, spp=3000)), "holds another run", "--overwrite")
    assert sha(out) == before
    foreign = tmp_path / "notes.h5"
    foreign.write_text("my notes")
    assert_one_line_error(run_cli(tiny_args(foreign)), "not a psf-cvae grid file", "--overwrite")
    assert foreign.read_text() == "my notes"
    # The same run again is a no-op resume; --overwrite replaces another run.
    assert run_cli(tiny_args(out)).exit_code == 0
    assert sha(out) == before
    result = run_cli(tiny_args(out, spp=3000, heldout=0, noise_points=0) + ["--overwrite"])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert json.loads(f.attrs["run_params"])["spp"] == 3000


def test_info_cli(tiny_grid, tmp_path):
    result = run_cli(["info", str(tiny_grid)])
    assert result.exit_code == 0 and "14/14 traced" in result.output
    assert "4 x 4 points, kernel_size 64 px traced -> kernel_size_small 15 px stored" in result.output
    # The light-kept line, recomputed from the raw datasets: the lit PSFs (every channel valid), a PSF counted as
    # truncated when a channel keeps under 99% of its valid rays.
    with h5py.File(tiny_grid) as f:
        kept, lit = f["grid/kept"][:].astype(np.float64), f["grid/valid"][:].astype(bool).all(axis=-1)
    line = next(x for x in result.output.splitlines() if x.startswith("light kept"))
    below = int((kept.min(axis=-1)[lit] < 0.99).sum())
    assert line.startswith(
        f"light kept  valid rays inside the 64-px traced window: mean {100 * kept[lit].mean():.2f}%, "
        f"min {100 * kept[lit].min():.2f}% (channel "
    ), line
    assert line.endswith(f"), {below} of {int(lit.sum())} lit PSFs below 99% (truncated)"), line
    assert below > 0  # the default lens's 64-px window truncates some of these (docs/dataset.md)
    assert_one_line_error(run_cli(["info", str(tmp_path / "none.h5")]), "does not exist")


def test_version():
    result = run_cli(["--version"])
    assert result.exit_code == 0 and "psf-cvae" in result.output and "deeplens-core" in result.output


def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path):
    """Kill a real run mid-way with SIGKILL, run the same command again, compare."""
    out = tmp_path / "killed.h5"
    changes = dict(spp=20000, block_rays=40000, heldout=4, heldout_spp=40000, noise_points=2)  # 2 points a block
    cmd = [sys.executable, "-m", "cli", "-v"] + tiny_args(out, **changes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        if "block 4/" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(out, "r") as f:
        done = f["blocks/done"][:].astype(bool)
        table = f["blocks/table"][:]
        first_done = f["grid/psf"][:]
    assert 4 <= done.sum() < len(done), done  # killed mid-run: some blocks, not all

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    reference = generate(tiny_config(tmp_path / "straight.h5", **changes))
    with h5py.File(out, "r") as f, h5py.File(reference, "r") as g:
        assert f["blocks/done"][:].all()
        for kind, d, lo, hi in table[done & (table[:, 0] == 0)]:  # finished blocks untouched
            np.testing.assert_array_equal(f["grid/psf"][d, lo:hi], first_done[d, lo:hi])
        for name in (
            "grid/psf",
            "grid/kept",
            "noise/psf",
            "heldout/psf_a",
            "heldout/psf_b",
            "grid/illumination",
            "grid/valid",
            "heldout/illumination_b",
            "axis/fraction",
        ):
            np.testing.assert_array_equal(f[name][:], g[name][:])


def test_a_reader_holding_the_file_does_not_stop_the_writer(tiny_grid, tmp_path):
    """`psf info` (or any h5py reader with HDF5's default lock) while a run writes."""
    from psfgen.gridfile import Block, write_block

    out = tmp_path / "g.h5"
    shutil.copy(tiny_grid, out)
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); time.sleep(60)"
    reader = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"},
    )
    try:
        assert reader.stdout.readline().strip() == "open"  # HDF5's default shared lock is held now
        write_block(
            out,
            0,
            Block("grid", 0, 0, 4),
            np.full((4, 3, 15, 15), 1 / 225, np.float32),  # each channel sums to 1, as a PSF does
            np.zeros((4, 3), np.float32),
            1.0,
            np.ones((4, 3), np.float32),
            np.ones((4, 3), np.uint8),
            np.zeros((4, 2)),
        )
        assert run_cli(["info", str(out)]).exit_code == 0
    finally:
        reader.kill()
        reader.wait()
    with h5py.File(out) as f:
        assert (f["grid/psf"][0, :4] == np.float32(1 / 225)).all()


def _hold_lock(target, what):
    """A separate process holding the run lock of ``target`` until killed."""
    code = (
        f"import time, pathlib; from psfgen.shared import locking\n"
        f"with locking.exclusive(pathlib.Path({str(target)!r}), {what!r}):\n"
        f"    print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_kill_9_frees_the_lock(tmp_path, tiny_grid):
    out = tmp_path / "g.h5"
    holder = _hold_lock(out, "psf generate")
    try:
        args = (
            ["generate", "--out", str(out)]
            + [x for k, v in TINY.items() if k != "depths" for x in (f"--{k.replace('_', '-')}", str(v))]
            + ["--depths", "0.5,2"]
        )
        assert_one_line_error(
            CliRunner().invoke(main, args), f"{out} is being written by psf generate (pid {holder.pid})"
        )
        assert not out.exists()
        run_dir = tmp_path / "run"
        train_holder = _hold_lock(run_dir, "psf train")
        try:
            result = CliRunner().invoke(main, ["train", "--data", str(tiny_grid), "--run-dir", str(run_dir)])
            assert_one_line_error(result, f"{run_dir} is being written by psf train (pid {train_holder.pid})")
            assert not run_dir.exists()
        finally:
            train_holder.kill()
            train_holder.wait()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the lock with the process: the same command now runs.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"spp": 10**12, "heldout_spp": 4 * 10**12}, ("one block of spp 1000000000000", "GiB", "lower --spp")),
        ({"kernel_size": 100_000}, ("100000-px kernel", "GiB")),
        ({"grid_size": 100_000, "noise_points": 4}, ("grid_size 100000 needs about", "smaller --grid-size")),
        ({"depths": (1e30,)}, ("tracing the on-axis point at 1e+30 m failed",)),
        (
            {"depths": (1e-9,)},
            ("window holds only", "of channel R that reach the sensor from the axis at 1e-09 m", "--depths"),
        ),
    ],
)
def test_what_cannot_be_traced_is_refused_in_one_line_leaving_no_file(tmp_path, change, needles):
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5", **change)), *needles)
    assert not (tmp_path / "g.h5").exists() and list(tmp_path.glob("*.tmp")) == []


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, tiny_grid, monkeypatch):
    import shutil as sh

    from psfgen import gridfile

    out = tmp_path / "g.h5"
    real_usage = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    assert_one_line_error(run_cli(tiny_args(out)), "will need about", "free space or choose another --out")
    assert not out.exists()
    monkeypatch.setattr(sh, "disk_usage", real_usage)
    write, calls = gridfile.write_block, []

    def fills_up(*args, **kwargs):  # the disk fills up at the third block
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write(*args, **kwargs)

    monkeypatch.setattr(gridfile, "write_block", fills_up)
    assert_one_line_error(run_cli(tiny_args(out)), "No space left on device", "run the same command again")
    monkeypatch.setattr(gridfile, "write_block", write)
    assert run_cli(tiny_args(out)).exit_code == 0  # resumes: the two finished blocks are kept
    with h5py.File(out) as a, h5py.File(tiny_grid) as b:
        np.testing.assert_array_equal(a["grid/psf"][:], b["grid/psf"][:])


def test_a_damaged_file_is_named_damaged_not_foreign(tmp_path, tiny_grid):
    out = tmp_path / "g.h5"
    sh_copy = __import__("shutil").copy
    sh_copy(tiny_grid, out)
    with h5py.File(out, "r+") as f:
        del f["noise/psf"]
    assert_one_line_error(run_cli(tiny_args(out)), "is damaged: dataset noise/psf is missing", "--overwrite")
    out.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # an HDF5 signature and nothing readable after it
    assert_one_line_error(run_cli(tiny_args(out)), "cannot be opened (damaged", "--overwrite")


@pytest.mark.parametrize("value", [1.5, float("nan"), -0.1])
@pytest.mark.parametrize("name", ["grid/kept", "heldout/kept_b"])
def test_a_kept_share_outside_0_to_1_is_a_damaged_file_in_one_line(tmp_path, tiny_grid, name, value):
    out = tmp_path / "g.h5"
    shutil.copy(tiny_grid, out)
    with h5py.File(out, "r+") as f:
        f[name][0, 1] = value
    assert_one_line_error(run_cli(["info", str(out)]), f"{out} is damaged: {name} holds values outside 0..1 (or NaN)")


def test_a_window_that_cuts_light_is_warned_with_the_measured_share_and_one_that_holds_it_is_not(tmp_path, caplog):
    """A user's --kernel-size on the default lens at 1 m: 32 px keeps under 60% of the rays of every point, and so
    few of the corners' (~2%) that they are stored as dark; 320 px (more than the 250-282 px its corners need at 1
    and 5 m) keeps them all."""
    small = dict(grid_size=3, depths=(1.0,), heldout=0, noise_points=0, spp=2000)
    with caplog.at_level(logging.WARNING, logger="psfgen"):
        result = run_cli(tiny_args(tmp_path / "cut.h5", kernel_size=32, **small))
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "cut.h5") as f:
        kept, valid, illum = f["grid/kept"][0], f["grid/valid"][0].astype(bool), f["grid/illumination"][0]
    assert (illum > 0.5).all() and (kept.max(axis=-1) < 0.6).all()  # the whole field is lit, every PSF cut
    corners = [0, 2, 6, 8]
    assert not valid[corners].any() and valid[[1, 3, 4, 5, 7]].all()  # stored as dark by the window alone
    p, c = np.unravel_index(kept.argmin(), kept.shape)
    assert p in corners
    (warning,) = [r.getMessage() for r in caplog.records if "lit grid PSFs keep less than" in r.getMessage()]
    assert warning.startswith(
        "9 of 9 lit grid PSFs keep less than 99% of their valid rays in the 32-px traced window (4 of them "
        f"stored as dark: too few of their rays in the window for a PSF) (worst {100 * kept.min():.1f}%, channel "
        f"{'RGB'[c]} of point ({grid_coords(3)[p, 0]:.3g}, {grid_coords(3)[p, 1]:.3g}) at 1 m)"
    ), warning
    assert "--kernel-size (e.g. " in warning and "32 x 2.52 um / 15 = 5.38 um now" in warning, warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="psfgen"):
        result = run_cli(tiny_args(tmp_path / "whole.h5", kernel_size=320, **small))
    assert result.exit_code == 0, result.output
    assert "keep less than" not in caplog.text
    with h5py.File(tmp_path / "whole.h5") as f:
        assert (f["grid/kept"][:] >= 0.99).all() and f["grid/valid"][:].all()


def test_the_progress_bar_counts_whole_psfs_up_to_its_total(tmp_path, monkeypatch):
    """Blocks of 5 and 4 points: thirds of them per colour are no whole numbers, and summed in floating point they
    overshot the total (a negative ETA and a TqdmWarning on the bar)."""
    import io
    import warnings

    from tqdm import TqdmWarning, tqdm

    import psfgen.generation as generation

    steps, bars = [], []

    class Shown(tqdm):  # the bar as a terminal shows it (the tests' log level would hide it)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)

        def update(self, n=1):
            steps.append(n)
            return super().update(n)

    monkeypatch.setattr(generation, "tqdm", Shown)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TqdmWarning)
        generate(tiny_config(tmp_path / "g.h5", grid_size=3, depths=(1.0,), heldout=0, noise_points=0,
                             block_rays=5 * TINY["spp"]))  # fmt: skip
    (bar,) = bars
    assert len(steps) == 3 * 2 and all(type(s) is int for s in steps), steps  # 2 blocks, after each colour
    assert bar.total == 9 and bar.n == sum(steps) == 9
    shown = bar.fp.getvalue()
    assert "9/9" in shown and "<-" not in shown, shown  # no fraction of a PSF, no negative time left
