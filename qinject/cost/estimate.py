"""Estimated latency of a graph under a plan on a target: per node, conversions, end to end.

The estimate is made on the float graph (before the Q/DQ rewrite) from the plan alone, so it is
cheap enough for a search to call for every candidate plan. It mirrors what the rewrite and
onnxruntime do:

- a quantized node costs its table entry at its (weight bits, activation bits), or the roofline
  at its precision, moving its weight at the weight width, its inputs at the activation width and
  its output at that width where the output stays quantized (a quantized node reads it, or the op's
  integer kernel needs it: Conv), else in float;
- every other node costs its float entry or the roofline (memory-bound; zero-copy ops such as
  Reshape only the per-op overhead); range-preserving ops (MaxPool, Reshape) on an integer tensor
  move it at that width, and so does a Concat or a residual Add of integer tensors whose output
  point is read quantized (QLinearConcat, QLinearAdd: the rewrite's ``join_integers``);
  an epilogue (the ReLU after a convolution, jax's bias add) runs inside the
  kernel before it, float or integer, and costs nothing of its own;
- a conversion (a QuantizeLinear, a DequantizeLinear, or a requantization between widths) is
  charged wherever a tensor crosses from one precision region to another: where a quantized node
  reads a tensor held at another width, and where a float node reads an integer tensor. One per
  tensor and width, as the rewrite shares its Q/DQ pairs. On a CPU table a requantization costs a
  DequantizeLinear and a QuantizeLinear: onnxruntime has no kernel for it. No peer tool models this cost.

Execution modes (``qinject.plan.MODES``) other than static read and write float: a dynamic node
(MatMul, Gemm, LSTM) costs its int8 kernel plus the run-time quantization pass over its input (once
per input however many dynamic nodes read it; on onnxruntime's CPU a MatMul's bias Add runs inside
the kernel, where a static MatMul's stays a float Add); a
weight-only MatMul/Gemm (onnxruntime's MatMulNBits) moves its packed weight and computes in float;
other weight-only ops run the float op on a weight dequantized every run. Neither needs a conversion around it.

Measured entries win over the roofline; every node's ``source`` says which one priced it, and why
the roofline was used when the table is a measured one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import onnx_ir as ir

from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.calib_data import QinjectWarning, input_specs, random_arrays
from qinject.core.errors import QinjectError
from qinject.core.plan import DYNAMIC, STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.quant_points import OUTPUT_MIN_SQNR_DB, integer_joins, output_point, output_sqnr_db
from qinject.cost import fallback
from qinject.cost.latency_table import FLOAT_BITS, LatencyTable

MEASURED = "measured"
ROOFLINE = "roofline"
MISSING = "roofline (shape not in the table)"
FITTED = "fitted per op (shape not in the table)"


@dataclass(frozen=True)
class NodeCost:
    """One node's estimated latency."""

    node: str
    op: str
    weight_bits: int  # 32: float; 0: the op has no weight
    activation_bits: int
    latency_us: float
    source: str
    quantizable: bool = False
    mode: str = STATIC
    block_size: int = 0

    @property
    def label(self) -> str:
        """"float", "8/8", "8/8 dynamic", "4 weight-only/32" (weight bits / activation bits)."""
        if self.activation_bits == FLOAT_BITS and self.mode != WEIGHT_ONLY:
            return "float"
        if self.mode == WEIGHT_ONLY:
            return f"{self.weight_bits} weight-only/{self.block_size}"
        text = f"{_bits(self.weight_bits)}/{self.activation_bits}"
        return text if self.mode == STATIC else f"{text} {self.mode}"


@dataclass(frozen=True)
class ConversionCost:
    """A precision change of one tensor (QuantizeLinear, DequantizeLinear, or requantization)."""

    tensor: str
    from_bits: int
    to_bits: int
    elements: int
    latency_us: float
    source: str

    @property
    def op(self) -> str:
        return "DequantizeLinear" if self.to_bits == FLOAT_BITS else "QuantizeLinear"


@dataclass
class CostReport:
    """The estimate for one plan, with the float and uniform 16-bit baselines on the same target."""

    target: str
    nodes: list[NodeCost]
    conversions: list[ConversionCost]
    float_us: float = math.nan
    sixteen_bit_us: float = math.nan
    notes: list[str] = field(default_factory=list)

    run_overhead_us: float = 0.0

    @property
    def total_us(self) -> float:
        return sum(n.latency_us for n in self.nodes) + self.conversion_us + self.run_overhead_us

    @property
    def conversion_us(self) -> float:
        return sum(c.latency_us for c in self.conversions)

    @property
    def saving_vs_float(self) -> float:
        return 1.0 - self.total_us / self.float_us

    @property
    def saving_vs_16_bit(self) -> float:
        return 1.0 - self.total_us / self.sixteen_bit_us

    def share(self, cost: NodeCost | ConversionCost) -> float:
        return cost.latency_us / self.total_us if self.total_us else 0.0


def estimate(model: ir.Model, plan: Plan, table: LatencyTable, batch: int = 1, baselines: bool = True
             ) -> CostReport:
    """Estimate ``model`` quantized by ``plan`` on ``table``'s target.

    Args:
        model: the float IR model (constants folded as the quantize pipeline folds them).
        plan: per-node choices.
        table: the target's latency table.
        batch: the size given to a symbolic batch dimension.
        baselines: also estimate the float and uniform W16A16 plans (for the savings).
    """
    model = priced_model(model, batch)
    report = _Estimator(model, plan, table).run()
    if baselines:
        report.float_us = _Estimator(model, Plan(None), table).run().total_us
        report.sixteen_bit_us = _Estimator(model, Plan.uniform(16, 16), table).run().total_us
    return report


_OBSERVED = "qinject.cost.shapes_observed"  # model meta: the float run that fills unknown shapes was made


def priced_model(model: ir.Model, batch: int) -> ir.Model:
    """``model`` at concrete shapes (``qir.with_batch``), and where onnx's shape inference stops (a
    Slice ended by an input's Shape: TorchScript BERT's position ids), the shapes one float run on
    random inputs of those shapes gives: otherwise every node after it has no MACs and no latency key.
    Returns a copy when shapes are filled in; the model itself when nothing is missing."""
    priced = qir.with_batch(model, batch)
    if priced.meta.get(_OBSERVED) or qir.has_jax_nodes(priced) or all(
            op_facts.latency_key(n) is not None for n in qir.quantizable_nodes(priced)):
        return priced
    priced.meta[_OBSERVED] = True  # one float run per priced model, whatever it finds
    try:
        values = onnx_backend.all_values(priced, random_arrays(input_specs(priced), 1, seed=0))
    except QinjectError as exc:
        warnings.warn(f"latency estimate: some shapes are unknown and a float run to find them failed ({exc})",
                      QinjectWarning, stacklevel=2)
        return priced
    if priced is model:
        priced = model.clone()
    for node in priced.graph:
        for value in node.outputs:
            if not _concrete(value) and value.name in values:
                value.shape = ir.Shape(values[value.name].shape)
    return priced


def _scalar_scale(node: ir.Node) -> bool:
    """A Mul by a one-element constant (either side) or a Div by one (the divisor)."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    sides = node.inputs if node.op_type == "Mul" else node.inputs[1:]
    return any(v is not None and _constant(v) and v.shape is not None and math.prod(v.shape.numpy()) == 1
               for v in sides)


def _constant(value: ir.Value) -> bool:
    """An initializer, a Constant node's output, or an Identity of either (TorchScript's tied
    biases): what onnxruntime folds before it fuses."""
    while value.const_value is None and (producer := value.producer()) is not None and \
            producer.op_type == "Identity" and producer.inputs[0] is not None:
        value = producer.inputs[0]
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        return True
    return value.const_value is not None and not value.is_graph_input()


def _concrete(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(d, int) for d in value.shape)


class _Estimator:
    def __init__(self, model: ir.Model, plan: Plan, table: LatencyTable) -> None:
        self.graph, self.plan, self.table = model.graph, plan, table
        # An accelerator (an analytic table) has units for each precision it lists, so every quantized
        # node keeps its output at its width; onnxruntime on a CPU (a measured table) has integer
        # kernels for 8 bits only, and the rewrite quantizes outputs accordingly.
        self.native = table.kind == "analytic"
        self.fallback = _fallback(table)
        self.choices: dict[str, NodeQuant] = {}
        # Nodes inside If/Loop/Scan bodies are priced once each (one pass of a body, both branches).
        for node in qir.searchable_nodes(model):
            choice = plan.choice(node.name)
            # a mode the op lacks (static LSTM too) leaves the node float in the rewrite
            # (_insert_qdq_modes.refusal)
            if choice is not None and choice.mode in op_facts.modes(node):
                self.choices[node.name] = choice
        self.unfused: set[str] = set()  # static nodes whose kernel onnxruntime cannot fuse (filled below)
        self.joined: dict[str, int] = {}  # Concat/Add run on the integers -> their width (filled below)
        self.bits = self._integer_tensors()
        self.fused = self._fused_epilogues(model, [n for n in self.graph if n.name in self.joined])
        if not self.native:
            self.fused.update(self._fused_biases())
            self.fused.update(self._fused_scales())
        self.quantized_inputs: set[str] = set()  # inputs a dynamic node priced quantizing (once each)

    def run(self) -> CostReport:
        report = CostReport(self.table.target, [], [], run_overhead_us=self.table.roofline.run_overhead_us)
        for node in self.graph.all_nodes():
            report.nodes.append(self._node(node))
        report.conversions = self._conversions()
        return report

    @staticmethod
    def _fused_epilogues(model: ir.Model, joined: list[ir.Node]) -> dict[str, str]:
        """Epilogue node -> the dot/convolution it runs inside (Conv + Relu is one kernel, float or
        integer; jax's bias add too), or the integer Add whose output Q takes it in."""
        fused = {}
        for node in qir.quantizable_nodes(model) + joined:
            value = node.outputs[0]
            while len(value.uses()) == 1 and not value.is_graph_output():
                consumer = value.uses()[0].node
                if not op_facts.is_epilogue(consumer):
                    break
                fused[consumer.name] = node.name
                value = consumer.outputs[0]
        return fused

    def _fused_biases(self) -> dict[str, str]:
        """Bias Add -> the dynamic MatMul whose kernel adds it: onnxruntime fuses a dynamic MatMul's
        constant bias into DynamicQuantizeMatMul / MatMulIntegerToFloat; a static (QDQ) MatMul's
        stays a float Add (BERT-base: 72 Adds of 30-50 us each)."""
        fused = {}
        for node in self.graph:
            choice = self.choices.get(node.name)
            if choice is None or choice.mode != DYNAMIC or node.op_type != "MatMul":
                continue
            uses = node.outputs[0].uses()
            if len(uses) != 1 or node.outputs[0].is_graph_output():
                continue
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
            if other is not None and _constant(other) and other.shape is not None and len(other.shape) == 1:
                fused[add.name] = node.name
        return fused

    def _fused_scales(self) -> dict[str, str]:
        """Scalar Mul/Div -> the float MatMul it runs inside: onnxruntime folds a scale on a float
        MatMul's input or output into FusedMatMul (attention's 1/sqrt(d) on Q and K). A quantized
        MatMul keeps it as an op of its own (BERT-base: two 50 us Muls per layer)."""
        fused = {}
        for node in self.graph:
            if node.op_type != "MatMul" or node.name in self.choices:
                continue
            for value in node.inputs[:2]:
                scale = value.producer() if value is not None else None
                if scale is not None and len(value.uses()) == 1 and not value.is_graph_output() and \
                        _scalar_scale(scale):
                    fused[scale.name] = node.name
            uses = node.outputs[0].uses()
            if len(uses) == 1 and not node.outputs[0].is_graph_output() and uses[0].idx == 0 and \
                    _scalar_scale(uses[0].node):
                fused[uses[0].node.name] = node.name
        return fused

    # -- which tensors are held as integers --------------------------------------------------------------
    def _integer_tensors(self) -> dict[str, int]:
        """Tensor name -> the activation width it is held at, for the quantized outputs, the joins
        that run on the integers (``quant_points.integer_joins``) and what range-preserving ops carry
        on from them (the rest is float)."""
        held: dict[str, int] = {}
        paired: dict[str, int] = {}  # a static node's activation inputs: the rewrite pairs each
        for node in self.graph:
            choice = self.choices.get(node.name)
            if choice is None or not choice.quantizes_activations:
                continue  # dynamic / weight-only: float in, float out
            for i in op_facts.activation_inputs(node):
                if node.inputs[i] is not None:
                    paired.setdefault(node.inputs[i].name, choice.activations)
            out = output_point(node)
            kernel = self.native or op_facts.runs_on_integer_kernel(node, choice.weights, choice.activations)
            read = not out.is_graph_output() and self._read_quantized(out, kernel, choice.activations)
            wants_output = kernel and op_facts.needs_quantized_output(node)
            if read or (wants_output and not out.is_graph_output() and not self._heavy_tailed(out, choice)):
                held[out.name] = choice.activations
            elif wants_output and not self.native:
                # the rewrite leaves this output float (a graph output, or heavy tails): no
                # QLinearConv, onnxruntime runs the op in float on dequantized inputs
                self.unfused.add(node.name)
        # A join may read any paired tensor (its conversion is priced for the node that asked for it);
        # onnxruntime's CPU joins 8-bit tensors only.
        joinable = {**paired, **held}
        join_width = None if self.native else 8
        if join_width is not None:
            joinable = {name: w for name, w in joinable.items() if w == join_width}
        joins = integer_joins(self.graph, joinable, lambda value: self._read_quantized(value, width=join_width))
        bits = dict(held)
        for node in self.graph:
            width = joins.get(node.name)
            if width is not None:
                for value in node.inputs:  # SiLU's Sigmoid runs on the integers with it (QLinearSigmoid)
                    if value is not None and op_facts.looked_up_from(value) is not None and value.name not in bits:
                        self.joined[value.producer().name] = bits[value.name] = width
                self.joined[node.name] = bits[output_point(node).name] = width
            elif self.choices.get(node.name) is None and node.inputs and node.inputs[0] is not None \
                    and node.inputs[0].name in bits:
                for value in op_facts.carried(node):
                    bits[value.name] = bits[node.inputs[0].name]
        return bits

    @staticmethod
    def _heavy_tailed(value: ir.Value, choice: NodeQuant) -> bool:
        """As the rewrite decides: an output quantized only for the kernel's sake is left float when
        calibration predicts too low an SQNR for it."""
        sqnr = output_sqnr_db(value, choice.activation_qtype, choice.activation_symmetric)
        return sqnr is not None and sqnr < OUTPUT_MIN_SQNR_DB

    def _read_quantized(self, value: ir.Value, through_range_preserving: bool = True, width: int | None = None
                        ) -> bool:
        """As the rewrite decides: a quantized node reads it (at ``width``, where given: a 16-bit
        reader gives an 8-bit tensor no pair), directly or (after an integer kernel) through
        range-preserving ops."""
        for use in value.uses():
            choice = self.choices.get(use.node.name)
            if choice is not None and choice.quantizes_activations and use.idx in op_facts.activation_inputs(use.node) \
                    and width in (None, choice.activations):
                return True
            if through_range_preserving and use.idx == 0 and any(
                    self._read_quantized(v, width=width) for v in op_facts.carried(use.node)):
                return True
        return False

    # -- nodes ---------------------------------------------------------------------------------------------
    def _node(self, node: ir.Node) -> NodeCost:
        if node.name in self.fused:
            return NodeCost(node.name, node.op_type, 0, 0, 0.0, f"fused into {self.fused[node.name]}")
        key = op_facts.latency_key(node)
        choice = self.choices.get(node.name)
        quantizable = op_facts.is_quantizable(node)
        if choice is not None and choice.mode != STATIC:
            return self._moded(node, choice, key, quantizable)
        if choice is not None:
            w_bits = choice.weights if op_facts.weight_of(node) is not None else choice.activations
            a_bits = choice.activations
        elif node.name in self.joined:
            w_bits, a_bits = 0, self.joined[node.name]  # QLinearConcat, QLinearAdd
        elif not quantizable and node.outputs and node.outputs[0].name in self.bits:
            w_bits, a_bits = 0, self.bits[node.outputs[0].name]  # a range-preserving op on integers
        else:
            w_bits = a_bits = FLOAT_BITS
        measured = self.table.lookup(*key, w_bits, a_bits) if key else None
        if measured is not None:
            return NodeCost(node.name, node.op_type, w_bits, a_bits, measured, MEASURED, quantizable)
        source = self._missing_source(node, w_bits, a_bits)
        if choice is not None and not self.native and (
                node.name in self.unfused or not op_facts.runs_on_integer_kernel(node, w_bits, a_bits)):
            # onnxruntime's CPU has no integer kernel at these widths: it dequantizes and runs the float op
            return NodeCost(node.name, node.op_type, w_bits, a_bits, self._dequantized_float(node, w_bits),
                            self._missing_source(node, FLOAT_BITS, FLOAT_BITS), quantizable)
        us = self._roofline(node, choice, a_bits)
        if choice is not None and not self.native and op_facts.fact(node).two_activations and \
                op_facts.weight_of(node) is None:
            # Two activations (attention's scores and context): QLinearMatMul packs a B that is not a
            # constant on every run, where a weight's is packed once, so the weight MatMuls' fit is far
            # too cheap for it. Measured against float, kernel to kernel: the shipped table's attention
            # entries 1.09-1.12x, BERT-base's [12,128,64]x[12,64,128] 1.02x, micro-benchmarks of nine
            # shapes 0.5-1.16x (median 0.9, noisy); with its conversions it does not pay. No cheaper
            # than the float kernel, then.
            us = max(us, self._dequantized_float(node, FLOAT_BITS))
        return NodeCost(node.name, node.op_type, w_bits, a_bits, us, source, quantizable)

    def _moded(self, node: ir.Node, choice: NodeQuant, key: tuple[str, str] | None, quantizable: bool
               ) -> NodeCost:
        """A dynamic or weight-only node: its measured entry, else the roofline of what runs."""
        a_bits = choice.activations if choice.mode == DYNAMIC else FLOAT_BITS
        made = dict(op=node.op_type, weight_bits=choice.weights, activation_bits=a_bits, quantizable=quantizable,
                    mode=choice.mode, block_size=choice.block_size if choice.mode == WEIGHT_ONLY else 0)
        measured = self.table.lookup(*key, choice.weights, a_bits, choice.mode) if key else None
        if measured is not None:
            return NodeCost(node.name, latency_us=measured, source=MEASURED, **made)
        source = self._missing_source(node, *_fitted_widths(choice), STATIC)
        roofline, macs, weight = self.table.roofline, op_facts.macs(node) or 0, op_facts.weight_of(node)
        inputs = sum(_elements(node.inputs[i]) for i in op_facts.activation_inputs(node))
        out_bytes = _elements(node.outputs[0]) * _bytes(FLOAT_BITS)
        fp32 = _float_precision(roofline)
        if choice.mode == DYNAMIC:
            # the int8 kernel (every weight of it: LSTM's W and R) by the table's static W8A8 fit of the
            # same shape, then the run-time quantization of its input, priced as a static QuantizeLinear
            # of it (onnxruntime's DynamicQuantizeLinear measures the same: 30 us against 32-40 us on
            # BERT-base's 128x768) less a kernel launch (a lone reader fuses it: DynamicQuantizeMatMul),
            # once per input however many dynamic nodes read it (Q, K and V)
            extra = op_facts.fact(node).weight_inputs or ()
            weights = _elements(weight) if not extra else sum(_elements(node.inputs[i]) for i in extra)
            kernel = roofline.node_us(macs, weights * _bytes(8) + inputs + out_bytes, roofline.precision(8, 8))
            us = self._fitted(node.op_type, 8, 8, kernel)
            for i in op_facts.activation_inputs(node):
                value = node.inputs[i]
                if value is not None and value.name not in self.quantized_inputs:
                    us += max(0.0, self._conversion(value, FLOAT_BITS, 8).latency_us - roofline.op_overhead_us)
                    self.quantized_inputs.add(value.name)
        elif op_facts.weight_only_kernel(node) and not self._read_quantized(node.outputs[0], False):
            # weight-only MatMul/Gemm: MatMulNBits unpacks blocks in its kernel (onnxruntime does not
            # fuse it when a static node reads its output directly: then dequantize + float)
            packed = _elements(weight) * (_bytes(choice.weights) + _bytes(FLOAT_BITS) / choice.block_size)
            # (the float kernel's fit: MatMulNBits computes in float)
            us = self._fitted(node.op_type, FLOAT_BITS, FLOAT_BITS,
                              roofline.node_us(macs, packed + inputs * _bytes(FLOAT_BITS) + out_bytes, fp32))
        else:
            us = self._dequantized_float(node, choice.weights)
        return NodeCost(node.name, latency_us=us, source=source, **made)

    def _dequantized_float(self, node: ir.Node, w_bits: int) -> float:
        """The float op's price (as measured, else its roofline) plus dequantizing its weight."""
        key = op_facts.latency_key(node)
        measured = self.table.lookup(*key, FLOAT_BITS, FLOAT_BITS) if key else None
        us = measured if measured is not None else self._roofline(node, None, FLOAT_BITS)
        weight = op_facts.weight_of(node)
        if weight is not None:
            roofline = self.table.roofline
            us += roofline.node_us(0, _elements(weight) * (_bytes(w_bits) + _bytes(FLOAT_BITS)),
                                   _float_precision(roofline))
        return us

    def _roofline(self, node: ir.Node, choice: NodeQuant | None, a_bits: int) -> float:
        roofline = self.table.roofline
        if op_facts.fact(node).zero_copy:
            return roofline.op_overhead_us
        macs = op_facts.macs(node) or 0
        if choice is None:
            moved = sum(_elements(v) * _bytes(self.bits.get(v.name, FLOAT_BITS)) for v in node.inputs if v)
            moved += sum(_elements(v) * _bytes(self.bits.get(v.name, a_bits)) for v in node.outputs)
            return self._fitted(node.op_type, FLOAT_BITS if a_bits == FLOAT_BITS else 0, a_bits,
                                roofline.node_us(macs, moved, roofline.precision(a_bits, a_bits)))
        weight = op_facts.weight_of(node)
        w_bits = choice.weights if weight is not None else choice.activations
        moved = _elements(weight) * _bytes(w_bits) if weight is not None else 0.0
        moved += sum(_elements(node.inputs[i]) * _bytes(choice.activations)
                     for i in op_facts.activation_inputs(node))
        out = output_point(node)
        moved += _elements(node.outputs[0]) * _bytes(self.bits.get(out.name, FLOAT_BITS))
        return self._fitted(node.op_type, w_bits, choice.activations,
                            roofline.node_us(macs, moved, roofline.precision(w_bits, choice.activations)))

    def _fitted(self, op: str, w_bits: int, a_bits: int, roofline_us: float, mode: str = STATIC) -> float:
        """A measured table's fit for the op at these widths (``qinject.cost.fallback``), applied to the
        roofline's work; the roofline where the table has none."""
        work = max(0.0, roofline_us - self.table.roofline.op_overhead_us)
        price = self.fallback.price(op, w_bits, a_bits, mode, work)
        return roofline_us if price is None else price

    def _missing_source(self, node: ir.Node, w_bits: int, a_bits: int, mode: str = STATIC) -> str:
        if self.table.kind != "measured":
            return ROOFLINE
        fit = self.fallback.fit_for(node.op_type, w_bits, a_bits, mode)
        return FITTED if fit is not None and not op_facts.fact(node).zero_copy else MISSING

    # -- conversions -----------------------------------------------------------------------------------------
    def _conversions(self) -> list[ConversionCost]:
        wanted: dict[tuple[str, int], tuple[ir.Value, int]] = {}
        for node in self.graph.all_nodes():  # body nodes keep float outputs: only their inputs convert
            choice = self.choices.get(node.name)
            for i, value in enumerate(node.inputs):
                if value is None or value.const_value is not None:
                    continue
                have = self.bits.get(value.name, FLOAT_BITS)
                if choice is not None and choice.quantizes_activations and i in op_facts.activation_inputs(node):
                    want = choice.activations
                elif choice is None and op_facts.preserves_range(node) and i == 0:
                    continue  # carried on at the same width
                elif node.name in self.joined:
                    continue  # joined on the integers
                else:
                    want = FLOAT_BITS  # a float op reads it
                if have != want:
                    wanted.setdefault((value.name, want), (value, have))
        for out in self.graph.outputs:
            have = self.bits.get(out.name, FLOAT_BITS)
            if have != FLOAT_BITS:
                wanted.setdefault((out.name, FLOAT_BITS), (out, have))
        return [self._conversion(value, have, want) for (_, want), (value, have) in wanted.items()]

    def _conversion(self, value: ir.Value, have: int, want: int) -> ConversionCost:
        elements = _elements(value)
        if FLOAT_BITS not in (have, want) and not self.native:
            # onnxruntime has no requantize kernel: it runs the rewrite's DequantizeLinear, then the
            # QuantizeLinear at the other width (an 8-bit output read by a 16-bit node costs both,
            # more than a float reader's one); an accelerator's compiler folds the two into a scale
            down, up = self._conversion(value, have, FLOAT_BITS), self._conversion(value, FLOAT_BITS, want)
            source = up.source if down.source == MEASURED else down.source
            return ConversionCost(value.name, have, want, elements, down.latency_us + up.latency_us, source)
        op = "DequantizeLinear" if want == FLOAT_BITS else "QuantizeLinear"
        narrow = want if op == "QuantizeLinear" else have
        measured = self.table.lookup(op, f"x{elements}", 0, narrow)
        if measured is not None:
            return ConversionCost(value.name, have, want, elements, measured, MEASURED)
        roofline = self.table.roofline
        us = roofline.node_us(0, elements * (_bytes(have) + _bytes(want)), _float_precision(roofline))
        fitted = self.fallback.price(op, 0, narrow, STATIC, us - roofline.op_overhead_us)
        if fitted is not None:
            if _changes_layout(value):
                # onnxruntime runs integer convolutions channels-last (NHWC) and float ones in NCHWc
                # blocks, so where the regions meet it adds a layout kernel beside the Q/DQ (keras_cnn:
                # 3 Transposes and a ReorderInput more than float); a measured entry includes it
                moved_us = elements * 2 * _bytes(FLOAT_BITS) / roofline.memory_bytes_per_s * 1e6
                layout = self.fallback.price("Transpose", FLOAT_BITS, FLOAT_BITS, STATIC, moved_us)
                fitted += layout or 0.0
            return ConversionCost(value.name, have, want, elements, fitted, FITTED)
        return ConversionCost(value.name, have, want, elements, us,
                              MISSING if self.table.kind == "measured" else ROOFLINE)


# One fit per table object, cached: a search prices hundreds of plans on the same table. The table is
# held so that its id cannot be reused; a table grown since (profiled entries added) is fitted again.
_FITS: dict[int, tuple[LatencyTable, int, fallback.Fallback]] = {}


def _fallback(table: LatencyTable) -> fallback.Fallback:
    cached = _FITS.get(id(table))
    if cached is None or cached[0] is not table or cached[1] != len(table.entries):
        cached = _FITS[id(table)] = (table, len(table.entries), fallback.fit(table))
    return cached[2]


def _fitted_widths(choice: NodeQuant) -> tuple[int, int]:
    """The widths of the static fit a dynamic or weight-only node is priced by: its W8A8 integer kernel,
    or the float op (weight-only MatMul/Gemm compute in float)."""
    return (8, 8) if choice.mode == DYNAMIC else (FLOAT_BITS, FLOAT_BITS)


def _changes_layout(value: ir.Value) -> bool:
    """A spatial tensor (rank 4 or more) that a convolution writes or reads: the precision change there
    is also a change of layout."""
    if value.shape is None or len(value.shape) < 4:
        return False
    producer = value.producer()
    while producer is not None and op_facts.is_epilogue(producer) and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()  # the ReLU that runs inside the convolution
    return (producer is not None and op_facts.fact(producer).sets_layout) or any(
        op_facts.fact(use.node).sets_layout for use in value.uses())


def _float_precision(roofline) -> str:
    return "fp32" if "fp32" in roofline.peak_ops_per_s else next(iter(roofline.peak_ops_per_s))


def _elements(value: ir.Value | None) -> int:
    if value is None or value.shape is None:
        return 0
    return math.prod(d if isinstance(d, int) else 1 for d in value.shape)


def _bytes(bits: int) -> float:
    return bits / 8.0


def format_report(report: CostReport, top: int | None = None) -> str:
    """The per-node breakdown as a text table, then the totals and savings."""
    rows = sorted(report.nodes, key=lambda n: -n.latency_us)
    shown = rows if top is None else rows[:top]
    lines = [f"{'node':<28} {'op':<22} {'bits w/a':>9} {'latency us':>11} {'share':>6}  source"]
    for n in shown:
        bits = "" if n.source.startswith("fused") else n.label
        lines.append(f"{n.node[:28]:<28} {n.op[:22]:<22} {bits:>9} {n.latency_us:>11.2f} "
                     f"{report.share(n):>6.1%}  {n.source}")
    if len(rows) > len(shown):
        rest = sum(n.latency_us for n in rows[len(shown):])
        lines.append(f"{'(' + str(len(rows) - len(shown)) + ' more nodes)':<61} {rest:>11.2f} "
                     f"{rest / report.total_us if report.total_us else 0:>6.1%}")
    if report.conversions:
        lines.append(f"{'conversions (' + str(len(report.conversions)) + ' Q/DQ)':<61} {report.conversion_us:>11.2f} "
                     f"{report.conversion_us / report.total_us if report.total_us else 0:>6.1%}")
    if report.run_overhead_us:
        lines.append(f"{'per-run overhead':<61} {report.run_overhead_us:>11.2f} "
                     f"{report.run_overhead_us / report.total_us:>6.1%}")
    lines.append("")
    lines.append(f"estimated latency on {report.target}: {report.total_us / 1e3:.3f} ms")
    if not math.isnan(report.float_us):
        lines.append(f"  float baseline   {report.float_us / 1e3:.3f} ms  (saving {report.saving_vs_float:+.1%})")
    if not math.isnan(report.sixteen_bit_us):
        lines.append(f"  W16A16 baseline  {report.sixteen_bit_us / 1e3:.3f} ms  (saving {report.saving_vs_16_bit:+.1%})")
    missing = sum(1 for n in report.nodes if n.source in (MISSING, FITTED))
    if missing:
        lines.append(f"  {missing} node(s) priced by the roofline: their shapes are not in the table "
                     "(profile this model with `qinject profile`)")
    return "\n".join(lines)


def _bits(bits: int) -> str:
    return "-" if bits == 0 else "f" if bits == FLOAT_BITS else str(bits)
