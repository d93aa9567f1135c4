"""The configuration of ``psf train``: the spec's keys and defaults plus the run's plumbing."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from psfgen.shared.configio import check_at_least, check_device, check_grid_size, check_seed
from psfgen.shared.errors import InputError

STEPS_PER_BLOCK = 5000  # max_steps auto: steps for each block of grid PSFs ...
PSFS_PER_BLOCK = 7500  # ... of this many (7 220 PSFs took 5000 steps, 14 297 took 10 000; docs/results.md)
READ_RUN_STREAMING = 8  # read_run auto when the grid streams from the file: PSFs per contiguous HDF5 read
MAX_FREQUENCIES = 24  # band 2^23 pi: beyond it sin(2^l pi c) is noise at float32 precision


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the spec's network with the training choices that make its prior mean beat
    bilinear interpolation (docs/results.md, "Why these defaults"). configs/cvae_v1.yaml is the spec.

    The keys that may say auto (grid_size None, condition_on_depth, condition_frame, in_memory,
    read_run, max_steps, blend) are decided for the grid file by ``training.resolve``; a run records the result."""

    # Data
    data: str = ""  # grid HDF5 file written by `psf generate`
    run_dir: str = "runs/cvae"  # TensorBoard logs, checkpoints and the resolved config
    grid_size: int | None = None  # N; None: take it from the file, else it must match
    kernel_size_small: int | None = None  # PSF side [px]; None: the file's, else it must match
    condition_on_depth: str = "auto"  # auto | true | false; auto: true when the file has >1 depth
    condition_frame: str = (
        "auto"  # auto | canonical | cartesian; auto: canonical when the lens is rotationally symmetric
    )
    # Several focus settings: what the networks see beside the focus code φ (linear in 1/focus). inverse: the depth
    # code d (linear in 1/depth); defocus: the code of 1/depth - 1/focus (the defocus, linear in both). The API and
    # the table take (depth, focus) either way.
    focus_code: str = "inverse"
    supersample: int = 3  # canonical frame: the decoder's kernel is this many times finer than kernel_size_small
    in_memory: str = "auto"  # hold the grid in RAM: auto (files under 2 GiB) | true | false
    # Contiguous PSFs per read; a batch gathers batch_size/read_run runs. auto: 1 for a grid in memory (each PSF of a
    # batch drawn on its own), gcd(batch_size, READ_RUN_STREAMING) for one that streams from the file; on --resume the
    # run's own
    read_run: int | str = "auto"
    num_workers: int = 0  # DataLoader worker processes
    # Model (docs/design.md, "What is learned")
    latent_dim: int = 128  # z dimension
    hidden_dim: int = 512  # MLP width
    num_layers: int = 4  # hidden layers per MLP
    num_frequencies: int = 3  # Fourier bands L of the positional encoding (spec: 10)
    pe_scale: float = 0.5  # coordinates are scaled by this before encoding; 1.0 (spec) aliases -1 with +1
    depth_frequencies: int | None = 1  # bands that vary with depth d; None: all num_frequencies (spec)
    # Optimisation and losses (docs/design.md, "The losses", "Defaults")
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam (spec: 1e-4)
    lr_schedule: str = "cosine"  # constant (spec) | cosine (decays to 1% of learning_rate at max_steps)
    scale_weight: float = 0.01  # pins the decoder's output scale, which the normalisation leaves free (docs/results.md)
    recon_weight: float = 1e4  # spec: 1.0; see docs/results.md, "Why these defaults"
    kl_weight: float = 1e-4
    smooth_weight: float = 1e-3
    prior_recon_weight: float = 1e4  # not in the spec (0 there): MSE of decode(μ_p(c), c), the path `psf sample` uses
    illumination_weight: float = 1.0  # the illumination head's loss (an addition to the spec); above 0
    # Optimiser steps (spec: 20000); auto: STEPS_PER_BLOCK for each PSFS_PER_BLOCK grid PSFs (depths x
    # grid_size²), rounded up: the passes over the grid the two benchmark lenses needed (docs/results.md)
    max_steps: int | str = "auto"
    # What the model answers with (not in the spec): bicubic, the network blended with its grid through bicubic
    # interpolation, by radius band: interpolation of the grid, or the network corrected by its residual on it, the
    # kind and each band's weight fitted on the validation points at every checkpoint, which carries the grid
    # (psfcvae/api/blend.py); none, the network alone; auto: bicubic unless the model does not take the depth
    # of a file of several, or the grid would add over BLEND_GRID_LIMIT to every checkpoint
    blend: str = "auto"
    # Schedule and bookkeeping
    log_every: int = 50  # steps between scalar logs
    val_every: int = 500  # steps between validations (and image logs)
    checkpoint_every: int = 1000  # steps between checkpoints (also at the end)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:K

    def validate(self) -> None:
        check_at_least(
            self,
            1,
            "kernel_size_small",
            "supersample",
            "latent_dim",
            "hidden_dim",
            "num_layers",
            "batch_size",
            "log_every",
            "val_every",
            "checkpoint_every",
        )
        for key in ("max_steps", "read_run"):
            value = getattr(self, key)
            if isinstance(value, str) and value.strip().lower() != "auto":
                raise InputError.for_key(key, f"must be a whole number or auto, got {value!r}")
            if not isinstance(value, str):
                check_at_least(self, 1, key)
        if not isinstance(self.read_run, str) and self.batch_size % self.read_run:
            raise InputError.for_keys(
                f"{{batch_size}} ({self.batch_size}) must be a multiple of {{read_run}} ({self.read_run})",
                "batch_size",
                "read_run",
            )
        check_at_least(self, 0, "num_workers", "depth_frequencies")
        check_seed(self)
        if not self.run_dir.strip():
            raise InputError.for_key("run_dir", "is empty; give a directory for the run (e.g. runs/cvae)")
        if self.grid_size is not None:
            check_grid_size(self)
        if not 0 <= self.num_frequencies <= MAX_FREQUENCIES:
            raise InputError.for_key(
                "num_frequencies",
                f"must be between 0 and {MAX_FREQUENCIES}, got {self.num_frequencies} "
                "(finer bands oscillate faster than float32 resolves a coordinate)",
            )
        if not 0 < self.pe_scale < math.inf:
            raise InputError.for_key("pe_scale", f"must be a positive, finite number, got {self.pe_scale}")
        check_model_size(self)
        if not 0 < self.learning_rate < math.inf:
            raise InputError.for_key("learning_rate", f"must be a positive, finite number, got {self.learning_rate}")
        for key in (
            "recon_weight",
            "kl_weight",
            "smooth_weight",
            "prior_recon_weight",
            "scale_weight",
        ):
            if not 0 <= getattr(self, key) < math.inf:
                raise InputError.for_key(key, f"must be a finite number, 0 or more, got {getattr(self, key)}")
        if not 0 < self.illumination_weight < math.inf:  # the head is part of every model: it must learn
            raise InputError.for_key(
                "illumination_weight", f"must be a positive, finite number, got {self.illumination_weight}"
            )
        choices = {
            "lr_schedule": ("constant", "cosine"),
            "condition_frame": ("auto", "canonical", "cartesian"),
            "condition_on_depth": ("auto", "true", "false"),
            "focus_code": ("inverse", "defocus"),
            "blend": ("auto", "bicubic", "none"),
            "in_memory": ("auto", "true", "false"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                words = ", ".join(allowed[:-1]) + " or " + allowed[-1]
                raise InputError.for_key(key, f"must be {words}, got {getattr(self, key)!r}")
        check_device(self)

    def with_steps_for(self, num_psfs: int) -> TrainConfig:
        """This config with max_steps auto resolved for a grid of num_psfs PSFs (a given number stays)."""
        if not isinstance(self.max_steps, str):
            return self
        return replace(self, max_steps=STEPS_PER_BLOCK * max(1, math.ceil(num_psfs / PSFS_PER_BLOCK)))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): a function of the step alone."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        t = min(step / self.max_steps, 1.0)
        return self.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


# Bytes per network parameter while training: the weights, their gradients and Adam's two moments, in float32.
BYTES_PER_PARAMETER = 16


def check_model_size(cfg: TrainConfig) -> None:
    """Refuse, before a run directory exists, networks whose training state cannot fit in this machine's memory
    (--set hidden_dim=1000000000 would otherwise fail in the allocator). The count is an upper estimate of the
    encoder, prior and decoder MLPs (psfcvae/model/cvae.py) with the canonical decoder's supersampled output.
    With kernel_size_small left to the file, the check waits for training.resolve."""
    if cfg.kernel_size_small is None:
        return
    k_out = 3 * (cfg.kernel_size_small * cfg.supersample) ** 2
    cond_features = 2 * cfg.num_frequencies * 3
    h, layers = cfg.hidden_dim, cfg.num_layers
    mlp = lambda inputs, outputs: inputs * h + max(layers - 1, 0) * h * h + h * outputs  # noqa: E731
    encoder = mlp(3 * cfg.kernel_size_small**2 + cond_features, 2 * cfg.latent_dim)
    prior = mlp(cond_features, 2 * cfg.latent_dim)
    decoder = mlp(cfg.latent_dim + cond_features, k_out)
    need = BYTES_PER_PARAMETER * (encoder + prior + decoder)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram / 2:
        keys = ("hidden_dim", "num_layers", "latent_dim", "supersample")
        changed = sorted(keys, key=lambda k: getattr(cfg, k) == getattr(TrainConfig, k))  # named first: a changed one
        sizes = ", ".join(f"{{{k}}} {getattr(cfg, k)}" for k in changed)
        raise InputError.for_keys(
            f"a network of {sizes} needs about {need / 2**30:.3g} GiB to train, more than half of this machine's "
            f"{ram / 2**30:.1f} GiB; choose smaller values",
            *changed,
        )
