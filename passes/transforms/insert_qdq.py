"""The Q/DQ rewrite: insert QuantizeLinear/DequantizeLinear as a plan says.

For each quantized node (see ``qinject.plan``):
- the weight becomes an integer initializer followed by DequantizeLinear (per channel along the
  op's channel axis, or per tensor), so the file shrinks about 4x at int8;
- each activation input gets a QuantizeLinear -> DequantizeLinear pair with calibrated scales, and
  so does the node's output point (``qinject.quant_points``) where that pays (see
  ``_Rewrite.quantize_output``);
- the bias of Conv/Gemm becomes int32 behind a DequantizeLinear: with scale s_x * s_w at 8 bits or
  fewer, the layout onnxruntime needs to fuse DequantizeLinear -> Conv -> QuantizeLinear into
  QLinearConv; with its own exact scale otherwise (see ``_Rewrite.bias``).
A tensor quantized through range-preserving ops (MaxPool, Reshape, ...) reuses the upstream scale, so
onnxruntime keeps those ops on integers. A Concat or residual Add whose inputs and output are
quantized anyway reads the dequantized inputs, so it runs on integers too (QLinearConcat,
QLinearAdd; see ``_Rewrite.join_integers``).

Nodes whose choice is ``dynamic`` or ``weight-only`` (``qinject.plan``) get those forms instead
(``passes/transforms/_insert_qdq_modes.py``; LSTM's DynamicQuantizeLSTM in ``_insert_qdq_lstm.py``): their
activations stay float, with no calibrated Q/DQ, so they need no calibration statistics; a node
without such a form (a static choice on an LSTM too) stays float with a note.

Quantizable nodes inside If/Loop/Scan bodies are quantized too, at the plan's choice for their name
(dynamic and weight-only included), static ones when calibration observed their inputs
(``qinject.passes.transforms._subgraph_taps``): weights and input activations, with the Q/DQ nodes placed in the body
itself so onnxruntime can fuse them there. Their outputs stay float. A note on the control-flow node
says what was quantized inside and what was not, and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
from qinject.passes.transforms import _insert_qdq_modes
from qinject.passes.transforms._insert_qdq_lstm import MS_DOMAIN

from qinject.core import ir as qir
from qinject.core import numerics, op_facts
from qinject.core.errors import PlanError, QinjectError, UnsupportedModelError
from qinject.core.learned import learned
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.quant_points import OUTPUT_MIN_SQNR_DB, integer_joins, output_point, output_sqnr_db, range_source
from qinject.core.search_result import search_result
from qinject.core.stats import select_range

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ActKey:
    """How an activation is quantized: its integer type and symmetry."""

    qtype: numerics.QType
    symmetric: bool


@dataclass
class _QParams:
    scale: np.ndarray
    zero_point: np.ndarray
    dequantized: ir.Value | None = None


class InsertQDQ(Pass):
    """Quantize weights and activations of every node the plan selects.

    Options:
        plan: per-node choices (``qinject.plan.Plan``); None applies the plan a search pass chose
            (``qinject.search.RESULT`` in the model's meta), with the initializers it replaced
            (AdaRound-rounded weights, corrected biases) written first; else ``fallback``.
        method: how activation ranges are chosen from calibration statistics.
        percentile: the percentile for ``method='percentile'``.
    """

    name = "insert-qdq"

    def __init__(self, plan: Plan | None = None, method: str = "minmax", percentile: float = 99.99,
                 fallback: Plan | None = None) -> None:
        self.plan, self.method, self.percentile, self.fallback = plan, method, percentile, fallback

    def call(self, model: ir.Model) -> PassResult:

        plan = self.plan
        if plan is None:
            found = search_result(model)
            fitted = model.meta.get(qir.CHOSEN_PLAN)  # fitted to the target after any search (passes/target/)
            if found is None and fitted is None and self.fallback is None:
                raise QinjectError("insert-qdq was given no plan and no search pass ran before it")
            plan = fitted if fitted is not None else found.plan if found is not None else self.fallback
            # the rounded weights (AdaRound, bias correction) the search measured
            for name, array in (found.weights.items() if found is not None else ()):
                model.graph.initializers[name].const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        nodes = qir.quantizable_nodes(model)
        inner = qir.subgraph_quantizable_nodes(model)
        unknown = sorted(set(plan.nodes) - {n.name for n in nodes + inner})
        if unknown:
            raise PlanError(_unknown_nodes(model, unknown, plan))
        chosen = [(n, plan.choice(n.name)) for n in nodes if plan.choice(n.name) is not None]
        inner_chosen = [(n, plan.choice(n.name)) for n in inner if plan.choice(n.name) is not None]
        for node in graph.all_nodes():
            reason = op_facts.fact(node).float_reason
            if reason is not None:
                node.meta.setdefault(qir.QUANT_NOTES, []).append(reason)
        # Before the rewrite: a lowered body node leaves its graph, but its owner still gets the note.
        owners = {id(n): qir.subgraph_owners(model)[id(n.graph)] for n in inner}
        if not chosen and not inner_chosen:
            _note_subgraph_nodes(inner, owners, {})
            return PassResult(model, False)
        need = max(c.min_opset for _, c in chosen + inner_chosen)
        if opset < need:
            raise QinjectError(f"the plan needs opset {need} but the model has {opset} (run upgrade-opset first)")
        rewrite = _Rewrite(graph, self.method, self.percentile)
        static = []
        for node, choice in chosen:
            if choice.quantizes_activations and STATIC in op_facts.modes(node):
                rewrite.quantize_node(node, choice)
                static.append((node, choice))
            else:  # another mode, or static where the op has no static form (a note says so)
                rewrite.lower_mode(node, choice)
        # Outputs last: whether an output point is free depends on which inputs got quantized.
        for node, choice in static:
            rewrite.quantize_output(node, choice)
        rewrite.join_integers()
        rewrite.route_range_preserving_consumers()
        kept_float = {id(n): why for n, choice in inner_chosen if (why := rewrite.quantize_body_node(n, choice))}
        _note_subgraph_nodes(inner, owners, kept_float)
        rewrite.note_unfused()
        if any(n.domain == MS_DOMAIN for n in graph.all_nodes()):  # DynamicQuantizeLSTM
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        for g in (graph, *graph.subgraphs()):  # a lowered body node's float weight may live in its body
            qir.drop_unused_initializers(g)
        graph.sort()
        return PassResult(model, True)


class _Rewrite:
    def __init__(self, graph: ir.Graph, method: str, percentile: float) -> None:
        self.graph, self.method, self.percentile = graph, method, percentile
        self.acts: dict[tuple[str, ActKey], _QParams] = {}
        self.origin: dict[str, ir.Value] = {}  # dequantized value name -> the float value it stands for
        self.weights: dict[tuple[str, numerics.QType, bool, int | None], tuple[ir.Value, np.ndarray]] = {}
        self.collapsed: dict[tuple, str] = {}  # weight key -> a note: channels whose codes are all zero
        # Q/DQ pairs inside control-flow bodies: (value name, key, id(body)) -> params
        self.body_acts: dict[tuple[str, ActKey, int], _QParams] = {}
        self._names: set[str] | None = None  # every name in the model, once a body is rewritten
        self.weight_only: list[ir.Node] = []  # the nodes standing for weight-only nodes

    # -- per node ----------------------------------------------------------------------------------
    def quantize_node(self, node: ir.Node, choice: NodeQuant, body: ir.Graph | None = None) -> None:
        """Quantize the node's activation inputs, weight and bias; ``body``: the control-flow body
        holding the node, where its Q/DQ nodes go."""
        key = ActKey(choice.activation_qtype, choice.activation_symmetric)
        notes = node.meta.setdefault(qir.QUANT_NOTES, [])  # after earlier passes' notes (fit-target)
        act_scales = []
        for i in op_facts.activation_inputs(node):
            value = node.inputs[i]
            params = self.activation(value, key, node) if body is None else self.body_activation(value, key, body)
            node.replace_input_with(i, params.dequantized)
            act_scales.append(params.scale)
        weight_scale = None
        w = op_facts.weight_of(node)
        if w is not None:
            widx = op_facts.weight_index(node)
            dq, weight_scale = self.weight(node, w, choice, body)
            node.replace_input_with(widx, dq)
            collapsed = self.collapsed.get((w.name, choice.weight_qtype, choice.weight_symmetric, choice.per_channel))
            if collapsed:
                notes.append(collapsed)
        self.bias(node, choice, act_scales, weight_scale, notes, body)
        node.meta[qir.QUANT_APPLIED] = choice

    def lower_mode(self, node: ir.Node, choice: NodeQuant) -> bool:
        """Give the node its dynamic or weight-only form, in the graph (or body) that holds it. False,
        untouched but for a note, where it has none (``_insert_qdq_modes.refusal``)."""
        why = _insert_qdq_modes.refusal(node, choice)
        if why is not None:
            node.meta.setdefault(qir.QUANT_NOTES, []).append(why)
            return False
        node.meta[qir.QUANT_APPLIED] = choice
        node.meta.setdefault(qir.QUANT_NOTES, [])
        core = _insert_qdq_modes.lower(node, choice, self)
        core.meta.update({qir.QUANT_APPLIED: choice, qir.QUANT_NOTES: node.meta[qir.QUANT_NOTES]})
        if choice.mode == WEIGHT_ONLY:
            self.weight_only.append(core)
        return True

    def note_unfused(self) -> None:
        """Note the weight-only nodes onnxruntime will not fuse, now that every consumer is rewritten."""
        for node in self.weight_only:
            why = _insert_qdq_modes.unfused_note(node)
            if why is not None:
                node.meta[qir.QUANT_NOTES].append(why)

    def quantize_body_node(self, node: ir.Node, choice: NodeQuant) -> str | None:
        """Quantize a node inside a control-flow body (its output stays float). Untouched, and why for
        the owner's note, if it has no form for a dynamic / weight-only choice, or a static node has no
        calibration statistics for an input (onnxruntime could not observe it, or the branch never ran)."""
        if not choice.quantizes_activations or STATIC not in op_facts.modes(node):
            return None if self.lower_mode(node, choice) else f"no {choice.mode} form"
        points = [node.inputs[i] for i in op_facts.activation_inputs(node)]
        missing = [v.name for v in points if self._range_stats(v) is None]
        if missing:
            node.meta.setdefault(qir.QUANT_NOTES, []).append(
                f"left float: no calibration statistics for {', '.join(missing)} (its body never ran on the "
                "calibration data, or onnxruntime could not observe it)")
            return "no calibration statistics for their inputs"
        self.quantize_node(node, choice, node.graph)
        return None

    def _range_stats(self, value: ir.Value) -> object:
        source = value
        while source is not None and source.meta.get(qir.ACT_STATS) is None:
            source = range_source(source)
        return None if source is None else source.meta.get(qir.ACT_STATS)

    def body_activation(self, value: ir.Value, key: ActKey, body: ir.Graph) -> _QParams:
        """A Q/DQ pair for ``value`` inside ``body`` (outer-scope values too: the pair sits beside its
        consumer, where onnxruntime's QDQ fusion looks for it), shared by the body's consumers."""
        cached = self.body_acts.get((value.name, key, id(body)))
        if cached is not None:
            return cached
        found = learned(value, key.qtype, key.symmetric)  # fine-tuned (passes/rounding/finetune.py)
        if found is not None:
            scale, zp = found.scale, found.zero_point
        else:  # a range-preserving op's output without statistics of its own takes its source's range
            lo, hi = select_range(self._range_stats(value), self.method, key.qtype, key.symmetric, self.percentile)
            scale, zp = numerics.scale_zero_point(lo, hi, key.qtype, key.symmetric)
        params = _QParams(_representable(scale, value).reshape(()), np.asarray(zp).reshape(()))
        self._pair(value, key, params, body, self.fresh)
        self.body_acts[(value.name, key, id(body))] = params
        return params

    def fresh(self, base: str) -> str:
        """A value or node name not used anywhere in the model (bodies may not shadow outer names)."""
        if self._names is None:
            self._names = qir.all_names(self.graph)
        return qir.fresh_name(base, self._names)

    @staticmethod
    def representable(scale: np.ndarray, value: ir.Value) -> np.ndarray:
        return _representable(scale, value)

    def quantize_output(self, node: ir.Node, choice: NodeQuant) -> None:
        """Quantize the node's output point when it costs no accuracy or buys an integer kernel.

        Free: a quantized node downstream reads this tensor (directly, or through range-preserving
        ops after an 8-bit integer kernel), so it is quantized anyway. Otherwise only 8-bit nodes whose
        integer kernel needs a quantized output (Conv; Gemm/MatMul followed by a ReLU) get one, and
        only if the predicted SQNR of that extra rounding is at least ``OUTPUT_MIN_SQNR_DB``: a
        heavy-tailed output would cost more accuracy than the kernel saves.
        """
        out = output_point(node)
        if out.is_graph_output():
            return
        key = ActKey(choice.activation_qtype, choice.activation_symmetric)
        # Only an integer kernel keeps its output on integers; after a 4- or 16-bit node (dequantize +
        # float op in onnxruntime) a range-preserving op fed a quantized tensor would run on integers
        # in NCHW, which onnxruntime does 20-50x slower than in float (uint8 MaxPool).
        kernel = op_facts.runs_on_integer_kernel(node, choice.weights, choice.activations)
        if not self._read_quantized(out, key, through_range_preserving=kernel):
            if not (kernel and op_facts.needs_quantized_output(node)):
                return
            sqnr = output_sqnr_db(out, key.qtype, key.symmetric, self.method, self.percentile)
            if sqnr is not None and sqnr < OUTPUT_MIN_SQNR_DB:
                node.meta[qir.QUANT_NOTES].append(
                    f"output kept float: {key.qtype} would give it only {sqnr:.1f} dB SQNR (heavy tails); "
                    "onnxruntime runs the op in float on dequantized inputs")
                return
        self.output(out, key, node)

    def join_integers(self) -> None:
        """Run Concats, residual Adds and Muls of two activations (``quant_points.integer_joins``) on
        the integers: feed each the dequantized tensors of its inputs (pairs made where missing: a
        lookup op's output, SiLU's Sigmoid, gets one from its own input's range; a range-preserving
        op's output shares its source's) and route every float consumer of its output through that
        output's pair. onnxruntime then fuses QLinearConcat / QLinearAdd / QLinearMul instead of
        dequantizing the inputs, joining in float and quantizing again (a Relu in between goes into
        the output's Q, the zero point at the bottom of the range). A two-input Sum becomes Add, the
        same function: onnxruntime has no QLinearSum. A residual Add left float also kept the Relu
        after it float, and with it often a convolution: ResNet-50 ran 0.33x of float against
        onnxruntime's own quantize_static at 0.26x (BENCHMARKS.md)."""
        held: dict[str, ActKey] = {}
        for (name, key), params in self.acts.items():
            if key.qtype.bits == 8:  # the float tensor and its dequantized stand-in, which readers hold
                held.setdefault(name, key)
                held.setdefault(params.dequantized.name, key)
        keys = set(held.values())
        joins = integer_joins(self.graph, held, lambda v: any(self._read_quantized(v, k) for k in keys))
        for node in list(self.graph):  # in graph order: a join's inputs are paired before it
            key = joins.get(node.name)
            if key is None:
                continue
            for i, value in enumerate(node.inputs):
                if value is not None and value.const_value is None:
                    node.replace_input_with(i, self._join_input(value, key, node).dequantized)
            if node.op_type == "Sum":
                node.op_type = "Add"
            self.output(output_point(node), key, node)

    def _join_input(self, value: ir.Value, key: ActKey, node: ir.Node) -> _QParams:
        """The pair a join reads ``value`` through at ``key``, made if missing."""
        value = self.origin.get(value.name, value)
        found = self.acts.get((value.name, key))
        if found is not None:
            return found
        source = op_facts.looked_up_from(value)
        if source is not None:
            return self._lookup_pair(value, self._join_input(source, key, node), key)
        return self.activation(value, key, node)

    def _lookup_pair(self, value: ir.Value, source: _QParams, key: ActKey) -> _QParams:
        """A Q/DQ pair for a lookup op's output, its range the op's map of its input's (no
        calibration needed), with the op fed its input's pair: onnxruntime fuses QLinearSigmoid."""
        producer = value.producer()
        qtype = key.qtype
        lo, hi = ((np.array([qtype.qmin, qtype.qmax], np.float64) - source.zero_point.astype(np.float64))
                  * source.scale.astype(np.float64))
        lo, hi = op_facts.fact(producer).lookup_range(float(lo), float(hi))
        scale, zp = numerics.scale_zero_point(np.float64(lo), np.float64(hi), qtype, key.symmetric)
        params = _QParams(_representable(scale, value).reshape(()), zp.reshape(()))
        producer.replace_input_with(0, source.dequantized)
        dq = self._pair(value, key, params, self.graph, lambda name: name)
        self.origin[dq.name] = value
        self.acts[(value.name, key)] = params
        return params

    def route_range_preserving_consumers(self) -> None:
        """Feed the dequantized tensor to float MaxPool/Reshape/... consumers whose result is read
        quantized at the same key downstream: both ends then carry the same scale, onnxruntime runs
        the op on integers, and the producer (e.g. a Concat) keeps a single Q consumer it can fuse."""
        for (_, key), params in list(self.acts.items()):
            value = self.origin[params.dequantized.name]
            for use in list(value.uses()):
                node = use.node
                if use.idx == 0 and any(self._read_quantized(v, key) for v in op_facts.carried(node)):
                    node.replace_input_with(0, params.dequantized)

    def _read_quantized(self, value: ir.Value, key: ActKey, through_range_preserving: bool = True) -> bool:
        """Whether a quantized node reads ``value`` at ``key``, directly or through range-preserving ops."""
        if (value.name, key) in self.acts:
            return True
        if not through_range_preserving:
            return False
        return any(use.idx == 0 and self._read_quantized(v, key)
                   for use in value.uses() for v in op_facts.carried(use.node))

    # -- activations -------------------------------------------------------------------------------
    def activation(self, value: ir.Value, key: ActKey, node: ir.Node) -> _QParams:
        """The Q/DQ pair for ``value`` at ``key``, created once and shared by every consumer."""
        value = self.origin.get(value.name, value)  # already routed through a pair: quantize the float
        cached = self.acts.get((value.name, key))
        if cached is not None:
            return cached
        params = self._params(value, key, node)
        dq = self._pair(value, key, params, self.graph, lambda name: name)
        self.origin[dq.name] = value
        self.acts[(value.name, key)] = params
        return params

    def _pair(self, value: ir.Value, key: ActKey, params: _QParams, graph: ir.Graph,
              named: Callable[[str], str]) -> ir.Value:
        """QuantizeLinear -> DequantizeLinear of ``value`` with ``params``, appended to ``graph``
        (node and value names through ``named``); sets and returns ``params.dequantized``."""
        suffix = "" if key.qtype.bits == 8 else f"_{key.qtype}"
        scale = self._const(f"{value.name}_scale{suffix}", _in_type(params.scale, value))
        zp = self._const(f"{value.name}_zero_point{suffix}", params.zero_point)
        q = ir.node("QuantizeLinear", [value, scale, zp], name=named(f"{value.name}_QuantizeLinear{suffix}"))
        q.outputs[0].name = named(f"{value.name}_quantized{suffix}")
        q.outputs[0].shape = value.shape
        q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(key.qtype.numpy_dtype))
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=named(f"{value.name}_DequantizeLinear{suffix}"))
        dq.outputs[0].name = named(f"{value.name}_dequantized{suffix}")
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        graph.extend([q, dq])
        params.dequantized = dq.outputs[0]
        return params.dequantized

    def output(self, value: ir.Value, key: ActKey, node: ir.Node) -> None:
        """Quantize a node's output point and route its float consumers through the Q/DQ pair,
        so the next integer kernel reads integers (consumers with their own pair keep theirs)."""
        params = self.activation(value, key, node)
        for use in list(value.uses()):
            if use.node.op_type != "QuantizeLinear":  # this pair's Q, or another key's
                use.node.replace_input_with(use.idx, params.dequantized)

    def _params(self, value: ir.Value, key: ActKey, node: ir.Node) -> _QParams:
        source, root = range_source(value), None
        while source is not None:
            source = self.origin.get(source.name, source)  # a routed op reads the pair's dequantized
            shared = self.acts.get((source.name, key))
            if shared is not None:
                return _QParams(shared.scale, shared.zero_point)
            if source.meta.get(qir.ACT_STATS) is not None:
                root = source
            source = range_source(source)
        # Not paired yet (a join's output, paired after the nodes): take the range it will have, so
        # that both ends of the range-preserving ops share one scale and onnxruntime runs them on
        # integers (a YOLO block's Split feeds a convolution before its source is paired).
        value = root if root is not None else value
        found = learned(value, key.qtype, key.symmetric)  # fine-tuned (passes/rounding/finetune.py)
        if found is not None:
            return _QParams(found.scale.reshape(()), found.zero_point.reshape(()))
        stats = value.meta.get(qir.ACT_STATS)
        if stats is None:
            raise QinjectError(f"node {node.name!r}: no calibration statistics for activation {value.name!r} "
                               "(run the calibrate pass first)")
        lo, hi = select_range(stats, self.method, key.qtype, key.symmetric, self.percentile)
        scale, zp = numerics.scale_zero_point(lo, hi, key.qtype, key.symmetric)
        return _QParams(_representable(scale, value).reshape(()), zp.reshape(()))

    # -- weights and bias ----------------------------------------------------------------------------
    def weight(self, node: ir.Node, w: ir.Value, choice: NodeQuant,
               body: ir.Graph | None = None) -> tuple[ir.Value, np.ndarray]:
        qtype = choice.weight_qtype
        array = w.const_value.numpy()
        axis = op_facts.channel_axis(node) if choice.per_channel and array.ndim > 1 else None
        cache_key = (w.name, qtype, choice.weight_symmetric, axis) + ((id(body),) if body is not None else ())
        if cache_key in self.weights:
            return self.weights[cache_key]
        if array.dtype.kind != "f":
            raise UnsupportedModelError(f"node {node.name!r}: weight {w.name!r} is {array.dtype}, not float")
        if not np.all(np.isfinite(array)):
            raise UnsupportedModelError(f"node {node.name!r}: weight {w.name!r} contains NaN or Inf")
        found = learned(w, qtype, choice.weight_symmetric, axis)  # fine-tuned (passes/rounding/finetune.py)
        if found is not None:
            scale, zp = found.scale, found.zero_point
        else:
            lo, hi = numerics.weight_range(array, axis)
            scale, zp = numerics.scale_zero_point(lo, hi, qtype, choice.weight_symmetric)
        scale = _representable(scale, w)
        q = numerics.quantize(array, scale, zp, qtype, axis)
        self._check_collapse(w, array, q, zp, qtype, axis, choice)
        suffix = "" if qtype.bits == 8 else f"_{qtype}"
        dequantized = self._dequantized_const(w, suffix, q, scale, zp, axis, body)
        self.weights[cache_key] = (dequantized, scale)
        return dequantized, scale

    def _check_collapse(self, w: ir.Value, array: np.ndarray, q: np.ndarray, zp: np.ndarray, qtype: numerics.QType,
                        axis: int | None, choice: NodeQuant) -> None:
        """Note output channels that held non-zero weights but quantize to all-zero codes (a per-tensor
        scale set by an outlier channel does that): the layer's output for them collapses to its bias."""
        channel_axis = axis if axis is not None else (0 if array.ndim > 1 else None)
        if channel_axis is None:
            return
        other = tuple(i for i in range(array.ndim) if i != channel_axis)
        zero = np.asarray(zp, dtype=q.dtype)
        if zero.ndim:
            zero = zero.reshape([-1 if i == channel_axis else 1 for i in range(array.ndim)])
        # Compared in the codes' own type: one byte per weight of temporaries, not eight.
        dead = np.all(q == zero, axis=other) & np.any(array != 0, axis=other)
        if dead.any():
            self.collapsed[(w.name, qtype, choice.weight_symmetric, choice.per_channel)] = (
                f"{int(dead.sum())} of {dead.size} output channels of weight {w.name!r} quantize to all zeros at "
                f"{qtype.bits} bits{'' if axis is not None else ' per tensor (try per-channel)'}: their output "
                "collapses to the bias")

    def bias(self, node: ir.Node, choice: NodeQuant, act_scales: list[np.ndarray],
             weight_scale: np.ndarray | None, notes: list[str], body: ir.Graph | None = None) -> None:
        """Store the bias as int32 behind a DequantizeLinear.

        At 8 bits and fewer its scale is s_x * s_w, the layout of onnxruntime's integer kernels.
        Otherwise (16 bits, an int32 overflow, an unusual Gemm) it gets its own scale, max|b| / (2^31 - 1),
        which is exact to ~1e-9 relative. A float bias is never left beside quantized inputs:
        onnxruntime's WeightBiasQuantization would quantize it with s_x * s_w itself and, at 16 bits,
        overflow int32 silently.
        """
        idx = op_facts.fact(node).bias_input
        if idx is None or idx >= len(node.inputs) or node.inputs[idx] is None or weight_scale is None:
            return
        b = node.inputs[idx]
        if b.const_value is None or len(act_scales) != 1:
            return
        bias = b.const_value.numpy().astype(np.float64)
        if not np.all(np.isfinite(bias)):
            raise UnsupportedModelError(f"node {node.name!r}: bias {b.name!r} contains NaN or Inf")
        scale = (np.float64(act_scales[0]) * weight_scale.astype(np.float64)).astype(np.float32)
        kernel_layout = choice.weights <= 8 and choice.activations <= 8 and scale.size in (1, bias.size)
        unfused = op_facts.bias_unfused(node, bias)
        if unfused is not None:
            kernel_layout = False
            notes.append(f"bias not fused: {unfused}")
        if kernel_layout and np.any(np.abs(np.rint(bias / scale.reshape(-1).astype(np.float64))) > INT32_MAX):
            kernel_layout = False
            notes.append("bias not fused: bias / (activation scale x weight scale) overflows int32; "
                         "stored with its own int32 scale")
        if not kernel_layout:
            scale = np.asarray(max(float(np.abs(bias).max()), 1e-30) / INT32_MAX, dtype=np.float32)
        per_channel = scale.size > 1
        scale = _representable(scale.reshape(-1) if per_channel else scale.reshape(()), b)
        q = np.clip(np.rint(bias / scale.astype(np.float64)), -INT32_MAX, INT32_MAX).astype(np.int32)
        dequantized = self._dequantized_const(b, f"_{node.name}", q, scale, np.zeros(scale.shape, np.int32),
                                              0 if per_channel else None, body)
        node.replace_input_with(idx, dequantized)

    def _dequantized_const(self, value: ir.Value, suffix: str, q: np.ndarray, scale: np.ndarray,
                           zero_point: np.ndarray, axis: int | None, body: ir.Graph | None = None) -> ir.Value:
        """Integer initializer -> DequantizeLinear standing for the constant ``value`` (in ``body``
        for a node inside a control-flow body; the initializers stay in the main graph, visible there)."""
        stem = value.name
        inputs = [self._const(f"{stem}_{part}{suffix}", array)
                  for part, array in (("quantized", q), ("scale", _in_type(scale, value)), ("zero_point", zero_point))]
        attrs = {} if axis is None else {"axis": axis}
        name, out = f"{stem}_DequantizeLinear{suffix}", f"{stem}_dequantized{suffix}"
        if body is not None:
            name, out = self.fresh(name), self.fresh(out)
        dq = ir.node("DequantizeLinear", inputs, attrs, name=name)
        dq.outputs[0].name = out
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        (body if body is not None else self.graph).extend([dq])
        return dq.outputs[0]

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        return qir.add_initializer(self.graph, name, array)


def _float_type(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy()) if value.dtype is not None and value.dtype.is_floating_point() \
        else np.dtype(np.float32)


def _representable(scale: np.ndarray, value: ir.Value) -> np.ndarray:
    """The scale rounded to what ``value``'s float type stores (fp16, bf16: Q/DQ scales share the
    tensor's type), never below its smallest normal number; codes are computed with this scale."""
    dtype = _float_type(value)
    if dtype == np.float32:
        return scale
    floor = float(ml_dtypes.finfo(dtype).smallest_normal)
    return np.maximum(scale, floor).astype(dtype).astype(np.float32)


def _in_type(scale: np.ndarray, value: ir.Value) -> np.ndarray:
    return np.asarray(scale).astype(_float_type(value))


def _note_subgraph_nodes(inner: list[ir.Node], owners: dict[int, ir.Node], kept_float: dict[int, str]) -> None:
    """Say on each control-flow node (``owners``: by id of a body node) which quantizable nodes inside
    its bodies were quantized and which stayed float, and why (``kept_float``: by id of a node)."""
    by_owner: dict[int, tuple[ir.Node, dict[tuple[str, str], list[str]]]] = {}
    for node in inner:
        if qir.QUANT_APPLIED in node.meta:
            outcome = ("quantized", "")
        elif id(node) in kept_float:
            outcome = ("left float", f": {kept_float[id(node)]}")
        else:
            outcome = ("left float by the plan", "")
        owner = owners[id(node)]
        by_owner.setdefault(id(owner), (owner, {}))[1].setdefault(outcome, []).append(node.name or node.op_type)
    for owner, outcomes in by_owner.values():
        notes = owner.meta.setdefault(qir.QUANT_NOTES, [])
        for (what, why), names in outcomes.items():
            notes.append(f"{len(names)} quantizable node(s) inside its subgraph(s) {what} ({_names(names)}){why}")


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _unknown_nodes(model: ir.Model, names: list[str], plan: Plan) -> str:
    """The error for a plan naming nodes that are not quantizable: why, for ops that have no quantized
    form at all (GRU: onnxruntime has no integer kernel for it)."""
    by_name = {n.name: n for n in model.graph.all_nodes()}
    for name in names:
        node = by_name.get(name)
        reason = op_facts.fact(node).float_reason if node is not None else None
        if reason is not None and plan.nodes[name] is not None:
            mode = plan.nodes[name].mode
            return (f"plan names node {name!r} ({node.op_type}) with mode {mode!r}, but it has no quantized "
                    f"form: {reason.removeprefix('left float: ')}; leave it out of the plan (it runs float)")
    return f"plan names node(s) {names} that are not quantizable nodes of the model"
