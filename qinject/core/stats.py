"""Streaming activation statistics and the choice of a clipping range from them.

Pure numpy, no IR. A ``TensorStats`` sees one batch at a time and keeps a fixed-size state (min,
max, and optionally a histogram of ``BINS`` bins), so calibration memory does not grow with the
number of samples. The histogram covers [-R, R] with R a power of two that doubles as data
arrives; doubling merges neighbouring bins exactly, so no sample is ever re-binned approximately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qinject.core.numerics import QType, fake_quantize, scale_zero_point

BINS = 4096  # per tensor: 32 KiB of int64 counts, whatever the number of samples
METHODS = ("minmax", "percentile", "mse", "entropy")
MAX_DISTINCT = 256


@dataclass
class TensorStats:
    """Running statistics of one activation tensor."""

    with_histogram: bool = True
    count: int = 0
    sum_squares: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    nonfinite: int = 0
    half_range: float = 0.0
    # The distinct values seen, while there are at most MAX_DISTINCT of them (then None).
    distinct: np.ndarray | None = field(default_factory=lambda: np.empty(0, np.float32))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def update(self, batch: np.ndarray) -> None:
        """Fold one batch of values into the statistics."""
        x = np.asarray(batch, dtype=np.float32).ravel()
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            x = x[finite]
        if x.size == 0:
            return
        self.count += x.size
        if self.distinct is not None:
            # Only the first batch of continuous data pays for np.unique; then tracking stops.
            self.distinct = np.union1d(self.distinct, np.unique(x))
            if self.distinct.size > MAX_DISTINCT:
                self.distinct = None
        # Accumulated in float64: a float32 dot overflows once values pass ~1e19 (constant-weight nets reach that).
        self.sum_squares += float(np.einsum("i,i->", x, x, dtype=np.float64))
        lo, hi = float(x.min()), float(x.max())
        self.minimum, self.maximum = min(self.minimum, lo), max(self.maximum, hi)
        if self.with_histogram:
            self._grow_to(max(abs(lo), abs(hi)))
            width = 2 * self.half_range / BINS
            idx = np.clip(((x + self.half_range) / width).astype(np.int64), 0, BINS - 1)
            self.counts += np.bincount(idx, minlength=BINS)

    def _grow_to(self, absmax: float) -> None:
        if absmax <= self.half_range:
            return
        if self.half_range == 0.0:
            # Start at the smallest power of two covering the data (2**-30 at least).
            self.half_range = float(2.0 ** max(np.ceil(np.log2(absmax)) if absmax > 0 else -30, -30))
            return
        while self.half_range < absmax:
            # Doubling R: bins (2k, 2k+1) of the old grid become bin k of its centre half.
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(BINS, dtype=np.int64)
            self.counts[BINS // 4: 3 * BINS // 4] = merged
            self.half_range *= 2

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, BINS + 1)


def select_range(stats: TensorStats, method: str, qtype: QType, symmetric: bool,
                 percentile: float = 99.99) -> tuple[float, float]:
    """The clipping range [lo, hi] to quantize a tensor with, by calibration method."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r} (expected one of {', '.join(METHODS)})")
    if stats.count == 0:
        return 0.0, 0.0
    if method == "minmax" or not stats.with_histogram or stats.half_range == 0.0:
        return stats.minimum, stats.maximum
    if stats.distinct is not None:
        # A few discrete values (a one-hot, a mask): every clipping method would cut the rare ones,
        # e.g. a percentile below 99.6 maps every 1 of a 1-in-257 one-hot to 0.
        return stats.minimum, stats.maximum
    if method == "percentile":
        return _percentile_range(stats, percentile)
    if method == "mse":
        return _mse_range(stats, qtype, symmetric)
    return _entropy_range(stats, qtype)


def _percentile_range(stats: TensorStats, p: float) -> tuple[float, float]:
    cdf = np.cumsum(stats.counts) / stats.counts.sum()
    edges = stats.edges
    lo = edges[np.searchsorted(cdf, (100.0 - p) / 100.0)]
    hi = edges[min(np.searchsorted(cdf, p / 100.0) + 1, BINS)]
    return max(float(lo), stats.minimum), min(float(hi), stats.maximum)


def _mse_range(stats: TensorStats, qtype: QType, symmetric: bool) -> tuple[float, float]:
    """Shrink [min, max] by the factor that minimises the expected squared quantization error."""
    candidates = [(stats.minimum * a, stats.maximum * a) for a in np.linspace(1.0, 0.05, 96)]
    return min(candidates, key=lambda r: expected_mse(stats, r[0], r[1], qtype, symmetric))


def expected_mse(stats: TensorStats, lo: float, hi: float, qtype: QType, symmetric: bool) -> float:
    """Mean squared error of quantizing the observed values with range [lo, hi].

    Values inside the range carry uniform rounding noise scale^2/12; values outside it are clipped
    (their error taken at their bin centre). Without a histogram, only the rounding noise is known.
    """
    scale, zp = scale_zero_point(lo, hi, qtype, symmetric)
    rounding = float(scale) ** 2 / 12
    if not stats.with_histogram or stats.half_range == 0.0 or stats.count == 0:
        return rounding
    edges = stats.edges
    used = stats.counts > 0
    centres, weights = ((edges[:-1] + edges[1:]) / 2)[used], stats.counts[used].astype(np.float64)
    err = (fake_quantize(centres, scale, zp, qtype) - centres) ** 2
    err = np.where((centres >= lo) & (centres <= hi), rounding, err)
    return float(np.dot(weights, err)) / float(weights.sum())


def expected_sqnr_db(stats: TensorStats, lo: float, hi: float, qtype: QType, symmetric: bool) -> float:
    """Predicted SQNR (dB) of quantizing this tensor with range [lo, hi]."""
    if stats.count == 0:
        return float("inf")
    signal = stats.sum_squares / stats.count
    noise = expected_mse(stats, lo, hi, qtype, symmetric)
    if noise == 0.0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-300) / noise))


def _entropy_range(stats: TensorStats, qtype: QType) -> tuple[float, float]:
    """TensorRT-style KL calibration on the magnitude histogram: the threshold T minimising
    KL(P || Q), P the clipped reference distribution and Q its quantization to the code levels."""
    half = BINS // 2
    nonneg = stats.minimum >= 0
    magnitude = (stats.counts[half:] + (0 if nonneg else stats.counts[:half][::-1])).copy()
    # The bin at zero holds exact zeros (ReLU, padding) that every zero-point-aligned grid represents
    # exactly; left in, its spike is smeared over its merge group and drives the threshold far too low.
    magnitude[0] = 0    # Signed data spends half the codes on each side, whatever the storage type's signedness.
    levels = 2**qtype.bits if nonneg else 2 ** (qtype.bits - 1)
    top = int(np.nonzero(magnitude)[0].max()) + 1
    if levels >= top:
        return stats.minimum, stats.maximum
    best_i, best_kl = top, np.inf
    for i in range(levels, top + 1, max(1, (top - levels) // 256)):
        p = magnitude[:i].astype(np.float64).copy()
        p[i - 1] += magnitude[i:].sum()
        q = _requantize(magnitude[:i].astype(np.float64), levels)
        mask = p > 0
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    threshold = best_i * (stats.half_range / half)
    lo = 0.0 if nonneg else max(-threshold, stats.minimum)
    return lo, min(threshold, stats.maximum)


def _requantize(p: np.ndarray, levels: int) -> np.ndarray:
    """Merge ``p`` into ``levels`` groups and spread each group's mass over its non-empty bins."""
    q = np.zeros_like(p)
    for chunk in np.array_split(np.arange(p.size), levels):
        nz = p[chunk] > 0
        if nz.any():
            q[chunk[nz]] = p[chunk].sum() / nz.sum()
    return q
