from __future__ import annotations

import numpy as np
import pytest

from qinject.core.numerics import QType
from qinject.core.stats import BINS, TensorStats, select_range


def test_streaming_equals_one_shot_minmax(rng) -> None:
    data = rng.standard_normal((50, 1000)) * np.linspace(0.1, 20, 50)[:, None]
    s = TensorStats()
    for row in data:
        s.update(row)
    assert (s.minimum, s.maximum) == (pytest.approx(data.min()), pytest.approx(data.max()))
    assert s.count == data.size == int(s.counts.sum())


def test_histogram_growth_is_exact(rng) -> None:
    # Values that land on bin centres of the final grid must be counted in the right bin whatever
    # order the range grew in.
    s = TensorStats()
    s.update(np.array([0.1]))
    s.update(np.array([100.0]))
    final = TensorStats()
    final.update(np.array([0.1, 100.0]))
    assert s.half_range == final.half_range
    assert np.array_equal(s.counts, final.counts)


def test_state_size_does_not_grow(rng) -> None:
    s = TensorStats()
    for _ in range(200):
        s.update(rng.standard_normal(4096))
    assert s.counts.shape == (BINS,)


def test_percentile_and_mse_clip_outliers(rng) -> None:
    data = np.concatenate([rng.standard_normal(100_000), [1000.0]])
    s = TensorStats()
    s.update(data)
    t = QType(8, True)
    assert select_range(s, "minmax", t, True) == (pytest.approx(data.min()), 1000.0)
    lo, hi = select_range(s, "percentile", t, True, percentile=99.9)
    assert hi < 10 and lo > -10


def test_mse_and_entropy_clip_gaussian_tails(rng) -> None:
    # For Gaussian data the MSE-optimal 4-bit clip is near 2.5 sigma, well inside the ~4.4 sigma max;
    # one lone outlier would not be clipped by MSE (its squared error outweighs the rounding noise).
    s = TensorStats()
    s.update(rng.standard_normal(100_000))
    lo, hi = select_range(s, "mse", QType(4, True), True)
    assert 1.5 < hi < 0.8 * s.maximum
    lo, hi = select_range(s, "entropy", QType(8, True), True)
    assert 1.5 < hi < s.maximum


def test_entropy_on_nonnegative_data_keeps_zero_floor(rng) -> None:
    s = TensorStats()
    s.update(np.abs(rng.standard_normal(50_000)))
    lo, hi = select_range(s, "entropy", QType(8, False), False)
    assert lo == 0.0 and 1.0 < hi <= s.maximum


def test_nonfinite_values_are_counted_and_ignored() -> None:
    s = TensorStats()
    s.update(np.array([1.0, np.nan, np.inf, -2.0]))
    assert s.nonfinite == 2 and (s.minimum, s.maximum) == (-2.0, 1.0)


def test_unknown_method() -> None:
    s = TensorStats()
    s.update(np.ones(3))
    with pytest.raises(ValueError, match="unknown calibration method"):
        select_range(s, "magic", QType(8, True), True)


def test_discrete_values_are_never_clipped(rng) -> None:
    one_hot = np.eye(257, dtype=np.float32)[rng.integers(0, 257, 512)]
    s = TensorStats()
    s.update(one_hot)
    for method in ("percentile", "mse", "entropy"):
        assert select_range(s, method, QType(8, False), False, percentile=99.0) == (0.0, 1.0)
