"""Stage 2: the CVAE's terms and shapes, the streaming dataset, training, resume, bad input."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, SMALL, assert_one_line_error, scalars, small_config, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import distributions as dist

from cli import main
from psfcvae import CVAE, ModelArgs, TrainConfig, load_model, train
from psfcvae.model.losses import kl_loss, smooth_loss
from psfcvae.training.data import Conditions, GridBatches, make_loader
from psfgen import GridFile, generate
from psfgen.shared import configio
from psfgen.shared.errors import InputError


def test_spec_network_input_sizes():
    """With (x, y) only and the spec's defaults: 715 / 40 / 168 inputs, 4 x 512 hidden layers."""
    model = CVAE(ModelArgs(cond_dim=2))
    lin = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in lin(model.encoder)] == [715, 512, 512, 512, 512]
    assert [m.in_features for m in lin(model.prior)] == [40, 512, 512, 512, 512]
    assert [m.in_features for m in lin(model.decoder)] == [168, 512, 512, 512, 512]
    assert lin(model.encoder)[-1].out_features == 256 and lin(model.decoder)[-1].out_features == 675
    assert model.pe(torch.zeros(5, 2)).shape == (5, 40)


def test_positional_encoding_values():
    model = CVAE(ModelArgs(cond_dim=2, num_frequencies=2))
    c = torch.tensor([[0.25, -0.5]])
    pe = model.pe(c)[0]
    expect = [
        np.sin(np.pi * 0.25),
        np.sin(np.pi * -0.5),
        np.cos(np.pi * 0.25),
        np.cos(np.pi * -0.5),
        np.sin(2 * np.pi * 0.25),
        np.sin(2 * np.pi * -0.5),
        np.cos(2 * np.pi * 0.25),
        np.cos(2 * np.pi * -0.5),
    ]
    np.testing.assert_allclose(pe.numpy(), expect, atol=1e-6)


def test_decoder_output_is_a_normalised_psf():
    model = CVAE(ModelArgs(cond_dim=3, latent_dim=8, hidden_dim=32, num_layers=2))
    torch.manual_seed(0)
    out = model.decode(torch.randn(7, 8) * 5, torch.rand(7, 3) * 2 - 1)
    assert out.shape == (7, 3, 15, 15)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=(-2, -1)), torch.ones(7, 3), atol=1e-5, rtol=0)
    samples = model.sample_from_prior(torch.zeros(4, 3))
    assert samples.shape == (4, 3, 15, 15)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(6, 5) for _ in range(4))
    q = dist.Independent(dist.Normal(mu_q, (0.5 * lv_q).exp()), 1)
    p = dist.Independent(dist.Normal(mu_p, (0.5 * lv_p).exp()), 1)
    torch.testing.assert_close(kl_loss(mu_q, lv_q, mu_p, lv_p), dist.kl_divergence(q, p).mean())


def test_smoothness_matches_brute_force(tiny_grid):
    grid = GridFile.open(tiny_grid)
    for use_depth in (False, True):
        conds = Conditions(grid.coords, grid.depths, grid.neighbors, use_depth, "cpu")
        model = CVAE(ModelArgs(cond_dim=3 if use_depth else 2, latent_dim=4, hidden_dim=16, num_layers=1))
        point = torch.tensor([0, 5, 15, 6, 9])
        depth = torch.tensor([0, 1, 1, 0, 1])
        src, nbr_cond = conds.pairs(point, depth)
        mu_p, _ = model.prior_params(conds(point, depth))
        mu_nbr, _ = model.prior_params(nbr_cond)
        got = smooth_loss(mu_p, src, mu_nbr)
        # Brute force: every table pair touching a batch point, at its depth; plus adjacent depths.
        terms = []
        for b, (g, d) in enumerate(zip(point.tolist(), depth.tolist())):
            for i, j in grid.neighbors.tolist():
                if g in (i, j):
                    other = j if g == i else i
                    mu_o, _ = model.prior_params(conds(torch.tensor([other]), torch.tensor([d])))
                    terms.append(((mu_p[b] - mu_o[0]) ** 2).sum())
            if use_depth:
                for d2 in (d - 1, d + 1):
                    if 0 <= d2 < 2:
                        mu_o, _ = model.prior_params(conds(torch.tensor([g]), torch.tensor([d2])))
                        terms.append(((mu_p[b] - mu_o[0]) ** 2).sum())
        assert len(terms) == len(src)
        torch.testing.assert_close(got, torch.stack(terms).mean())


def test_dataset_streams_every_psf_once_per_epoch_with_2_workers(tiny_grid):
    info = GridFile.open(tiny_grid)
    with h5py.File(tiny_grid) as f:
        grid = f["grid/psf"][:]
    ds = GridBatches(info, batch_size=8, read_run=4, seed=1, in_memory=False)
    n = len(ds)  # batches per epoch: 32 PSFs / 8
    assert n == 4
    batches = []
    for b, batch in zip(range(2 * n), make_loader(ds, start=0, num_workers=2)):
        batches.append(batch)
    single = [ds[g] for g in range(2 * n)]
    for a, b in zip(batches, single):  # same order and content as in one process
        torch.testing.assert_close(a["psf"], b["psf"])
    for epoch in range(2):
        seen = torch.cat([torch.stack([x["plane"], x["point"]], 1) for x in batches[epoch * n : (epoch + 1) * n]])
        assert len({tuple(r) for r in seen.tolist()}) == 32
    for batch in batches:
        np.testing.assert_array_equal(batch["psf"].numpy(), grid[batch["plane"].numpy(), batch["point"].numpy()])
    assert not torch.equal(batches[0]["point"], batches[n]["point"]) or not torch.equal(
        batches[0]["plane"], batches[n]["plane"]
    )
    mem = GridBatches(info, batch_size=8, read_run=4, seed=1, in_memory=True)
    torch.testing.assert_close(mem[5]["psf"], single[5]["psf"])


def test_loss_falls_and_event_file_holds_every_tag(tiny_grid, tmp_path):
    run_dir = train(small_config(tiny_grid, tmp_path / "run", max_steps=80))
    loss = scalars(run_dir, "loss_all")  # spp-2000 PSFs: the Monte Carlo noise bounds how far it can fall
    assert loss[-1][1] < 0.8 * loss[0][1], loss
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tags = ea.Tags()
    for tag in (
        "loss_all",
        "loss_recon",
        "loss_kl",
        "loss_smooth",
        "val_mse",
        "learning_rate",
        "grad_norm",
        "val_prior_mse",
        "val_points_rel_l2",
    ):
        assert tag in tags["scalars"], tag
    for tag in ("val_psf_gt", "val_psf_recon", "val_psf_prior"):
        assert tag in tags["images"], tag
        img = ea.Images(tag)[-1]
        assert img.width == img.height == 4 * 16 - 1  # 4 x 4 kernels of 15 px, 1 px gaps
    _check_dashboard(run_dir)
    for name in ("latest.pt", "best.pt", "config.yaml"):
        assert (run_dir / name).exists()
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    assert ckpt["step"] == 80 and ckpt["config"]["latent_dim"] == 8 and "torch" in ckpt["versions"]
    assert ckpt["data_fingerprint"]["run_id"] == GridFile.open(tiny_grid).run_id


def _check_dashboard(run_dir):
    """The custom-scalars layout names exactly the scalars logged; the comparison images are
    readable; the hyper-parameters live in the run itself; README documents every tag."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    from psfcvae.training import tblog

    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charted = {t for cat in layout.category for chart in cat.chart for t in chart.multiline.tag}
    assert [c.title for c in layout.category] == ["losses", "validation", "optimisation"]
    assert charted == set(ea.Tags()["scalars"]), charted ^ set(ea.Tags()["scalars"])
    # gt | recon | prior: three 63-px mosaics upsampled to >= 256 px (x5 = 315), two 4-px gaps.
    img = ea.Images("val_psf_compare")[-1]
    assert (img.width, img.height) == (3 * 315 + 2 * 4, 315)
    ho = ea.Images("val_points_compare")[-1]  # the 4 validation points: 2 rows of 4 kernels, x9 (>= 512 px)
    assert (ho.width, ho.height) == (9 * (4 * 16 - 1), 9 * (2 * 15 + 1))
    assert not (run_dir / "tb" / "hparams").exists()  # no second run of one-point charts
    start = plugin_data_pb2.HParamsPluginData()
    start.ParseFromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["latent_dim"].number_value == 8
    readme = (ROOT / "README.md").read_text()
    for tag in [*ea.Tags()["scalars"], *ea.Tags()["images"]]:
        assert f"`{tag}`" in readme, tag
    assert (
        set(tblog.LOSSES + tblog.VALIDATION_MSE + tblog.VALIDATION_REL + tblog.OPTIMISATION + tblog.ILLUMINATION)
        | {tblog.BLENDED}  # this run fits a blend
        == charted
    )
    assert tblog.BLENDED not in str(tblog.layout(blended=False))  # a run without one logs no blended score


def test_resume_after_kill_equals_uninterrupted_run(tiny_grid, tmp_path):
    killed = tmp_path / "killed"
    args = ["train", "--data", str(tiny_grid), "--run-dir", str(killed)]
    # A constant learning rate: the killed run does not know where the other one stops.
    sets = [
        x for k, v in {**SMALL, "max_steps": 100000, "lr_schedule": "constant"}.items() for x in ("--set", f"{k}={v}")
    ]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "-q"] + args + sets, cwd=ROOT)
    deadline = time.time() + 120
    while not (killed / "latest.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(killed / "latest.pt", weights_only=True)["step"]
    assert step >= 10 and step % 10 == 0
    end = step + 20
    straight = train(small_config(tiny_grid, tmp_path / "straight", max_steps=end, lr_schedule="constant"))
    resumed = train(small_config(tiny_grid, killed, max_steps=end, lr_schedule="constant"), resume=True)
    a = torch.load(straight / "latest.pt", weights_only=True)
    b = torch.load(resumed / "latest.pt", weights_only=True)
    assert b["step"] == end
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    for tag in ("loss_all", "val_mse"):
        sa, sb = sorted(scalars(straight, tag)), sorted(scalars(resumed, tag))  # by step; purged steps gone
        assert [s for s, _ in sa] == [s for s, _ in sb]
        np.testing.assert_allclose([v for _, v in sa], [v for _, v in sb], rtol=1e-6)


def test_resume_with_cosine_schedule_after_a_crash(tiny_grid, tmp_path, monkeypatch):
    """The same, with the default cosine schedule: a run that dies after its step-10
    checkpoint, resumed, ends where an uninterrupted run of the same length does."""
    from psfcvae import checkpoint as ckpt_module

    straight = train(small_config(tiny_grid, tmp_path / "straight", max_steps=30))
    real_save = ckpt_module.save

    def save_then_die(path, payload):
        real_save(path, payload)
        if path.name == "latest.pt" and payload["step"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tiny_grid, tmp_path / "crashed", max_steps=30))
    monkeypatch.setattr(ckpt_module, "save", real_save)
    resumed = train(small_config(tiny_grid, tmp_path / "crashed", max_steps=30), resume=True)
    a = torch.load(straight / "latest.pt", weights_only=True)["model"]
    b = torch.load(resumed / "latest.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Resuming a finished run changes nothing.
    before = (resumed / "latest.pt").read_bytes(), sorted((resumed / "tb").rglob("*"))
    train(small_config(tiny_grid, resumed, max_steps=30), resume=True)
    assert ((resumed / "latest.pt").read_bytes(), sorted((resumed / "tb").rglob("*"))) == before


def test_bad_grid_data_is_named_and_a_non_finite_loss_stops_naming_the_step(tiny_grid, tmp_path, monkeypatch):
    bad = tmp_path / "nan.h5"
    shutil.copy(tiny_grid, bad)
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
    for value, what in ((np.nan, "NaN or inf"), (-0.01, "negative values"), (0.0, "no energy")):
        with h5py.File(bad, "r+") as f:
            f["grid/psf"][:] = f["grid/psf"][:].clip(0, None) if value else f["grid/psf"][:]
            f["grid/psf"][1, 3] = value
        result = CliRunner().invoke(main, ["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")] + sets)
        assert_one_line_error(result, "point 3, depth 2 m, channel R", what)
        assert not (tmp_path / "r").exists()
        shutil.copy(tiny_grid, bad)
    from psfcvae.model import cvae as model_module
    from psfcvae.training.loop import TrainingError

    monkeypatch.setattr(model_module, "recon_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match="loss became non-finite at step 1 .*the data passed their checks"):
        train(small_config(tiny_grid, tmp_path / "r2"))


def test_damaged_grid_files_are_one_line(tiny_grid, tmp_path):
    bad = tmp_path / "bad.h5"
    for edit, needle in (
        (lambda f: f.__delitem__("grid/psf"), "dataset grid/psf is missing"),
        (lambda f: f.attrs.__setitem__("run_params", "{not json"), "run_params"),
        (lambda f: f["noise/index"].__setitem__(0, 99), "noise/index holds 99"),
        (lambda f: f["grid/neighbors"].__setitem__((0, 1), -5), "grid/neighbors holds -5"),
        (lambda f: f["heldout/part"].__setitem__(2, 7), "heldout/part holds values other than 0 (validation)"),
    ):
        shutil.copy(tiny_grid, bad)
        with h5py.File(bad, "r+") as f:
            edit(f)
        for args in (["info", str(bad)], _train_args(bad, tmp_path / "r")):
            assert_one_line_error(CliRunner().invoke(main, args), "is damaged", needle)
        assert not (tmp_path / "r").exists()


def test_non_finite_weights_are_never_saved_or_loaded(tiny_grid, tiny_run, tmp_path, monkeypatch):
    # A step can leave non-finite weights behind a finite loss (an overflowing update):
    # inject one into the optimiser's step and check that no checkpoint takes it.
    from psfcvae.training.loop import TrainingError

    step = torch.optim.Adam.step

    def overflowing_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    with pytest.raises(TrainingError, match="weights became non-finite by step 1"):
        train(small_config(tiny_grid, tmp_path / "r", max_steps=2, checkpoint_every=1))
    assert not (tmp_path / "r" / "latest.pt").exists()
    monkeypatch.undo()
    assert_one_line_error(
        CliRunner().invoke(main, _train_args(tiny_grid, tmp_path / "r2", "--set", "learning_rate=inf")),
        "'learning_rate' must be a positive, finite number",
    )
    ckpt = torch.load(tiny_run / "latest.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="non-finite weights"):
        load_model(tmp_path / "nan.pt")


def _train_args(data, run_dir, *extra):
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
    return ["train", "--data", str(data), "--run-dir", str(run_dir)] + sets + list(extra)


def test_bad_input(tiny_grid, tmp_path):
    run = lambda args: CliRunner().invoke(main, args)
    assert_one_line_error(run(_train_args(tmp_path / "none.h5", tmp_path / "r")), "does not exist", "psf generate")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    assert_one_line_error(run(_train_args(foreign, tmp_path / "r")), "not a psf-cvae grid file")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    assert_one_line_error(run(_train_args(text, tmp_path / "r")), "--data expects a grid file", "is not an HDF5 file")
    unfinished = tmp_path / "unfinished.h5"
    shutil.copy(tiny_grid, unfinished)
    with h5py.File(unfinished, "r+") as f:
        f["blocks/done"][3] = 0
    assert_one_line_error(run(_train_args(unfinished, tmp_path / "r")), "unfinished", "run the same 'psf generate'")
    assert_one_line_error(
        run(_train_args(tiny_grid, tmp_path / "r", "--set", "latnt_dim=3")), "unknown key 'latnt_dim'"
    )
    assert_one_line_error(run(_train_args(tiny_grid, tmp_path / "r", "--set", "batch_size=0")), "'batch_size'")
    assert_one_line_error(
        run(_train_args(tiny_grid, tmp_path / "r", "--set", "kernel_size_small=11")), "kernel_size_small"
    )
    assert not (tmp_path / "r").exists()
    # A finished run: refused without --resume; --resume on another dataset refused.
    assert run(_train_args(tiny_grid, tmp_path / "r", "--set", "max_steps=5")).exit_code == 0
    assert_one_line_error(run(_train_args(tiny_grid, tmp_path / "r")), "already holds a run", "--resume")
    other = tmp_path / "other.h5"
    from conftest import tiny_config

    from psfgen import generate

    generate(tiny_config(other, seed=99, heldout=0, noise_points=0))
    before = (tmp_path / "r" / "latest.pt").read_bytes()
    assert_one_line_error(run(_train_args(other, tmp_path / "r", "--resume")), "trained on another dataset")
    assert (tmp_path / "r" / "latest.pt").read_bytes() == before
    assert_one_line_error(run(_train_args(tiny_grid, tmp_path / "new", "--resume")), "nothing to resume")


def test_spec_encoding_aliases_field_edges_and_pe_scale_separates_them():
    edges = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    spec = CVAE(ModelArgs(cond_dim=2)).pe(edges)
    torch.testing.assert_close(spec[0], spec[1], atol=1e-3, rtol=0)  # why pe_scale exists (float32 at 2^9 pi)
    scaled = CVAE(ModelArgs(cond_dim=2, pe_scale=0.5)).pe(edges)
    assert (scaled[0] - scaled[1]).abs().max() > 1.0


def test_prior_recon_term_and_weights():
    torch.manual_seed(0)
    args = ModelArgs(
        cond_dim=2,
        latent_dim=4,
        hidden_dim=16,
        num_layers=1,
        recon_weight=2.0,
        kl_weight=0.5,
        smooth_weight=0.0,
        prior_recon_weight=3.0,
    )
    model = CVAE(args)
    psf = torch.rand(5, 3, 15, 15)
    psf = psf / psf.sum(dim=(-2, -1), keepdim=True)
    cond = torch.rand(5, 2) * 2 - 1
    out = model(psf, cond)
    mu_p, _ = model.prior_params(cond)
    torch.testing.assert_close(out.recon_prior, torch.mean((model.decode(mu_p, cond) - psf) ** 2))
    torch.testing.assert_close(out.loss, 2.0 * out.recon + 0.5 * out.kl + 3.0 * out.recon_prior)
    assert CVAE(ModelArgs(cond_dim=2, latent_dim=4, hidden_dim=16, num_layers=1))(psf, cond).recon_prior == 0


def test_scale_term_pins_the_decoders_sum_that_normalisation_leaves_free():
    torch.manual_seed(0)
    args = ModelArgs(
        cond_dim=2,
        latent_dim=4,
        hidden_dim=16,
        num_layers=1,
        recon_weight=1.0,
        kl_weight=0.0,
        smooth_weight=0.0,
        prior_recon_weight=0.0,
        scale_weight=2.0,
    )
    model = CVAE(args)
    psf = torch.rand(5, 3, 15, 15)
    psf = psf / psf.sum(dim=(-2, -1), keepdim=True)
    cond = torch.rand(5, 2) * 2 - 1
    torch.manual_seed(1)
    out = model(psf, cond)
    torch.manual_seed(1)  # the same reparameterisation noise: z again
    mu_q, logvar_q = model.encode(psf, cond)
    z = mu_q + torch.randn_like(mu_q) * (0.5 * logvar_q).exp()
    raw = torch.nn.functional.softplus(model.decoder(torch.cat([z, model.pe(cond)], dim=1))).view(5, 3, -1)
    torch.testing.assert_close(out.scale, (torch.log(raw.sum(-1)) ** 2).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, out.recon + 2.0 * out.scale)
    with torch.no_grad():  # a decoder scaled up draws the same PSFs, and only the scale term sees it
        model.decoder[-1].bias += 5.0
    assert model(psf, cond).scale > out.scale


def test_learning_rate_schedules():
    const = configio.build(TrainConfig, {"learning_rate": 1e-3, "max_steps": 100, "lr_schedule": "constant"})
    assert const.lr_at(0) == const.lr_at(99) == 1e-3
    cos = configio.build(TrainConfig, {"learning_rate": 1e-3, "max_steps": 100, "lr_schedule": "cosine"})
    assert cos.lr_at(0) == pytest.approx(1e-3) and cos.lr_at(50) == pytest.approx(0.505e-3)
    assert cos.lr_at(100) == pytest.approx(1e-5)


def test_depth_frequencies_limit_the_bands_that_vary_with_depth():
    pe = CVAE(ModelArgs(cond_dim=3, num_frequencies=3, depth_frequencies=1)).pe
    near, far = pe(torch.tensor([[0.2, 0.3, 1.0]])), pe(torch.tensor([[0.2, 0.3, -0.4]]))
    changed = (near - far).abs().reshape(3, 2, 3) > 1e-6  # [band, sin/cos, coordinate]
    assert changed[0, :, 2].any() and not changed[1:, :, 2].any() and not changed[:, :, :2].any()
    assert pe(torch.zeros(1, 3)).shape == (1, 18)


def test_cvae_v1_yaml_is_the_spec():
    cfg = configio.load(TrainConfig, ROOT / "configs" / "cvae_v1.yaml")
    spec = dict(
        kernel_size_small=15,
        latent_dim=128,
        hidden_dim=512,
        num_layers=4,
        num_frequencies=10,
        batch_size=64,
        learning_rate=1e-4,
        recon_weight=1.0,
        kl_weight=1e-4,
        smooth_weight=1e-3,
        val_every=500,
        pe_scale=1.0,
        depth_frequencies=None,
        prior_recon_weight=0.0,
        lr_schedule="constant",
        condition_frame="cartesian",
    )
    assert {k: getattr(cfg, k) for k in spec} == spec
    from psfcvae.training.loop import model_args_for, resolve

    class OneDepth:  # the file facts resolve and model_args_for read: one depth, 15 px kernels
        grid_size, kernel_size_small, depths, path = 4, 15, np.array([1.0]), "x.h5"
        focus, n_focus, n_planes = np.array([np.nan]), 1, 1

    one_depth = resolve(configio.build(TrainConfig, {**configio.to_dict(cfg), "condition_on_depth": "false"}), OneDepth)
    args = model_args_for(one_depth, OneDepth)
    model = CVAE(args)
    assert (
        model.encoder[0].in_features == 715 and model.prior[0].in_features == 40 and model.decoder[0].in_features == 168
    )


def test_resume_refuses_another_data_order_and_batch_must_fit_runs(tiny_grid, tmp_path):
    run_dir = train(small_config(tiny_grid, tmp_path / "r", max_steps=10))
    with pytest.raises(InputError, match="another seed"):
        train(small_config(tiny_grid, run_dir, max_steps=20, seed=4), resume=True)
    with pytest.raises(InputError, match="multiple of read_run"):
        small_config(tiny_grid, run_dir, batch_size=12, read_run=8)
    with pytest.raises(InputError, match="'seed'"):
        small_config(tiny_grid, run_dir, seed=-1)


def test_device_for_a_process_of_several():
    from psfgen.shared.devices import resolve_device

    assert resolve_device("cpu", 1).type == "cpu"
    with pytest.raises(InputError, match="one GPU"):
        resolve_device("cuda:1", 0)
    if torch.cuda.is_available():
        assert resolve_device("cuda", 0) == torch.device("cuda:0")


def test_canonical_frame_refuses_an_encoding_that_aliases_centre_and_corner(tiny_grid, tmp_path):
    with pytest.raises(InputError, match="centre and the sensor corner"):
        train(small_config(tiny_grid, tmp_path / "r", pe_scale=1.0))


def test_max_steps_auto_grows_with_the_grid_and_a_resumed_run_keeps_its_own(tiny_grid, tmp_path):
    from psfcvae.training.loop import resolve

    auto = configio.build(TrainConfig, {})
    assert auto.max_steps == "auto"
    # 5000 steps per 7 500 grid PSFs, rounded up: the two benchmark grids (7 220 and 14 297 PSFs).
    assert [auto.with_steps_for(n).max_steps for n in (32, 7220, 7500, 7501, 14297, 15129)] == [
        5000,
        5000,
        5000,
        10000,
        10000,
        15000,
    ]
    assert configio.build(TrainConfig, {"max_steps": 300}).with_steps_for(14297).max_steps == 300
    for bad in ("many", 0):
        with pytest.raises(InputError, match="max_steps"):
            configio.build(TrainConfig, {"max_steps": bad})
    info = GridFile.open(tiny_grid)  # 2 depths x 4² = 32 PSFs
    assert resolve(auto, info).max_steps == 5000
    # On --resume, auto is the run's own number, not the rule's: a finished 10-step run stays finished.
    run_dir = tmp_path / "short"
    train(small_config(tiny_grid, run_dir, max_steps=10))
    train(small_config(tiny_grid, run_dir, max_steps="auto"), resume=True)
    resumed = torch.load(run_dir / "latest.pt", weights_only=True)
    assert resumed["step"] == 10 and resumed["config"]["max_steps"] == 10


def test_read_run_auto_draws_each_psf_on_its_own_in_memory_and_a_resumed_run_keeps_its_own(tiny_grid, tmp_path):
    from psfcvae.training.loop import resolve

    info = GridFile.open(tiny_grid)
    for bad in ("some", 0):
        with pytest.raises(InputError, match="read_run"):
            configio.build(TrainConfig, {"read_run": bad})
    streamed = {"in_memory": "false"}
    assert resolve(configio.build(TrainConfig, {}), info).read_run == 1  # a small grid is held in memory
    assert resolve(configio.build(TrainConfig, streamed), info).read_run == 8  # one HDF5 read per 8 PSFs
    assert resolve(configio.build(TrainConfig, {**streamed, "batch_size": 12}), info).read_run == 4  # fits the batch
    assert resolve(configio.build(TrainConfig, {"read_run": 2}), info).read_run == 2
    # In memory, one batch holds PSFs from all over the file, not runs of neighbours.
    auto = resolve(configio.build(TrainConfig, {"batch_size": 16}), info)
    batch = GridBatches(info, batch_size=16, read_run=auto.read_run, seed=0, in_memory=True)[0]
    flat = (batch["plane"] * info.grid_size**2 + batch["point"]).numpy()
    assert len(set(flat)) == 16 and (np.diff(flat) == 1).sum() < 4  # two runs of 8 would have 14 steps of 1
    with h5py.File(tiny_grid) as f:
        np.testing.assert_array_equal(batch["psf"].numpy(), f["grid/psf"][:][batch["plane"], batch["point"]])
    # On --resume, auto is the run's own value: a run streamed in runs of 4 resumes in runs of 4.
    run_dir = tmp_path / "run"
    train(small_config(tiny_grid, run_dir, max_steps=4, in_memory="false", batch_size=12))
    train(small_config(tiny_grid, run_dir, max_steps=6, batch_size=12), resume=True)  # in memory now
    resumed = torch.load(run_dir / "latest.pt", weights_only=True)
    assert resumed["step"] == 6 and resumed["config"]["read_run"] == 4


def test_a_checkpoint_of_another_schema_is_refused_in_one_line(tiny_run, tiny_grid, tmp_path):
    from psfcvae import checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    latest = run_dir / "latest.pt"
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["schema_version"] == checkpoint.SCHEMA_VERSION == 12
    sample = [
        "sample",
        "--checkpoint",
        str(latest),
        "--coords",
        "0,0",
        "--depth",
        "1",
        "--out",
        str(tmp_path / "p.npy"),
    ]
    for version, which in ((checkpoint.SCHEMA_VERSION - 1, "an earlier"), (checkpoint.SCHEMA_VERSION + 1, "a later")):
        torch.save({**ckpt, "schema_version": version}, latest)
        before = latest.read_bytes()
        want = f"checkpoint {latest} has schema version {version} ({which} psf-cvae); retrain with 'psf train'"
        assert_one_line_error(CliRunner().invoke(main, _train_args(tiny_grid, run_dir, "--resume")), want)
        assert_one_line_error(CliRunner().invoke(main, sample), want)
        assert latest.read_bytes() == before and not (tmp_path / "p.npy").exists()


def test_a_checkpoint_with_other_keys_is_refused(tiny_run, tiny_grid, tmp_path):
    # Within one schema a checkpoint holds exactly this version's keys: no default fills one in.
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    latest = run_dir / "latest.pt"
    ckpt = torch.load(latest, weights_only=True)
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "scale_weight"}}, latest)
    assert_one_line_error(
        CliRunner().invoke(main, _train_args(tiny_grid, run_dir, "--resume")),
        f"checkpoint {latest} holds config keys of another psf-cvae",
    )
    torch.save({**ckpt, "model_args": {k: v for k, v in ckpt["model_args"].items() if k != "scale_weight"}}, latest)
    with pytest.raises(InputError, match="does not match this version's network"):
        load_model(latest)


def test_removed_options_and_a_zero_illumination_weight_are_refused_naming_the_key(tiny_grid, tmp_path):
    # Measured and not kept (docs/design.md, "Options measured and removed"); the illumination
    # head is part of every model.
    for key, value in (
        ("output", "softmax"),
        ("decoder_rank", 64),
        ("relative_loss", "true"),
        ("warmup_steps", 100),
        ("rotation", "bilinear"),
    ):
        result = CliRunner().invoke(main, _train_args(tiny_grid, tmp_path / "r", "--set", f"{key}={value}"))
        assert_one_line_error(result, f"unknown key '{key}'")
        with pytest.raises(InputError, match=f"unknown key '{key}' in config"):
            configio.build(TrainConfig, {key: value})
    for weight in (0, -1):
        result = CliRunner().invoke(
            main, _train_args(tiny_grid, tmp_path / "r", "--set", f"illumination_weight={weight}")
        )
        assert_one_line_error(result, "illumination_weight", f"must be a positive, finite number, got {float(weight)}")
    assert not (tmp_path / "r").exists()


def test_the_run_records_its_config_resolved_for_the_file(tiny_run):
    # Every auto decided once, for the file: config.yaml and each checkpoint hold the decision.
    want = {
        "grid_size": 4,
        "max_steps": 40,
        "condition_on_depth": "true",  # two depths
        "condition_frame": "canonical",  # the default lens is rotationally symmetric
        "in_memory": "true",  # a few kB
    }
    saved = configio.load(TrainConfig, tiny_run / "config.yaml")
    ckpt = torch.load(tiny_run / "latest.pt", weights_only=True)
    assert {k: getattr(saved, k) for k in want} == {k: ckpt["config"][k] for k in want} == want
    assert ckpt["model_args"]["frame"] == "canonical" and ckpt["model_args"]["cond_dim"] == 3


def test_best_pt_is_chosen_on_the_validation_points_alone(tiny_grid, tiny_run, tmp_path):
    """The test points never choose a checkpoint: in a copy of the file whose test points hold another reference
    (flat PSFs, another illumination), the same run writes best.pt at the same step with the same score and logs
    the same validation scalars. Each checkpoint records the validation points that chose it."""
    from psfgen.plan.grid import TEST, VALIDATION

    info = GridFile.open(tiny_grid)
    test = info.heldout_part == TEST
    assert test.sum() == 4 and (~test).sum() == 4
    changed = tmp_path / "changed.h5"
    shutil.copy(tiny_grid, changed)
    k = info.kernel_size_small
    with h5py.File(changed, "r+") as f:
        for half in "ab":
            psf, illum = f[f"heldout/psf_{half}"][:], f[f"heldout/illumination_{half}"][:]
            psf[test] = 1.0 / k**2  # still a PSF: each channel sums to 1
            illum[test] = 0.25
            f[f"heldout/psf_{half}"][:], f[f"heldout/illumination_{half}"][:] = psf, illum
    # The change is one a score on the test points would see: the trained model's error there moves.
    model, other = load_model(tiny_run / "best.pt"), GridFile.open(changed).heldout("test")
    mine = info.heldout("test")
    pred = model.psf(mine["coords"][:, 0], mine["coords"][:, 1], mine["depth"], allow_extrapolation=True).numpy()
    from psfgen.shared.metrics import rel_l2

    assert abs(rel_l2(pred, mine["ref"]).mean() - rel_l2(pred, other["ref"]).mean()) > 0.1
    run_dir = train(small_config(changed, tmp_path / "run"))
    a, b = (torch.load(d / "best.pt", weights_only=True) for d in (tiny_run, run_dir))
    assert (a["step"], a["best_val"]) == (b["step"], b["best_val"])
    for tag in ("val_points_rel_l2", "val_blended_rel_l2", "val_points_mse", "val_points_illumination_abs"):
        assert scalars(tiny_run, tag) == scalars(run_dir, tag), tag
    # What chose it: the file's validation points, by the network's relative L2; latest.pt records the same points.
    val = np.column_stack([info.heldout_coords, info.heldout_depth])[info.heldout_part == VALIDATION]
    assert a["selection"]["points"] == val.tolist() and a["selection"]["part"] == "validation"
    assert a["selection"]["metric"] == "val_points_rel_l2" and a["selection"]["data_run_id"] == info.run_id
    assert a["selection"]["chosen_by"] == "lowest val_points_rel_l2"
    latest = torch.load(tiny_run / "latest.pt", weights_only=True)["selection"]
    assert latest["chosen_by"] == "last step saved" and latest["points"] == val.tolist()


def test_the_kernel_side_is_the_files_unless_the_config_names_another(tmp_path):
    grid = generate(tiny_config(tmp_path / "k9.h5", kernel_size=36, kernel_size_small=9, depths=(1.0,)))
    run = train(small_config(grid, tmp_path / "r", max_steps=2, val_every=2, checkpoint_every=2))
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    assert ckpt["model_args"]["kernel_size_small"] == 9 and ckpt["config"]["kernel_size_small"] == 9
    assert load_model(run / "latest.pt").psf(0.2, 0.1).shape == (1, 3, 9, 9)
    with pytest.raises(InputError, match=r"config kernel_size_small is 15 but .* holds 9x9 PSFs"):
        train(small_config(grid, tmp_path / "r2", max_steps=2, kernel_size_small=15))
