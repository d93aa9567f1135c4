"""num_depths auto (psfgen.plan.depthplan): the pilot's arithmetic by hand, the choice, the config, a real pilot."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import TINY, assert_one_line_error, run_cli, tiny_args, tiny_config

from psfgen.config import resolve
from psfgen.plan import depthplan
from psfgen.shared.errors import InputError

M = depthplan.PILOT_DEPTHS


def _pilot_field(scale: np.ndarray, k: int = 5) -> np.ndarray:
    """[M, 2, 3, k, k]: a fixed pattern times scale[m] at pilot depth m, at two field points."""
    pattern = np.arange(1, 3 * k * k + 1, dtype=np.float64).reshape(3, k, k)
    return scale[:, None, None, None, None] * np.broadcast_to(pattern, (2, 3, k, k))


def test_quadratic_in_inverse_depth_by_hand():
    # scale 1 + u² at M depths u uniform in [1, 3]: a mid-point between neighbours h apart in u is predicted
    # as 1 + u² + h², off by h² / (1 + u²); pooled over the mid-points of D depths (h = their half spacing).
    u = np.linspace(1, 3, M)
    truth = _pilot_field(1 + u**2)
    ok = np.ones((M, 2), bool)
    errors, noise = depthplan.midpoint_errors(truth, truth, ok)
    assert noise == 0
    for d in (3, 5, 9, 17):
        step = (M - 1) // (d - 1)
        mids = u[step // 2 :: step][: d - 1]
        h = u[step // 2] - u[0]
        assert errors[d] == pytest.approx(h**2 * np.sqrt(len(mids) / ((1 + mids**2) ** 2).sum()), rel=1e-9), d
    assert errors[3] > errors[5] > errors[9] > errors[17]


def test_noise_is_measured_and_removed():
    # Two independent traces, each 2% relative noise on a field quadratic in 1/depth: the pilot reports one
    # trace's noise, and with it removed the errors are the noiseless ones.
    u = np.linspace(1, 3, M)
    truth = _pilot_field(1 + u**2, k=31)  # enough pixels for the noise's cross terms to average out
    rng = np.random.default_rng(0)
    a, b = (truth * (1 + 0.02 * rng.normal(size=truth.shape)) for _ in range(2))
    ok = np.ones((M, 2), bool)
    clean, _ = depthplan.midpoint_errors(truth, truth, ok)
    errors, noise = depthplan.midpoint_errors(a, b, ok)
    assert noise == pytest.approx(0.02, rel=0.05)
    for d in (3, 5):  # where the change is well above the noise
        assert errors[d] == pytest.approx(clean[d], rel=0.1), d
    # Without the correction the D = 9 figure would be mostly noise: the means of two traces at three depths.
    raw = np.sqrt(clean[9] ** 2 + 0.75 * noise**2)
    assert abs(errors[9] - clean[9]) < 0.3 * abs(raw - clean[9])
    # A dark pilot PSF (not lit) is left out: zeros there change nothing.
    dark, ok = truth.copy(), np.ones((M, 2), bool)
    dark[4, 1], ok[4, 1] = 0, False
    assert depthplan.midpoint_errors(dark, dark, ok)[0] == pytest.approx(depthplan.midpoint_errors(truth, truth, ok)[0])


def test_the_fewest_depths_within_the_bound_win():
    e = depthplan.DEPTH_ERROR
    assert depthplan.choose({3: 2 * e, 5: e, 9: e / 2, 17: 0.0}) == 5
    assert depthplan.choose({3: e / 2, 5: 0.0, 9: 0.0, 17: 0.0}) == 3
    assert depthplan.choose({3: 9 * e, 5: 5 * e, 9: 3 * e, 17: 2 * e}) == 33
    assert depthplan.choose({3: 2 * e, 5: e, 9: 0.0, 17: 0.0}) == 5  # at the bound is within it
    assert depthplan.choose({3: float("nan"), 5: 2 * e, 9: e / 2, 17: 0.0}) == 9  # unmeasured is not within


def test_config_takes_auto_and_refuses_other_words(tmp_path):
    cfg = tiny_config(tmp_path / "g.h5", depths=None, depth_min=0.5, depth_max=5.0, num_depths="auto")
    assert cfg.auto_depths() and cfg.depth_count() is None
    chosen = resolve(cfg, 5)
    np.testing.assert_allclose(1 / chosen.depth_values(), np.linspace(2.0, 0.2, 5))
    assert (chosen.grid_size, chosen.spp, chosen.num_depths) == (TINY["grid_size"], TINY["spp"], 5)
    with pytest.raises(InputError, match="num_depths"):
        tiny_config(tmp_path / "g.h5", depths=None, num_depths="many")
    with pytest.raises(InputError, match="depth_max"):
        tiny_config(tmp_path / "g.h5", depths=None, depth_min=1.0, depth_max=1.0, num_depths="auto")
    # A budget too small for the fewest depths the pilot may choose is refused before any pilot is traced.
    with pytest.raises(InputError, match="at each of 3 depths"):
        tiny_config(tmp_path / "g.h5", depths=None, spp=None, ray_budget=5000, num_depths="auto")
    # Bad counts with a budget are one line too (the budget's arithmetic would divide by them).
    for bad in (2.5, 0, -2):
        with pytest.raises(InputError, match="num_depths"):
            tiny_config(tmp_path / "g.h5", depths=None, spp=None, ray_budget=10**6, num_depths=bad)
    # Without grid size, spp or budget, auto spends the default 5 depths' rays over the depths it picks.
    free = tiny_config(tmp_path / "g.h5", depths=None, grid_size=None, spp=None, noise_points=None, num_depths="auto")
    nine = resolve(free, 9)
    assert 9 * nine.grid_size**2 * nine.spp <= 5 * 46**2 * 18_903 < 9 * (nine.grid_size + 1) ** 2 * nine.spp


def _auto_args(out):
    args = tiny_args(out, grid_size=2)  # 2 x 2: the depths are what this is about
    i = args.index("--depths")
    return [*args[:i], *args[i + 2 :], "--num-depths", "auto", "--depth-min", "0.5", "--depth-max", "5"]


@pytest.mark.slow
def test_a_real_pilot_chooses_records_and_resumes(tmp_path, monkeypatch, caplog):
    # The real pilot at fewer rays and points: seconds, not a minute.
    monkeypatch.setattr(depthplan, "PILOT_SPP", 1000)
    monkeypatch.setattr(depthplan, "PILOT_FIELD", (0.0, 1.0))
    out = tmp_path / "g.h5"
    result = run_cli(_auto_args(out))
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        plan = json.loads(f.attrs["depth_plan"])
        depths = f["depths"][:]
        assert plan["num_depths"] in depthplan.CHOICES and len(depths) == plan["num_depths"]
        np.testing.assert_allclose(1 / depths[::-1], np.linspace(0.2, 2.0, len(depths)))
        assert json.loads(f.attrs["config"])["num_depths"] == len(depths)  # the resolved config: auto decided
    assert "num_depths auto" in run_cli(["info", str(out)]).output
    # The same command again: the file's choice, no second pilot (which might choose otherwise).
    monkeypatch.setattr(depthplan, "pilot", lambda *a, **k: pytest.fail("a second pilot ran"))
    again = run_cli(_auto_args(out))
    assert again.exit_code == 0, again.output


def test_auto_with_shard_is_one_line(tmp_path):
    out = tmp_path / "g.h5"
    result = run_cli([*_auto_args(out), "--shard", "0/2"])
    assert_one_line_error(result, "--num-depths auto", "--shard")
    assert not list(tmp_path.iterdir())
