"""The configuration of ``psf generate``: one frozen dataclass, checked at load time."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError



def shipped_lens_dir() -> Path:
    """Where the lenses that come with psf-cvae lie: the installed package ``psfgen.lenses``
    (setup.cfg maps it to data/lenses), or data/lenses itself when running from a checkout."""
    spec = importlib.util.find_spec("psfgen.lenses")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "data" / "lenses"


DEFAULT_LENS = str(shipped_lens_dir() / "acl12708u.json")


@dataclass(frozen=True)
class GenerateConfig:
    lens: str = DEFAULT_LENS  # DeepLens lens JSON file, or the name of a shipped lens (data/lenses)
    out: str = "grid.h5"  # output HDF5 file
    grid_size: int = 20  # N: the field grid is N x N points over [-1, 1]^2
    depths: tuple[float, ...] | None = None  # explicit object depths [m]; overrides the range
    depth_min: float = 0.4  # nearest object depth [m] (when depths is not given)
    depth_max: float = 20.0  # farthest object depth [m]
    num_depths: int = 5  # depths spaced uniformly in 1/depth between min and max
    focus_m: float | None = None  # refocus the lens to this object distance [m] before tracing
    spp: int = 100_000  # rays per point source and wavelength for the grid
    ks: int = 64  # traced kernel size [px] (DeepLens ks)
    ks_small: int = 15  # stored kernel size [px] after area downsampling
    heldout: int = 256  # off-grid evaluation points (half at grid depths, half between)
    heldout_spp: int | None = None  # rays of the held-out reference, split in two halves; None: 4*spp
    noise_points: int = 32  # grid points traced a second time per depth (noise floor)
    block_rays: int = 4_000_000  # rays per traced block (bounds memory); points/block = block_rays // spp
    seed: int = 0  # every block is seeded from (seed, block)
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    overwrite: bool = False  # replace an existing output file from another run
    shard: str | None = None  # "K/N": trace only shard K (0-based) of N; "auto": from torchrun or a SLURM array

    def validate(self) -> None:
        if self.grid_size < 2:
            raise InputError(f"grid_size must be at least 2, got {self.grid_size}")
        if self.depths is not None:
            if len(self.depths) == 0:
                raise InputError("depths is empty; give at least one depth in metres")
            bad = [d for d in self.depths if not d > 0 or not np.isfinite(d)]
            if bad:
                raise InputError(f"depths must be positive (metres), got {bad[0]}")
            if len(set(self.depths)) != len(self.depths):
                raise InputError("depths must not repeat")
        else:
            if not self.depth_min > 0:
                raise InputError(f"depth_min must be positive (metres), got {self.depth_min}")
            if not self.depth_max >= self.depth_min:
                raise InputError(
                    f"depth_max ({self.depth_max}) must be at least depth_min ({self.depth_min})"
                )
            if self.num_depths < 1:
                raise InputError(f"num_depths must be at least 1, got {self.num_depths}")
            if self.num_depths > 1 and self.depth_max == self.depth_min:
                raise InputError("depth_max equals depth_min: set num_depths to 1 or widen the range")
        if self.focus_m is not None and not self.focus_m > 0:
            raise InputError(f"focus_m must be positive (metres), got {self.focus_m}")
        if self.spp < 1:
            raise InputError(f"spp must be at least 1, got {self.spp}")
        if self.ks < 2:
            raise InputError(f"ks (--kernel-size) must be at least 2, got {self.ks}")
        if self.ks_small < 1 or self.ks_small > self.ks:
            raise InputError(
                f"ks_small (--kernel-size-small, {self.ks_small}) must be between 1 and "
                f"ks (--kernel-size, {self.ks})"
            )
        if self.heldout < 0:
            raise InputError(f"heldout must be 0 or more, got {self.heldout}")
        if self.heldout_spp is not None and self.heldout_spp < 2:
            raise InputError(
                f"heldout_spp must be at least 2 (it is split in two halves), got {self.heldout_spp}"
            )
        if not 0 <= self.noise_points <= self.grid_size**2:
            raise InputError(
                f"noise_points must be between 0 and grid_size^2 = {self.grid_size**2}, "
                f"got {self.noise_points}"
            )
        if self.seed < 0:
            raise InputError(f"seed must be 0 or more, got {self.seed}")
        if self.block_rays < 1:
            raise InputError(f"block_rays must be at least 1, got {self.block_rays}")
        if self.shard is not None and self.shard != "auto":
            m = re.fullmatch(r"(\d+)/(\d+)", self.shard)
            if not m or not int(m.group(1)) < int(m.group(2)):
                raise InputError(f"shard must be K/N with 0 <= K < N (e.g. 0/4), or auto; got {self.shard!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"device must be auto, cpu, cuda or cuda:K, got {self.device!r}")

    # Derived values. Kept as methods, not fields, so they cannot disagree with the fields.
    def depth_values(self) -> np.ndarray:
        """Object depths [m], ascending. A range is spaced uniformly in 1/depth."""
        if self.depths is not None:
            return np.array(sorted(self.depths), dtype=np.float64)
        inv = np.linspace(1.0 / self.depth_min, 1.0 / self.depth_max, self.num_depths)
        return 1.0 / inv

    def heldout_half_spp(self) -> int:
        """Rays per held-out half: the reference (both halves) has heldout_spp rays."""
        total = self.heldout_spp if self.heldout_spp is not None else 4 * self.spp
        return max(1, total // 2)

    def run_params(self) -> dict:
        """The parameters that decide the content of the file (not where or on what it runs)."""
        from .configio import to_dict

        d = to_dict(self)
        for k in ("out", "device", "overwrite", "lens", "shard"):
            d.pop(k)
        d["depths"] = [float(x) for x in self.depth_values()]
        d["heldout_spp"] = 2 * self.heldout_half_spp()
        for k in ("depth_min", "depth_max", "num_depths"):
            d.pop(k)
        return d
