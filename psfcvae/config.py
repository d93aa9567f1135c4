"""The configuration of ``psf train``: the spec's keys and defaults plus the run's plumbing."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from psfgen.errors import InputError


MAX_FREQUENCIES = 24  # band 2^23 pi: beyond it sin(2^l pi c) is noise at float32 precision


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the spec's network with the training choices that make its prior mean beat
    bilinear interpolation (README, "Why these defaults"). configs/cvae_v1.yaml is the spec."""

    # Data
    data: str = ""  # grid HDF5 file written by `psf generate`
    run_dir: str = "runs/cvae"  # TensorBoard logs, checkpoints and the resolved config
    grid_size: int | None = None  # N; None: take it from the file, else it must match
    kernel_size_small: int = 15  # PSF side [px]; must match the file
    condition_on_depth: str = "auto"  # auto | true | false; auto: true when the file has >1 depth
    condition_frame: str = "auto"  # auto | canonical | cartesian; auto: canonical when the lens is rotationally symmetric
    supersample: int = 3  # canonical frame: the decoder's kernel is this many times finer than kernel_size_small
    decoder_rank: int | None = None  # canonical frame: factor the decoder's output layer through this many dimensions (speed)
    in_memory: str = "auto"  # hold the grid in RAM: auto (files under 2 GiB) | true | false
    read_run: int = 8  # contiguous PSFs per read; a batch gathers batch_size/read_run runs
    num_workers: int = 0  # DataLoader worker processes
    # Model (USAGE_CVAE.md, "Network Architecture")
    latent_dim: int = 128  # z dimension
    hidden_dim: int = 512  # MLP width
    num_layers: int = 4  # hidden layers per MLP
    num_frequencies: int = 3  # Fourier bands L of the positional encoding (spec: 10)
    pe_scale: float = 0.5  # coordinates are scaled by this before encoding; 1.0 (spec) aliases -1 with +1
    depth_frequencies: int | None = 1  # bands that vary with depth d; None: all num_frequencies (spec)
    # Optimisation and losses (USAGE_CVAE.md, "Loss Function", "Configuration")
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam (spec: 1e-4)
    lr_schedule: str = "cosine"  # constant (spec) | cosine (decays to 1% of learning_rate at max_steps)
    output: str = "softplus"  # decoder output: softplus (spec) | softmax (exp, normalised per channel)
    scale_weight: float = 0.01  # pins the decoder's output scale, which the normalisation leaves free (README)
    relative_loss: bool = False  # reconstruction on ||K̂ - K||² / ||K||² per PSF (the metric) instead of the MSE
    warmup_steps: int = 0  # the learning rate rises linearly from 0 over these first steps (0: the spec, none)
    recon_weight: float = 1e4  # spec: 1.0; see README, "Why these defaults"
    kl_weight: float = 1e-4
    smooth_weight: float = 1e-3
    prior_recon_weight: float = 1e4  # not in the spec (0 there): MSE of decode(μ_p(c), c), the path `psf sample` uses
    illumination_weight: float = 1.0  # the illumination head's loss (an addition to the spec): 0 leaves the head out
    max_steps: int = 5000  # spec: 20000; the held-out error is flat past ~3000 steps (README)
    # Schedule and bookkeeping
    log_every: int = 50  # steps between scalar logs
    val_every: int = 500  # steps between validations (and image logs)
    checkpoint_every: int = 1000  # steps between checkpoints (also at the end)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:K

    def validate(self) -> None:
        positive = (
            "kernel_size_small", "read_run", "supersample", "latent_dim", "hidden_dim", "num_layers", "batch_size",
            "max_steps", "log_every", "val_every", "checkpoint_every",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise InputError(f"config key '{key}' must be at least 1, got {getattr(self, key)}")
        if self.batch_size % self.read_run:
            raise InputError(
                f"config key 'batch_size' ({self.batch_size}) must be a multiple of read_run ({self.read_run})"
            )
        if self.seed < 0:
            raise InputError(f"config key 'seed' must be 0 or more, got {self.seed}")
        if self.warmup_steps < 0:
            raise InputError(f"config key 'warmup_steps' must be 0 or more, got {self.warmup_steps}")
        if self.grid_size is not None and self.grid_size < 2:
            raise InputError(f"config key 'grid_size' must be at least 2, got {self.grid_size}")
        if not 0 <= self.num_frequencies <= MAX_FREQUENCIES:
            raise InputError(
                f"config key 'num_frequencies' must be between 0 and {MAX_FREQUENCIES}, got {self.num_frequencies} "
                "(finer bands oscillate faster than float32 resolves a coordinate)"
            )
        if self.num_workers < 0:
            raise InputError(f"config key 'num_workers' must be 0 or more, got {self.num_workers}")
        if self.decoder_rank is not None and self.decoder_rank < 1:
            raise InputError(f"config key 'decoder_rank' must be at least 1 (or null), got {self.decoder_rank}")
        if self.depth_frequencies is not None and self.depth_frequencies < 0:
            raise InputError(f"config key 'depth_frequencies' must be 0 or more, got {self.depth_frequencies}")
        if not self.pe_scale > 0:
            raise InputError(f"config key 'pe_scale' must be positive, got {self.pe_scale}")
        if not 0 < self.learning_rate < math.inf:
            raise InputError(f"config key 'learning_rate' must be a positive, finite number, got {self.learning_rate}")
        for key in ("recon_weight", "kl_weight", "smooth_weight", "prior_recon_weight", "scale_weight",
                    "illumination_weight"):
            if not 0 <= getattr(self, key) < math.inf:
                raise InputError(f"config key '{key}' must be a finite number, 0 or more, got {getattr(self, key)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"config key 'lr_schedule' must be constant or cosine, got {self.lr_schedule!r}")
        if self.output not in ("softplus", "softmax"):
            raise InputError(f"config key 'output' must be softplus or softmax, got {self.output!r}")
        if self.condition_frame not in ("auto", "canonical", "cartesian"):
            raise InputError(
                f"config key 'condition_frame' must be auto, canonical or cartesian, got {self.condition_frame!r}"
            )
        for key in ("condition_on_depth", "in_memory"):
            if getattr(self, key) not in ("auto", "true", "false"):
                raise InputError(f"config key '{key}' must be auto, true or false, got {getattr(self, key)!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"config key 'device' must be auto, cpu, cuda or cuda:K, got {self.device!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): a function of the step alone."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "constant":
            return warm * self.learning_rate
        t = min(step / self.max_steps, 1.0)
        return warm * self.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
