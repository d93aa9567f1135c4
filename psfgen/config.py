"""The configuration of ``psf generate``: one frozen dataclass, checked at load time."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from psfgen.plan import budget
from psfgen.shared.configio import check_at_least, check_device, check_grid_size, check_seed, to_dict
from psfgen.shared.errors import InputError


def shipped_lens_dir() -> Path:
    """Where the lenses that come with psf-cvae lie: ``psfgen/lenses``, package data of the
    installed package; in a checkout a link to data/lenses."""
    return Path(__file__).parent / "lenses"


DEFAULT_LENS = str(shipped_lens_dir() / "acl12708u.json")

# Two held-out halves of psfgen.trace.illumination.MIN_RAYS each: below, no held-out point could be lit (tested).
MIN_HELDOUT_SPP = 200
NOISE_POINTS = 32  # re-traced grid points per depth, when the grid has that many


def default_noise_points(grid_size: int) -> int:
    """The noise floor's re-traced points per depth: 32, or every point of a smaller grid."""
    return min(NOISE_POINTS, max(grid_size, 0) ** 2)


@dataclass(frozen=True)
class GenerateConfig:
    lens: str = DEFAULT_LENS  # DeepLens .json, Zemax .zmx or CODE V .seq file, or the name of a shipped lens
    # The sensor, over what the lens file gives or where it gives none (a .zmx or .seq carries no resolution):
    sensor_size_mm: tuple[float, ...] | None = None  # (width, height) [mm]
    sensor_res: tuple[int, ...] | None = None  # (columns, rows) [px]
    out: str = "grid.h5"  # output HDF5 file
    grid_size: int | None = None  # N: the field grid is N x N points over [-1, 1]^2; None: 46, or from ray_budget
    depths: tuple[float, ...] | None = None  # explicit object depths [m]; overrides the range
    depth_min: float = 0.4  # nearest object depth [m] (when depths is not given)
    depth_max: float = 20.0  # farthest object depth [m]
    # Depths spaced uniformly in 1/depth between min and max; "auto" (the default): a pilot trace picks 3, 5, 9, 17
    # or 33 from how fast the lens's PSFs change with depth (psfgen/plan/depthplan.py), and psf generate records them
    # in depths. 5 before this was measured (configs/generate.yaml keeps the spec's 5).
    num_depths: int | str = "auto"
    # Focus distances [m] the lens is refocused to (DeepLens's refocus: the sensor moves), each traced at every depth;
    # inf (YAML .inf or "inf") focuses at infinity. None: the sensor where the lens file puts it.
    focus_m: tuple[float, ...] | None = None
    # Or a range of num_focus focus distances uniform in 1/focus from focus_min to focus_max [m] (which may be inf).
    # num_focus "auto" (what None means with a range): a pilot trace picks 3, 5, 9, 17 or 33 from how fast the lens's
    # PSFs change with focus (psfgen/plan/focusplan.py), and psf generate records them in focus_m.
    focus_min: float | None = None
    focus_max: float | None = None
    num_focus: int | str | None = None
    spp: int | None = None  # rays per point source and wavelength for the grid; None: 18903, or from ray_budget
    # Rays per colour for the grid over all depths (depths x grid_size^2 x spp); None: grid_size and spp as given
    # (with num_depths auto and neither given: the default 5 depths' rays). With one of them it fixes the other;
    # alone, psfgen.plan.budget.choose picks both from each depth's share (docs/ray_budget.md).
    ray_budget: int | None = None
    # Traced kernel side [px] (DeepLens's ks); "auto" (the default): a pilot trace picks the smallest even side that
    # keeps 99% of the valid rays of every PSF (psfgen/plan/windowplan.py), and psf generate records it here. 64
    # before the kept light was measured (configs/generate.yaml keeps the spec's 64).
    kernel_size: int | str = "auto"
    kernel_size_small: int = 15  # stored kernel side [px] after exact-area downsampling
    heldout: int = 256  # off-grid evaluation points by radius band: a quarter validation, the rest test
    heldout_spp: int | None = None  # rays of the held-out reference, split in two halves; None: 4*spp
    noise_points: int | None = (
        None  # grid points traced a second time per depth (noise floor); None: default_noise_points
    )
    block_rays: int = 4_000_000  # rays per traced block (bounds memory); points/block = block_rays // spp
    seed: int = 0  # every block is seeded from (seed, block)
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    overwrite: bool = False  # replace an existing output file from another run
    shard: str | None = None  # "K/N": trace only shard K (0-based) of N; "auto": from torchrun or a SLURM array

    def validate(self) -> None:
        if not self.out.strip():  # Path("") is the working directory
            raise InputError.for_key("out", "is empty; give a file path for the grid (e.g. grid.h5)")
        check_grid_size(self)
        for key, unit in (("sensor_size_mm", "millimetres"), ("sensor_res", "pixels")):
            value = getattr(self, key)
            if value is not None and not (len(value) == 2 and all(v > 0 and np.isfinite(v) for v in value)):
                raise InputError.for_key(key, f"must be two positive {unit}, width,height; got {value}")
        if isinstance(self.num_depths, str) and self.num_depths != "auto":
            raise InputError.for_key("num_depths", f"must be a whole number or auto, got {self.num_depths!r}")
        if self.depths is not None:
            if len(self.depths) == 0:
                raise InputError.for_key("depths", "is empty; give at least one depth in metres")
            bad = [d for d in self.depths if not d > 0 or not np.isfinite(d)]
            if bad:
                raise InputError.for_key("depths", f"must be positive (metres), got {bad[0]}")
            if len(set(self.depths)) != len(self.depths):
                raise InputError.for_key("depths", f"must not repeat, got {', '.join(f'{d:g}' for d in self.depths)}")
        else:
            if not self.depth_min > 0:
                raise InputError.for_key("depth_min", f"must be positive (metres), got {self.depth_min}")
            if not self.depth_max >= self.depth_min:
                raise InputError.for_keys(
                    f"{{depth_max}} ({self.depth_max}) must be at least {{depth_min}} ({self.depth_min})",
                    "depth_max",
                    "depth_min",
                )
            if self.num_depths != "auto":
                check_at_least(self, 1, "num_depths")
            if self.num_depths != 1 and self.depth_max == self.depth_min:
                raise InputError.for_keys(
                    "{depth_max} equals {depth_min}: set {num_depths} to 1 or widen the range",
                    "depth_max",
                    "depth_min",
                    "num_depths",
                )
        self._check_focus()
        check_at_least(self, 1, "spp", "block_rays")
        if isinstance(self.kernel_size, str) and self.kernel_size != "auto":
            raise InputError.for_key(
                "kernel_size", f"must be a whole number of pixels or auto, got {self.kernel_size!r}"
            )
        if self.auto_window():  # the pilot's side is at least kernel_size_small
            check_at_least(self, 1, "kernel_size_small")
        else:
            check_at_least(self, 2, "kernel_size")
        if not self.auto_window() and not 1 <= self.kernel_size_small <= self.kernel_size:
            raise InputError.for_keys(
                f"{{kernel_size_small}} ({self.kernel_size_small}) must be between 1 and "
                f"{{kernel_size}} ({self.kernel_size})",
                "kernel_size_small",
                "kernel_size",
            )
        check_at_least(self, 0, "heldout")
        check_seed(self)
        if self.heldout_spp is not None and self.heldout_spp < MIN_HELDOUT_SPP:
            raise InputError.for_key(
                "heldout_spp",
                f"must be at least {MIN_HELDOUT_SPP} (two halves of the {MIN_HELDOUT_SPP // 2} rays a lit PSF needs), "
                f"got {self.heldout_spp}",
            )
        # num_depths auto leaves grid_size, spp and noise_points to the pilot's choice only when they come from
        # the budget; given, they are checked here, before a pilot is traced.
        if self.noise_points is not None and self.grid_size is not None:
            check_noise_points(self.noise_points, self.grid_size)
        # The budget must afford the depths and focus settings given, or the fewest a pilot may choose.
        depths = budget.DEPTH_CHOICES[0] if self.auto_depths() else self.depth_count()
        focus = self.least_focus_count()
        budget.resolve(self.budget(focus), self.grid_size, self.spp, depths, focus)
        # Its own form first: what the option is comes before how it combines with others.
        if self.shard is not None and self.shard != "auto":
            m = re.fullmatch(r"(\d+)/(\d+)", self.shard)
            if not m or not int(m.group(1)) < int(m.group(2)):
                raise InputError.for_key(
                    "shard", f"must be K/N with 0 <= K < N (e.g. 0/4), or auto; got {self.shard!r}"
                )
        # A pilot on each shard could choose otherwise: every shard must trace the same depths, focus and window.
        pilots = (
            (self.auto_depths(), "num_depths", "depths", "number of depths"),
            (self.auto_focus(), "num_focus", "focus settings", "number of focus settings"),
            (self.auto_window(), "kernel_size", "window", "kernel size"),
        )
        for auto, key, what, give in pilots:
            if self.shard is not None and auto:
                raise InputError.for_keys(
                    f"{{{key}}} auto cannot be combined with {{shard}}: every shard must trace the same {what}; "
                    f"give the {give} a run without it chose (its log and psf info say it)",
                    key,
                    "shard",
                )
        check_device(self)

    def _check_focus(self) -> None:
        """focus_m: positive, distinct metres (inf allowed); or focus_min and focus_max, with num_focus (a count, or
        auto: also what none means)."""
        if isinstance(self.num_focus, str) and self.num_focus != "auto":
            raise InputError.for_key("num_focus", f"must be a whole number or auto, got {self.num_focus!r}")
        ranged = {k: getattr(self, k) for k in ("focus_min", "focus_max", "num_focus")}
        given = [k for k, v in ranged.items() if v is not None]
        if self.focus_m is not None:
            if given:
                raise InputError.for_keys(
                    f"{{focus_m}} and {{{given[0]}}} both give the focus settings: give the list or the range",
                    "focus_m",
                    given[0],
                )
            if len(self.focus_m) == 0:
                raise InputError.for_key("focus_m", "is empty; give at least one focus distance in metres (or inf)")
            bad = [f for f in self.focus_m if not f > 0]  # NaN too
            if bad:
                raise InputError.for_key("focus_m", f"must be positive metres or inf, got {bad[0]}")
            if len(set(self.focus_m)) != len(self.focus_m):
                raise InputError.for_key("focus_m", f"must not repeat, got {', '.join(f'{f:g}' for f in self.focus_m)}")
            return
        if not given:
            return
        missing = [k for k in ("focus_min", "focus_max") if ranged[k] is None]
        if missing:
            raise InputError.for_key(
                given[0],
                f"needs {' and '.join(missing)} too: a focus range is focus_min and focus_max (--focus-min, "
                "--focus-max), with num_focus settings (--num-focus; auto when not given)",
            )
        if not (self.focus_min > 0 and np.isfinite(self.focus_min)):
            raise InputError.for_key("focus_min", f"must be positive (metres), got {self.focus_min}")
        if not self.focus_max > self.focus_min:  # NaN too
            raise InputError.for_keys(
                f"{{focus_max}} ({self.focus_max}) must be beyond {{focus_min}} ({self.focus_min})",
                "focus_max",
                "focus_min",
            )
        if not self.auto_focus():
            check_at_least(self, 2, "num_focus")

    # Derived values. Kept as methods, not fields, so they cannot disagree with the fields.
    def budget(self, num_focus: int | None = None) -> int | None:
        """The rays per colour the grid spends over all planes (depths x focus settings): ray_budget; with
        num_depths auto and not both grid_size and spp given, the default 5 depths' rays at each focus (auto moves
        them between depths, it adds none); None: grid_size and spp as given or by default.
        num_focus: num_focus auto's choice, the F of that default (the config's own count otherwise)."""
        if self.ray_budget is None and self.auto_depths() and (self.grid_size is None or self.spp is None):
            focus = self.focus_count() if num_focus is None else num_focus
            if focus is None:
                raise ValueError("num_focus auto: the default budget needs the chosen number of focus settings")
            return budget.DEFAULT_RAY_BUDGET * budget.DEFAULT_NUM_DEPTHS * focus
        return self.ray_budget

    def focus_values(self, num_focus: int | None = None) -> np.ndarray | None:
        """The focus distances [m], ascending (inf last); None without any (the lens file's sensor). A range is
        spaced uniformly in 1/focus (num_focus of them: the config's, or the given count for num_focus auto)."""
        if self.focus_m is not None:
            return np.array(sorted(self.focus_m), dtype=np.float64)
        if self.focus_min is None:
            return None
        n = self.num_focus if num_focus is None else num_focus
        if n in (None, "auto"):
            raise ValueError("num_focus auto: psf generate chooses the focus settings (psfgen.config.resolve)")
        inv = np.linspace(1.0 / self.focus_min, 1.0 / self.focus_max, n)  # 1/inf = 0
        with np.errstate(divide="ignore"):
            return 1.0 / inv

    def focus_count(self) -> int | None:
        """F: how many focus settings (1 without any); None while num_focus auto waits for its pilot."""
        if self.auto_focus():
            return None
        values = self.focus_values()
        return 1 if values is None else len(values)

    def least_focus_count(self) -> int:
        """The fewest focus settings the run may trace, what a budget must afford: num_focus auto's fewest choice,
        else F."""
        return budget.FOCUS_CHOICES[0] if self.auto_focus() else self.focus_count()

    def auto_focus(self) -> bool:
        """num_focus auto (or none given) with a focus range, the focus settings not chosen yet."""
        return self.focus_m is None and self.focus_min is not None and self.num_focus in (None, "auto")

    def auto_depths(self) -> bool:
        """num_depths auto, the depths not chosen yet."""
        return self.depths is None and self.num_depths == "auto"

    def auto_window(self) -> bool:
        """kernel_size auto, the window not chosen yet."""
        return self.kernel_size == "auto"

    def depth_range(self) -> tuple[float, float]:
        """The nearest and farthest object depth [m] a run traces: of the depths given, or the range."""
        if self.depths is not None:
            return min(self.depths), max(self.depths)
        return self.depth_min, self.depth_max

    def depth_count(self) -> int | None:
        """How many depths; None while num_depths auto waits for its pilot."""
        if self.depths is not None:
            return len(self.depths)
        return None if self.num_depths == "auto" else self.num_depths

    def depth_values(self, num_depths: int | None = None) -> np.ndarray:
        """Object depths [m], ascending. A range is spaced uniformly in 1/depth (num_depths of them:
        the config's, or the given count for num_depths auto)."""
        if self.depths is not None:
            return np.array(sorted(self.depths), dtype=np.float64)
        n = self.num_depths if num_depths is None else num_depths
        if n == "auto":
            raise ValueError("num_depths auto: psf generate chooses the depths (psfgen.config.resolve)")
        inv = np.linspace(1.0 / self.depth_min, 1.0 / self.depth_max, n)
        return 1.0 / inv

    def heldout_half_spp(self) -> int:
        """Rays per held-out half: the reference (both halves) has heldout_spp rays."""
        total = self.heldout_spp if self.heldout_spp is not None else 4 * self.spp
        return max(1, total // 2)

    def run_params(self) -> dict:
        """The parameters that decide the content of the file (not where or on what it runs); of a resolved config."""
        d = to_dict(self)
        for k in ("out", "device", "overwrite", "lens", "shard", "ray_budget"):  # ray_budget: in grid_size x spp
            d.pop(k)
        d["depths"] = [float(x) for x in self.depth_values()]
        d["heldout_spp"] = 2 * self.heldout_half_spp()
        focus = self.focus_values()
        d["focus_m"] = None if focus is None else [float(f) for f in focus]
        for k in ("depth_min", "depth_max", "num_depths", "focus_min", "focus_max", "num_focus"):
            d.pop(k)
        return d


def check_noise_points(noise_points: int, grid_size: int) -> None:
    if not 0 <= noise_points <= grid_size**2:
        raise InputError.for_key(
            "noise_points",
            f"must be between 0 and {grid_size**2} (the points of a {grid_size}x{grid_size} grid), got {noise_points}",
        )


def resolve(
    cfg: GenerateConfig, num_depths: int | None = None, kernel_size: int | None = None, num_focus: int | None = None
) -> GenerateConfig:
    """The config a run traces, every auto or default value decided: depths, focus_m (ascending), grid_size and spp
    (from the ray budget), noise_points, heldout_spp, kernel_size. The one step that resolves them; the grid file
    records its result.

    num_depths: num_depths auto's choice (the pilot's, or the number of depths of the file a run resumes).
    kernel_size: kernel_size auto's choice [px] (likewise).
    num_focus: num_focus auto's choice (likewise): the default budget is a single focus's times it.
    """
    if cfg.auto_window() and kernel_size is None:
        raise ValueError("kernel_size auto: psf generate chooses the window (psfgen.plan.windowplan)")
    depths = cfg.depth_values(num_depths)
    focus = cfg.focus_values(num_focus)
    n_focus = 1 if focus is None else len(focus)
    grid_size, spp = budget.resolve(cfg.budget(n_focus), cfg.grid_size, cfg.spp, len(depths), n_focus)
    noise_points = default_noise_points(grid_size) if cfg.noise_points is None else cfg.noise_points
    check_noise_points(noise_points, grid_size)
    heldout_spp = 4 * spp if cfg.heldout_spp is None else cfg.heldout_spp
    return replace(
        cfg,
        depths=tuple(float(d) for d in depths),
        num_depths=len(depths),
        focus_m=None if focus is None else tuple(float(f) for f in focus),
        focus_min=None,
        focus_max=None,
        num_focus=None,
        grid_size=grid_size,
        spp=spp,
        noise_points=noise_points,
        kernel_size=kernel_size if cfg.auto_window() else cfg.kernel_size,
        heldout_spp=2 * max(1, heldout_spp // 2),  # two equal halves
    )
