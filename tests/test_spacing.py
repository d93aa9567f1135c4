"""Where sampling limits interpolation (psfgen.analysis.spacing): an oracle by hand, and a traced file."""

from __future__ import annotations

import numpy as np
import pytest

from psfgen.analysis.info import noise_floor, summary
from psfgen.analysis.spacing import LIMITING_RATIO, Spacing, check_file, spacing_errors
from psfgen.gridfile import GridFile


def _field(scale: np.ndarray, n: int = 4) -> np.ndarray:
    """[D, n, n, 3, 5, 5]: one fixed pattern, times scale[d] at depth d, the same at every field point."""
    pattern = np.arange(1, 3 * 25 + 1, dtype=np.float64).reshape(3, 5, 5)
    return scale[:, None, None, None, None, None] * np.broadcast_to(pattern, (n, n, 3, 5, 5))


def _errors(psf, depths, lit=None, noise2=0.0) -> Spacing:
    lit = np.ones(psf.shape[:3], bool) if lit is None else lit
    return spacing_errors(lambda d: psf[d], np.asarray(depths), lit, noise2)


def test_linear_in_inverse_depth_and_field_is_exact():
    u = np.array([1.0, 1.5, 3.0])  # 1/depth, unevenly spaced: the prediction weighs its neighbours
    x = np.linspace(-1, 1, 5)
    psf = _field(2 + u, n=5) * (3 + x[None, :, None, None, None, None]) * (4 - x[None, None, :, None, None, None])
    s = _errors(psf, 1 / u)
    assert s.depth == pytest.approx(0, abs=1e-12)
    # (3 + x_row)(4 - x_col) is bilinear: linear along every row and every column, so exact too.
    assert s.field == pytest.approx(0, abs=1e-12)


def test_quadratic_in_inverse_depth_by_hand():
    # scale 1 + u² at u = 1, 2, 3: the middle (5) is predicted as (2 + 10) / 2 = 6, off by 1/5 everywhere.
    u = np.array([1.0, 2.0, 3.0])
    psf = _field(1 + u**2)
    s = _errors(psf, 1 / u)
    assert s.depth == pytest.approx(0.2)
    assert s.field == pytest.approx(0.0)
    assert "depth limits" in s.describe()
    # One trace's noise of 10%: the three PSFs bring 1.5 x 0.01 of it; what is left is the change.
    assert _errors(psf, 1 / u, noise2=0.01).depth == pytest.approx(np.sqrt(0.04 - 0.015))
    # A dark middle PSF (zeros, not lit) leaves nothing to measure across depth at that point...
    lit = np.ones(psf.shape[:3], bool)
    dark = psf.copy()
    dark[1, 0, 0] = 0
    lit[1, 0, 0] = False
    assert _errors(dark, 1 / u, lit).depth == pytest.approx(0.2)  # ...and the rest are as before


def test_noise_is_removed_with_each_triples_weights():
    # Linear in 1/depth at uneven depths (the middle weighs its neighbours 0.875 / 0.125), 5% independent noise
    # on every PSF: nothing but noise is left to explain, so nothing may remain once it is removed.
    u = np.array([1.0, 1.25, 3.0])  # 1/depth
    truth = _field(2 + u, n=8)
    noisy = truth * (1 + 0.05 * np.random.default_rng(1).normal(size=truth.shape))
    s = _errors(noisy, 1 / u, noise2=0.05**2)
    assert s.depth < 0.015  # the mid-point rule's 1.5 instead of 1 + 0.875² + 0.125² would leave ~2.6%
    assert s.field < 0.015


def test_field_limits_when_the_field_changes_fast():
    x = np.linspace(0, 1, 4)
    psf = _field(np.ones(3)) * (1 + 3 * x[None, None, :, None, None, None] ** 2)
    s = _errors(psf, [1.0, 2.0, 3.0])
    assert s.field > 0 and s.depth == pytest.approx(0.0)
    assert "the field grid limits" in s.describe()
    # Neither limits when the two are within LIMITING_RATIO of each other.
    assert "limits" not in Spacing(field=0.1, depth=0.1 * LIMITING_RATIO * 0.9, noise=0.0).describe()
    assert "n/a" in _errors(psf[:2], [1.0, 2.0]).describe()  # two depths: nothing across depth


def test_a_traced_file(tiny_grid):
    s = check_file(GridFile.open(tiny_grid))  # 4 x 4 at 0.5 and 2 m: two depths, so no depth figure
    assert np.isnan(s.depth) and 0 < s.field < 2
    # One trace's noise, pooled: two traces differ by about sqrt(2) of it (psf info's noise floor is a mean).
    assert s.noise * np.sqrt(2) == pytest.approx(np.nanmean(noise_floor(GridFile.open(tiny_grid))), rel=0.35)
    assert "sampling    a grid PSF predicted from its neighbours" in summary(tiny_grid)


def test_across_focus_linear_in_inverse_focus_is_exact_and_quadratic_by_hand():
    # 3 focus settings (0.5 m, 2 m, inf: 1/focus 2, 0.5, 0) x 2 depths, planes f*D + d.
    focus, depths = np.array([0.5, 2.0, np.inf]), np.array([1.0, 2.0])
    v = 1.0 / focus
    linear = _field(np.repeat(3 + v, 2))  # [6, ...]: plane f*2 + d scaled by 3 + 1/focus
    lit = np.ones(linear.shape[:3], bool)
    s = spacing_errors(lambda p: linear[p], depths, lit, focus=focus)
    assert s.focus == pytest.approx(0, abs=1e-12) and s.depth != s.depth  # two depths: no depth figure
    # scale 1 + v² at v = 2, 0.5, 0: the middle (1.25) is predicted as 0.25 * 5 + 0.75 * 1 = 2, off by 0.6.
    quad = _field(np.repeat(1 + v**2, 2))
    s = spacing_errors(lambda p: quad[p], depths, lit, focus=focus)
    assert s.focus == pytest.approx(0.6)
    assert "60.0% across focus" in s.describe() and "focus limits" in s.describe()
    # Two focus settings: nothing to measure across focus, and the line says nothing of it.
    two = spacing_errors(lambda p: quad[p], depths, lit[:4], focus=focus[:2])
    assert two.focus != two.focus and "focus" not in two.describe()


def test_depth_and_focus_limit_together():
    s = Spacing(field=0.1, depth=0.8, noise=0.0, focus=0.9)
    assert "depth and focus limit; more depths and more focus settings" in s.describe()
    assert "the field grid limits" in Spacing(field=0.9, depth=0.1, noise=0.0, focus=0.2).describe()
    assert "limit" not in Spacing(field=0.5, depth=0.8, noise=0.0, focus=0.9).describe()
