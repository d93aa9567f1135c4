"""Round three of bad inputs and faults (docs/reliability.md): each case one `Error:` line, exit 2, nothing lost."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_line_error, run_cli, small_config, tiny_args

from psfcvae import load_model, train
from psfgen.config import MIN_HELDOUT_SPP
from psfgen.shared import locking
from psfgen.shared.errors import InputError
from psfgen.trace import illumination


def sample_args(ckpt, out, *extra):
    return ["sample", "--checkpoint", str(ckpt), "--coords", "0.1,0.2", "--depth", "1", "--out", str(out), *extra]


# --- reading what the user names ------------------------------------------------------------------------------------


def test_a_lens_or_config_that_is_no_regular_file_is_refused_before_it_is_read(tmp_path):
    fifo = tmp_path / "lens.json"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5", lens=fifo)), "lens file", "a device, pipe or socket")
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5", lens="/dev/zero")), "/dev/zero", "not a file")
    result = run_cli(["generate", "--config", "/dev/urandom", "--out", str(tmp_path / "g.h5")])
    assert_one_line_error(result, "config file /dev/urandom", "not a file")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(17 * 2**20)  # sparse: 17 MiB of zeros
    assert_one_line_error(run_cli(["generate", "--config", str(big)]), "larger than 16 MiB")
    assert not (tmp_path / "g.h5").exists()


def test_deeply_nested_json_and_yaml_are_one_line(tmp_path):
    lens = tmp_path / "deep.json"
    lens.write_text('{"surfaces": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_one_line_error(run_cli(tiny_args(tmp_path / "g.h5", lens=lens)), "nested too deeply")
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("grid_size: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_one_line_error(run_cli(["generate", "--config", str(cfg)]), "nested too deeply")
    result = run_cli([*tiny_args(tmp_path / "g.h5"), "--set", "spp=" + "[" * 20_000 + "]" * 20_000])
    assert_one_line_error(result, "--set spp", "nested too deeply")


# --- numbers at the edge --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--seed", str(2**70)], ("--seed must be between 0 and 2**63 - 1", str(2**70))),
        (["--focus-m", "1e30"], ("cannot focus this lens at 1e+30 m",)),
        (["--heldout-spp", "3"], (f"--heldout-spp must be at least {MIN_HELDOUT_SPP}", "got 3")),
        (["--ray-budget", "1000000", "--grid-size", "1"], ("--grid-size must be at least 2, got 1",)),
        (["--ray-budget", "1000000", "--spp", "0"], ("--spp must be at least 1, got 0",)),
    ],
)
def test_generate_refuses_numbers_at_the_edge_in_the_users_words(tmp_path, args, needles):
    base = tiny_args(tmp_path / "g.h5")
    if "--grid-size" in args or "--spp" in args:  # the budget's own combinations: drop the tiny grid's pair
        i = base.index("--spp")
        base = base[:i] + base[i + 2 :]
        i = base.index("--grid-size")
        base = base[:i] + base[i + 2 :]
    assert_one_line_error(run_cli([*base, *args]), *needles)
    assert not (tmp_path / "g.h5").exists()


def test_the_held_out_floor_is_two_halves_of_a_lit_psf():
    assert MIN_HELDOUT_SPP == 2 * illumination.MIN_RAYS


def test_focus_at_infinity_takes_deeplens_infinite_focus_path(tmp_path, monkeypatch):
    from deeplens import GeoLens

    seen = []
    real = GeoLens.refocus
    monkeypatch.setattr(GeoLens, "refocus", lambda self, foc_dist: (seen.append(foc_dist), real(self, foc_dist))[1])
    out = tmp_path / "g.h5"
    result = run_cli([*tiny_args(out, grid_size=2, depths=(2.0,), heldout=0), "--focus-m", "inf"])
    assert result.exit_code == 0, result.output
    assert seen and all(d == float("inf") for d in seen)  # +inf: DeepLens tests depth == inf, not -inf


def test_train_refuses_a_seed_beyond_64_bits_and_an_empty_run_dir(tiny_grid, tmp_path):
    base = ["train", "--data", str(tiny_grid)]
    assert_one_line_error(run_cli([*base, "--run-dir", str(tmp_path / "r"), "--seed", str(2**70)]), "--seed")
    assert_one_line_error(run_cli([*base, "--run-dir", ""]), "--run-dir is empty")
    assert not (tmp_path / "r").exists()


# --- locks, checkpoints, outputs ------------------------------------------------------------------------------------


def test_a_lock_holds_for_every_spelling_of_the_path(tmp_path):
    real = tmp_path / "grid.h5"
    link = tmp_path / "alias.h5"
    link.symlink_to(real)
    with locking.exclusive(real, "psf generate"):
        assert_one_line_error(run_cli(tiny_args(link)), "is being written by psf generate")
    (tmp_path / "runs").mkdir()
    with locking.exclusive(tmp_path / "runs" / "a", "psf train"), pytest.raises(InputError, match="psf train"):
        with locking.exclusive(tmp_path / "runs" / ".." / "runs" / "a", "psf train"):  # another spelling
            pass


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_one_stays(tiny_grid, tmp_path, monkeypatch):
    from psfcvae import checkpoint

    run_dir = tmp_path / "r"
    train(small_config(tiny_grid, run_dir, max_steps=10, checkpoint_every=10, val_every=10))
    before = (run_dir / "latest.pt").read_bytes()

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"half")  # torch has begun writing ...
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")  # ... then fails

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(InputError, match=r"cannot write checkpoint .*previous (best|latest)\.pt is kept.*--resume"):
        train(small_config(tiny_grid, run_dir, max_steps=20, checkpoint_every=10, val_every=10), resume=True)
    assert (run_dir / "latest.pt").read_bytes() == before
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_psf_sample_under_a_file_size_limit_keeps_the_old_output(tiny_run, tmp_path):
    keep = tmp_path / "keep.npz"
    assert run_cli(sample_args(tiny_run / "latest.pt", keep)).exit_code == 0
    good = keep.read_bytes()
    limit = 64 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for out in (keep, tmp_path / "fresh.npz", tmp_path / "fresh.h5"):
        cmd = [sys.executable, "-m", "cli", *sample_args(tiny_run / "latest.pt", out, "--overwrite"), "--grid", "64"]
        cmd.remove("--coords")
        cmd.remove("0.1,0.2")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=small_files)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("Error: cannot write"), done.stderr
    assert keep.read_bytes() == good  # the good file is whole, the failed ones left nothing
    assert not (tmp_path / "fresh.npz").exists() and not (tmp_path / "fresh.h5").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_output_under_a_regular_file_is_named_before_any_work(tiny_run, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    result = run_cli(sample_args(tiny_run / "latest.pt", blocker / "p.npz"))
    assert_one_line_error(result, "--out", "notes.txt is a file, not a directory")
    img = tmp_path / "in.png"
    from psfcvae.rendering.imageio import write_image

    write_image(img, torch.rand(3, 16, 16))
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(img), "--depth", "1"]
    assert_one_line_error(run_cli([*args, "--out", str(blocker / "b.png")]), "notes.txt is a file, not a directory")


# --- psf render and sample ------------------------------------------------------------------------------------------


def test_a_png_that_declares_too_many_pixels_is_refused_from_its_header(tiny_run, tmp_path):
    huge = tmp_path / "huge.png"
    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0" * 4)
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(huge), "--depth", "1"]
    assert_one_line_error(run_cli([*args, "--out", str(tmp_path / "o.png")]), "20000x20000 pixels", "smaller image")


@pytest.mark.parametrize("field", ["0,1e-300,0,1e-300", "0,0.001,0,0.001"])
def test_a_field_window_too_small_for_the_image_is_one_line(tiny_run, tmp_path, field):
    from psfcvae.rendering.imageio import write_image

    img = tmp_path / "in.png"
    write_image(img, torch.rand(3, 32, 32))
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(img), "--depth", "1"]
    result = run_cli([*args, "--field", field, "--out", str(tmp_path / "o.png")])
    assert_one_line_error(result, "--field", "pixels across (at most 1024)")


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x"])
def test_devices_are_checked_by_render_sample_and_the_api(tiny_run, tmp_path, device):
    ckpt = tiny_run / "latest.pt"
    assert_one_line_error(run_cli([*sample_args(ckpt, tmp_path / "p.npz"), "--device", device]), "--device", device)
    from psfcvae.rendering.imageio import write_image

    write_image(tmp_path / "in.png", torch.rand(3, 8, 8))
    args = ["render", "--checkpoint", str(ckpt), "--image", str(tmp_path / "in.png"), "--depth", "1", "--out"]
    assert_one_line_error(run_cli([*args, str(tmp_path / "o.png"), "--device", device]), "--device", device)
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(InputError, match="device must be auto, cpu, cuda or cuda:K"):
        load_model(ckpt, device=device)


def test_sample_names_the_coordinate_and_refuses_a_depth_whose_inverse_overflows(tiny_run, tmp_path):
    ckpt = tiny_run / "latest.pt"
    args = ["sample", "--checkpoint", str(ckpt), "--coords", "1.0000001,0", "--depth", "1", "--out"]
    assert_one_line_error(run_cli([*args, str(tmp_path / "a.npz")]), "--coords must lie in [-1, 1]", "1.0000001")
    args = sample_args(ckpt, tmp_path / "b.npz", "--allow-extrapolation")
    args[args.index("--depth") + 1] = "1e-300"
    assert_one_line_error(run_cli(args), "--depth 1e-300 m gives no finite condition")
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


# --- the API --------------------------------------------------------------------------------------------------------


def test_api_refuses_complex_coordinates_odd_arguments_and_integer_tables(tiny_run):
    model = load_model(tiny_run / "latest.pt")
    for kwargs, needle in (
        (dict(x=0.1 + 0.5j, y=0.1), "x must be a real number"),
        (dict(x=np.array([0.1 + 0j]), y=[0.2]), "x must be a real number"),
        (dict(x=0.1, y=[[0.1], [0.2, 0.3]]), "y must be a real number"),
        (dict(x=0.1, y=0.1, mode=3), "mode must be 'mean' or 'sample'"),
        (dict(x=0.1, y=0.1, mode="sample", n_samples="2"), "n_samples must be a whole number"),
        (dict(x=0.1, y=0.1, mode="sample", n_samples=True), "n_samples must be a whole number"),
        (dict(x=0.1, y=0.1, depth_m=1e-300, allow_extrapolation=True), "gives no finite condition"),
    ):
        kwargs.setdefault("depth_m", 1.0)
        with pytest.raises(InputError, match=needle):
            model.psf(**kwargs)
    for options, needle in (
        (dict(dtype=torch.int8), "floating type"),
        (dict(target="small"), "target deviation"),
        (dict(sizes=("a", 2, 2)), "three whole numbers"),
    ):
        with pytest.raises(InputError, match=needle):
            model.tabulate(**options)


def test_many_points_are_decoded_in_chunks_equal_to_one_pass(tiny_run, monkeypatch):
    from psfcvae.api import psfmodel

    model = load_model(tiny_run / "latest.pt")
    x, y = np.linspace(-0.9, 0.9, 50), np.linspace(0.8, -0.8, 50)
    whole, light = model.psf(x, y, 1.0), model.illumination(x, y, 1.0)
    monkeypatch.setattr(psfmodel, "CHUNK", 7)  # 50 points in 8 chunks
    torch.testing.assert_close(model.psf(x, y, 1.0), whole)
    torch.testing.assert_close(model.illumination(x, y, 1.0), light)


def test_a_damaged_grid_value_names_the_file_once_read(tiny_grid, tmp_path):
    import h5py

    bad = tmp_path / "bad.h5"
    bad.write_bytes(Path(tiny_grid).read_bytes())
    with h5py.File(bad, "r+") as f:
        f["grid/illumination"][0, 0, 0] = -0.5
    assert_one_line_error(run_cli(["info", str(bad)]), "is damaged", "grid/illumination")
    with h5py.File(bad, "r+") as f:
        f["grid/illumination"][0, 0, 0] = 1.0
        f["heldout/depth"][0] = -2.0
    assert_one_line_error(run_cli(["info", str(bad)]), "is damaged", "heldout/depth")
    with h5py.File(bad, "r+") as f:
        f["heldout/depth"][0] = 1.0
        f.attrs["versions"] = "{" * 1
    assert_one_line_error(run_cli(["info", str(bad)]), "is damaged", "attribute versions is not valid JSON")


# --- grid files whose values a reader would trust -------------------------------------------------------------------


def _edited(tiny_grid, tmp_path, edit) -> Path:
    import h5py

    bad = tmp_path / "edited.h5"
    bad.write_bytes(Path(tiny_grid).read_bytes())
    with h5py.File(bad, "r+") as f:
        edit(f)
    return bad


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda f: f["grid/psf"].__setitem__((0, 0), 1000 * f["grid/psf"][0, 0]), "a sum other than 1"),
        (lambda f: f["grid/psf"].__setitem__((1, 3), 1e-30 * f["grid/psf"][1, 3]), "a sum other than 1"),
        (lambda f: f["grid/illumination"].__setitem__((0, 0, 0), 1e30), "grid/illumination"),
        (lambda f: f["depths"].__setitem__(Ellipsis, f["depths"][()][::-1]), "strictly ascending"),
        (lambda f: f["heldout/depth"].__setitem__(0, np.nan), "heldout/depth"),
        (lambda f: f["noise/index"].__setitem__(Ellipsis, f["noise/index"][()][::-1]), "noise/index"),
        (lambda f: f.attrs.__delitem__("device"), "attribute device is missing"),
        (lambda f: f.attrs.__delitem__("lens_path"), "attribute lens_path is missing"),
        (lambda f: f.attrs.__delitem__("started_at"), "attribute started_at is missing"),
        (lambda f: f.attrs.__setitem__("versions", "not json"), "attribute versions is not valid JSON"),
        (lambda f: f.attrs.__setitem__("lens_json", "{"), "attribute lens_json is not valid JSON"),
        (lambda f: f.attrs.__setitem__("sensor_size_mm", "[1, "), "attribute sensor_size_mm is not valid JSON"),
        (lambda f: f.attrs.__setitem__("sensor_size_mm", "[-1, 2]"), "not two positive millimetres"),
        (lambda f: f.attrs.__setitem__("depth_plan", "[[["), "attribute depth_plan is not valid JSON"),
        (lambda f: f.attrs.__setitem__("run_params", "[" * 100_000), "attribute run_params is not valid JSON"),
        (lambda f: f.attrs.__setitem__("shard_index", "two"), "attribute shard_count is missing"),
        (lambda f: f.attrs.__setitem__("schema_version", "4"), "schema version '4'"),
        (lambda f: f.__setitem__("extra", f["grid/psf"]) or f.__delitem__("grid/coords"), "grid/coords"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_grid_values_are_checked_once_where_the_file_is_read(tiny_grid, tmp_path, edit, needle):
    bad = _edited(tiny_grid, tmp_path, edit)
    for args in (["info", str(bad)], ["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")]):
        assert_one_line_error(run_cli(args), needle)
    assert not (tmp_path / "r").exists()


def test_a_dangling_or_external_link_is_a_damaged_file(tiny_grid, tmp_path):
    import h5py

    for link in (h5py.SoftLink("/nowhere"), h5py.ExternalLink("gone.h5", "/coords")):
        bad = _edited(
            tiny_grid, tmp_path, lambda f, link=link: (f.__delitem__("grid/coords"), f.__setitem__("grid/coords", link))
        )
        assert_one_line_error(run_cli(["info", str(bad)]), "is damaged", "grid/coords")


def test_a_grid_with_no_lit_point_is_refused_by_train_and_eval(tiny_grid, tmp_path):
    def darken(f):
        f["grid/valid"][...] = 0
        f["grid/psf"][...] = 0

    bad = _edited(tiny_grid, tmp_path, darken)
    assert_one_line_error(run_cli(["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")]), "no lit grid PSF")
    result = run_cli(["eval", "--baselines-only", "--data", str(bad), "--out", str(tmp_path / "ev")])
    assert_one_line_error(result, "no lit grid PSF")
    assert not (tmp_path / "r").exists() and not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_a_reader_holding_the_grid_with_hdf5_locking_stops_no_command(tiny_grid, tmp_path):
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); time.sleep(60)"
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    reader = subprocess.Popen([sys.executable, "-c", hold, str(tiny_grid)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert reader.stdout.readline().strip() == "open"  # HDF5's default shared lock is held now
        assert run_cli(["info", str(tiny_grid)]).exit_code == 0
        run = small_config(tiny_grid, tmp_path / "r", max_steps=2, val_every=2, checkpoint_every=2)
        train(run)
        result = run_cli(["eval", "--checkpoint", str(tmp_path / "r" / "latest.pt"), "--data", str(tiny_grid), "--out",
                          str(tmp_path / "ev")])  # fmt: skip
        assert result.exit_code == 0, result.output
    finally:
        reader.kill()
        reader.wait()


def test_training_refuses_a_network_too_large_for_memory_and_an_infinite_pe_scale(tiny_grid, tmp_path):
    base = ["train", "--data", str(tiny_grid), "--run-dir", str(tmp_path / "r"), "--set"]
    assert_one_line_error(run_cli([*base, "hidden_dim=1000000000"]), "'hidden_dim' 1000000000", "GiB to train")
    assert_one_line_error(run_cli([*base, "supersample=1000"]), "'supersample' 1000", "GiB to train")
    assert_one_line_error(run_cli([*base, "pe_scale=.inf"]), "'pe_scale' must be a positive, finite number")
    assert not (tmp_path / "r").exists()


def test_a_write_failing_half_way_keeps_the_finished_blocks_and_the_file_whole(tiny_grid, tmp_path, monkeypatch):
    import errno

    import h5py

    from psfgen import GridFile

    out = tmp_path / "g.h5"
    real, calls = os.pwrite, []

    def disk_fills(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3 * 7 + 2:  # three blocks (6 writes and a done mark each), then part of the fourth
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_fills)
    assert_one_line_error(run_cli(tiny_args(out)), "No space left on device", "run the same command again")
    monkeypatch.setattr(os, "pwrite", real)
    grid = GridFile.open(out)  # opens and checks: the structure is whole
    assert grid.done.sum() == 3 and not grid.complete
    assert run_cli(["info", str(out)]).exit_code == 0
    assert run_cli(tiny_args(out)).exit_code == 0  # resumes
    with h5py.File(out) as a, h5py.File(tiny_grid) as b:
        for name in ("grid/psf", "noise/psf", "heldout/psf_a", "heldout/psf_b", "grid/kept"):
            np.testing.assert_array_equal(a[name][:], b[name][:])  # equal to the uninterrupted run


def test_a_window_too_small_for_the_axis_psf_says_so_and_not_that_the_lens_is_dark(tmp_path):
    args = tiny_args(tmp_path / "g.h5", kernel_size=2, kernel_size_small=2, depths=(0.5,))
    assert_one_line_error(run_cli(args), "2-px window holds only", "larger --kernel-size")
    assert "vignettes" not in run_cli(args).stderr
    assert not (tmp_path / "g.h5").exists()


# --- a disk that fills at the very end ------------------------------------------------------------------------------


def test_a_disk_full_when_generate_stamps_its_finish_loses_nothing(tmp_path, monkeypatch):
    from psfgen import generation, gridfile
    from psfgen.gridfile import GridFile

    stamp = gridfile.finish
    out = tmp_path / "g.h5"

    def on_a_full_disk(path, **marks):  # every block is written; the disk has not one byte more
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), limit[1]))
        try:
            stamp(path, **marks)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, old)

    monkeypatch.setattr(generation.gridfile, "finish", on_a_full_disk)
    assert run_cli(tiny_args(out)).exit_code == 0
    grid = GridFile.open(out)
    assert grid.done.all() and grid.finished_at is not None
    assert grid.trace_seconds == pytest.approx(grid.seconds.sum())


# --- psf eval's outputs, schedule changes on resume, diagnostics of many lines ---------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_eval_leaves_the_previous_out_whole_and_an_unwritable_out_is_said_before_the_work(
    tiny_grid, tmp_path, monkeypatch
):
    import errno

    from psfcvae.evaluation import evaluate

    out = tmp_path / "ev"
    args = ["eval", "--baselines-only", "--data", str(tiny_grid), "--out", str(out)]
    assert run_cli(args).exit_code == 0
    before = _tree(out)
    real = evaluate.report.write_report

    def disk_fills(result, folder, *rest):  # the figures are written; the report is half written, then the disk fills
        (Path(folder) / "report.html").write_text("<html>half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate.report, "write_report", disk_fills)
    assert_one_line_error(run_cli(args), f"cannot write the evaluation into {out}", "No space left", "as it was")
    assert _tree(out) == before  # no new figure beside the old metrics
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]  # nothing left beside it
    monkeypatch.setattr(evaluate.report, "write_report", real)

    def no_work(*a, **k):
        raise AssertionError("the metrics were computed before --out was checked")

    monkeypatch.setattr(evaluate, "compute_metrics", no_work)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    args[-1] = str(blocker / "ev")
    assert_one_line_error(run_cli(args), "--out", "notes.txt is a file, not a directory")
    args[-1] = str(blocker)
    assert_one_line_error(run_cli(args), "--out", "is a file; give a directory")


def test_resuming_with_another_learning_rate_schedule_warns(tiny_run, tiny_grid, tmp_path, caplog):
    import logging

    for change in (dict(learning_rate=2e-3), dict(lr_schedule="constant"), dict(max_steps=50)):
        run_dir = tmp_path / "r"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(tiny_run, run_dir)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train(small_config(tiny_grid, run_dir, **change), resume=True)
        key = next(iter(change))
        assert f"resuming with another {key}: the learning rate from here on is not the original run's" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(small_config(tiny_grid, run_dir, max_steps=50), resume=True)  # the same run again: no change
    assert "resuming with another" not in caplog.text


def test_a_reason_of_many_lines_is_one_line(tiny_run, tmp_path, monkeypatch):
    from psfcvae.api import sample

    def hdf5_fails(*a, **k):
        raise OSError(
            "Unable to synchronously create file (file write failed: errno = 28)\n"
            "  major: Low-level I/O\n  minor: Write failed"
        )

    monkeypatch.setattr(sample.h5py, "File", hdf5_fails)
    out = tmp_path / "p.h5"
    result = run_cli(sample_args(tiny_run / "latest.pt", out))
    assert_one_line_error(result, f"cannot write {out}: Unable to synchronously create file (file write failed")
    assert "major" not in result.output and not out.exists() and not list(tmp_path.glob(".*.tmp"))


# --- an adversary's own cases (docs/reliability.md, "Round three: the adversary's cases") ---------------------------


def test_broken_hdf5_metadata_is_a_damaged_file_in_one_line(tiny_grid, tmp_path):
    data = bytearray(Path(tiny_grid).read_bytes())
    at = data.index(b"run_params\0")  # the root group's attribute message that names run_params
    data[at - 4 : at] = b"\xff" * 4  # its header, garbled: HDF5 runs off the end of the message when it decodes it
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(data))
    for args in (["info", str(bad)], ["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")]):
        assert_one_line_error(run_cli(args), f"{bad} is damaged: HDF5 cannot read it", "regenerate it")
    assert not (tmp_path / "r").exists()


def test_a_symlink_loop_or_an_empty_out_is_one_line(tiny_grid, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_one_line_error(run_cli(tiny_args(tmp_path / "a")), "cannot be resolved", "symlink loop")
    result = run_cli(["train", "--data", str(tiny_grid), "--run-dir", str(tmp_path / "a")])
    assert_one_line_error(result, "cannot be resolved", "symlink loop")
    assert_one_line_error(run_cli(tiny_args("")), "--out is empty")
    assert_one_line_error(run_cli([*tiny_args(tmp_path / "g.h5"), "--out", " "]), "--out is empty")


def test_eval_never_replaces_a_directory_it_did_not_write(tiny_run, tiny_grid, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = _tree(run_dir)
    base = ["eval", "--baselines-only", "--data", str(tiny_grid), "--out"]
    result = run_cli([*base, str(run_dir)])  # the run directory, checkpoints and all
    assert_one_line_error(result, "holds files this command did not write (best.pt, config.yaml, latest.pt, ...)")
    assert _tree(run_dir) == before
    monkeypatch.chdir(run_dir)
    for out in (".", ""):  # the working directory
        assert_one_line_error(run_cli([*base, out]), "holds files this command did not write")
    assert _tree(run_dir) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([*base, str(empty)]).exit_code == 0  # an empty directory, then its own earlier output
    assert run_cli([*base, str(empty)]).exit_code == 0 and (empty / "metrics.json").exists()


def test_a_config_that_gives_a_key_twice_is_refused(tiny_grid, tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("max_steps: 5\nhidden_dim: 64\nmax_steps: 7\n")  # YAML would keep 7 without a word
    result = run_cli(["train", "--data", str(tiny_grid), "--run-dir", str(tmp_path / "r"), "--config", str(cfg)])
    assert_one_line_error(result, f"config file {cfg} gives key 'max_steps' twice (line 3)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("depth", ["inf", "1e400"])
def test_render_names_the_option_for_an_infinite_depth(tiny_run, tmp_path, depth):
    from psfcvae.rendering.imageio import write_image

    write_image(tmp_path / "in.png", torch.rand(3, 8, 8))
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(tmp_path / "in.png"), "--depth"]
    result = run_cli([*args, depth, "--out", str(tmp_path / "o.png")])
    assert_one_line_error(result, "--depth must be a positive, finite number of metres, got inf")


def test_a_depth_map_whose_inverse_overflows_is_named_as_the_map(tiny_run, tmp_path):
    from psfcvae.rendering.imageio import write_image

    img, depth = tmp_path / "in.png", tmp_path / "d.npy"
    write_image(img, torch.rand(3, 8, 8))
    np.save(depth, np.full((8, 8), 1e-320))
    args = ["render", "--checkpoint", str(tiny_run / "latest.pt"), "--image", str(img), "--depth-map", str(depth)]
    result = run_cli([*args, "--allow-extrapolation", "--out", str(tmp_path / "o.png")])
    assert_one_line_error(result, "--depth-map", "1/depth overflows")
    assert not (tmp_path / "o.png").exists()
