"""The fallback fitted per op and mode from a measured table's own entries (``qinject.cost.fallback``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qinject.app.api import estimate_latency
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.cost import fallback
from qinject.cost.estimate import FITTED, estimate
from qinject.frontends.onnx_frontend import load_onnx
from qinject.latency_table import Entry, LatencyTable, Roofline
from qinject.plan import DYNAMIC, NodeQuant, Plan
from tests.builders import conv_net, matmul_net

ROOF = Roofline({"fp32": 1e11, "int8": 4e11}, 1e10, op_overhead_us=0.5)
LAUNCH, ELEMENTWISE_SCALE = 1.5, 1.2  # what the float elementwise entries are made of
QUANTIZE = (3.0, 2.0)  # fixed us, scale of the QuantizeLinear entries
CONV_SCALE = 4.0  # int8 Conv entries: the launch cost plus 4x their roofline work
MATMUL_SCALE = 5.0  # small MatMul entries (W8A8 and W16A16): the launch cost plus 5x their work


def _entry(op: str, shape: str, w_bits: int, a_bits: int, fixed: float, scale: float) -> Entry:
    work = fallback.entry_work_us(Entry(op, shape, w_bits, a_bits, 1.0), ROOF)
    return Entry(op, shape, w_bits, a_bits, fixed + scale * work)


def _table(kind: str = "measured") -> LatencyTable:
    table = LatencyTable("cpu", kind, ROOF)
    for n in (1000, 20000, 400000):
        table.add(_entry("QuantizeLinear", f"x{n}", 0, 8, *QUANTIZE))
    for op, n in (("Add", 100), ("Add", 5000), ("Mul", 80000), ("Sigmoid", 900000)):
        table.add(_entry(op, f"1x{n};1x{n}->1x{n}", 32, 32, LAUNCH, ELEMENTWISE_SCALE))
    for h in (8, 16, 32):
        table.add(_entry("Conv", f"1x16x{h}x{h};32x16x3x3->1x32x{h}x{h}", 8, 8, LAUNCH, CONV_SCALE))
    return table


def test_fits_recover_the_fixed_cost_and_scale_the_entries_were_made_of():
    fits = fallback.fit(_table())
    q = fits.fit_for("QuantizeLinear", 0, 8)
    assert (q.fixed_us, q.scale) == pytest.approx(QUANTIZE)
    pooled = fits.fit_for("Relu", 32, 32)  # no entry of its own: the fit over every MAC-free float op
    assert (pooled.fixed_us, pooled.scale) == pytest.approx((LAUNCH, ELEMENTWISE_SCALE))
    conv = fits.fit_for("Conv", 8, 8)  # the launch cost held, the slope its own
    assert (conv.fixed_us, conv.scale) == pytest.approx((LAUNCH, CONV_SCALE))
    assert fits.price("Conv", 8, 8, "static", 10.0) == pytest.approx(LAUNCH + CONV_SCALE * 10.0)


def test_no_fit_from_too_few_sizes_for_an_op_with_macs_or_for_an_analytic_table():
    fits = fallback.fit(_table())
    assert fits.fit_for("Conv", 32, 32) is None  # no float Conv entries; a MAC op never takes the pooled fit
    assert fits.fit_for("DequantizeLinear", 0, 8) is None
    table = _table()
    for n in (10, 20):
        table.add(_entry("MatMul", f"4x{n};{n}x8->4x8", 8, 8, 1.0, 1.0))
    assert fallback.fit(table).fit_for("MatMul", 8, 8) is None  # two sizes: fewer than MIN_ENTRIES
    assert fallback.fit(_table("analytic")).fits == {}


def test_the_estimate_prices_missing_shapes_and_conversions_by_the_fits_with_a_layout_kernel():
    model = qir.with_batch(load_onnx(conv_net()), 1)
    table = _table()
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert table.lookup(*op_facts.latency_key(conv2), 8, 8) is None
    plain = LatencyTable("cpu", "measured", ROOF)  # the same roofline, no entries to fit
    report = estimate(model, Plan.uniform(8, 8), table)
    roofline_only = estimate(model, Plan.uniform(8, 8), plain)
    fitted = {c.node: c for c in report.nodes}["conv2"]
    work = {c.node: c for c in roofline_only.nodes}["conv2"].latency_us - ROOF.op_overhead_us
    assert fitted.source == FITTED and fitted.latency_us == pytest.approx(LAUNCH + CONV_SCALE * work)
    # x (1x3x8x8, into conv1) is quantized: the QuantizeLinear fit plus a layout kernel (the pooled
    # float fit moving the tensor), since onnxruntime runs the integer convolution channels-last
    x = next(c for c in report.conversions if c.tensor == "x")
    elements = 3 * 8 * 8
    q_work = elements * 5 / ROOF.memory_bytes_per_s * 1e6
    layout_work = elements * 8 / ROOF.memory_bytes_per_s * 1e6
    assert x.source == FITTED
    layout = LAUNCH + ELEMENTWISE_SCALE * layout_work
    assert x.latency_us == pytest.approx(QUANTIZE[0] + QUANTIZE[1] * q_work + layout)


def _matmul_table() -> LatencyTable:
    table = _table()
    for n in (8, 16, 32, 64):
        for bits in (8, 16):
            table.add(_entry("MatMul", f"64x{n};{n}x64->64x64", bits, bits, LAUNCH, MATMUL_SCALE))
    return table


def test_a_matmul_fit_keeps_its_line_over_its_entries_then_joins_the_measured_peak():
    table = _matmul_table()
    fits = fallback.fit(table)
    mm = fits.fit_for("MatMul", 8, 8)
    assert (mm.fixed_us, mm.scale) == pytest.approx((LAUNCH, MATMUL_SCALE))
    largest = max(fallback.entry_work_us(e, ROOF) for e in table if e.op == "MatMul" and e.weight_bits == 8)
    peak = fallback.peak_work_us(ROOF, 8, 8)  # the roofline's int8 peak: a 256x1024x1024 W8A8 MatMul
    assert peak == pytest.approx(2 * 256 * 1024 * 1024 / ROOF.peak_ops_per_s["int8"] * 1e6)
    edge = LAUNCH + MATMUL_SCALE * largest
    assert mm(largest / 2) == pytest.approx(LAUNCH + MATMUL_SCALE * largest / 2)  # the entries' own line
    assert mm((largest + peak) / 2) == pytest.approx((edge + peak) / 2)  # on the way to the peak
    assert mm(peak) == pytest.approx(peak) and mm(3 * peak) == pytest.approx(3 * peak)  # the peak's rate
    # no peak was timed at 16 bits (onnxruntime runs them as dequantize + float): the line goes on
    assert fits.price("MatMul", 16, 16, "static", peak) == pytest.approx(LAUNCH + MATMUL_SCALE * peak)
    # a MAC op other than the peak's kernel keeps its line at any size
    assert fits.price("Conv", 8, 8, "static", peak) == pytest.approx(LAUNCH + CONV_SCALE * peak)


def test_dynamic_costs_no_less_than_the_static_kernel_plus_quantizing_its_input():
    table = _matmul_table()  # (estimate_latency folds the Constant weight, as quantize does)
    static = estimate_latency(matmul_net(), Plan(None, {"mm1": NodeQuant()}), table, batch=64)
    dynamic = estimate_latency(matmul_net(), Plan(None, {"mm1": NodeQuant(mode=DYNAMIC)}), table, batch=64)
    kernel = {c.node: c for c in static.nodes}["mm1"]
    quantize_x = next(c for c in static.conversions if c.tensor == "x")
    node = {c.node: c for c in dynamic.nodes}["mm1"]
    assert kernel.source == quantize_x.source == node.source == FITTED
    assert not dynamic.conversions  # it reads and writes float: its quantization is its own
    assert node.latency_us >= kernel.latency_us + quantize_x.latency_us
    # and more than the roofline alone, which priced it as if the integer kernel ran at its peak
    roofline_only = estimate_latency(matmul_net(), Plan(None, {"mm1": NodeQuant(mode=DYNAMIC)}),
                                     LatencyTable("cpu", "measured", ROOF), batch=64)
    assert node.latency_us > {c.node: c for c in roofline_only.nodes}["mm1"].latency_us


def _shared_input_net() -> onnx.ModelProto:
    """x[1,128,64] read by two MatMuls (BERT's Q and K), each followed by a bias Add: one bias an
    initializer, the other an Identity of one (as TorchScript writes tied parameters)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in (1, 2)]
    init += [numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), n) for n in ("b1", "b2_init")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="q"),
             helper.make_node("Add", ["m1", "b1"], ["y1"], name="q_bias"),
             helper.make_node("MatMul", ["x", "w2"], ["m2"], name="k"),
             helper.make_node("Identity", ["b2_init"], ["b2"], name="tied"),
             helper.make_node("Add", ["b2", "m2"], ["y2"], name="k_bias")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 64])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 128, 64]) for y in ("y1", "y2")],
                              init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_dynamic_matmuls_sharing_an_input_quantize_it_once_and_take_their_bias_in_the_kernel():
    """As onnxruntime's CPU runs them: one DynamicQuantizeLinear of x for both MatMulIntegerToFloat,
    each adding its bias; a static (QDQ) MatMul's bias stays a float Add."""
    table = _matmul_table()
    both = {n: NodeQuant(mode=DYNAMIC) for n in ("q", "k")}
    dynamic = {c.node: c for c in estimate_latency(_shared_input_net(), Plan(None, both), table).nodes}
    static = estimate_latency(_shared_input_net(), Plan(None, dict.fromkeys(("q", "k"), NodeQuant())), table)
    quantize_x = next(c for c in static.conversions if c.tensor == "x").latency_us
    kernel = {c.node: c for c in static.nodes}["q"].latency_us
    launch = table.roofline.op_overhead_us  # a lone reader's quantization runs inside its kernel
    assert dynamic["q"].latency_us == pytest.approx(kernel + quantize_x - launch)
    assert dynamic["k"].latency_us == pytest.approx(kernel)  # x is quantized once
    assert dynamic["q_bias"].source == "fused into q" and dynamic["k_bias"].source == "fused into k"
    assert dynamic["q_bias"].latency_us == dynamic["k_bias"].latency_us == 0.0
    assert all(c.latency_us > 0 for c in static.nodes if c.node in ("q_bias", "k_bias"))
    # an accelerator's roofline has no such rule: a bias Add after a dynamic node is its own op there
    analytic = {c.node: c for c in estimate_latency(_shared_input_net(), Plan(None, both), _table("analytic")).nodes}
    assert analytic["q_bias"].latency_us > 0


def test_a_scale_on_a_float_matmul_runs_inside_it_and_stays_an_op_when_the_matmul_is_quantized():
    """onnxruntime folds attention's scalar scale (a Mul by a Constant, either input, or a Div after)
    into a float MatMul (FusedMatMul); a quantized MatMul keeps it, so quantizing the scores costs it."""
    q, k = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 32, 16]) for n in ("q", "k"))
    nodes = [helper.make_node("Constant", [], ["s"], name="scale", value=numpy_helper.from_array(np.float32(0.5))),
             helper.make_node("Mul", ["q", "s"], ["qs"], name="scale_q"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qs", "kt"], ["scores"], name="scores"),
             helper.make_node("Div", ["scores", "d"], ["out"], name="divide")]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 32, 32])
    graph = helper.make_graph(nodes, "attention", [q, k], [out],
                              [numpy_helper.from_array(np.array([2.0], np.float32), "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    table = _matmul_table()
    floated = {c.node: c for c in estimate_latency(model, Plan(None, {}), table).nodes}
    assert floated["scale_q"].source == floated["divide"].source == "fused into scores"
    quantized = {c.node: c for c in estimate_latency(model, Plan(None, {"scores": NodeQuant()}), table).nodes}
    assert quantized["scale_q"].latency_us > 0 and quantized["divide"].latency_us > 0


def test_a_matmul_of_two_activations_costs_no_less_than_float_where_a_weight_matmul_pays():
    """onnxruntime packs a B that is not a constant on every QLinearMatMul run: attention's int8
    score MatMul runs no faster than float, though the weight MatMuls' fit prices it far below."""
    q, k = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 64, 32]) for n in ("q", "k"))
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("MatMul", ["q", "w"], ["projected"], name="projection")]
    outs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 64, 64]),
            helper.make_tensor_value_info("projected", TensorProto.FLOAT, [1, 4, 64, 64])]
    weight = numpy_helper.from_array(np.ones((32, 64), np.float32), "w")
    model = helper.make_model(helper.make_graph(nodes, "attention", [q, k], outs, [weight]),
                              opset_imports=[helper.make_opsetid("", 13)])
    plan = Plan(None, {"scores": NodeQuant(), "projection": NodeQuant()})
    table = _matmul_table()
    for n in (8, 16, 32, 64):  # float entries at the int8 ones' fraction of their (4x lower) peak
        table.add(_entry("MatMul", f"64x{n};{n}x64->64x64", 32, 32, LAUNCH, MATMUL_SCALE))
    floated = {c.node: c for c in estimate_latency(model, Plan(None, {}), table).nodes}
    quantized = {c.node: c for c in estimate_latency(model, plan, table).nodes}
    assert quantized["projection"].latency_us < floated["projection"].latency_us
    assert quantized["scores"].latency_us == pytest.approx(floated["scores"].latency_us)
    # an accelerator's table keeps the integer unit's price
    analytic = LatencyTable("npu", "analytic", ROOF)
    native = {c.node: c for c in estimate_latency(model, plan, analytic).nodes}
    assert native["scores"].latency_us < {c.node: c for c in estimate_latency(model, Plan(None, {}), analytic
                                                                              ).nodes}["scores"].latency_us
