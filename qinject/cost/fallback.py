"""What a measured table's own entries say about the shapes it lacks: a fallback fitted per op and mode.

A measured table's roofline comes from three micro-benchmarks (a large MatMul, a large Add, a chain of
one-element Adds), and prices real kernels badly at both ends. Small kernels cost far more than the
one-element Add's overhead: the shipped local-cpu table measures a QuantizeLinear of 1024 elements at
2.0 us where the roofline says 0.5, so a sub-millisecond model's Q/DQ pairs and integer kernels came out
nearly free and its estimate 0.86x where it measures 1.45x. Large kernels run at their own fraction of
the peak, different per op and precision (the table's int8 Conv entries run at 25-110% of the int8 peak,
its float ones at 30-170% of the float one).

So, for every (op, weight bits, activation bits, mode) with at least ``MIN_ENTRIES`` entries of distinct
size, ``latency = fixed + scale * work`` is fitted by least squares on the relative error, where
``work`` is the entry's roofline time without the per-op overhead; ops without a fit of their own
(float elementwise ops, mostly) take the fit pooled over every MAC-free op at their widths and mode.
The estimate prices a shape the table lacks with it (``Fallback.price``), and says so in the node's
``source``. Deterministic: the fit reads the table only, never a clock.

A line fitted on small kernels says nothing about large ones: the shipped table's int8 MatMul entries
(at most 13 us of roofline work) run at 4-10x their work, a fixed cost the slope absorbs (5.1), and
carried that slope to BERT's 768x3072 MatMuls (600 us of work), which priced a W8A8 BERT at 0.71x of
float where it measures 0.40x. The table does hold one large measurement of those kernels: its
roofline's peaks, timed on a ``PEAK_MATMUL`` MatMul in float and W8A8 (``qinject.profiler.fit_roofline``),
run by definition at exactly their work. So the MatMul and Gemm fits at those two widths leave the
fitted line at the group's largest entry and join the peak's point on a straight line, then grow
with the work as the peak did (``Fit.__call__``): shapes the entries span keep their price, larger ones
go to the measured peak.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from qinject.core import op_facts
from qinject.core.plan import STATIC
from qinject.cost.latency_table import FLOAT_BITS, PEAK_MATMUL, Entry, LatencyTable, Roofline

MIN_ENTRIES = 3  # a line through fewer points says nothing about its slope
POOLED = "*"  # the fit over every MAC-free op of a width and mode
CONVERSIONS = ("QuantizeLinear", "DequantizeLinear")
MIN_SCALE = 0.05
PEAK_OPS = ("MatMul", "Gemm")  # the kernel the roofline's peaks are timed on (a Gemm runs the same GEMM)
PEAK_BITS = ((FLOAT_BITS, FLOAT_BITS), (8, 8))  # the widths they are timed at: fp32 and W8A8


@dataclass(frozen=True)
class Fit:
    """``latency_us = fixed_us + scale * work_us`` for one group of entries, up to ``largest_us`` (the
    group's largest entry's work) where a measured peak lies beyond it: from there a straight line to
    the peak's point (``peak_us``, at which latency equals work), and beyond the peak the work itself."""

    fixed_us: float
    scale: float
    entries: int
    largest_us: float = math.inf
    peak_us: float = math.inf

    def __call__(self, work_us: float) -> float:
        if work_us <= self.largest_us:
            return self.fixed_us + self.scale * work_us
        if work_us >= self.peak_us:
            return work_us
        edge = self.fixed_us + self.scale * self.largest_us
        return edge + (self.peak_us - edge) * (work_us - self.largest_us) / (self.peak_us - self.largest_us)

    def toward_peak(self, largest_us: float, peak_us: float) -> Fit:
        """This fit, joined beyond ``largest_us`` to a peak measured at ``peak_us`` of work (unchanged
        where the peak is not beyond the largest entry, or the line already costs more there)."""
        if peak_us <= largest_us or self.fixed_us + self.scale * largest_us >= peak_us:
            return self
        return Fit(self.fixed_us, self.scale, self.entries, largest_us, peak_us)


@dataclass(frozen=True)
class Fallback:
    """The fits of one table, by (op, weight bits, activation bits, mode)."""

    fits: dict[tuple[str, int, int, str], Fit]

    def fit_for(self, op: str, weight_bits: int, activation_bits: int, mode: str = STATIC) -> Fit | None:
        own = self.fits.get((op, weight_bits, activation_bits, mode))
        if own is not None or op in CONVERSIONS or _has_macs(op):
            return own
        return self.fits.get(_pooled(weight_bits, activation_bits, mode))

    def price(self, op: str, weight_bits: int, activation_bits: int, mode: str, work_us: float
              ) -> float | None:
        """The fitted latency of a kernel whose roofline work (without the per-op overhead) is
        ``work_us``; None where the table has too few entries to fit."""
        fit = self.fit_for(op, weight_bits, activation_bits, mode)
        return None if fit is None else fit(work_us)


def fit(table: LatencyTable) -> Fallback:
    """Fit ``table``'s entries per op and mode (empty for an analytic table: its roofline is the model)."""
    if table.kind != "measured":
        return Fallback({})
    groups: dict[tuple[str, int, int, str], list[tuple[float, float]]] = defaultdict(list)
    for entry in table:
        work = entry_work_us(entry, table.roofline)
        if work is None:
            continue
        point = (work, entry.latency_us)
        groups[(entry.op, entry.weight_bits, entry.activation_bits, entry.mode)].append(point)
        if entry.op not in CONVERSIONS and not _has_macs(entry.op) and not op_facts.lookup("", entry.op).zero_copy:
            groups[_pooled(entry.weight_bits, entry.activation_bits, entry.mode)].append(point)
    # A kernel's fixed cost is the runtime's (dispatch, threads), not the op's: it is read where the
    # sizes span enough to tell it from the slope, the MAC-free float ops and the conversions; the
    # other groups, whose entries are all large (batch-64 or 224-pixel convolutions), give a slope
    # with that fixed cost held (their own intercept would be an extrapolation: 16-44 us).
    launch = _least_squares(groups.get((POOLED, FLOAT_BITS, FLOAT_BITS, STATIC), []))
    fixed = launch.fixed_us if launch is not None else table.roofline.op_overhead_us
    fits = {}
    for key, points in groups.items():
        free = key[0] in CONVERSIONS or key == (POOLED, FLOAT_BITS, FLOAT_BITS, STATIC)
        found = _least_squares(points) if free else _slope(points, fixed)
        if found is not None:
            op, w_bits, a_bits, mode = key
            peak = peak_work_us(table.roofline, w_bits, a_bits) if op in PEAK_OPS and mode == STATIC else None
            fits[key] = found if peak is None else found.toward_peak(max(w for w, _ in points), peak)
    return Fallback(fits)


def peak_work_us(roofline: Roofline, weight_bits: int, activation_bits: int) -> float | None:
    """The roofline work of the MatMul its peaks were timed on, at widths they were timed at (None
    at others: 16-bit and W4A8 run as dequantize + float, which no peak measured)."""
    if (weight_bits, activation_bits) not in PEAK_BITS:
        return None
    m, k, n = PEAK_MATMUL
    peak = Entry("MatMul", f"{m}x{k};{k}x{n}->{m}x{n}", weight_bits, activation_bits, 1.0)
    return entry_work_us(peak, roofline)


def _slope(points: list[tuple[float, float]], fixed: float) -> Fit | None:
    """The scale minimising the squared relative error with the fixed cost held."""
    if len({round(w, 6) for w, _ in points}) < MIN_ENTRIES:
        return None
    a = sum(w**2 / y**2 for w, y in points)
    b = sum((y - fixed) * w / y**2 for w, y in points)
    # a scale near zero is a group whose entries do not grow with the work (noise): no fit
    return Fit(fixed, b / a, len(points)) if a > 0 and b / a > MIN_SCALE else None


def _least_squares(points: list[tuple[float, float]]) -> Fit | None:
    """Fixed cost and scale minimising the squared relative error; None with too few distinct sizes
    or a slope that is not positive (the sizes say nothing about how the kernel grows)."""
    if len({round(w, 6) for w, _ in points}) < MIN_ENTRIES:
        return None
    # rows (1/y, w/y) . (f, s) ~ 1
    a11 = sum(1 / y**2 for _, y in points)
    a12 = sum(w / y**2 for w, y in points)
    a22 = sum(w**2 / y**2 for w, y in points)
    b1 = sum(1 / y for _, y in points)
    b2 = sum(w / y for w, y in points)
    det = a11 * a22 - a12**2
    if det > 0:
        fixed, scale = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        if fixed >= 0 and scale > 0:
            return Fit(fixed, scale, len(points))
    return _slope(points, 0.0)


def entry_work_us(entry: Entry, roofline: Roofline) -> float | None:
    """The roofline time of an entry's kernel without the per-op overhead, from its shape signature
    (None where the signature cannot be read or the op's MACs cannot be told from it)."""
    bandwidth = roofline.memory_bytes_per_s
    if entry.op in CONVERSIONS and entry.shape.startswith("x"):
        if not entry.shape[1:].isdigit():
            return None
        return int(entry.shape[1:]) * (4 + entry.activation_bits / 8) / bandwidth * 1e6
    shapes = _shapes(entry.shape)
    if shapes is None:
        return None
    inputs, outputs = shapes
    a_bytes, w_bytes = entry.activation_bits / 8, (entry.weight_bits or entry.activation_bits) / 8
    macs = 0
    if _has_macs(entry.op):
        macs = _signature_macs(entry.op, inputs, outputs)
        if macs is None:
            return None
    moved = sum(math.prod(s) * (w_bytes if macs and i == 1 else a_bytes) for i, s in enumerate(inputs))
    moved += sum(math.prod(s) for s in outputs) * a_bytes
    precision = roofline.precision(entry.weight_bits or entry.activation_bits, entry.activation_bits)
    compute = 2.0 * macs / roofline.peak_ops_per_s[precision] if macs else 0.0
    return max(compute, moved / bandwidth) * 1e6


def _pooled(weight_bits: int, activation_bits: int, mode: str) -> tuple[str, int, int, str]:
    """The pooled group of a MAC-free op: float, or moving integers (weight bits 0)."""
    on_integers = weight_bits in (0, FLOAT_BITS) and activation_bits != FLOAT_BITS
    return (POOLED, 0 if on_integers else weight_bits, activation_bits, mode)


def _has_macs(op: str) -> bool:
    return op_facts.lookup("", op).macs is not None


def _signature_macs(op: str, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]]) -> int | None:
    """MACs from a signature: output elements times the reduction length, which is the activation's
    last dim for ops whose output channels are last (MatMul, Gemm), and the weight's size per output
    channel for those whose channels are axis 1 (Conv: in/groups x kernel)."""
    if len(inputs) < 2 or not outputs or not inputs[0] or not inputs[1]:
        return None
    axis = op_facts.lookup("", op).output_channel_axis
    if axis == -1:
        return math.prod(outputs[0]) * inputs[0][-1]
    if axis == 1:  # (a ConvTranspose's weight is laid out the other way: priced as if it were a Conv)
        return math.prod(outputs[0]) * math.prod(inputs[1][1:])
    return None


def _shapes(signature: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]] | None:
    if "->" not in signature:
        return None
    ins, outs = signature.split(" g")[0].split("->", 1)  # " g4": a grouped convolution's groups
    try:
        return [_dims(p) for p in ins.split(";") if p], [_dims(p) for p in outs.split(";") if p]
    except ValueError:
        return None


def _dims(part: str) -> tuple[int, ...]:
    if part == "scalar":
        return ()
    return tuple(int(d) for d in part.split("x"))
