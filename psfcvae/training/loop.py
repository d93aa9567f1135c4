"""``psfcvae.train(config)``: the training loop, top to bottom.

``train`` decides every value the config leaves to the grid file (``resolve``: the run
records the result), checks a run to resume against it and locks the run directory;
``_train`` sets up the model, the data and the logs, then runs one loop that steps, logs,
validates and checkpoints in plain order. What is not the loop lives in small helpers
beside it, which take the run's fixed parts as one ``Run``. Batch ``g`` of the data
depends only on (seed, g) and the random state is saved in every checkpoint, so
``resume`` continues the very same run: same step count, same data order, same
TensorBoard curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from psfcvae import checkpoint, optics
from psfcvae.api import blend
from psfcvae.evaluation import baselines
from psfcvae.images import mosaic
from psfcvae.model.cvae import CVAE, ModelArgs
from psfcvae.training import interrupt, tblog
from psfcvae.training.config import READ_RUN_STREAMING, TrainConfig, check_model_size
from psfcvae.training.data import (
    Conditions,
    GridBatches,
    lit_only,
    make_loader,
)
from psfgen.analysis import symmetry
from psfgen.gridfile import GridFile
from psfgen.plan.grid import VALIDATION
from psfgen.shared import configio, locking
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError
from psfgen.shared.metrics import rel_l2
from psfgen.shared.provenance import now, versions

log = logging.getLogger(__name__)

IN_MEMORY_AUTO_LIMIT = 2 * 2**30  # bytes: 'auto' holds grids below this in RAM
# bytes: blend auto carries grids up to this (float16) in every checkpoint; a 51 x 51 grid on 33 planes is 116 MiB
BLEND_GRID_LIMIT = 2**30


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is one line."""


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train the CVAE on ``cfg.data``; returns the run directory.

    Under torchrun every rank runs this function: each takes its share of every global
    batch, DistributedDataParallel averages the gradients, and rank 0 alone validates,
    logs and writes checkpoints.
    """
    # the grid file, checked whole; the run's latest checkpoint when resuming
    if not cfg.data:
        raise InputError("no data file given; pass --data grid.h5 (written by 'psf generate')")
    info = GridFile.open(cfg.data)
    info.require_complete()
    info.check_grid()  # every grid PSF finite, non-negative, summing to 1: before any step is taken
    latest = Path(cfg.run_dir) / "latest.pt"
    ckpt = checkpoint.load(latest) if resume and latest.exists() else None
    # the config resolved for this file, its network, and whether the run to resume fits them
    cfg = resolve(cfg, info, ckpt)
    args = model_args_for(cfg, info)
    if ckpt is not None:
        _check_resume(ckpt, cfg, info, args)
    with _run_lock(Path(cfg.run_dir)), interrupt.stop_on_signal():  # one writer per run directory; Ctrl-C saves
        return _train(cfg, info, args, ckpt, resume)


# --- the config, resolved for the file -----------------------------------------------------


def resolve(cfg: TrainConfig, info: GridFile, ckpt: dict | None = None) -> TrainConfig:
    """``cfg`` with every value it leaves to the file decided for ``info``: grid_size, kernel_size_small, the auto of
    max_steps (on --resume, ``ckpt``'s own), condition_on_depth, condition_frame, in_memory and read_run. What
    the run records (config.yaml, every checkpoint). Checks the file fits the config."""
    if cfg.grid_size is not None and cfg.grid_size != info.grid_size:
        raise InputError(
            f"config grid_size is {cfg.grid_size} but {info.path} has a {info.grid_size}x{info.grid_size} grid"
        )
    if cfg.kernel_size_small is not None and cfg.kernel_size_small != info.kernel_size_small:
        raise InputError(
            f"config kernel_size_small is {cfg.kernel_size_small} but {info.path} holds "
            f"{info.kernel_size_small}x{info.kernel_size_small} PSFs; set kernel_size_small: {info.kernel_size_small}"
        )
    max_steps = _max_steps(cfg, info, ckpt)
    frame = resolve_frame(cfg.condition_frame, info)
    if frame == "canonical" and cfg.pe_scale > 0.5:
        raise InputError(
            f"pe_scale {cfg.pe_scale} with the canonical frame gives the centre and the sensor corner the same "
            "encoding (their codes are -1 and +1); use pe_scale 0.5 or less, or condition_frame: cartesian"
        )
    grid_bytes = info.n_planes * info.grid_size**2 * 3 * info.kernel_size_small**2 * 4
    resolved = dataclasses.replace(
        cfg,
        grid_size=info.grid_size,
        kernel_size_small=info.kernel_size_small,
        max_steps=max_steps,
        condition_on_depth=_decide(cfg.condition_on_depth, len(info.depths) > 1),
        condition_frame=frame,
        in_memory=_decide(cfg.in_memory, grid_bytes < IN_MEMORY_AUTO_LIMIT),
    )
    resolved = dataclasses.replace(resolved, read_run=_read_run(resolved, ckpt))
    resolved = dataclasses.replace(resolved, blend=_blend(resolved, info))
    check_model_size(resolved)  # the file's kernel side decides the decoder's output
    return resolved


def _blend(cfg: TrainConfig, info: GridFile) -> str:
    """blend decided (bicubic | none): auto is bicubic unless the model does not take the depth of a file of several
    (the blend interpolates at the query's depth, which such a model's condition lacks) or the grid, carried in
    every checkpoint, is over BLEND_GRID_LIMIT; one log line says why not."""
    blind = cfg.condition_on_depth == "false" and len(info.depths) > 1
    if cfg.blend == "bicubic" and blind:
        raise InputError.for_key(
            "blend",
            f"is bicubic, which needs the depth in the condition, but condition_on_depth is false on a file of "
            f"{len(info.depths)} depths: set blend: none, or condition_on_depth: true",
        )
    if cfg.blend != "auto":
        return cfg.blend
    size = info.n_planes * info.grid_size**2 * 3 * info.kernel_size_small**2 * 2  # float16
    if blind or size > BLEND_GRID_LIMIT:
        why = "the model does not take the depth" if blind else f"the grid would add {size / 2**30:.1f} GiB to it"
        log.info("blend auto: none (the network alone): %s", why)
        return "none"
    return "bicubic"


def _read_run(cfg: TrainConfig, ckpt: dict | None) -> int:
    """read_run auto (``cfg`` with in_memory decided): on --resume the run's own, else 1 for a grid in memory, whose
    reads cost nothing per PSF, so that a batch holds batch_size PSFs from all over the grid rather than runs of
    neighbours along a row (on the Cooke triplet's 17-depth grid the network alone erred by 2.1% instead of 2.6% at
    10 000 steps; docs/results.md), and gcd(batch_size, READ_RUN_STREAMING) for one streamed from the file, where
    each run is one contiguous HDF5 read (benchmarks/bench_loader.py)."""
    if not isinstance(cfg.read_run, str):
        return cfg.read_run
    if ckpt is not None:
        return int(ckpt["config"]["read_run"])
    return 1 if cfg.in_memory == "true" else math.gcd(cfg.batch_size, READ_RUN_STREAMING)


def _decide(choice: str, when_auto: bool) -> str:
    """An auto | true | false key decided: 'true' or 'false', auto by ``when_auto``."""
    return {"auto": "true" if when_auto else "false", "true": "true", "false": "false"}[choice]


def _max_steps(cfg: TrainConfig, info: GridFile, ckpt: dict | None) -> int:
    """max_steps auto: on --resume the run's own number, else the rule for this grid's size."""
    if not isinstance(cfg.max_steps, str):
        return cfg.max_steps
    if ckpt is not None:
        return int(ckpt["config"]["max_steps"])
    num_psfs = info.n_planes * info.grid_size**2
    steps = cfg.with_steps_for(num_psfs).max_steps
    log.info("max_steps auto: %d steps for %d grid PSFs (%s x %d²)", steps, num_psfs, _planes(info),
             info.grid_size)  # fmt: skip
    return steps


def _planes(info: GridFile) -> str:
    """'3 depths' or '4 focus settings x 3 depths': the file's planes, for the log."""
    depths = f"{len(info.depths)} depths"
    return depths if info.n_focus == 1 else f"{info.n_focus} focus settings x {depths}"


def resolve_frame(choice: str, info: GridFile) -> str:
    """The frame (canonical | cartesian) of condition_frame ``choice`` on this file.

    auto: canonical when the prescription is rotationally symmetric and the file's own
    PSFs agree under the field's mirror and quarter-turn maps within its noise floor.
    """
    if choice == "cartesian":
        return "cartesian"
    check = symmetry.check_file(info)
    if choice == "canonical":
        if not check.holds:
            log.warning(
                "condition_frame canonical on a lens that does not look rotationally symmetric (%s)", check.describe()
            )
        return "canonical"
    frame = "canonical" if check.holds else "cartesian"
    log.info(
        "condition frame %s: %s",
        frame,
        check.describe() if check.holds else f"not rotationally symmetric, conditioning on (x, y): {check.describe()}",
    )
    return frame


def model_args_for(cfg: TrainConfig, info: GridFile) -> ModelArgs:
    """The network of a resolved config (``resolve(cfg, info)``) on this file."""
    if "auto" in (cfg.condition_on_depth, cfg.condition_frame):
        raise ValueError("model_args_for takes a resolved config: resolve(cfg, info)")
    canonical = cfg.condition_frame == "canonical"
    # Several focus settings: the focus code φ is the condition's last column (linear in 1/focus, inf allowed).
    # One: no focus input, the network of a file without focus.
    has_focus = info.n_focus > 1
    focus = (
        dict(
            has_focus=True,
            focus_min=float(info.focus.min()),
            focus_max=float(info.focus.max()),
            focus_code=cfg.focus_code,
        )
        if has_focus
        else {}
    )
    return ModelArgs(
        kernel_size_small=cfg.kernel_size_small,
        cond_dim=2 + int(cfg.condition_on_depth == "true") + int(has_focus),
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
        scale_weight=cfg.scale_weight,
        frame=cfg.condition_frame,
        # Settings of the canonical frame only: at their defaults otherwise, so they never
        # make two identical cartesian networks look different (on --resume).
        supersample=cfg.supersample if canonical else ModelArgs.supersample,
        field_scale=symmetry.field_scale(info.sensor_size_mm) if canonical else ModelArgs.field_scale,
        illumination_weight=cfg.illumination_weight,
        **focus,
    )


def _check_resume(ckpt: dict, cfg: TrainConfig, info: GridFile, args: ModelArgs) -> None:
    """Refuse to resume a run that this config or file would change (its dataset, network or data
    order); warn when the learning rate from here on differs."""
    run_dir = Path(cfg.run_dir)
    latest = run_dir / "latest.pt"
    for entry, mine in (("config", configio.to_dict(cfg)), ("model_args", asdict(args))):
        if set(ckpt[entry]) != set(mine):
            raise InputError(
                f"checkpoint {latest} holds {entry} keys of another psf-cvae; retrain with this 'psf train'"
            )
    checkpoint.check_same_data(ckpt, info, f"checkpoint {latest}")
    if ckpt["selection"]["points"] != selection(info, None)["points"]:  # best.pt's score is on these points
        raise InputError(
            f"checkpoint {latest} chose best.pt on other validation points than {info.path} holds (another held-out "
            f"set); resume on the run's own data file ({run_dir}/config.yaml)"
        )
    if ckpt["model_args"] != asdict(args):
        raise InputError(
            f"checkpoint {latest} has another network than this config; resume with the run's own "
            f"config ({run_dir}/config.yaml)"
        )
    before = ckpt["config"]
    order = [k for k in ("seed", "batch_size", "read_run") if before[k] != getattr(cfg, k)]
    if order:
        raise InputError(
            f"--resume with another {', '.join(order)} than the run would change its data order; "
            f"resume with the values in {run_dir}/config.yaml"
        )
    schedule = [k for k in ("learning_rate", "lr_schedule", "max_steps") if before[k] != getattr(cfg, k)]
    if schedule and not (schedule == ["max_steps"] and cfg.lr_schedule == "constant"):
        log.warning(
            "resuming with another %s: the learning rate from here on is not the original run's", ", ".join(schedule)
        )
    log.info("resuming %s at step %d", run_dir, ckpt["step"])


# --- the loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A training run's parts that stay put while it trains: what the helpers beside the loop take."""

    cfg: TrainConfig  # resolved (resolve): no auto left
    info: GridFile
    run_dir: Path
    rank: int  # this process's rank among ``world`` (0 of 1 without torchrun)
    world: int
    device: torch.device
    model: CVAE  # the model itself, not its DDP wrapper
    optimizer: torch.optim.Optimizer
    writer: SummaryWriter | None  # TensorBoard, on the main process only
    selection: dict | None = None  # what chooses best.pt (selection()): every checkpoint records it
    validation: dict | None = None  # the lit validation points (GridFile.heldout's entries): what fits the blend
    blend_grid: torch.Tensor | None = None  # [F*D, P, 3, k, k] float16: the grid the blend takes (main only)
    conds: Conditions | None = None  # the grid points' conditions: where fit_blend asks the network too
    # a cache, not state: step -> (the blend fitted at that step, the network's PSFs at the validation points it was
    # fitted on) (fit_blend), which the validation, best.pt, latest.pt and the closing log line of that step share
    blend_fit: dict = dataclasses.field(default_factory=dict)

    @property
    def main(self) -> bool:
        """The process that validates, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def latest(self) -> Path:
        return self.run_dir / "latest.pt"


def _train(cfg: TrainConfig, info: GridFile, args: ModelArgs, ckpt: dict | None, resume: bool) -> Path:
    """train() once the config is resolved and the run directory locked; ckpt: the run's latest
    checkpoint when resuming."""
    run_dir = Path(cfg.run_dir)
    # --- the run directory, the processes (one, or this rank of a torchrun job) -------------
    _prepare_run_dir(run_dir, resume)
    rank, world, device = setup_distributed(cfg.device)
    if world > cfg.batch_size:
        raise InputError(f"{world} processes share a batch of {cfg.batch_size}: raise batch_size to at least {world}")

    # --- the model and optimiser; a resumed run takes back its weights, moments and random state
    torch.manual_seed(cfg.seed)
    model = CVAE(args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    step, best = _restore(ckpt, model, optimizer, device) if resume else (0, math.inf)
    if step >= cfg.max_steps:
        log.info("%s is already at max_steps (%d); raise --max-steps to train on", run_dir, cfg.max_steps)
        if world > 1:
            dist.destroy_process_group()
        return run_dir

    # --- the run's record (its resolved config, TensorBoard), the module the loop steps ------
    writer = _writer(run_dir, step, resume, cfg.blend == "bicubic") if rank == 0 else None
    run = Run(cfg, info, run_dir, rank, world, device, model, optimizer, writer)
    if run.main:
        configio.save_yaml(cfg, run_dir / "config.yaml")
    net = _wrap(run, step)

    # --- the data: the grid's conditions and the validation points without dark points, batches from step on
    conds, heldout = _lit_data(run)
    # the blend's grid, held once as the float16 every checkpoint stores (the main process alone writes them)
    grid = blend_grid(info, model) if cfg.blend == "bicubic" and run.main else None
    run = dataclasses.replace(run, selection=selection(info, heldout), validation=heldout, blend_grid=grid, conds=conds)
    loader = _loader(run, step)

    # --- the loop ------------------------------------------------------------------------
    metrics: dict = {}
    # Under DDP each rank summed its own share of a saved window: a resumed DDP run starts a new one.
    window = LossWindow(ckpt["loss_window"] if ckpt and world == 1 else None)
    t0, step0 = time.perf_counter(), step
    bar = _progress_bar(run, step)
    model.train()
    for batch in loader:
        if step >= cfg.max_steps:
            break
        # Ctrl-C or SIGTERM: save where the last step left off, then stop
        if signum := interrupt.requested(world, device):
            if run.main:
                _save(run, run.latest, step, best, metrics, window, LAST)
            bar.close()
            raise interrupt.Interrupted(step, run.latest, signum)

        # forward: the batch, its neighbour pairs (both ends lit), the loss
        psf = batch["psf"].to(device, non_blocking=True)  # [B, 3, k, k]
        point, plane = batch["point"].to(device), batch["plane"].to(device)  # [B]
        pair_src, pair_cond = conds.pairs(point, plane)  # [Q], [Q, C]
        out = net(psf, conds(point, plane), pair_src, pair_cond, **_lit_terms(batch, device))
        _check_finite(run, out, step)

        # set this step's learning rate, then step
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
            if run.main:
                _log_means(run, bar, means, step)

        # validate on the grid and the validation points; a better score on them writes best.pt (the test
        # points are psf eval's alone: they never choose a checkpoint)
        if run.main and (step % cfg.val_every == 0 or step == cfg.max_steps):
            metrics = _validate_and_log(run, conds, heldout, step)
            score = metrics[run.selection["metric"]]
            if score < best:
                best = score
                _save(run, run_dir / "best.pt", step, best, metrics, window, BEST)

        # checkpoint
        if run.main and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            _save(run, run.latest, step, best, metrics, window, LAST)
        bar.update(1)
    bar.close()
    _finish(run, metrics, step, step - step0, time.perf_counter() - t0)
    return run_dir


# --- set-up --------------------------------------------------------------------------------


def _run_lock(run_dir: Path):
    """The run directory's lock, taken by rank 0 alone (the ranks of one DDP run share it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    return locking.exclusive(run_dir, "psf train")


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


def _restore(ckpt: dict, model: CVAE, optimizer, device) -> tuple[int, float]:
    """Load the run's latest checkpoint (checked by _check_resume) into model, optimizer and the
    random state: (step, best held-out score)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["best_val"]


def _writer(run_dir: Path, step: int, resume: bool, blended: bool) -> SummaryWriter:
    """The run's TensorBoard writer with its custom-scalars layout (blended: the run fits a blend); a resumed run
    drops what came after ``step``."""
    if resume:
        _wait_for_a_later_second(run_dir / "tb")
    writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=step + 1 if resume else None)
    tblog.start(writer, blended)
    return writer


def _wait_for_a_later_second(log_dir: Path) -> None:
    """TensorBoard reads event files in name order, and names start with the creation
    second: a resumed run's file must sort after the interrupted run's, or the purge of the
    steps logged after the checkpoint would come before them and miss them."""
    stamps = [
        int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()
    ]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def _wrap(run: Run, step: int):
    """The module the loop steps: the model, or under torchrun its DistributedDataParallel wrapper."""
    if run.world == 1:
        return run.model
    torch.manual_seed(
        run.cfg.seed + 7919 * run.rank + step
    )  # the same weights everywhere (DDP broadcasts them), other noise
    return DistributedDataParallel(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _lit_data(run: Run) -> tuple[Conditions, dict | None]:
    """The grid's conditions and the file's validation points, both without dark points (one log line says how
    many). The test points are never read here: they are psf eval's."""
    info, model = run.info, run.model
    lit = info.lit  # [F*D, P]
    conds = Conditions(info.coords, info.depths, info.neighbors, model.args.has_depth, run.device, lit, info.focus)
    n_val = info.n_part("validation")
    heldout, dark_heldout = lit_only(info.heldout("validation")) if n_val else (None, 0)
    model.illumination.any_dark.fill_(bool((~lit).any()))
    if run.main and not lit.all():
        log.info(
            "dark points left out: %d of %d grid PSFs (their %d neighbour pairs too) from the PSF losses, "
            "%d of %d validation points from validation",
            (~lit).sum(),
            lit.size,
            conds.dark_pairs(info.neighbors),
            dark_heldout,
            n_val,
        )
    return conds, heldout


BEST, LAST = "best", "last"  # which checkpoint _save writes: the best score on the validation points, or the latest


def selection(info: GridFile, validation: dict | None) -> dict:
    """What chooses best.pt, recorded in every checkpoint: the file's validation points (part "validation" of
    GridFile.heldout) as [V, 3] (x, y, depth [m]) lists, dark ones included, and the score: the network's mean
    relative L2 there (val_points_rel_l2), or the grid's prior-mean MSE when none is lit. psf eval refuses a
    checkpoint chosen on any of the points it scores.

    The network's score, not the blended answer's (val_blended_rel_l2): the blend is refitted at every
    validation and can cover for a network that has not learned yet, so the blended score can pick an early
    step whose illumination head still lights dark points (a 150-step run of the vignetted test grid: step 50)."""
    points = np.column_stack([info.heldout_coords, info.heldout_depth])[info.heldout_part == VALIDATION]
    lit = validation is not None and len(validation["ref"]) > 0
    return {
        "part": "validation",
        "metric": "val_points_rel_l2" if lit else "val_prior_mse",
        "data_run_id": info.run_id,
        "heldout_from": info.heldout_from,  # None: the file's own held-out set
        "points": points.tolist(),
    }


def _loader(run: Run, step: int):
    """Batches from ``step`` on (this rank's share), the grid in RAM or streamed; one log line says which."""
    cfg, info = run.cfg, run.info
    in_memory = cfg.in_memory == "true"
    dataset = GridBatches(info, cfg.batch_size, cfg.read_run, cfg.seed, in_memory, rank=run.rank, world=run.world)
    (log.info if run.main else log.debug)(  # once, not once per rank
        "training on %s%s: %s x %d points, cond %s, %s, %d parameters, run dir %s",
        run.device,
        f" ({run.world} processes)" if run.world > 1 else "",
        _planes(info),
        info.grid_size**2,
        "(" + ", ".join(["x", "y"] + ["d"] * run.model.args.has_depth + ["φ"] * run.model.args.has_focus) + ")",
        "in memory" if in_memory else "streamed from disk",
        sum(p.numel() for p in run.model.parameters()),
        run.run_dir,
    )
    return make_loader(dataset, start=step, num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda")


def _progress_bar(run: Run, step: int) -> tqdm:
    """The steps bar, from ``step``: on the main process only, and only while INFO is logged (tqdm's own
    check hides it where stderr is not a terminal)."""
    quiet = not log.isEnabledFor(logging.INFO) or not run.main
    return tqdm(total=run.cfg.max_steps, initial=step, unit="step", desc="training",
                disable=True if quiet else None, dynamic_ncols=True)  # fmt: skip


# --- one step --------------------------------------------------------------------------------


def _lit_terms(batch: dict, device) -> dict:
    """forward()'s lit weights (None when the whole batch is lit: the spec's losses exactly) and the
    illumination head's targets."""
    lit = None if bool(batch["lit"].all()) else batch["lit"].to(device).float()
    return {"lit": lit, "illum": batch["illum"].to(device), "valid": batch["valid"].to(device)}


def _check_finite(run: Run, out, step: int) -> None:
    """A non-finite loss stops training (every rank together, or the others would wait forever)."""
    finite = torch.isfinite(out.loss.detach())
    if run.world > 1:
        flag = finite.float().to(run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag > 0
    if not finite:
        raise TrainingError(
            f"loss became non-finite at step {step + 1} (recon {out.recon.item():.3g}, kl {out.kl.item():.3g}); "
            f"the last good checkpoint {run.latest if run.latest.exists() else '(none yet)'} is kept; the data "
            "passed their checks (finite, in range, each channel summing to 1), so lower learning_rate or kl_weight"
        )


class LossWindow:
    """The training losses summed since the last log: their means are what TensorBoard shows.

    Saved in every checkpoint, so a resume between two logs logs the same means.
    """

    KEYS = (
        "loss_all",
        "loss_recon",
        "loss_kl",
        "loss_smooth",
        "loss_recon_prior",
        "loss_scale",
        "grad_norm",
        "loss_illumination",
    )

    def __init__(self, state: dict | None = None):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
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


def _log_means(run: Run, bar: tqdm, means: dict, step: int) -> None:
    """The loss window's means and the learning rate in TensorBoard; the mean loss on the bar."""
    for key, value in means.items():
        run.writer.add_scalar(key, value, step)
    run.writer.add_scalar("learning_rate", run.optimizer.param_groups[0]["lr"], step)
    bar.set_postfix(loss=f"{means['loss_all']:.3g}", refresh=False)


# --- validation, checkpoints, the end ------------------------------------------------------


@torch.no_grad()
def validate(model: CVAE, conds: Conditions, info: GridFile, heldout: dict | None, device, image_plane: int, keep=None):
    """Whole-grid posterior reconstruction and prior mean (the mean over every plane); prior mean and
    illumination on ``heldout``, the lit validation points, each at its own depth and focus (never the test
    points: psf eval scores those). keep(p, prior) is handed each plane's prior mean [P, 3, k, k] float32 numpy
    (what the blend's fit takes too, so that it is computed once).

    Returns (metrics, images); images are [3, H, W] mosaics of plane ``image_plane``.
    """
    model.eval()
    P = info.grid_size**2
    sums = {"recon": 0.0, "prior": 0.0}
    images = {}
    for d in range(info.n_planes):
        gt = info.grid_psf(d)  # [P, 3, k, k]
        recon, prior = model.predict_grid(gt, conds(torch.arange(P, device=device), torch.full((P,), d, device=device)))
        if keep is not None:
            keep(d, prior)
        lit = conds.lit_np[d]  # dark points have no PSF to compare with
        sums["recon"] += float(((recon - gt)[lit] ** 2).mean()) if lit.any() else 0.0
        sums["prior"] += float(((prior - gt)[lit] ** 2).mean()) if lit.any() else 0.0
        if d == image_plane:
            n = info.grid_size
            images = {
                "val_psf_gt": mosaic(gt, n),
                "val_psf_recon": mosaic(recon, n),
                "val_psf_prior": mosaic(prior, n),
                "val_psf_compare": tblog.grid_comparison(gt, recon, prior, n),
            }
    N = info.n_planes
    metrics = {"val_mse": sums["recon"] / N, "val_prior_mse": sums["prior"] / N}
    if heldout is not None and len(heldout["ref"]):
        cond = model.condition(heldout["coords"], heldout["depth"], heldout["focus"])
        pred = model.sample_from_prior(cond, mean=True).cpu().numpy()
        ref = heldout["ref"]
        metrics["val_points_mse"] = float(((pred - ref) ** 2).mean())
        metrics["val_points_rel_l2"] = float(rel_l2(pred, ref).mean())
        images["val_points_compare"] = tblog.heldout_comparison(ref, pred)
        # relative illumination, model against traced, on the lit validation points
        illum, _ = model.illumination.predict(cond)
        metrics["val_points_illumination_abs"] = float(np.abs(illum.cpu().numpy() - heldout["illumination"]).mean())
    model.train()
    return metrics, images


def _validate_and_log(run: Run, conds: Conditions, heldout: dict | None, step: int) -> dict:
    """validate(), its scalars and images in TensorBoard and one log line: the metrics."""
    info = run.info
    middle = info.plane(info.n_focus // 2, len(info.depths) // 2)  # the middle depth (at the middle focus)
    fits = run.blend_grid is not None and heldout is not None and len(heldout["ref"]) > 0
    net_grid = torch.empty(tuple(run.blend_grid.shape), dtype=torch.float16) if fits else None

    def keep(p: int, prior: np.ndarray) -> None:  # the validation's pass over the grid is the blend's fit's too
        net_grid[p] = _blend_plane(run, torch.from_numpy(prior))

    metrics, images = validate(run.model, conds, info, heldout, run.device, middle, keep if fits else None)
    if fits:
        metrics["val_blended_rel_l2"] = _blended_score(run, step, net_grid)
    for key, value in metrics.items():
        run.writer.add_scalar(key, value, step)
    for key, img in images.items():
        run.writer.add_image(key, img, step)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _save(run: Run, path: Path, step: int, best: float, metrics: dict, window: LossWindow, which: str) -> None:
    """Write a checkpoint of the run at ``step``: weights, optimiser, random state, resolved config,
    data fingerprint, loss window, and what chose it (``which``: BEST or LAST)."""
    # A finite loss can still step to non-finite weights; checked here, where they would be kept,
    # not every step (one device sync per tensor); the next step's loss check catches them too.
    if not torch.stack([p.isfinite().all() for p in run.model.parameters()]).all():
        raise TrainingError(
            f"the weights became non-finite by step {step} (learning rate {run.cfg.lr_at(step - 1):.3g}); the last "
            f"good checkpoint {run.latest if run.latest.exists() else '(none yet)'} is kept; lower learning_rate"
        )
    run.writer.flush()  # the curves up to this step reach the disk with the checkpoint (kill -9 safe)
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    checkpoint.save(
        path,
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "model_args": asdict(run.model.args),
            "step": step,
            "best_val": best,
            "val": metrics,
            "config": configio.to_dict(run.cfg),
            "data_fingerprint": checkpoint.data_fingerprint(run.info),
            "versions": versions(),
            "saved_at": now(),
            "rng": rng,
            "loss_window": window.state(),  # a resume between two logs logs the same means
            "optics": optics.grid_optics(run.info),  # kernel pitch and sensor: what `psf render` needs
            "selection": {
                **run.selection,
                "chosen_by": f"lowest {run.selection['metric']}" if which == BEST else "last step saved",
            },
            "blend": None if run.blend_grid is None else fit_blend(run, step).state(),
        },
    )


def blend_grid(info: GridFile, model: CVAE) -> torch.Tensor:
    """The grid the blend takes, [F*D, P, 3, k, k] float16 as psf train holds it: the file's grid PSFs,
    averaged over each point's mirror images for a canonical model (baselines.mirror_averaged)."""
    return torch.as_tensor(_mirrored(model, info.grid_psfs(), info.grid_size), dtype=torch.float16)


def _mirrored(model: CVAE, planes: np.ndarray, n: int) -> np.ndarray:
    """Planes of PSFs on the n x n grid [F, P, 3, k, k] averaged over each point's mirror images for a canonical
    model (baselines.mirror_averaged: the diagonal too on a square sensor), unchanged otherwise."""
    if not model.canonical:
        return planes
    sx, sy = model.args.field_scale
    return baselines.mirror_averaged(planes, n, square=sx == sy)


@torch.no_grad()
def fit_blend(run: Run, step: int, net_grid: torch.Tensor | None = None) -> blend.Blend:
    """The blend of the network as it is at ``step`` with the grid, fitted on the lit validation points
    (psfcvae/api/blend.py): the same points that choose best.pt, never the test points. Fitted once per step: the
    validation, the checkpoints and the closing line of one step share it. net_grid: the network's prior mean at the
    grid points as ``_network_grid`` gives it, when the validation already computed it."""
    if step in run.blend_fit:
        return run.blend_fit[step][0]
    info, model, val = run.info, run.model, run.validation
    if val is None:  # no lit validation point: every weight stays 1, the network alone
        val = {"coords": np.zeros((0, 2))}
        pred = None
    else:
        pred = _validation_prediction(run)
    fold = tuple(model.args.field_scale) if model.canonical else None  # the table's octant (blend.Blend.fold)
    run.blend_fit.clear()  # the network has moved on since any earlier step; its grid need not be held too
    fitted = blend.fit(
        run.blend_grid,
        None if pred is None else net_grid if net_grid is not None else _network_grid(run),
        info.grid_size,
        info.depths,
        info.focus,
        None if pred is None else pred.numpy(),
        val,
        fold,
    )
    run.blend_fit[step] = (fitted, pred)
    return fitted


@torch.no_grad()
def _network_grid(run: Run, chunk: int = 4096) -> torch.Tensor:
    """The network's prior mean at every grid point: [F*D, P, 3, k, k] float16 on the CPU, as blend_grid (a
    canonical model's averaged over the mirror images too, where its rotated kernels differ by their resampling)."""
    model = run.model
    model.eval()
    out = torch.empty(tuple(run.blend_grid.shape), dtype=torch.float16)
    for p, cond in enumerate(run.conds.table):  # [P, C] a plane, one at a time in float32
        out[p] = _blend_plane(run, torch.cat([model.sample_from_prior(c, mean=True).cpu() for c in cond.split(chunk)]))
    model.train()
    return out


def _blend_plane(run: Run, prior: torch.Tensor) -> torch.Tensor:
    """One plane of the network's prior mean [P, 3, k, k] float32 as the blend takes it: float16, a canonical
    model's averaged over the mirror images as blend_grid is."""
    return torch.as_tensor(_mirrored(run.model, prior[None].numpy(), run.info.grid_size)[0]).half()


@torch.no_grad()
def _blended_score(run: Run, step: int, net_grid: torch.Tensor | None = None) -> float:
    """val_blended_rel_l2: the mean raw relative L2 on the lit validation points of the PSFs the API answers with
    there (the illumination head's lit/dark call aside), the network at ``step`` blended as fit_blend fits it on the
    same points (net_grid: fit_blend's)."""
    val = run.validation
    fitted = fit_blend(run, step, net_grid)
    # the network's at the points' sides, as fit_blend took it
    pred = fitted.answer(run.blend_fit[step][1], val["coords"][:, 0], val["coords"][:, 1], _validation_sides(run))
    return float(rel_l2(pred.numpy(), val["ref"]).mean())


def _validation_sides(run: Run) -> blend.Sides:
    """Where the model answers the lit validation points (blend.refocused): the points themselves at one focus."""
    val = run.validation
    focus_m = val["focus"] if run.info.n_focus > 1 else None
    return blend.refocused(val["depth"], focus_m, run.info.depths, run.info.focus)


@torch.no_grad()
def _validation_prediction(run: Run) -> torch.Tensor:
    """The network's prior mean at the sides of the lit validation points (``_validation_sides``): [S, V, 3, k, k]
    float32 on the CPU."""
    model, val = run.model, run.validation
    sides = _validation_sides(run)
    model.eval()
    pred = [
        model.sample_from_prior(
            model.condition(val["coords"], depth, val["focus"] if sides.focus is None else sides.focus[s]), mean=True
        )
        for s, depth in enumerate(sides.depth)
    ]
    model.train()
    return torch.stack(pred).cpu()


def _finish(run: Run, metrics: dict, step: int, steps: int, elapsed: float) -> None:
    """The run's speed in the log (steps run since the start or resume, in elapsed s), the blend of the last step
    ``step``, its hyper-parameters with their final metrics, the process group closed."""
    if run.main:
        rate = steps / elapsed if elapsed > 0 else float("nan")
        log.info("%d steps in %.1f s (%.1f steps/s); logs: %s", steps, elapsed, rate, run.run_dir / "tb")
        if run.blend_grid is not None:
            log.info("blend of latest.pt: %s", fit_blend(run, step).describe())
        hparams = {k: v for k, v in configio.to_dict(run.cfg).items() if isinstance(v, (int, float, str, bool))}
        tblog.write_hparams(run.writer, hparams, metrics)
        run.writer.close()
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
