"""Grid files written before the kernel sizes' rename (schema 2: ``ks``, ``ks_small`` in their
run_params and config) read, train and evaluate as the same file written today (schema 3:
``kernel_size``, ``kernel_size_small``)."""

from __future__ import annotations

import json

import torch
from helpers import as_schema_2, assert_one_line_error, run_cli, sha, small_config, tiny_args

from psfcvae import checkpoint, evaluation, load_model, train
from psfcvae.evaluation import EvalConfig, compute_metrics
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
