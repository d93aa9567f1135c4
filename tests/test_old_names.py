"""Files and checkpoints written before the kernel sizes' rename (``ks``, ``ks_small`` ->
``kernel_size``, ``kernel_size_small``) read, train, evaluate and render as those written today.

Grid files: schema 2 named them so in run_params and config (schema 3 renamed them).
Checkpoints: schema 1 named them so in model_args, data_fingerprint and optics (schema 2 renamed them).
"""

from __future__ import annotations

import json
import shutil

import torch
from helpers import as_schema_2, assert_one_line_error, run_cli, sha, small_config, tiny_args

from psfcvae import checkpoint, evaluation, load_model, train
from psfcvae.evaluation import EvalConfig, compute_metrics
from psfcvae.optics import model_optics
from psfgen.shared import configio
from psfgen.store import open_info


def test_a_schema_2_file_reads_trains_and_evaluates_as_its_schema_3_twin(tiny_grid, tiny_run, tmp_path, monkeypatch):
    old = as_schema_2(tiny_grid, tmp_path / "old.h5")
    old_info, new_info = open_info(old), open_info(tiny_grid)
    assert (old_info.schema, new_info.schema) == (2, 3) and old_info.has_illumination
    # Read under this version's names only, with the values the file holds.
    assert old_info.kernel_size_small == 15 and old_info.config["kernel_size"] == 64
    assert old_info.config == new_info.config
    assert json.loads(old_info.attrs["run_params"]) == json.loads(new_info.attrs["run_params"])
    # psf info: the same report but for its first line (path, schema).
    shown = [run_cli(["info", str(p)]) for p in (old, tiny_grid)]
    assert shown[0].exit_code == 0 and "v2" in shown[0].output.splitlines()[0], shown[0].output
    assert shown[0].output.splitlines()[1:] == shown[1].output.splitlines()[1:]
    assert "kernel_size 64 px traced -> kernel_size_small 15 px stored" in shown[0].output
    # Resuming it is refused (its run id hashes the old names), naming --overwrite; the file untouched.
    before = sha(old)
    assert_one_line_error(
        run_cli(tiny_args(old)), f"{old} was written by an older psf generate (schema 2", "--overwrite"
    )
    assert sha(old) == before
    # Training on it gives the network, fingerprint, optics and weights that the schema-3 file gives.
    runs = [
        train(small_config(p, tmp_path / n, max_steps=2, val_every=2, checkpoint_every=2))
        for p, n in ((old, "old"), (tiny_grid, "new"))
    ]
    a, b = (torch.load(r / "latest.pt", weights_only=True) for r in runs)
    for key in ("model_args", "data_fingerprint", "optics"):
        assert a[key] == b[key], key
    assert a["data_fingerprint"]["kernel_size_small"] == 15 and a["optics"]["kernel_size"] == 64
    for name, weights in b["model"].items():
        torch.testing.assert_close(a["model"][name], weights, rtol=1e-6, atol=1e-7)
    # Evaluation: the checkpoint of the schema-3 file fits it, and every held-out figure is the same.
    model = load_model(tiny_run / "latest.pt", device="cpu")
    checkpoint.check_same_data(model.info, old_info, "checkpoint")
    cfg = {"out": str(tmp_path), "device": "cpu"}
    monkeypatch.setattr(evaluation, "_model_speed", lambda *args, **kw: 1.0)  # a timing (3 s), not compared
    metrics = [
        compute_metrics(configio.build(EvalConfig, {**cfg, "data": i.path}), i, model)[0] for i in (old_info, new_info)
    ]
    assert metrics[0]["optics"] == metrics[1]["optics"]
    assert (metrics[0]["optics"]["traced_kernel_px"], metrics[0]["optics"]["kernel_px"]) == (64, 15)
    assert metrics[0]["heldout"] == metrics[1]["heldout"] and metrics[0]["heldout"]["cvae prior mean"]


def _as_schema_1(ckpt: dict) -> dict:
    """A checkpoint as psf train wrote it before the rename (checkpoint schema 1)."""
    old = {**ckpt, "schema_version": 1}
    for entry, names in (
        ("model_args", {"kernel_size_small": "ks"}),
        ("data_fingerprint", {"kernel_size_small": "ks_small"}),
        ("optics", {"kernel_size": "ks", "kernel_size_small": "ks_small"}),
    ):
        old[entry] = {names.get(k, k): v for k, v in ckpt[entry].items()}
        assert set(names.values()) <= set(old[entry]), entry  # ckpt was written with the new names
    return old


def test_a_checkpoint_from_before_the_rename_loads_gives_the_same_psfs_and_resumes(tiny_run, tiny_grid, tmp_path):
    new = torch.load(tiny_run / "latest.pt", weights_only=True)
    assert new["schema_version"] == checkpoint.SCHEMA_VERSION == 2 and "kernel_size_small" in new["model_args"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    torch.save(_as_schema_1(new), run / "latest.pt")  # as written then: not through checkpoint.save
    old_model, new_model = load_model(run / "latest.pt", device="cpu"), load_model(tiny_run / "latest.pt", device="cpu")
    assert old_model.net.args == new_model.net.args and old_model.net.args.kernel_size_small == 15
    assert old_model.info["data_fingerprint"] == new_model.info["data_fingerprint"]
    assert model_optics(old_model) == model_optics(new_model) and model_optics(old_model)["kernel_size"] == 64
    x, y, depth = [0.0, 0.3, -0.8], [0.0, 0.5, 0.9], [0.5, 1.0, 2.0]
    psf = old_model.psf(x, y, depth)
    assert psf.shape == (3, 3, 15, 15) and torch.equal(psf, new_model.psf(x, y, depth))
    checkpoint.check_same_data(old_model.info, open_info(tiny_grid), "checkpoint")  # eval's check passes
    # psf train --resume continues it, and writes this version's checkpoint.
    train(small_config(tiny_grid, run, max_steps=42), resume=True)
    resumed = torch.load(run / "latest.pt", weights_only=True)
    assert resumed["step"] == 42 and resumed["schema_version"] == 2
    assert resumed["model_args"] == new["model_args"] and resumed["data_fingerprint"] == new["data_fingerprint"]
