"""The ``psf`` command line: parse options, load the config, call the library.

Nothing here computes anything: each command maps its options onto a typed config and
calls ``psfgen`` / ``psfcvae``. A user mistake (InputError) becomes one ``Error:`` line
and exit code 2.
"""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def _interrupted_line(text: str = "Interrupted.") -> str:
    """What Ctrl-C prints, on a line of its own: on a terminal the ``^C`` echo (or a progress bar) is
    still open, so a newline first closes it."""
    return ("\n" if sys.stderr.isatty() else "") + text


def _stop_while_starting(_signum, _frame):
    """Ctrl-C while this module loads (click, the commands): nothing to clean up, so stop as anywhere
    else, with one line and exit code 130, not a traceback of the imports. SystemExit, unlike
    KeyboardInterrupt, leaves Python without a traceback."""
    sys.stderr.write(_interrupted_line() + "\n")
    raise SystemExit(INTERRUPTED)


# Only where Python's own handler is in place: a process started with SIGINT ignored keeps ignoring it.
_starting = signal.getsignal(signal.SIGINT) is signal.default_int_handler
if _starting:
    try:
        signal.signal(signal.SIGINT, _stop_while_starting)
    except ValueError:  # imported from a thread other than the main one: signals are not ours to handle
        _starting = False

import functools  # noqa: E402  (after the handler: Ctrl-C during these imports is handled)
import logging  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
from click.core import ParameterSource  # noqa: E402

from psfgen.shared.errors import InputError  # noqa: E402


def _versions_line() -> str:
    from psfgen.shared.provenance import package_version

    return (
        f"psf-cvae {package_version('psf-cvae')}, deeplens-core {package_version('deeplens-core')}, "
        f"torch {package_version('torch')}"
    )


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(_versions_line())
        ctx.exit()


class BadInput(click.ClickException):
    """A user mistake: printed as one ``Error: ...`` line, exit code 2 (click's usage code)."""

    exit_code = 2


# Settings the library names in its messages, as the options of the commands that take them.
API_OPTIONS = {
    "sample": {
        "depth_m": "--depth",
        "focus_m": "--focus-m",
        "allow_extrapolation": "--allow-extrapolation",
        "coords": "--coords",
        "height": "--height-mm",
        "angle": "--angle-deg",
    },
    "render": {
        "depth_m": "--depth",
        "focus_m": "--focus-m",
        "allow_extrapolation": "--allow-extrapolation",
        "psf_every": "--psf-every",
        "field": "--field",
        "field_mm": "--field-mm",
        "error": "--error",
        "method": "--exact",
    },
}
DEFAULT_RENDER_ERROR = 0.05  # psfcvae.rendering.lowrank.DEFAULT_ERROR (tested equal), without importing torch here


def _spellings(ctx: click.Context) -> dict[str, str]:
    """Config key -> the option that set it, for the options the user typed on this command line."""
    from_set = {item.split("=", 1)[0].strip() for item in ctx.params.get("sets") or ()}  # --set wins over an option
    typed = {
        p.name: p.opts[-1]
        for p in ctx.command.params
        if isinstance(p, click.Option)
        and p.name not in from_set
        and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE
    }
    api = dict(API_OPTIONS.get(ctx.command.name, {}))
    if ctx.params.get("depth_map") is not None:  # the depths the library checks came from the map
        api["depth_m"] = "--depth-map"
    return {**typed, **api}


def _same_command(ctx: click.Context, *extra: str, omit: tuple[str, ...] = ()) -> str:
    """The command line the user typed (options as given, in the command's order, but those named
    in ``omit``), plus ``extra``."""
    words = ["psf", ctx.command.name or ""]
    for p in ctx.command.params:
        if p.name in omit:
            continue
        value = ctx.params.get(p.name)
        if (
            ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE
            or value is None
            or value is False
            or value == ()
        ):
            continue
        if isinstance(p, click.Argument):
            words += list(value) if isinstance(value, tuple) else [str(value)]
        elif p.is_flag:
            words.append(p.opts[-1])
        else:
            for v in value if p.multiple else [value]:
                words += [p.opts[-1], str(v)]
    return shlex.join(words + [w for w in extra if w not in words])


def user_errors(fn):
    """Turn InputError into one line on stderr and exit code 2, no traceback; the settings it
    names are spelled as the options the user typed (--noise-points, not noise_points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            message = exc.render(_spellings(click.get_current_context()))
            raise BadInput(message.splitlines()[0] if message.strip() else type(exc).__name__) from None
        except RuntimeError as exc:
            from psfcvae.training.loop import TrainingError

            if isinstance(exc, TrainingError):
                raise click.ClickException(str(exc)) from None  # exit 1: not a usage error
            raise

    return wrapper


class Interruption(click.ClickException):
    """Ctrl-C: its line as given (no ``Error:``), exit code 130. A command that can be resumed says how."""

    exit_code = INTERRUPTED

    def __init__(self, message: str = "Interrupted."):
        super().__init__(message)

    def show(self, file=None):
        if self.message:
            click.echo(_interrupted_line(self.message), err=True)


# The commands in the order a user runs them.
PIPELINE = ("generate", "info", "train", "eval", "sample", "render", "merge")


# Options that name a file, by config key, and the kind of file each takes (psfgen.shared.filekinds).
FILE_OPTIONS = {"data": "grid", "checkpoint": "checkpoint", "lens": "lens", "image": "image", "config_path": "config"}


def expect_file(path, key: str) -> None:
    """Refuse a file of another kind than option or config key ``key`` takes (a checkpoint as --data), in one
    line naming the option as the user set it and the option that takes the file; ``key`` "PATH" or "SHARDS":
    the command's argument."""
    from psfgen.shared.filekinds import refuse_other_kind

    def is_grid(hdf5: Path) -> bool:
        from psfgen.gridfile import GridFile

        try:
            GridFile.open(hdf5)
        except InputError:
            return False
        return True

    ctx = click.get_current_context()
    takes = {FILE_OPTIONS[p.name]: p.opts[-1] for p in ctx.command.params if p.name in FILE_OPTIONS}
    if key in FILE_OPTIONS:
        refuse_other_kind(path, FILE_OPTIONS[key], "{" + key + "}", takes, is_grid, {key: f"config key '{key}'"})
    else:  # psf info and psf merge read grid files
        refuse_other_kind(path, "grid", f"psf {ctx.command.name}", takes, is_grid)


class OneLineGroup(click.Group):
    """Usage errors of any kind (click's own parsing too) as one ``Error:`` line, exit 2; Ctrl-C anywhere
    as one line, exit 130 (click's own answer is ``Aborted!`` and 1); commands listed in pipeline order."""

    @staticmethod
    def _one_line(exc: click.UsageError):
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `psf`: show the help
            return exc
        return BadInput(exc.format_message())

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda name: PIPELINE.index(name) if name in PIPELINE else len(PIPELINE))

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise self._one_line(exc) from None
        except KeyboardInterrupt:
            pass
        raise Interruption()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._one_line(exc) from None
        except KeyboardInterrupt:
            pass
        # Raised after the handler, not in it: the interrupted frames (DataLoader workers, the traced lens) are freed
        # now, not kept alive through the exception's context until after Python's exit handlers, which would wait
        # for the workers for ever.
        raise Interruption()


# Each command: the one line `psf --help` lists it with, and the examples its own help ends with.
ABOUT = {
    "generate": (
        "Ray-trace PSFs over field, depth and focus into a grid file.",
        [
            "psf generate --lens cooke_triplet_f5 --depths 0.5,1,5 --out grid.h5",
            "psf generate --focus-m 0.5,2,inf --out refocus.h5",
            "psf generate --config configs/generate.yaml --shard 0/4",
        ],
    ),
    "info": ("Summarise a grid file: lens, grid, depths, rays, progress, noise.", ["psf info grid.h5"]),
    "train": (
        "Train the conditional VAE on a grid file; write its checkpoints.",
        ["psf train --data grid.h5 --run-dir runs/cvae", "psf train --data grid.h5 --run-dir runs/cvae --resume"],
    ),
    "eval": (
        "Score a model against traced PSFs and baselines; write a report.",
        [
            "psf eval --checkpoint runs/cvae/best.pt --data grid.h5 --out eval",
            "psf eval --baselines-only --data grid.h5 --out baselines",
        ],
    ),
    "sample": (
        "PSFs at any field points, or a dense map, from a trained model.",
        [
            "psf sample --checkpoint best.pt --depth 2 --coords '0,0;1,1' --out psfs.npz",
            "psf sample --checkpoint best.pt --depth 2 --grid 9 --out map.png",
        ],
    ),
    "render": (
        "Blur an image through the lens, each pixel with its own PSF.",
        [
            "psf render --checkpoint best.pt --image scene.png --depth 2 --out out.png",
            "psf render --checkpoint best.pt --image scene.png --depth-map depth.npy \\\n      --out out.png",
        ],
    ),
    "merge": (
        "Merge the shard files of one 'psf generate --shard K/N' run.",
        ["psf merge grid.shard*-of-0004.h5 --out grid.h5"],
    ),
}


def about(name: str) -> dict:
    """click's ``short_help`` (listed whole, where click cuts the docstring's first sentence with "...")
    and ``epilog`` (the examples; ``\\b`` keeps click from rewrapping them)."""
    line, examples = ABOUT[name]
    return {"short_help": line, "epilog": "\b\nExamples:\n" + "\n".join(f"  {e}" for e in examples)}


def set_option(example: str):
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help=f"Override one config key (repeatable), e.g. --set {example}.",
    )


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the psf-cvae, deeplens-core and torch versions and exit.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
def main(verbose: int, quiet: bool) -> None:
    """psf-cvae: learned point spread functions of a real lens, anywhere in the field."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    for noisy in ("deeplens", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    click.get_current_context().with_resource(_logs_above_bars())


def _logs_above_bars():
    """While a command runs, log lines go through tqdm.write: above the progress bar, never inside it.
    Only when the log goes to the console (not when a caller such as pytest has its own handlers)."""
    import contextlib

    from tqdm.contrib.logging import logging_redirect_tqdm

    console = [
        h
        for h in logging.getLogger().handlers
        if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
    ]
    return logging_redirect_tqdm() if console else contextlib.nullcontext()


@main.command(**about("generate"))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML config (e.g. configs/generate.yaml); options below override it.",
)
@click.option(
    "--lens",
    type=str,
    help="Lens file: DeepLens .json, Zemax .zmx or CODE V .seq, or the name of a lens shipped in data/lenses "
    "[default: acl12708u].",
)
@click.option(
    "--sensor-size-mm",
    type=str,
    help="Sensor width,height [mm], over the lens file's (a .zmx or .seq gives only the image radius).",
)
@click.option(
    "--sensor-res",
    type=str,
    help="Sensor columns,rows [px], over the lens file's (needed for a .zmx or .seq, which carry none).",
)
@click.option("--out", type=str, help="Output HDF5 file [default: grid.h5].")
@click.option(
    "--grid-size",
    type=int,
    help="N: trace an N x N field grid [default: from each depth's share of the default rays, 2e8 per colour, "
    "e.g. 51 at the default lens's 3 depths; 46 when --num-depths is a number].",
)
@click.option("--depths", type=str, help="Object depths in metres, comma separated, e.g. 0.4,1,2,5,20.")
@click.option(
    "--depth-min", type=float, help="Nearest depth [m] of a range spaced uniformly in 1/depth [default: 0.4]."
)
@click.option("--depth-max", type=float, help="Farthest depth [m] of the range [default: 20].")
@click.option(
    "--num-depths",
    type=str,
    help="Number of depths in the range, or auto: a short pilot trace picks 3, 5, 9, 17 or 33 from how fast "
    "the lens's PSFs change with depth (docs/ray_budget.md) [default: auto].",
)
@click.option(
    "--focus-m",
    type=str,
    help="Focus distances [m] to refocus the lens to (the sensor moves), comma separated, inf for infinity, e.g. "
    "0.5,1,2,inf: every depth is traced at each [default: the sensor where the lens file puts it].",
)
@click.option("--focus-min", type=float, help="Nearest focus [m] of a range spaced uniformly in 1/focus.")
@click.option("--focus-max", type=float, help="Farthest focus [m] of the range (inf allowed).")
@click.option(
    "--num-focus",
    type=str,
    help="Number of focus settings in the range (at least 2), or auto: a short pilot trace picks 3, 5, 9, 17 or 33 "
    "from how fast the lens's PSFs change with focus (docs/dataset.md, Focus) [default: auto].",
)
@click.option(
    "--spp",
    type=int,
    help="Rays per point and wavelength for the grid [default: from the same share, e.g. 25631 at the default "
    "lens's 3 depths; 18903 when --num-depths is a number].",
)
@click.option(
    "--ray-budget",
    type=float,
    help="Rays per colour for the grid over all depths (depths x grid size² x spp): picks both as measured "
    "best for each depth's share (docs/ray_budget.md), or with --grid-size or --spp the other.",
)
@click.option(
    "--kernel-size",
    type=str,
    help="Traced kernel side [px] (DeepLens's ks), or auto: a short pilot trace picks the smallest that keeps 99% "
    "of every PSF's rays (docs/dataset.md, Truncation) [default: auto].",
)
@click.option(
    "--kernel-size-small", type=int, help="Stored kernel side [px] after exact-area downsampling [default: 15]."
)
@click.option("--heldout", type=int, help="Number of off-grid evaluation points [default: 256].")
@click.option(
    "--heldout-spp", type=int, help="Rays of the held-out reference, split into two halves [default: 4 x spp]."
)
@click.option(
    "--noise-points",
    type=int,
    help="Grid points traced twice per depth to measure the noise floor [default: 32, or all points of a grid "
    "smaller than 6 x 6].",
)
@click.option("--block-rays", type=int, help="Rays per traced block; bounds memory [default: 4000000].")
@click.option("--seed", type=int, help="Random seed [default: 0].")
@click.option("--device", type=str, help="auto, cpu, cuda or cuda:K [default: auto].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file that holds another run.")
@click.option(
    "--shard",
    type=str,
    help="Trace only shard K of N (0-based, e.g. 0/4) into its own file; 'auto' takes K/N from torchrun or a "
    "SLURM array.",
)
@set_option("spp=2000")
@user_errors
def generate(config_path, sets, overwrite, **options):
    """Ray-trace a multi-depth PSF grid into a self-describing HDF5 file.

    Ctrl-C (or a crash) keeps every finished block: the same command again resumes.
    """
    from psfgen import GenerateConfig
    from psfgen.shared import configio

    if overwrite:
        options["overwrite"] = True
    cfg = configio.load(GenerateConfig, config_path, options, sets)
    expect_file(cfg.lens, "lens")
    from psfgen import (
        generate as run,  # torch and DeepLens: after the config is known to be good
    )

    try:
        path = run(cfg)
    except KeyboardInterrupt:
        path = None  # said below, outside the handler (see OneLineGroup.invoke)
    if path is None:
        from psfgen.generation import resolve_shard, shard_path

        where = cfg.out if cfg.shard is None else shard_path(Path(cfg.out), *resolve_shard(cfg.shard))
        # --overwrite would start the file again: the command that resumes leaves it out.
        raise Interruption(
            f"Interrupted; the finished blocks are kept in {where}. Resume with:\n  "
            f"{_same_command(click.get_current_context(), omit=('overwrite',))}"
        )
    click.echo(str(path))


@main.command(**about("merge"))
@click.argument("shards", nargs=-1, required=True)
@click.option("--out", type=str, required=True, help="The merged grid file.")
@click.option(
    "--virtual",
    is_flag=True,
    help="Map the shards with HDF5 virtual datasets instead of copying (keep the shards beside it).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@user_errors
def merge(shards, out, virtual, overwrite):
    """Merge the shard files of one 'psf generate --shard K/N' run into one grid file."""
    for shard in shards:
        expect_file(shard, "SHARDS")
    from psfgen.merge import merge as run

    click.echo(str(run(list(shards), out, overwrite=overwrite, virtual=virtual)))


@main.command(**about("info"))
@click.argument("path", type=str)
@user_errors
def info(path):
    """Summarise a grid file: lens, grid, depths, spp, progress, truncation, noise floor."""
    expect_file(path, "PATH")
    from psfgen.analysis.info import summary

    click.echo(summary(path))


@main.command(**about("train"))
@click.option(
    "--data", type=str, help="Grid HDF5 file written by 'psf generate' [required, unless the --config file sets data]."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML config (e.g. configs/cvae_v1.yaml); options below override it.",
)
@click.option(
    "--run-dir",
    type=str,
    help="Directory for TensorBoard logs, checkpoints and the resolved config [default: runs/cvae].",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint.")
@click.option(
    "--max-steps", type=int, help="Stop after this many optimiser steps [default: auto, 5000 per 7 500 grid PSFs]."
)
@click.option("--device", type=str, help="auto, cpu, cuda or cuda:K [default: auto].")
@click.option("--num-workers", type=int, help="DataLoader worker processes [default: 0].")
@set_option("kl_weight=1e-3")
@user_errors
def train(config_path, sets, resume, **options):
    """Train the conditional VAE on a grid file; writes TensorBoard logs and checkpoints.

    Ctrl-C (or SIGTERM) finishes the current step, saves latest.pt and prints the command
    that resumes the run (exit code 130).
    """
    from psfcvae.training.config import TrainConfig
    from psfgen.shared import configio

    cfg = configio.load(TrainConfig, config_path, options, sets)
    expect_file(cfg.data, "data")
    from psfcvae import train as run
    from psfcvae.training.interrupt import Interrupted

    main_rank = int(os.environ.get("RANK", "0")) == 0  # print once, also under torchrun
    stopped = None  # what to say when a signal stopped the run: said after the handlers (see OneLineGroup.invoke)
    try:
        run_dir = run(cfg, resume=resume)
    except Interrupted as stop:
        again = _same_command(click.get_current_context(), "--resume")
        stopped = f"Interrupted at step {stop.step}; saved {stop.checkpoint}. Resume with:\n  {again}" + (
            "\n  (under torchrun: the same torchrun command with --resume)"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1
            else ""
        )
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last checkpoint written stays
        latest = Path(cfg.run_dir) / "latest.pt"
        kept = f"{latest} (written earlier) is kept" if latest.exists() else "no checkpoint was written yet"
        stopped = f"Stopped at once by a second interrupt; {kept}."
    if stopped is not None:
        raise Interruption(stopped if main_rank else "")  # the main rank says it
    if main_rank:
        best = run_dir / "best.pt"
        click.echo(
            f"checkpoints: {run_dir / 'latest.pt'}"
            + (f", {best} (lowest error on the validation points)" if best.exists() else "")
        )
        click.echo(f"TensorBoard logs: {run_dir / 'tb'}  (tensorboard --logdir {run_dir / 'tb'})")
        ckpt = best if best.exists() else run_dir / "latest.pt"
        # best.pt was chosen on the validation points only, so the test points psf eval scores stay unseen
        click.echo(
            "next: "
            + shlex.join(["psf", "eval", "--checkpoint", str(ckpt), "--data", cfg.data, "--out", str(run_dir / "eval")])
            + "  # scores the test points, never seen in training nor used to choose the checkpoint"
        )


@main.command(name="eval", **about("eval"))
@click.option("--checkpoint", type=str, help="Checkpoint written by 'psf train' (latest.pt or best.pt).")
@click.option(
    "--data", type=str, required=True, help="Grid HDF5 file with a held-out set (the one the model trained on)."
)
@click.option("--out", type=str, required=True, help="Output directory for metrics.json, the PNGs and report.html.")
@click.option("--baselines-only", is_flag=True, help="Evaluate the interpolation baselines without a checkpoint.")
@click.option("--eigen-components", type=int, help="Components K of the eigen-PSF baseline [default: 32].")
@click.option("--log-scale", is_flag=True, help="Show PSFs on a log scale (3 decades) instead of linear.")
@click.option("--device", type=str, help="auto, cpu, cuda or cuda:K [default: auto].")
@user_errors
def evaluate_cmd(baselines_only, **options):
    """Measure the model against ray-traced truth and interpolation baselines; write a report."""
    from psfgen.shared import configio

    if baselines_only == (options["checkpoint"] is not None):
        raise click.UsageError("give either --checkpoint or --baselines-only")
    from psfcvae import EvalConfig, evaluate

    cfg = configio.load(EvalConfig, None, options)  # the one loader: typed, unknown keys refused, validated
    expect_file(cfg.data, "data")
    if cfg.checkpoint is not None:
        expect_file(cfg.checkpoint, "checkpoint")
    result = evaluate(cfg)
    click.echo(result["table"])
    click.echo(f"report: {Path(cfg.out) / 'report.html'}")


def _parse_coords(text: str, option: str = "--coords", example: str = "0.5,0.5;-0.3,0.8") -> list[tuple[float, float]]:
    try:
        pts = [tuple(float(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 for p in pts):
        raise click.BadParameter(f"expected 'x,y;x,y;...', e.g. '{example}'; got {text!r}", param_hint=option)
    return pts


@main.command(**about("sample"))
@click.option("--checkpoint", type=str, required=True, help="Checkpoint written by 'psf train'.")
@click.option("--coords", type=str, help="Field points 'x,y;x,y;...' in [-1, 1].")
@click.option(
    "--height-mm",
    type=str,
    help="Instead of --coords: image heights on the sensor 'x,y;...' [mm], x right, y up, 0 on the axis, where the "
    "points' chief rays land (docs/dataset.md, physical coordinates).",
)
@click.option(
    "--angle-deg",
    type=str,
    help="Instead of --coords: field angles 'x,y;...' [deg], per axis, positive where the image lies right or up.",
)
@click.option("--grid", "grid_m", type=int, help="Instead of --coords: a dense M x M map over the field.")
@click.option("--depth", type=float, help="Object depth [m] (needed when the model knows several depths).")
@click.option(
    "--focus-m",
    type=float,
    help="The distance the camera is focused at [m], inf allowed (needed when the model knows several).",
)
@click.option(
    "--mode",
    type=click.Choice(["mean", "sample"]),
    default="mean",
    show_default=True,
    help="Prior mean (deterministic) or a prior sample.",
)
@click.option(
    "--out",
    type=str,
    required=True,
    help="Output: .npz or .h5 (PSFs [B, 3, k, k] with coords [B, 2], depth_m and focus_m), .npy (PSFs alone, in "
    "--coords order; a --grid map row-major from the top-left, x = -1, y = +1) or .png (captioned mosaic for --grid, "
    "a row otherwise).",
)
@click.option(
    "--allow-extrapolation", is_flag=True, help="Accept coordinates, depths or focus outside the trained range."
)
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@user_errors
def sample(
    checkpoint, coords, height_mm, angle_deg, grid_m, depth, focus_m, mode, out, allow_extrapolation, device, overwrite
):
    """PSFs at arbitrary field points (or a dense map) from a trained model."""
    given = {"coords": coords, "height_mm": height_mm, "angle_deg": angle_deg}
    units = [k for k, v in given.items() if v is not None]
    if len(units) + (grid_m is not None) != 1:
        raise click.UsageError("give one of --coords, --height-mm, --angle-deg or --grid")
    if grid_m is not None and grid_m < 1:
        raise click.BadParameter(f"must be at least 1, got {grid_m}", param_hint="--grid")
    suffix = Path(out).suffix
    if suffix not in (".npz", ".h5", ".npy", ".png"):
        raise click.BadParameter(f"unknown output type {suffix!r}; use .npz, .h5, .npy or .png", param_hint="--out")
    option = {"coords": "--coords", "height_mm": "--height-mm", "angle_deg": "--angle-deg"}
    example = "0.5,0.5;-0.3,0.8" if units == ["coords"] else "1.2,-0.5;0,0.8"
    pts = _parse_coords(given[units[0]], option[units[0]], example) if units else None
    expect_file(checkpoint, "checkpoint")
    import numpy as np

    from psfcvae.api.sample import sample_psfs

    pts = np.array(pts) if pts is not None else None
    unit = units[0] if units else "coords"
    path = sample_psfs(
        checkpoint, out, pts, grid_m, depth, mode, allow_extrapolation, device, overwrite, unit, focus_m=focus_m
    )
    click.echo(str(path))


@main.command(**about("render"))
@click.option("--checkpoint", type=str, required=True, help="Checkpoint written by 'psf train'.")
@click.option("--image", type=str, help="Sharp input image: PNG, 8 or 16 bits, covering the sensor.")
@click.option(
    "--images",
    type=str,
    help="Instead of --image, many: a folder of PNGs (each with <stem>.npy as its depth map when present) or a "
    "text list, one 'image.png [depth]' a line; --out is then a folder, outputs already there are skipped.",
)
@click.option("--depth", type=float, help="Object depth [m] of the whole image.")
@click.option(
    "--depth-map",
    type=str,
    help="Instead of --depth: depth per pixel, .npy [H, W] in metres or a 16-bit PNG in millimetres.",
)
@click.option(
    "--focus-m",
    type=float,
    help="The distance the camera is focused at [m], inf allowed (needed when the model knows several): with "
    "--depth-map, a refocused photograph.",
)
@click.option("--out", type=str, required=True, help="Output PNG (the input's bit depth); a folder with --images.")
@click.option(
    "--exact",
    is_flag=True,
    help="Gather every pixel with its own kernel (the reference; slow for wide kernels) instead of the fast "
    "low-rank expansion (see docs/render.md).",
)
@click.option(
    "--error",
    type=float,
    default=DEFAULT_RENDER_ERROR,
    show_default=True,
    help="Fast path: the low-rank kernels' largest relative L2 error over the image (sets their number K).",
)
@click.option(
    "--psf-every",
    type=int,
    help="Evaluate the PSFs every S pixels and interpolate between [default: 1 with --exact, else 1% of the field].",
)
@click.option(
    "--field", type=str, help="The part of the sensor the image covers: 'x0,x1,y0,y1' in [-1, 1] [default: -1,1,-1,1]."
)
@click.option(
    "--field-mm",
    type=str,
    help="Instead of --field, in mm on the sensor: 'x0,x1,y0,y1', x right, y up, 0 on the axis.",
)
@click.option(
    "--linear",
    is_flag=True,
    help="The PNG holds linear values (default: sRGB-encoded; blurred in linear light either way).",
)
@click.option("--allow-extrapolation", is_flag=True, help="Accept depths or focus outside the trained range.")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (with --images: render every image again).")
@user_errors
def render(
    checkpoint,
    image,
    images,
    depth,
    depth_map,
    focus_m,
    out,
    exact,
    error,
    psf_every,
    field,
    field_mm,
    linear,
    allow_extrapolation,
    device,
    overwrite,
):
    """Blur an image (or many) through the lens, every pixel with its own PSF from the model."""
    expect_file(checkpoint, "checkpoint")
    if image is not None:
        expect_file(image, "image")
    from psfcvae.rendering.renderfile import render_batch, render_file

    if (image is None) == (images is None):
        raise click.UsageError("give either --image or --images")
    options = dict(
        srgb=not linear,
        method="exact" if exact else "auto",
        error=error,
        psf_every=psf_every,
        field=field,
        field_mm=field_mm,
        device=device,
        allow_extrapolation=allow_extrapolation,
        focus_m=focus_m,
    )
    if images is not None:
        if depth_map is not None:
            raise click.UsageError("--depth-map is for one --image; with --images a depth map is <stem>.npy or listed")
        written = render_batch(checkpoint, images, out, depth, overwrite=overwrite, **options)
        click.echo(f"{len(written)} image(s) written to {out}")
        return
    path = render_file(
        checkpoint,
        image,
        out,
        depth,
        depth_map,
        overwrite=overwrite,
        progress=logging.getLogger().level <= logging.INFO,
        **options,
    )
    click.echo(str(path))


if _starting:  # loaded: from here on Ctrl-C raises KeyboardInterrupt, and OneLineGroup answers it
    signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    main()
