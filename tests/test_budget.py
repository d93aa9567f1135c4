"""The ray budget: psfgen.plan.budget's rule, GenerateConfig's ray_budget key, `psf generate --ray-budget`."""

from __future__ import annotations

import json

import h5py
import pytest
from helpers import assert_one_line_error, run_cli, tiny_args, tiny_config

from psfgen.config import resolve
from psfgen.plan import budget
from psfgen.shared.errors import InputError


def test_without_a_budget_grid_size_and_spp_are_as_given_or_the_rule_at_the_spec_budget():
    # The spec's 20 x 20 at 1e5 is 4e7 rays per depth; the rule splits them 46 x 46 at 4e7 // 46^2 = 18903.
    assert budget.resolve(None, None, None) == (46, 18_903)
    assert budget.resolve(None, 7, None) == (7, 18_903) and budget.resolve(None, None, 2000) == (46, 2000)
    assert budget.resolve(None, 7, 1234) == (7, 1234)


def test_the_rule_gives_the_measured_choice_and_scales_with_the_budget():
    assert budget.choose(6_400_000) == (32, 6250)  # docs/ray_budget.md: 32 x 32 at 6.4e6 rays
    # 4e7 rays (the spec's 20 x 20 at 1e5): 32 * 6.25^0.2 = 46.2 points a side; 1.6e6: 32 * 0.25^0.2 = 24.3.
    assert budget.choose(40_000_000) == (46, 40_000_000 // 46**2)
    assert budget.choose(1_600_000) == (24, 1_600_000 // 24**2)
    # A small budget keeps spp >= MIN_SPP: 9000 rays give a 3x3 grid at 1000, not the rule's 8x8 at 140.
    assert budget.choose(9000) == (3, 1000)


def test_a_budget_with_one_of_grid_size_and_spp_fixes_the_other():
    assert budget.resolve(6_400_000, 32, None) == (32, 6250)
    assert budget.resolve(6_400_000, None, 25_000) == (16, 25_000)
    assert budget.resolve(1_000_000, None, 30_000) == (5, 30_000)  # floor(sqrt(33.3)): never over the budget


def test_a_budget_counts_every_depth():
    # 4 depths share 25.6e6 rays: 6.4e6 each, the rule's 32 x 32 at 6250; with a grid size, spp from a depth's share.
    assert budget.resolve(25_600_000, None, None, 4) == (32, 6250)
    assert budget.resolve(48_000, 4, None, 2) == (4, 1500)
    assert budget.resolve(1_000_000, None, 30_000, 2) == (4, 30_000)  # floor(sqrt(500000 / 30000)) = 4


@pytest.mark.parametrize(
    "args, needles",
    [
        ((3999, None, None), ("ray_budget", "at least 4000", "got 3999")),
        ((6_400_000, 16, 25_000), ("ray_budget", "grid_size", "spp", "at most one")),
        ((100_000, 12, None), ("12x12", "694 rays a point", "at most 10")),
        ((100_000, None, 50_000), ("not enough for a 2x2 grid", "200000")),
        ((11_999, None, None, 3), ("at least 12000", "at each of 3 depths")),
        ((100_000, 6, None, 3), ("6x6 grid at each of 3 depths", "925 rays a point", "at most 5")),
    ],
)
def test_bad_budgets_name_the_keys(args, needles):
    with pytest.raises(InputError) as exc:
        budget.resolve(*args)
    for needle in needles:
        assert needle in exc.value.render({}), exc.value.render({})


def test_config_records_the_budget_and_the_traced_split(tmp_path):
    cfg = tiny_config(tmp_path / "g.h5", spp=None, ray_budget=48_000)  # 2 depths of 4 x 4 at 1500
    assert cfg.spp is None  # the config is what was asked for; resolve() is the one step that decides
    cfg = resolve(cfg)
    assert (cfg.grid_size, cfg.spp, cfg.ray_budget, cfg.noise_points) == (4, 1500, 48_000, 4)
    # The budget is not part of run_params: the same grid spelled as --grid-size/--spp is the same run.
    assert cfg.run_params() == resolve(tiny_config(tmp_path / "g.h5", spp=1500)).run_params()


def without_spp(out):
    """tiny_args without --spp (the budget sets it)."""
    args = tiny_args(out)
    i = args.index("--spp")
    return args[:i] + args[i + 2 :]


def test_cli_ray_budget_with_grid_size_writes_the_spp_it_implies(tmp_path):
    out = tmp_path / "g.h5"
    result = run_cli([*without_spp(out), "--ray-budget", "48000"])  # 2 depths of 4x4: 48000 / 32 = 1500 a point
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        config = json.loads(f.attrs["config"])
        assert (config["grid_size"], config["spp"], config["ray_budget"]) == (4, 1500, 48_000)
        assert json.loads(f.attrs["run_params"])["spp"] == 1500
    info = run_cli(["info", str(out)])
    assert "budget      48,000 rays per colour (2 depths x grid size² x spp)" in info.output
    assert "requested ray_budget 48,000" in info.output


def test_cli_ray_budget_bad_input_is_one_line(tmp_path):
    out = tmp_path / "g.h5"
    both = run_cli([*tiny_args(out), "--ray-budget", "64000"])  # tiny_args gives --grid-size and --spp
    assert_one_line_error(both, "--ray-budget", "--grid-size", "--spp", "at most one")
    small = run_cli([*without_spp(out), "--ray-budget", "7000"])  # 2 depths need 2 x 4000
    assert_one_line_error(small, "--ray-budget must be at least 8000", "at each of 2 depths", "got 7000")
    assert not out.exists()
