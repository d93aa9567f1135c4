"""Scaling out: sharded generation + merge equals one process; DDP training under torchrun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT, SMALL, TINY, as_schema_2, assert_one_line_error, scalars, small_config, tiny_args, tiny_config

from cli import main
from psfcvae import load_model, train
from psfgen import generate, gridfile
from psfgen.merge import merge

COMPARED = (
    "grid/psf",
    "grid/kept",
    "noise/kept",
    "noise/psf",
    "heldout/psf_a",
    "heldout/psf_b",
    "heldout/kept_a",
    "heldout/kept_b",
    "blocks/done",
    "grid/illumination",
    "grid/valid",
    "noise/illumination",
    "noise/valid",
    "heldout/illumination_a",
    "heldout/illumination_b",
    "heldout/valid_a",
    "heldout/valid_b",
    "axis/fraction",
)
PSF = str(Path(sys.executable).parent / "psf")  # the installed command, as docs/scaling.md runs it


def torchrun() -> list[str]:
    """torchrun with 2 processes on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
    ]


def assert_same_run(a, b):
    with h5py.File(a) as f, h5py.File(b) as g:
        for name in COMPARED:
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)
        assert f.attrs["run_id"] == g.attrs["run_id"]


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return [generate(tiny_config(d / "grid.h5", shard=f"{k}/3")) for k in range(3)]


def test_three_shards_merge_to_the_single_process_file(three_shards, tiny_grid, tmp_path):
    assert [p.name for p in three_shards] == [f"grid.shard000{k}-of-0003.h5" for k in range(3)]
    with h5py.File(three_shards[1]) as f:
        done = f["blocks/done"][:]
        assert done[1::3].all() and not done[0::3].any() and not done[2::3].any()
    merged = merge([str(p) for p in reversed(three_shards)], tmp_path / "merged.h5")
    assert_same_run(merged, tiny_grid)
    virtual = CliRunner().invoke(
        main, ["merge", *map(str, three_shards), "--out", str(tmp_path / "virtual.h5"), "--virtual"]
    )
    assert virtual.exit_code == 0, virtual.output
    assert_same_run(tmp_path / "virtual.h5", tiny_grid)
    # The merged file is a grid file like any other: training accepts it.
    assert train(small_config(merged, tmp_path / "run", max_steps=5)).exists()


def test_merge_refuses_missing_duplicate_foreign_and_unfinished(three_shards, tmp_path):
    run = lambda *paths: CliRunner().invoke(main, ["merge", *map(str, paths), "--out", str(tmp_path / "m.h5")])
    a, b, c = three_shards
    assert_one_line_error(run(a, c), "missing shard(s) 1/3")
    dup = tmp_path / "copy.h5"
    shutil.copy(b, dup)
    assert_one_line_error(run(a, b, c, dup), "duplicate shard 1/3", str(dup))
    foreign = generate(tiny_config(tmp_path / "other.h5", seed=8, shard="1/3"))
    assert_one_line_error(run(a, foreign, c), "belongs to another run", str(foreign))
    two = generate(tiny_config(tmp_path / "two.h5", shard="1/2"))
    assert_one_line_error(run(a, b, c, two), "shard of 2")
    unfinished = tmp_path / "unfinished.h5"
    shutil.copy(b, unfinished)
    with h5py.File(unfinished, "r+") as f:
        f["blocks/done"][4] = 0
    assert_one_line_error(run(a, unfinished, c), "unfinished", "--shard 1/3")
    assert_one_line_error(run(a, tmp_path / "none.h5", c), "does not exist")
    old = as_schema_2(b, tmp_path / "old.h5")  # a shard traced before the kernel sizes' rename
    assert_one_line_error(run(a, old, c), f"shard {old}", "has schema version 2", "regenerate it with 'psf generate'")
    assert not (tmp_path / "m.h5").exists()
    # A shard is not a dataset for training.
    r = CliRunner().invoke(main, ["train", "--data", str(a), "--run-dir", str(tmp_path / "r")])
    assert_one_line_error(r, "is shard 0/3", "psf merge")


def test_merge_refuses_shards_whose_finish_is_not_stamped(three_shards, tmp_path):
    """Shards with every block written but no closing marks (stopped before psf generate stamped its finish): one
    line saying which shard to resume, not a traceback from the merged file's finish time."""
    copies = []
    for path in three_shards:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
        with h5py.File(copies[-1], "r+") as f:
            f["closing"][...] = 0
    r = CliRunner().invoke(main, ["merge", *map(str, copies), "--out", str(tmp_path / "m.h5")])
    assert_one_line_error(r, "shard 0/3", "finish not stamped", "--shard 0/3")
    assert not (tmp_path / "m.h5").exists()


def test_shard_auto_under_torchrun(tiny_grid, tmp_path):
    out = tmp_path / "g.h5"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        torchrun() + ["-m", "cli", "-q"] + tiny_args(out) + ["--shard", "auto"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    shards = sorted(tmp_path.glob("g.shard*-of-0002.h5"))
    assert len(shards) == 2
    assert_same_run(merge([str(s) for s in shards], tmp_path / "merged.h5"), tiny_grid)
    assert_one_line_error(
        CliRunner().invoke(main, tiny_args(tmp_path / "x.h5") + ["--shard", "auto"]), "--shard auto needs torchrun"
    )
    assert_one_line_error(CliRunner().invoke(main, tiny_args(tmp_path / "x.h5") + ["--shard", "3/3"]), "0 <= K < N")


def test_ddp_two_processes_gloo(tiny_grid, tmp_path):
    steps = 30
    sets = [x for k, v in {**SMALL, "max_steps": steps, "log_every": steps}.items() for x in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ddp = tmp_path / "ddp"
    r = subprocess.run(
        torchrun() + ["--no-python", PSF, "train", "--data", str(tiny_grid), "--run-dir", str(ddp)] + sets,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("TensorBoard logs") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.yaml", "latest.pt", "tb"]
    # The checkpoint loads in a single process, and a single process resumes it.
    model = load_model(ddp / "latest.pt")
    assert model.info["step"] == steps and model.psf(0.1, 0.2, 1.0).shape == (1, 3, 15, 15)
    assert train(small_config(tiny_grid, ddp, max_steps=steps + 10), resume=True).exists()
    # Same global batches, gradients averaged over the two halves: the loss follows the
    # single-process run (only the reparameterisation noise differs).
    single = train(small_config(tiny_grid, tmp_path / "single", max_steps=steps, log_every=steps))
    ((s_step, s_loss),) = scalars(single, "loss_all")
    d_loss = [v for s, v in scalars(ddp, "loss_all") if s == steps]
    assert s_step == steps and len(d_loss) == 1
    assert d_loss[0] == pytest.approx(s_loss, rel=0.1)


def test_virtual_merge_refuses_to_read_when_a_shard_is_gone(three_shards, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    copies = [shutil.copy(p, d / p.name) for p in three_shards]
    merged = merge([str(p) for p in copies], d / "virtual.h5", virtual=True)
    Path(copies[1]).unlink()
    assert_one_line_error(CliRunner().invoke(main, ["info", str(merged)]), "missing", Path(copies[1]).name)
    # A shard of another run put at its path (the same command with another seed) is not read either.
    generate(tiny_config(d / "grid.h5", shard="1/3", seed=TINY["seed"] + 1))
    for args in (["info", str(merged)], ["train", "--data", str(merged), "--run-dir", str(tmp_path / "r")]):
        assert_one_line_error(CliRunner().invoke(main, args), "no longer a shard of its run", Path(copies[1]).name)


def test_stale_temporary_files_are_removed_and_a_failed_merge_says_why(three_shards, tmp_path, monkeypatch):

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names files of a process that is gone
    out = tmp_path / "merged.h5"
    stale = [tmp_path / f".merged.h5.{dead.pid}.tmp", tmp_path / ".merged.h5.4194305.tmp"]  # above any pid_max
    for p in stale:
        p.write_bytes(b"x" * 1000)
    live = tmp_path / f".merged.h5.{os.getppid()}.tmp"  # a process that exists: not ours to delete
    live.write_bytes(b"x")
    merge([str(p) for p in three_shards], out)
    assert out.exists() and not any(p.exists() for p in stale) and live.exists()

    # A write that fails (a read-only or full directory) is one line, and its clean-up's
    # own failure does not hide it.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gridfile, "create", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    result = CliRunner().invoke(main, ["merge", *map(str, three_shards), "--out", str(tmp_path / "again.h5")])
    assert_one_line_error(result, "cannot write", "Permission denied", "writable --out")


def test_checkpoints_leave_no_temporary_files(tiny_run):
    assert [p.name for p in tiny_run.iterdir() if p.name.endswith(".tmp")] == []


def test_merge_into_a_directory_says_so(three_shards, tmp_path):
    result = CliRunner().invoke(main, ["merge", *map(str, three_shards), "--out", str(tmp_path), "--overwrite"])
    assert_one_line_error(result, "is a directory")
