"""The `psf` command as a user meets it: fast help, messages in its own options, Ctrl-C, outputs."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    SMALL,
    assert_one_line_error,
    run_cli,
    scalars,
    tiny_args,
)
from PIL import Image

from psfcvae import load_model
from psfgen import GenerateConfig
from psfgen.config import resolve
from psfgen.shared import configio
from psfgen.shared.errors import InputError

CLI = [sys.executable, "-c", "import sys; from cli import main; main()"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _timed(args) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    return time.perf_counter() - t0, done


def test_help_and_usage_errors_answer_without_torch():
    # What each answer loads: torch, DeepLens and matplotlib only where a command computes.
    probe = (
        "import sys; from cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'deeplens', 'matplotlib') if m in sys.modules), file=sys.stderr)"
    )
    for args in (
        ["--help"],
        ["train", "--help"],
        ["generate", "--bogus"],
        ["generate", "--grid-size", "1"],
        ["train", "--set", "kl_weigth=1"],
        ["sample", "--checkpoint", "c.pt", "--coords", "0,0", "--out", "x.txt"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.stderr.strip().splitlines()[-1] == "[]", (args, done.stderr)
    # And the time a user waits, against the interpreter's own start (generous: the machine is shared).
    bare = min(_timed([sys.executable, "-c", "pass"])[0] for _ in range(3))
    for args in (["--help"], ["train", "--help"], ["generate", "--noise-points", "99", "--grid-size", "4"]):
        took, done = min((_timed(CLI + args) for _ in range(2)), key=lambda t: t[0])
        assert done.returncode in (0, 2), done.stderr
        assert took < max(3.0, 20 * bare), (args, took, bare)


def test_noise_points_default_adapts_to_the_grid_and_info_says_so(tmp_path):
    for n, points in ((4, 16), (5, 25), (20, 32)):  # 32 where 32 fit
        cfg = configio.load(GenerateConfig, None, {"grid_size": n, "num_depths": 5})
        assert resolve(cfg, kernel_size=64).noise_points == points
    assert resolve(GenerateConfig(grid_size=4, num_depths=5), kernel_size=64).run_params()["noise_points"] == 16
    # `psf generate --grid-size 4` with nothing else set: no complaint about an option never given.
    out = tmp_path / "g.h5"
    result = run_cli(
        [
            "generate",
            "--grid-size",
            "4",
            "--depths",
            "1",
            "--spp",
            "300",
            "--heldout",
            "0",
            "--kernel-size",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert f["noise/index"].shape == (16,)
    text = run_cli(["info", str(out)]).output
    assert "16 grid points per depth (the default for a 4x4 grid" in text, text


def test_messages_name_the_option_typed_and_the_value(tmp_path):
    out = str(tmp_path / "g.h5")
    assert_one_line_error(
        run_cli(["generate", "--grid-size", "4", "--noise-points", "99", "--out", out]),
        "--noise-points must be between 0 and 16",
        "got 99",
    )
    # Set through --set (or a YAML file), the key is named as a config key.
    assert_one_line_error(
        run_cli(["generate", "--spp", "10", "--set", "spp=0", "--out", out]),
        "config key 'spp' must be at least 1, got 0",
    )
    assert_one_line_error(
        run_cli(["train", "--data", out, "--set", "kl_weigth=1"]),
        "unknown key 'kl_weigth' in --set; did you mean kl_weight?",
    )
    assert_one_line_error(
        run_cli(["eval", "--baselines-only", "--data", out, "--out", str(tmp_path / "e"), "--eigen-components", "0"]),
        "--eigen-components must be at least 1, got 0",
    )
    assert_one_line_error(
        run_cli(["eval", "--baselines-only", "--data", out, "--out", str(tmp_path / "e"), "--device", "gpu"]),
        "--device must be auto, cpu, cuda or cuda:K, got 'gpu'",
    )
    # A malformed value is named before how it combines with other options (--shard with the pilots' autos).
    assert_one_line_error(run_cli(["generate", "--shard", "4/4", "--out", out]), "--shard must be K/N", "got '4/4'")
    # Options parsed in the CLI itself echo the value too (a missing checkpoint is checked after them).
    missing = str(tmp_path / "none.pt")
    assert_one_line_error(
        run_cli(["sample", "--checkpoint", missing, "--coords", "0,abc", "--out", str(tmp_path / "s.npz")]),
        "--coords",
        "got '0,abc'",
    )
    assert_one_line_error(
        run_cli(["sample", "--checkpoint", missing, "--grid", "0", "--out", str(tmp_path / "s.npz")]),
        "--grid",
        "must be at least 1, got 0",
    )
    assert not (tmp_path / "g.h5").exists()
    # The library's own spelling, where no option is involved.
    with pytest.raises(InputError, match=r"^config key 'noise_points' must be between 0 and 16"):
        configio.build(GenerateConfig, {"grid_size": 4, "noise_points": 17})
    assert "did you mean" not in str(pytest.raises(InputError, configio.build, GenerateConfig, {"zzzz": 1}).value)


def test_sample_writes_coordinates_with_the_psfs_and_labels_the_png(tiny_run, tmp_path):
    ck = str(tiny_run / "latest.pt")
    assert (
        run_cli(
            [
                "sample",
                "--checkpoint",
                ck,
                "--coords",
                "0.5,0.5;-0.3,0.8",
                "--depth",
                "1",
                "--out",
                str(tmp_path / "p.npz"),
            ]
        ).exit_code
        == 0
    )
    saved = np.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(saved["coords"], [[0.5, 0.5], [-0.3, 0.8]])
    assert float(saved["depth_m"]) == 1.0 and str(saved["mode"]) == "mean"
    np.testing.assert_allclose(saved["psf"], load_model(ck).psf([0.5, -0.3], [0.5, 0.8], 1.0).numpy())
    assert (
        run_cli(
            ["sample", "--checkpoint", ck, "--grid", "3", "--depth", "1", "--out", str(tmp_path / "m.png")]
        ).exit_code
        == 0
    )
    img = np.asarray(Image.open(tmp_path / "m.png").convert("L"))
    mosaic_h = (3 * 16 - 1) * 8  # 3 tiles of 15 px with 1-px gaps, scaled 8x
    assert img.shape[0] > mosaic_h + 20  # a caption below the tiles
    caption = img[mosaic_h:]
    assert (caption < 128).sum() > 200  # dark text on white


def test_psf_info_on_an_interrupted_file_says_not_measured(tiny_grid, tmp_path):
    part = tmp_path / "part.h5"
    shutil.copy(tiny_grid, part)
    with h5py.File(part, "r+") as f:
        f["noise/psf"][1], f["noise/valid"][1] = 0, 0  # depth 1's re-traces not written yet
        table = f["blocks/table"][:]
        f["blocks/done"][(table[:, 0] == 1) & (table[:, 1] == 1)] = 0  # kind 1 is noise
    text = run_cli(["info", str(part)]).output
    assert "2 m: not measured yet" in text and "nan" not in text, text
    assert "0.5 m: " in text and "%" in text.split("0.5 m: ")[1].split(",")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_model_defaults_to_auto_and_an_absent_cuda_is_one_line(tiny_run, tmp_path):
    assert load_model(tiny_run / "latest.pt").device.type == "cpu"
    with pytest.raises(InputError, match="CUDA is not available"):
        load_model(tiny_run / "latest.pt", device="cuda")
    assert_one_line_error(
        run_cli(
            [
                "sample",
                "--checkpoint",
                str(tiny_run / "latest.pt"),
                "--coords",
                "0,0",
                "--depth",
                "1",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "a.npz"),
            ]
        ),
        "--device cuda",
    )


def training_started(data, run_dir, sets: list[str], **popen) -> subprocess.Popen:
    """`psf train` in a subprocess, returned once its TensorBoard file exists (it is stepping)."""
    proc = subprocess.Popen(CLI + ["train", "--data", str(data), "--run-dir", str(run_dir)] + sets, cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip
    deadline = time.time() + 120
    while not list((run_dir / "tb").glob("events.*")) and time.time() < deadline:
        time.sleep(0.05)
    return proc


def test_ctrl_c_in_train_saves_and_the_printed_command_resumes_the_same_run(tiny_grid, tmp_path):
    run_dir = tmp_path / "stopped"
    # No periodic checkpoint: what resumes is the one Ctrl-C writes. A constant learning rate,
    # since the interrupted run does not know where the straight one stops.
    keys = {**SMALL, "max_steps": 100000, "lr_schedule": "constant", "checkpoint_every": 100000}
    sets = [x for k, v in keys.items() for x in ("--set", f"{k}={v}")]
    proc = training_started(tiny_grid, run_dir, sets)
    time.sleep(1.0)  # some steps, then Ctrl-C
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = torch.load(run_dir / "latest.pt", weights_only=True)["step"]
    assert step > 0
    resume = err.strip().splitlines()[-1].strip()
    assert resume.startswith("psf train ") and resume.endswith("--resume") and "Interrupted at step" in err, err
    end = step + 13  # past at least two logs and one validation
    # Both runs in a subprocess with one thread: CPU kernels sum in another order with more threads.
    straight = tmp_path / "straight"
    sets_end = [x if x != "max_steps=100000" else f"max_steps={end}" for x in sets]
    subprocess.run(
        CLI + ["train", "--data", str(tiny_grid), "--run-dir", str(straight)] + sets_end,
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        CLI + shlex.split(resume)[1:] + ["--set", f"max_steps={end}"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(straight / "latest.pt", weights_only=True)
    b = torch.load(run_dir / "latest.pt", weights_only=True)
    assert b["step"] == end
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    for tag in ("loss_all", "val_mse"):  # the curves too, also the mean of the window the stop cut in two
        sa, sb = sorted(scalars(straight, tag)), sorted(scalars(run_dir, tag))
        assert [s for s, _ in sa] == [s for s, _ in sb]
        np.testing.assert_allclose([v for _, v in sa], [v for _, v in sb], rtol=1e-6)


def test_train_names_its_checkpoints_and_the_eval_command(tiny_grid, tmp_path):
    result = run_cli(
        [
            "train",
            "--data",
            str(tiny_grid),
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "max_steps=10",
            *[x for k, v in SMALL.items() if k != "max_steps" for x in ("--set", f"{k}={v}")],
        ]
    )
    assert result.exit_code == 0, result.output
    assert f"checkpoints: {tmp_path / 'r' / 'latest.pt'}" in result.output
    nxt = next(line for line in result.output.splitlines() if line.startswith("next: "))
    # best.pt, chosen on the validation points: the checkpoint honest to score on the test points
    assert shlex.split(nxt, comments=True)[1:5] == ["psf", "eval", "--checkpoint", str(tmp_path / "r" / "best.pt")]
    assert str(tiny_grid) in nxt and nxt.endswith("# scores the test points, never seen in training nor used to choose "
                                                   "the checkpoint")  # fmt: skip
    assert f"{tmp_path / 'r' / 'best.pt'} (lowest error on the validation points)" in result.output


def test_ctrl_c_in_generate_prints_the_resume_command(tmp_path):
    out = tmp_path / "g.h5"
    # One point per block, 8x8 at 2 depths: 128 blocks, seconds of tracing even on an idle CPU.
    args = tiny_args(out, grid_size=8, spp=4000, block_rays=4000, heldout=0, noise_points=0)
    args.append("--overwrite")  # as a user who restarts a run would; the resume command must not repeat it
    # SIGINT at its default: a shell running the tests in the background starts them with it ignored,
    # and Python then keeps ignoring it (psf train sets its own handler; psf generate relies on Python's).
    proc = subprocess.Popen(CLI + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the grid finished before the signal stopped it:\n{err[-2000:]}"
    assert proc.returncode == 130, err
    again = err.strip().splitlines()[-1].strip()
    assert again.startswith("psf generate ") and f"--out {out}" in again and "--overwrite" not in again, err
    with h5py.File(out) as f:
        done, seconds = f["blocks/done"][:].astype(bool), f["blocks/seconds"][:]
    result = run_cli(shlex.split(again)[1:])  # the same command finishes the file
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert f["blocks/done"][:].all()
        np.testing.assert_array_equal(f["blocks/seconds"][:][done], seconds[done])  # kept, not traced again


def test_input_error_keeps_its_placeholders_across_processes():
    import pickle

    exc = pickle.loads(pickle.dumps(InputError("{depth_m} {x} 3 m is out; {y}", {"depth_m": "depth_m"})))
    assert str(exc) == "depth_m {x} 3 m is out; {y}"  # unknown placeholders stay as written
    assert exc.render({"depth_m": "--depth"}) == "--depth {x} 3 m is out; {y}"
    assert InputError("a {literal} brace").render({"literal": "no"}) == "a {literal} brace"  # plain messages are text


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_exits_130(tiny_grid, tmp_path):
    """A scheduler (SLURM, systemd) signals every process of the job, DataLoader workers included."""
    run_dir = tmp_path / "run"
    keys = {**SMALL, "max_steps": 100000, "checkpoint_every": 100000, "num_workers": 2}
    sets = [x for k, v in keys.items() for x in ("--set", f"{k}={v}")]
    proc = training_started(tiny_grid, run_dir, sets, start_new_session=True)  # its own process group
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and torch.load(run_dir / "latest.pt", weights_only=True)["step"] > 0


# Python's own SIGINT handling in a child: a shell that runs the tests in the background starts them with SIGINT
# ignored, and Python would keep ignoring it.
SIGINT_AT_DEFAULT = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}


def test_ctrl_c_in_psf_info_is_one_line_and_exit_130(tiny_grid):
    """A `psf info` process stopped while it summarises the file (held there, so that the signal cannot come
    after it is done): one line, exit 130, where click says `Aborted!` and exits 1."""
    held = (
        "import sys, time\n"
        "import psfgen.analysis.info as info\n"
        "def held(path):\n"
        "    print('summarising', file=sys.stderr, flush=True)\n"
        "    time.sleep(60)\n"
        "info.summary = held\n"
        "from cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", held, "info", str(tiny_grid)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **SIGINT_AT_DEFAULT)  # fmt: skip
    assert proc.stderr.readline() == "summarising\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "Interrupted.\n")


def test_ctrl_c_while_psf_starts_is_one_line_and_exit_130():
    """SIGINT while the command line loads click (a quick Ctrl-C after Enter): no traceback of the imports."""
    early = (
        "import builtins, os, signal, sys\n"
        "load = builtins.__import__\n"
        "def loading(name, *args, **kwargs):\n"
        "    if name == 'click':\n"
        "        builtins.__import__ = load\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return load(name, *args, **kwargs)\n"
        "builtins.__import__ = loading\n"
        "from cli import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", early, "info", "grid.h5"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60, **SIGINT_AT_DEFAULT)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "Interrupted.\n")


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--out", "OUT/g.h5", "--grid-size", "3", "--depths", "1", "--device", "cpu"],
        ["info", "OUT/g.h5"],
        ["train", "--data", "OUT/g.h5", "--run-dir", "OUT/run", "--device", "cpu"],
        ["eval", "--data", "OUT/g.h5", "--baselines-only", "--out", "OUT/eval"],
        ["sample", "--checkpoint", "OUT/c.pt", "--coords", "0,0", "--out", "OUT/s.npz"],
        ["render", "--checkpoint", "OUT/c.pt", "--image", "OUT/i.png", "--depth", "1", "--out", "OUT/o.png"],
        ["merge", "OUT/a.h5", "--out", "OUT/m.h5"],
    ],
    ids=lambda args: args[0],
)
def test_ctrl_c_in_every_command_is_one_line_and_exit_130(args, tmp_path, monkeypatch):
    import cli

    def ctrl_c(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "expect_file", ctrl_c)  # each command checks its files first
    result = run_cli([a.replace("OUT", str(tmp_path)) for a in args])
    assert (result.exit_code, result.stdout, result.stderr) == (130, "", "Interrupted.\n")


PIPELINE = ["generate", "info", "train", "eval", "sample", "render", "merge"]


def test_help_lists_the_commands_in_pipeline_order_each_with_its_whole_line():
    from cli import main

    result = run_cli(["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:\n")[1].splitlines()
    assert [line.split()[0] for line in listed] == PIPELINE == sorted(main.commands, key=PIPELINE.index)
    for line in listed:
        name, text = line.split(None, 1)
        assert text == main.commands[name].short_help and not text.endswith("..."), line  # whole, on one line
    assert max(map(len, result.output.splitlines())) <= 80


@pytest.mark.parametrize("name", PIPELINE)
def test_each_command_help_ends_with_examples_that_parse(name):
    from cli import main

    result = run_cli([name, "--help"])
    assert result.exit_code == 0, result.output
    last = result.output.rstrip("\n").split("\n\n")[-1]  # the help's last paragraph
    heading, examples = last.replace("\\\n", " ").split("\n", 1)
    assert heading.strip() == "Examples:", last
    commands = [shlex.split(line) for line in examples.splitlines()]
    assert commands and all(words[:2] == ["psf", name] for words in commands), examples
    for words in commands:  # options that exist, values of their types, the required ones there
        main.commands[name].make_context(name, words[2:])
    assert max(map(len, result.output.splitlines())) <= 80
