"""``psfcvae.train(config)``: the training loop, top to bottom.

Set up (data, model, optimiser, maybe a checkpoint to resume), then one loop that steps,
logs, validates and checkpoints in plain order. Batch ``g`` of the data depends only on
(seed, g) and the random state is saved in every checkpoint, so ``resume`` continues the
very same run: same step count, same data order, same TensorBoard curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from psfgen import symmetry
from psfgen.shared import configio, locking
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2
from psfgen.shared.provenance import now, versions
from psfgen.store import GridFile

from . import checkpoint, interrupt, optics, tblog
from .config import TrainConfig
from .data import (
    Conditions,
    GridBatches,
    lit_only,
    make_loader,
)
from .images import mosaic
from .model import CVAE, ModelArgs

log = logging.getLogger(__name__)

IN_MEMORY_AUTO_LIMIT = 2 * 2**30  # bytes: 'auto' holds grids below this in RAM


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line."""


def model_args_for(cfg: TrainConfig, info: GridFile) -> ModelArgs:
    """The network for this config on this file; checks the file fits the config."""
    if cfg.grid_size is not None and cfg.grid_size != info.grid_size:
        raise InputError(
            f"config grid_size is {cfg.grid_size} but {info.path} has a {info.grid_size}x{info.grid_size} grid"
        )
    if cfg.kernel_size_small != info.kernel_size_small:
        raise InputError(
            f"config kernel_size_small is {cfg.kernel_size_small} but {info.path} holds "
            f"{info.kernel_size_small}x{info.kernel_size_small} PSFs; set kernel_size_small: {info.kernel_size_small}"
        )
    use_depth = {"auto": len(info.depths) > 1, "true": True, "false": False}[cfg.condition_on_depth]
    frame, scale = resolve_frame(cfg.condition_frame, info)
    if frame == "canonical" and cfg.pe_scale > 0.5:
        raise InputError(
            f"pe_scale {cfg.pe_scale} with the canonical frame gives the centre and the sensor corner the same "
            "encoding (their codes are -1 and +1); use pe_scale 0.5 or less, or condition_frame: cartesian"
        )
    return ModelArgs(
        kernel_size_small=info.kernel_size_small,
        cond_dim=3 if use_depth else 2,
        latent_dim=cfg.latent_dim,
        hidden_dim=cfg.hidden_dim,
        num_layers=cfg.num_layers,
        num_frequencies=cfg.num_frequencies,
        pe_scale=cfg.pe_scale,
        depth_frequencies=cfg.depth_frequencies,
        depth_min=float(info.depths.min()),
        depth_max=float(info.depths.max()),
        recon_weight=cfg.recon_weight,
        kl_weight=cfg.kl_weight,
        smooth_weight=cfg.smooth_weight,
        prior_recon_weight=cfg.prior_recon_weight,
        relative_loss=cfg.relative_loss,
        output=cfg.output,
        scale_weight=cfg.scale_weight,
        frame=frame,
        # Settings of the canonical decoder only: at their defaults otherwise, so they never
        # make two identical cartesian networks look different (on --resume).
        supersample=cfg.supersample if frame == "canonical" else ModelArgs.supersample,
        rotation=cfg.rotation if frame == "canonical" else ModelArgs.rotation,
        decoder_rank=cfg.decoder_rank if frame == "canonical" else None,
        field_scale=scale,
        **illumination_args(cfg, info),
    )


def illumination_args(cfg: TrainConfig, info: GridFile) -> dict:
    """The illumination head's ModelArgs: on when the file measured illumination and its weight is above 0."""
    on = cfg.illumination_weight > 0
    return {"illumination": on, "illumination_weight": cfg.illumination_weight if on else 0.0}


def resolve_frame(choice: str, info: GridFile) -> tuple[str, tuple[float, float]]:
    """(frame, field scale) for condition_frame ``choice`` on this file.

    auto: canonical when the prescription is rotationally symmetric and the file's own
    PSFs agree under the field's mirror and quarter-turn maps within its noise floor.
    """
    if choice == "cartesian":
        return "cartesian", (1.0, 1.0)
    scale = symmetry.field_scale(info.sensor_size_mm)
    check = symmetry.check_file(info)
    if choice == "canonical":
        if not check.holds:
            log.warning(
                "condition_frame canonical on a lens that does not look rotationally symmetric (%s)", check.describe()
            )
        return "canonical", scale
    frame = "canonical" if check.holds else "cartesian"
    log.info(
        "condition frame %s: %s",
        frame,
        check.describe() if check.holds else f"not rotationally symmetric, conditioning on (x, y): {check.describe()}",
    )
    return frame, scale


@torch.no_grad()
def validate(model: CVAE, conds: Conditions, info: GridFile, heldout: dict | None, device, image_depth: int):
    """Whole-grid posterior reconstruction and prior mean; prior mean on the held-out set.

    Returns (metrics, images); images are [3, H, W] mosaics of depth ``image_depth``.
    """
    model.eval()
    P = info.grid_size**2
    sums = {"recon": 0.0, "prior": 0.0}
    images = {}
    for d in range(len(info.depths)):
        gt = info.grid_psf(d)  # [P, 3, k, k]
        recon, prior = model.predict_grid(gt, conds(torch.arange(P, device=device), torch.full((P,), d, device=device)))
        lit = conds.lit_np[d]  # dark points have no PSF to compare with
        sums["recon"] += float(((recon - gt)[lit] ** 2).mean()) if lit.any() else 0.0
        sums["prior"] += float(((prior - gt)[lit] ** 2).mean()) if lit.any() else 0.0
        if d == image_depth:
            n = info.grid_size
            images = {
                "val_psf_gt": mosaic(gt, n),
                "val_psf_recon": mosaic(recon, n),
                "val_psf_prior": mosaic(prior, n),
                "val_psf_compare": tblog.grid_comparison(gt, recon, prior, n),
            }
    D = len(info.depths)
    metrics = {"val_mse": sums["recon"] / D, "val_prior_mse": sums["prior"] / D}
    if heldout is not None and len(heldout["ref"]):
        cond = model.condition(heldout["coords"], heldout["depth"])
        pred = model.sample_from_prior(cond, mean=True).cpu().numpy()
        ref = heldout["ref"]
        metrics["val_heldout_mse"] = float(((pred - ref) ** 2).mean())
        metrics["val_heldout_rel_l2"] = float(rel_l2(pred, ref).mean())
        images["val_heldout_compare"] = tblog.heldout_comparison(ref, pred)
        if model.illumination is not None:  # relative illumination, model against traced, on the lit held-out points
            illum, _ = model.illumination.predict(cond)
            err = np.abs(illum.cpu().numpy() - heldout["illumination"])
            metrics["val_heldout_illumination_abs"] = float(err.mean())
    model.train()
    return metrics, images


def _lit_data(info: GridFile, model: CVAE, device, main_rank: bool) -> tuple[Conditions, dict | None]:
    """The grid's conditions and the held-out set, both without dark points (one log line says how many)."""
    lit = info.lit  # [D, P]
    conds = Conditions(info.coords, info.depths, info.neighbors, model.args.cond_dim == 3, device, lit)
    heldout, dark_heldout = lit_only(info.heldout()) if info.n_heldout else (None, 0)
    if model.illumination is not None:
        model.illumination.any_dark.fill_(bool((~lit).any()))
    if main_rank and not lit.all():
        log.info(
            "dark points left out: %d of %d grid PSFs (their %d neighbour pairs too) from the PSF losses, "
            "%d of %d held-out points from validation",
            (~lit).sum(),
            lit.size,
            conds.dark_pairs(info.neighbors),
            dark_heldout,
            info.n_heldout,
        )
    return conds, heldout


def _lit_terms(batch: dict, model: CVAE, device) -> dict:
    """forward()'s lit weights (None when the whole batch is lit: the spec's losses exactly) and the
    illumination head's targets."""
    terms = {"lit": None if bool(batch["lit"].all()) else batch["lit"].to(device).float()}
    if model.illumination is not None:
        terms.update(illum=batch["illum"].to(device), valid=batch["valid"].to(device))
    return terms


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process
    group from the environment: nccl on GPUs, gloo on the CPU; each rank takes the GPU of
    its LOCAL_RANK (for --device auto or cuda). Plain runs get (0, 1, the configured device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _wait_for_a_later_second(log_dir: Path) -> None:
    """TensorBoard reads event files in name order, and names start with the creation
    second: a resumed run's file must sort after the interrupted run's, or the purge of the
    steps logged after the checkpoint would come before them and miss them."""
    stamps = [
        int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()
    ]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train the CVAE on ``cfg.data``; returns the run directory.

    Under torchrun every rank runs this function: each takes its share of every global
    batch, DistributedDataParallel averages the gradients, and rank 0 alone validates,
    logs and writes checkpoints.
    """
    # --- data, model, optimiser --------------------------------------------------------
    if not cfg.data:
        raise InputError("no data file given; pass --data grid.h5 (written by 'psf generate')")
    info = GridFile.open(cfg.data)
    info.require_complete()
    info.check_grid()  # every grid PSF finite, non-negative, summing to 1: before any step is taken
    run_dir = Path(cfg.run_dir)
    ckpt = checkpoint.load(run_dir / "latest.pt") if resume and (run_dir / "latest.pt").exists() else None
    if ckpt is not None:
        cfg = _with_the_runs_own_new_keys(cfg, ckpt)
    cfg = _resolve_steps(cfg, info, ckpt)
    args = model_args_for(cfg, info)
    with _run_lock(run_dir), interrupt.stop_on_signal():  # one writer per run directory; Ctrl-C saves, then stops
        return _train(cfg, resume, info, args, run_dir, ckpt)


# Keys added after a run may have started, with the value that reproduces the older code.
OLDER_BEHAVIOUR = {
    "condition_frame": "cartesian",
    "scale_weight": 0.0,
    "output": "softplus",
    "supersample": 3,
    "rotation": "bilinear",
    "decoder_rank": None,
    "relative_loss": False,
    "warmup_steps": 0,
    "illumination_weight": 0.0,
}


def _resolve_steps(cfg: TrainConfig, info: GridFile, ckpt: dict | None) -> TrainConfig:
    """max_steps auto: on --resume the run's own number, else the rule for this grid's size."""
    if not isinstance(cfg.max_steps, str):
        return cfg
    if ckpt is not None:
        return dataclasses.replace(cfg, max_steps=int(ckpt["config"]["max_steps"]))
    num_psfs = len(info.depths) * info.grid_size**2
    cfg = cfg.with_steps_for(num_psfs)
    log.info(
        "max_steps auto: %d steps for %d grid PSFs (%d depths x %d²)",
        cfg.max_steps,
        num_psfs,
        len(info.depths),
        info.grid_size,
    )
    return cfg


def _with_the_runs_own_new_keys(cfg: TrainConfig, ckpt: dict) -> TrainConfig:
    """For --resume of a run whose checkpoint predates some config keys: those keys take
    the value that reproduces the code it started with, not today's defaults."""
    saved = ckpt["config"]
    missing = {k: v for k, v in OLDER_BEHAVIOUR.items() if k not in saved}
    if missing:
        log.info("resuming a run from an older version: %s", ", ".join(f"{k}={v}" for k, v in missing.items()))
    return dataclasses.replace(cfg, **missing)


def _run_lock(run_dir: Path):
    """The run directory's lock, taken by rank 0 alone (the ranks of one DDP run share it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    return locking.exclusive(run_dir, "psf train")


class LossWindow:
    """The training losses summed since the last log: their means are what TensorBoard shows.

    Saved in every checkpoint, so a resume between two logs logs the same means.
    """

    KEYS = ("loss_all", "loss_recon", "loss_kl", "loss_smooth", "loss_recon_prior", "loss_scale", "grad_norm")

    def __init__(self, illumination: bool, state: dict | None = None):
        self.sums = dict.fromkeys(self.KEYS + (("loss_illumination",) if illumination else ()), 0.0)
        self.n = 0
        if state is not None:
            self.sums, self.n = dict(state["sums"]), state["n"]

    def add(self, out, grad_norm) -> None:
        values = {
            "loss_all": out.loss,
            "loss_recon": out.recon,
            "loss_kl": out.kl,
            "loss_smooth": out.smooth,
            "loss_recon_prior": out.recon_prior,
            "loss_scale": out.scale,
            "grad_norm": grad_norm,
            "loss_illumination": out.illum,
        }
        for key in self.sums:
            self.sums[key] += float(values[key].detach())
        self.n += 1

    def means(self, world: int, device) -> dict:
        """The window's means, over all ranks under DDP (the loss of the whole global batch); then empty."""
        sums = self.sums
        if world > 1:
            total = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(total)
            sums = dict(zip(sums, (total / world).tolist()))
        means = {k: v / self.n for k, v in sums.items()}
        self.sums, self.n = dict.fromkeys(self.sums, 0.0), 0
        return means

    def state(self) -> dict:
        return {"sums": dict(self.sums), "n": self.n}


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """The run directory exists and holds a run exactly when resuming; an input error otherwise."""
    latest = run_dir / "latest.pt"
    if latest.exists() and not resume:
        raise InputError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if resume and not latest.exists():
        raise InputError(f"nothing to resume: {latest} does not exist; start without --resume")
    try:  # every rank, before the process group: a rank that fails here must not leave others waiting
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run directory {run_dir}: {exc.strerror}") from None


def _restore(
    ckpt: dict, cfg: TrainConfig, info: GridFile, args: ModelArgs, model, optimizer, device, run_dir: Path
) -> tuple[int, float]:
    """Load a run's latest checkpoint into model and optimizer after checking it fits: (step, best)."""
    latest = run_dir / "latest.pt"
    checkpoint.check_same_data(ckpt, info, f"checkpoint {latest}")
    if asdict(ModelArgs(**ckpt["model_args"])) != asdict(args):  # older checkpoints lack newer keys
        raise InputError(
            f"checkpoint {latest} has another network than this config; resume with the run's own "
            f"config ({run_dir}/config.yaml)"
        )
    before = ckpt["config"]
    order = [k for k in ("seed", "batch_size", "read_run") if before.get(k) != getattr(cfg, k)]
    if order:
        raise InputError(
            f"--resume with another {', '.join(order)} than the run would change its data order; "
            f"resume with the values in {run_dir}/config.yaml"
        )
    schedule = [k for k in ("learning_rate", "lr_schedule", "max_steps") if before.get(k) != getattr(cfg, k)]
    if schedule and not (schedule == ["max_steps"] and cfg.lr_schedule == "constant"):
        log.warning(
            "resuming with another %s: the learning rate from here on is not the original run's", ", ".join(schedule)
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    log.info("resuming %s at step %d", run_dir, ckpt["step"])
    return ckpt["step"], ckpt["best_val"]


def _save(path: Path, run: dict, step: int, best: float, metrics: dict, window: LossWindow) -> None:
    """Write a checkpoint of the run (``run``: model, optimizer, args, cfg, info, fingerprint, device,
    writer, latest) at ``step``: weights, optimiser, random state, config, data fingerprint, loss window."""
    model, cfg, device, latest = run["model"], run["cfg"], run["device"], run["latest"]
    # A finite loss can still step to non-finite weights; checked here, where they would be kept,
    # not every step (one device sync per tensor); the next step's loss check catches them too.
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        raise TrainingError(
            f"the weights became non-finite by step {step} (learning rate {cfg.lr_at(step - 1):.3g}); the last good "
            f"checkpoint {latest if latest.exists() else '(none yet)'} is kept; lower learning_rate"
        )
    run["writer"].flush()  # the curves up to this step reach the disk with the checkpoint (kill -9 safe)
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    checkpoint.save(
        path,
        {
            "model": model.state_dict(),
            "optimizer": run["optimizer"].state_dict(),
            "model_args": asdict(run["args"]),
            "step": step,
            "best_val": best,
            "val": metrics,
            "config": configio.to_dict(cfg),
            "data_fingerprint": run["fingerprint"],
            "versions": versions(),
            "saved_at": now(),
            "rng": rng,
            "loss_window": window.state(),  # a resume between two logs logs the same means
            "optics": optics.grid_optics(run["info"]),  # kernel pitch and sensor: what `psf render` needs
        },
    )


def _step_is_finite(out, world: int, device, step: int, latest: Path) -> None:
    """A non-finite loss stops training (every rank together, or the others would wait forever)."""
    finite = torch.isfinite(out.loss.detach())
    if world > 1:
        flag = finite.float().to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag > 0
    if not finite:
        raise TrainingError(
            f"loss became non-finite at step {step + 1} (recon {out.recon.item():.3g}, kl {out.kl.item():.3g}); "
            f"the last good checkpoint {latest if latest.exists() else '(none yet)'} is kept; lower learning_rate "
            "or kl_weight"
        )


def _train(cfg: TrainConfig, resume: bool, info: GridFile, args: ModelArgs, run_dir: Path, ckpt: dict | None) -> Path:
    """train() once the run directory is locked; ckpt: the run's latest checkpoint when resuming."""
    # --- set up: run directory, processes, model, optimiser, maybe the run to resume -----------
    latest, best_path = run_dir / "latest.pt", run_dir / "best.pt"
    _prepare_run_dir(run_dir, resume)
    rank, world, device = setup_distributed(cfg.device)
    main_rank = rank == 0
    if world > cfg.batch_size:
        raise InputError(f"{world} processes share a batch of {cfg.batch_size}: raise batch_size to at least {world}")
    torch.manual_seed(cfg.seed)
    model = CVAE(args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    step, best = _restore(ckpt, cfg, info, args, model, optimizer, device, run_dir) if resume else (0, math.inf)
    if step >= cfg.max_steps:
        log.info("%s is already at max_steps (%d); raise --max-steps to train on", run_dir, cfg.max_steps)
        if world > 1:
            dist.destroy_process_group()
        return run_dir
    net = _wrap(model, cfg, rank, world, step, device)
    if main_rank:
        configio.save_yaml(cfg, run_dir / "config.yaml")

    # --- the data, the logs ---------------------------------------------------------------
    conds, heldout = _lit_data(info, model, device, main_rank)
    loader = _loader(cfg, info, model, device, rank, world, step, run_dir)
    writer = _writer(run_dir, step, resume) if main_rank else None
    run = dict(model=model, optimizer=optimizer, args=args, cfg=cfg, info=info, device=device, writer=writer,
               latest=latest, fingerprint=checkpoint.data_fingerprint(info))  # fmt: skip

    # --- the loop ----------------------------------------------------------------------
    metrics: dict = {}
    # Under DDP each rank summed its own share of a saved window: a resumed DDP run starts a new one.
    window = LossWindow(model.illumination is not None, ckpt.get("loss_window") if ckpt and world == 1 else None)
    t0, step0 = time.perf_counter(), step
    bar = _progress_bar(cfg.max_steps, step, main_rank)
    model.train()
    for batch in loader:
        if step >= cfg.max_steps:
            break
        if signum := interrupt.requested(world, device):  # Ctrl-C or SIGTERM: save where the last step left off
            if main_rank:
                _save(latest, run, step, best, metrics, window)
            bar.close()
            raise interrupt.Interrupted(step, latest, signum)

        # forward: the batch, its neighbour pairs (both ends lit), the loss
        psf = batch["psf"].to(device, non_blocking=True)  # [B, 3, k, k]
        point, depth_index = batch["point"].to(device), batch["depth_index"].to(device)  # [B]
        pair_src, pair_cond = conds.pairs(point, depth_index)  # [Q], [Q, C]
        out = net(psf, conds(point, depth_index), pair_src, pair_cond, **_lit_terms(batch, model, device))
        _step_is_finite(out, world, device, step, latest)

        # determine and set the learning rate, then step
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)
        optimizer.step()
        step += 1

        # log the loss window's means
        window.add(out, grad_norm)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            means = window.means(world, device)  # every rank takes part under DDP
            if main_rank:
                _log_means(writer, bar, means, optimizer.param_groups[0]["lr"], step)

        # evaluate on the grid and the held-out set, and write checkpoints
        if main_rank and (step % cfg.val_every == 0 or step == cfg.max_steps):
            metrics = _validate_and_log(model, conds, info, heldout, device, writer, step)
            score = metrics.get("val_heldout_rel_l2", metrics["val_prior_mse"])
            if score < best:
                best = score
                _save(best_path, run, step, best, metrics, window)
        if main_rank and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            _save(latest, run, step, best, metrics, window)
        bar.update(1)
    bar.close()
    _finish(run, cfg, metrics, step - step0, time.perf_counter() - t0, world, main_rank, run_dir)
    return run_dir


def _progress_bar(max_steps: int, step: int, main_rank: bool) -> tqdm:
    """The steps bar, from ``step``: on the main process only, and only while INFO is logged (tqdm's own
    check hides it where stderr is not a terminal)."""
    quiet = not log.isEnabledFor(logging.INFO) or not main_rank
    return tqdm(total=max_steps, initial=step, unit="step", desc="training", disable=True if quiet else None,
                dynamic_ncols=True)  # fmt: skip


def _log_means(writer, bar, means: dict, lr: float, step: int) -> None:
    """The loss window's means and the learning rate in TensorBoard; the mean loss on the bar."""
    for key, value in means.items():
        writer.add_scalar(key, value, step)
    writer.add_scalar("learning_rate", lr, step)
    bar.set_postfix(loss=f"{means['loss_all']:.3g}", refresh=False)


def _wrap(model: CVAE, cfg: TrainConfig, rank: int, world: int, step: int, device):
    """The module the loop steps: the model, or under torchrun its DistributedDataParallel wrapper."""
    if world == 1:
        return model
    torch.manual_seed(cfg.seed + 7919 * rank + step)  # the same weights everywhere (DDP broadcasts them), other noise
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _writer(run_dir: Path, step: int, resume: bool) -> SummaryWriter:
    """The run's TensorBoard writer with its custom-scalars layout; a resumed run drops what came after ``step``."""
    if resume:
        _wait_for_a_later_second(run_dir / "tb")
    writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=step + 1 if resume else None)
    tblog.start(writer)
    return writer


def _loader(cfg: TrainConfig, info: GridFile, model: CVAE, device, rank: int, world: int, step: int, run_dir: Path):
    """Batches from ``step`` on (this rank's share), the grid in RAM or streamed; one log line says which."""
    grid_bytes = len(info.depths) * info.grid_size**2 * 3 * info.kernel_size_small**2 * 4
    in_memory = {"auto": grid_bytes < IN_MEMORY_AUTO_LIMIT, "true": True, "false": False}[cfg.in_memory]
    dataset = GridBatches(info, cfg.batch_size, cfg.read_run, cfg.seed, in_memory, rank=rank, world=world)
    (log.info if rank == 0 else log.debug)(  # once, not once per rank
        "training on %s%s: %d depths x %d points, cond %s, %s, %d parameters, run dir %s",
        device,
        f" ({world} processes)" if world > 1 else "",
        len(info.depths),
        info.grid_size**2,
        "(x, y, d)" if model.args.cond_dim == 3 else "(x, y)",
        "in memory" if in_memory else "streamed from disk",
        sum(p.numel() for p in model.parameters()),
        run_dir,
    )
    return make_loader(dataset, start=step, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")


def _validate_and_log(model: CVAE, conds, info: GridFile, heldout, device, writer, step: int) -> dict:
    """validate(), its scalars and images in TensorBoard and one log line: the metrics."""
    metrics, images = validate(model, conds, info, heldout, device, image_depth=len(info.depths) // 2)
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    for key, img in images.items():
        writer.add_image(key, img, step)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _finish(
    run: dict, cfg: TrainConfig, metrics: dict, steps: int, elapsed: float, world: int, main_rank: bool, run_dir: Path
) -> None:
    """The run's speed in the log, its hyper-parameters with their final metrics, the process group closed."""
    if main_rank:
        rate = steps / elapsed if elapsed > 0 else float("nan")
        log.info("%d steps in %.1f s (%.1f steps/s); logs: %s", steps, elapsed, rate, run_dir / "tb")
        hparams = {k: v for k, v in configio.to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}
        tblog.write_hparams(run["writer"], hparams, metrics)
        run["writer"].close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
