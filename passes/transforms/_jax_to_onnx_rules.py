"""The rules of ``lower-jax-to-onnx``: how each jax primitive becomes standard ONNX (opset 21).

One small function per primitive or family, registered with ``@lowering`` beside it; see
``passes/transforms/lower_jax_to_onnx.py`` for the pass that applies them and the forms chosen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from qinject.passes.transforms._jax_lowering import (
    JAX,
    Emitter,
    Lowered,
    _bias_add,
    _const,
    _dequantized_constant,
    _inverse,
    _shape,
    lowering,
)

from qinject.core import op_facts

# -- elementwise ------------------------------------------------------------------------------------
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid", "erf": "Erf",
          "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "sin": "Sin",
          "cos": "Cos", "tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan", "sinh": "Sinh",
          "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
           "eq": "Equal", "lt": "Less", "gt": "Greater", "le": "LessOrEqual", "ge": "GreaterOrEqual"}
_LOGICAL = {"and": ("And", "BitwiseAnd"), "or": ("Or", "BitwiseOr"), "xor": ("Xor", "BitwiseXor")}


@lowering(*_UNARY)
def _unary(node: ir.Node, e: Emitter) -> Lowered:
    return e.op(_UNARY[node.op_type], [node.inputs[0]])


@lowering(*_BINARY, *_LOGICAL, "ne", "rem")
def _binary(node: ir.Node, e: Emitter) -> Lowered:
    a, b = node.inputs
    # jaxpr operands share a dtype; a literal's may differ only by weak typing: match the other side.
    if _const(b) is not None and a.dtype != b.dtype:
        b = e.cast(b, a.dtype.numpy())
    elif _const(a) is not None and a.dtype != b.dtype:
        a = e.cast(a, b.dtype.numpy())
    prim = node.op_type
    if prim == "ne":
        return e.op("Not", [e.op("Equal", [a, b])])
    if prim == "rem":  # lax.rem is C fmod: the result has the dividend's sign
        return e.op("Mod", [a, b], {"fmod": 1})
    if prim == "max" and (_is_zero(a) or _is_zero(b)) and _const(a if _is_zero(b) else b) is None:
        return e.op("Relu", [a if _is_zero(b) else b])  # jax.nn.relu; onnxruntime fuses Relu into QLinearConv
    if prim in _LOGICAL:
        logical, bitwise = _LOGICAL[prim]
        return e.op(logical if a.dtype == ir.DataType.BOOL else bitwise, [a, b])
    out = e.op(_BINARY[prim], [a, b])
    out_dtype = e.params.get("out_dtype")
    return out if out_dtype is None else e.cast(out, out_dtype, current=a.dtype.numpy())


def _is_zero(value: ir.Value) -> bool:
    array = _const(value)
    return (array is not None and array.size == 1 and array.dtype.kind == "f"
            and float(array.reshape(-1)[0]) == 0.0)


@lowering("not")
def _not(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Not" if node.inputs[0].dtype == ir.DataType.BOOL else "BitwiseNot", [node.inputs[0]])


@lowering("copy", "copy_p", "stop_gradient", "reduce_precision", "optimization_barrier")
def _identity(node: ir.Node, e: Emitter) -> Lowered:
    return list(node.inputs)  # dropped: consumers read the input (an Identity only for a graph output)


@lowering("rsqrt")
def _rsqrt(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Reciprocal", [e.op("Sqrt", [node.inputs[0]])])


@lowering("erfc")
def _erfc(node: ir.Node, e: Emitter) -> Lowered:
    x = node.inputs[0]
    return e.op("Sub", [e.const(np.ones((), x.dtype.numpy()), "one"), e.op("Erf", [x])])


@lowering("exp2")
def _exp2(node: ir.Node, e: Emitter) -> Lowered:
    x = node.inputs[0]
    return e.op("Pow", [e.const(np.asarray(2, x.dtype.numpy()), "two"), x])


@lowering("log1p", "expm1")
def _log1p_expm1(node: ir.Node, e: Emitter) -> Lowered:
    # In float64, log(1 + x) and exp(x) - 1 keep float32's relative precision for small x.
    x = node.inputs[0]
    dtype = x.dtype.numpy()
    wide = np.dtype(np.float64) if dtype.itemsize < 8 else dtype
    x, one = e.cast(x, wide), e.const(np.ones((), wide), "one")
    if node.op_type == "log1p":
        y = e.op("Log", [e.op("Add", [x, one])])
    else:
        y = e.op("Sub", [e.op("Exp", [x]), one])
    return e.cast(y, dtype, current=wide)


@lowering("square")
def _square(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Mul", [node.inputs[0], node.inputs[0]])


@lowering("integer_pow")
def _integer_pow(node: ir.Node, e: Emitter) -> Lowered:
    x, y = node.inputs[0], int(e.params["y"])
    if y == 0:
        return e.op("Expand", [e.const(np.ones((), x.dtype.numpy()), "one"), e.ints(_shape(x), "shape")])
    result, power, n = None, x, abs(y)  # square-and-multiply
    while n:
        if n & 1:
            result = power if result is None else e.op("Mul", [result, power])
        n >>= 1
        if n:
            power = e.op("Mul", [power, power])
    if y < 0:
        return e.op("Reciprocal", [result])
    return [x] if result is x else result


@lowering("round")
def _round(node: ir.Node, e: Emitter) -> Lowered:
    x = node.inputs[0]
    if int(e.params["rounding_method"]) == 1:  # TO_NEAREST_EVEN, as ONNX Round
        return e.op("Round", [x])
    # AWAY_FROM_ZERO: sign(x) * floor(|x| + 0.5)
    half = e.const(np.asarray(0.5, x.dtype.numpy()), "half")
    return e.op("Mul", [e.op("Sign", [x]), e.op("Floor", [e.op("Add", [e.op("Abs", [x]), half])])])


@lowering("is_finite")
def _is_finite(node: ir.Node, e: Emitter) -> Lowered:
    x = node.inputs[0]
    return e.op("Not", [e.op("Or", [e.op("IsNaN", [x]), e.op("IsInf", [x])])])


@lowering("clamp")
def _clamp(node: ir.Node, e: Emitter) -> Lowered:
    lo, x, hi = node.inputs
    if len(lo.shape) == 0 and len(hi.shape) == 0:  # Clip takes scalar bounds only
        return e.op("Clip", [x, lo, hi])
    return e.op("Min", [e.op("Max", [x, lo]), hi])


@lowering("select_n")
def _select_n(node: ir.Node, e: Emitter) -> Lowered:
    pred, *cases = node.inputs
    if len(cases) == 1:
        return [cases[0]]
    if pred.dtype == ir.DataType.BOOL:  # select_n(p, a, b) is b where p is true
        return e.op("Where", [pred, cases[1], cases[0]])
    out = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        out = e.op("Where", [e.op("Equal", [pred, e.const(np.asarray(i, pred.dtype.numpy()), f"case{i}")]),
                             cases[i], out])
    return out


@lowering("convert_element_type")
def _convert(node: ir.Node, e: Emitter) -> Lowered:
    x, dtype = node.inputs[0], np.dtype(e.params["new_dtype"])
    return [x] if x.dtype.numpy() == dtype else e.op("Cast", [x], {"to": ir.DataType.from_numpy(dtype)})


# -- layout -----------------------------------------------------------------------------------------
@lowering("reshape")
def _reshape(node: ir.Node, e: Emitter) -> Lowered:
    x = node.inputs[0]
    if e.params.get("dimensions") is not None:
        x = e.transpose(x, e.params["dimensions"])
    return e.op("Reshape", [x, e.ints(_shape(node.outputs[0]), "shape")])


@lowering("transpose")
def _transpose(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Transpose", [node.inputs[0]], {"perm": [int(p) for p in e.params["permutation"]]})


@lowering("squeeze")
def _squeeze(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Squeeze", [node.inputs[0], e.ints(e.params["dimensions"], "axes")])


@lowering("expand_dims")
def _expand_dims(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Unsqueeze", [node.inputs[0], e.ints(e.params["dimensions"], "axes")])


# Consumers that broadcast like numpy, so a broadcast_in_dim feeding them need not Expand.
_BROADCASTING = frozenset(_BINARY) | frozenset(_LOGICAL) | {"ne", "rem", "select_n"}


@lowering("broadcast_in_dim")
def _broadcast_in_dim(node: ir.Node, e: Emitter) -> Lowered:
    x, out = node.inputs[0], node.outputs[0]
    shape, dims = [int(d) for d in e.params["shape"]], list(e.params["broadcast_dimensions"])
    missing = [d for d in range(len(shape)) if d not in dims]
    y = e.op("Unsqueeze", [x, e.ints(missing, "axes")]) if missing else x
    ranked = [1] * len(shape)
    for i, d in enumerate(dims):
        ranked[d] = _shape(x)[i]
    if ranked == shape:
        return [y] if y is x else y
    if all(_broadcasts_without_expand(use, shape) for use in out.uses()) and not out.is_graph_output():
        if y is x:
            y = e.op("Identity", [x])
        y.shape = ir.Shape(ranked)  # smaller than jax's shape: the consumer broadcasts it
        return y
    return e.op("Expand", [y, e.ints(shape, "shape")])


def _broadcasts_without_expand(use: Any, shape: list[int]) -> bool:
    """Whether the consumer broadcasts its operands itself and another operand already has the
    full shape, so the ONNX result keeps jax's shape."""
    node = use.node
    if node.domain != JAX or node.op_type not in _BROADCASTING or _shape(node.outputs[0]) != shape:
        return False
    return any(i != use.idx and v is not None and _shape(v) == shape
               and not (v.producer() is not None and v.producer().op_type == "broadcast_in_dim")
               for i, v in enumerate(node.inputs))


@lowering("concatenate")
def _concatenate(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("Concat", list(node.inputs), {"axis": int(e.params["dimension"])})


@lowering("split")
def _split(node: ir.Node, e: Emitter) -> Lowered:
    sizes = [int(s) for s in e.params["sizes"]]
    return e.op("Split", [node.inputs[0], e.ints(sizes, "split")], {"axis": int(e.params["axis"])},
                num_outputs=len(sizes))


def _slice(e: Emitter, x: ir.Value, starts: list, ends: list, axes: list, steps: list | None = None
           ) -> ir.Value:
    inputs = [x, e.ints(starts, "starts"), e.ints(ends, "ends"), e.ints(axes, "axes")]
    return e.op("Slice", inputs + ([e.ints(steps, "steps")] if steps else []))


@lowering("slice")
def _slice_rule(node: ir.Node, e: Emitter) -> Lowered:
    p, dims = e.params, _shape(node.inputs[0])
    strides = p["strides"] or [1] * len(dims)
    axes = [a for a in range(len(dims))
            if (p["start_indices"][a], p["limit_indices"][a], strides[a]) != (0, dims[a], 1)]
    if not axes:
        return [node.inputs[0]]
    return _slice(e, node.inputs[0], [int(p["start_indices"][a]) for a in axes],
                  [int(p["limit_indices"][a]) for a in axes], axes, [int(strides[a]) for a in axes])


@lowering("rev")
def _rev(node: ir.Node, e: Emitter) -> Lowered:
    axes = [int(d) for d in e.params["dimensions"]]
    return _slice(e, node.inputs[0], [-1] * len(axes), [-(2**63)] * len(axes), axes, [-1] * len(axes))


@lowering("dynamic_slice")
def _dynamic_slice(node: ir.Node, e: Emitter) -> Lowered:
    x, *indices = node.inputs
    dims, sizes = _shape(x), [int(s) for s in e.params["slice_sizes"]]
    hi = [d - s for d, s in zip(dims, sizes)]  # jax clamps each start into [0, dim - size]
    if all(_const(i) is not None for i in indices):
        starts = [int(np.clip(_const(i), 0, h)) for i, h in zip(indices, hi)]
        return _slice(e, x, starts, [s + n for s, n in zip(starts, sizes)], list(range(len(dims))))
    parts = [e.op("Unsqueeze", [e.cast(i, np.int64), e.ints([0], "axes")]) for i in indices]
    starts = e.op("Concat", parts, {"axis": 0})
    starts = e.op("Min", [e.op("Max", [starts, e.ints([0] * len(dims), "zeros")]), e.ints(hi, "max_start")])
    ends = e.op("Add", [starts, e.ints(sizes, "sizes")])
    return e.op("Slice", [x, starts, ends])


def _pad_check(node: ir.Node) -> str | None:
    if any(int(i) for _, _, i in op_facts.jax_params(node)["padding_config"]):
        return "interior padding (lax.pad with interior > 0) has no ONNX equivalent"
    return None


@lowering("pad", check=_pad_check)
def _pad(node: ir.Node, e: Emitter) -> Lowered:
    x, value = node.inputs
    config = [(int(lo), int(hi)) for lo, hi, _ in e.params["padding_config"]]
    y = x
    if any(lo > 0 or hi > 0 for lo, hi in config):
        pads = [max(lo, 0) for lo, _ in config] + [max(hi, 0) for _, hi in config]
        y = e.op("Pad", [x, e.ints(pads, "pads"), e.cast(value, x.dtype.numpy())], {"mode": "constant"})
    cut = [a for a, (lo, hi) in enumerate(config) if lo < 0 or hi < 0]  # negative padding crops
    if cut:
        padded = [d + max(lo, 0) + max(hi, 0) for d, (lo, hi) in zip(_shape(x), config)]
        y = _slice(e, y, [max(-config[a][0], 0) for a in cut],
                   [padded[a] - max(-config[a][1], 0) for a in cut], cut)
    return [y] if y is x else y


@lowering("iota")
def _iota(node: ir.Node, e: Emitter) -> Lowered:
    p = e.params
    shape, dim = [int(d) for d in p["shape"]], int(p["dimension"])
    ramp = np.arange(shape[dim], dtype=np.dtype(p["dtype"]))
    ramp = ramp.reshape([-1 if a == dim else 1 for a in range(len(shape))])
    return e.const(np.ascontiguousarray(np.broadcast_to(ramp, shape)), "iota")


def _gather_check(node: ir.Node) -> str | None:
    return None if _take_axis(node) is not None else (
        "only the jnp.take(table, ids, axis=a) / table[ids] pattern of gather is supported")


def _take_axis(node: ir.Node) -> int | None:
    """The axis ``a`` when this gather is ``jnp.take(operand, indices[..., 0], axis=a)``."""
    p = op_facts.jax_params(node)
    dn, operand, indices = p["dimension_numbers"], _shape(node.inputs[0]), _shape(node.inputs[1])
    if dn.operand_batching_dims or len(dn.start_index_map) != 1 or not indices or indices[-1] != 1:
        return None
    a = dn.start_index_map[0]
    if tuple(dn.collapsed_slice_dims) != (a,):
        return None
    if list(p["slice_sizes"]) != [1 if d == a else n for d, n in enumerate(operand)]:
        return None
    nb = len(indices) - 1  # ONNX Gather: operand[:a] + indices + operand[a+1:]
    expected = tuple(range(a)) + tuple(range(a + nb, len(operand) - 1 + nb))
    return a if tuple(dn.offset_dims) == expected else None


@lowering("gather", check=_gather_check)
def _gather(node: ir.Node, e: Emitter) -> Lowered:
    operand, indices = node.inputs
    a = _take_axis(node)
    ids = e.op("Squeeze", [indices, e.ints([-1], "axes")])
    if "CLIP" in str(e.params.get("mode")):
        dtype, n = indices.dtype.numpy(), _shape(operand)[a]
        ids = e.op("Clip", [ids, e.const(np.zeros((), dtype), "lo"), e.const(np.asarray(n - 1, dtype), "hi")])
    # FILL_OR_DROP (jnp.take's default) returns NaN for an out-of-range index; ONNX Gather fails on one.
    return e.op("Gather", [operand, ids], {"axis": a})


@lowering("cumsum")
def _cumsum(node: ir.Node, e: Emitter) -> Lowered:
    return e.op("CumSum", [node.inputs[0], e.ints([int(e.params["axis"])], "axis")],
                {"reverse": int(bool(e.params.get("reverse", False)))})


# -- reductions -------------------------------------------------------------------------------------
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd", "reduce_and": "ReduceMin", "reduce_or": "ReduceMax"}


@lowering(*_REDUCE)
def _reduce(node: ir.Node, e: Emitter) -> Lowered:
    x, axes = node.inputs[0], [int(a) for a in e.params["axes"]]
    if not axes:  # an empty axes input would reduce everything
        return [x]
    boolean = x.dtype == ir.DataType.BOOL
    y = e.op(_REDUCE[node.op_type], [e.cast(x, np.int32) if boolean else x, e.ints(axes, "axes")],
             {"keepdims": 0})
    return e.cast(y, np.bool_, current=np.int32) if boolean else y


@lowering("argmax", "argmin")
def _arg(node: ir.Node, e: Emitter) -> Lowered:
    (axis,) = e.params["axes"]
    y = e.op("ArgMax" if node.op_type == "argmax" else "ArgMin", [node.inputs[0]],
             {"axis": int(axis), "keepdims": 0, "select_last_index": 0}, main=True)
    return e.cast(y, e.params["index_dtype"], current=np.int64)


def _window_check(node: ir.Node) -> str | None:
    p = op_facts.jax_params(node)
    if any(int(d) != 1 for d in p["base_dilation"]):
        return f"base_dilation {tuple(p['base_dilation'])} (a dilated input) has no ONNX pooling equivalent"
    return None


@lowering("reduce_window_max", "reduce_window_min", "reduce_window_sum", check=_window_check)
def _reduce_window(node: ir.Node, e: Emitter) -> Lowered:
    """MaxPool (min: negated), AveragePool x window size for a sum, or AveragePool alone when the
    sum is only divided by the window size (avg_pool). The pooled axes move last, the others are
    gathered into ONNX's [N, C] and restored afterwards."""
    p, x = e.params, node.inputs[0]
    dims, window, strides = _shape(x), list(p["window_dimensions"]), list(p["window_strides"])
    pads, dilation = [tuple(int(v) for v in pr) for pr in p["padding"]], list(p["window_dilation"])
    pooled = [d for d in range(len(dims))
              if (window[d], strides[d], pads[d], dilation[d]) != (1, 1, (0, 0), 1)]
    if not pooled:
        return [x]
    kept = [d for d in range(len(dims)) if d not in pooled]
    perm = kept + pooled
    lead = [dims[d] for d in kept]
    nc = lead if len(lead) == 2 else [math.prod(lead[:-1]), lead[-1]] if lead else [1, 1]
    y = e.reshape(e.transpose(x, perm), [dims[d] for d in perm], nc + [dims[d] for d in pooled])
    attrs = {"kernel_shape": [int(window[d]) for d in pooled], "strides": [int(strides[d]) for d in pooled],
             "pads": [pads[d][0] for d in pooled] + [pads[d][1] for d in pooled],
             "dilations": [int(dilation[d]) for d in pooled]}
    size = math.prod(window)
    if node.op_type == "reduce_window_sum":
        y = e.op("AveragePool", [y], attrs | {"count_include_pad": 1}, main=True)
        divided = _divided_by(node, size)
        if divided is not None:
            e.absorb(divided)
        else:
            y = e.op("Mul", [y, e.const(np.asarray(size, x.dtype.numpy()), "window_size")])
    elif node.op_type == "reduce_window_min":
        y = e.op("Neg", [e.op("MaxPool", [e.op("Neg", [y])], attrs, main=True)])
    else:
        y = e.op("MaxPool", [y], attrs, main=True)
    out = _shape(node.outputs[0])
    y = e.reshape(y, nc + [out[d] for d in pooled], [out[d] for d in perm])
    return e.transpose(y, _inverse(perm))


def _divided_by(node: ir.Node, size: int) -> ir.Node | None:
    """The ``div`` by the constant ``size`` that is the only reader of ``node``'s output (avg_pool)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0].is_graph_output() or node.outputs[0].dtype.numpy().kind != "f":
        return None
    div = uses[0].node
    d = _const(div.inputs[1]) if div.domain == JAX and div.op_type == "div" and uses[0].idx == 0 else None
    return div if d is not None and d.size == 1 and float(d.reshape(-1)[0]) == size else None


# -- dot_general and convolution --------------------------------------------------------------------
def _is_weight(value: ir.Value) -> bool:
    return _const(value) is not None or _dequantized_constant(value) is not None


def _dot_dtype(node: ir.Node) -> np.dtype:
    """What the MatMul computes in: the preferred element type, int32 for narrow integers
    (ONNX MatMul has no 8/16-bit integer form, and int32 accumulation is what jax's does)."""
    pref = op_facts.jax_params(node).get("preferred_element_type")
    dtype = np.dtype(pref) if pref is not None else node.inputs[0].dtype.numpy()
    if dtype.kind in "iub" and dtype not in (np.int32, np.int64, np.uint32, np.uint64):
        return np.dtype(np.int32)
    return dtype


@lowering("dot_general")
def _dot_general(node: ir.Node, e: Emitter) -> Lowered:
    (cl, cr), (bl, br) = e.params["dimension_numbers"]
    lhs, rhs = node.inputs
    swap = _is_weight(lhs) and not _is_weight(rhs)
    if swap:  # W @ x as (x' @ W')': the weight stays MatMul's input 1
        lhs, rhs, cl, cr, bl, br = rhs, lhs, cr, cl, br, bl
    ls, rs = _shape(lhs), _shape(rhs)
    fl = [d for d in range(len(ls)) if d not in cl and d not in bl]
    fr = [d for d in range(len(rs)) if d not in cr and d not in br]
    batch, mdims, ndims = [ls[d] for d in bl], [ls[d] for d in fl], [rs[d] for d in fr]
    k, m, n = math.prod(ls[d] for d in cl), math.prod(mdims), math.prod(ndims)
    dtype, out_dtype = _dot_dtype(node), node.outputs[0].dtype.numpy()
    lhs, rhs = e.cast(lhs, dtype), e.cast(rhs, dtype)
    if (not swap and not bl and len(ls) == 2 and list(cl) == [1] and len(rs) == 2 and _const(rhs) is not None
            and dtype == out_dtype and (bias := _bias_add(node, e, 1)) is not None):
        # x @ W + b: Gemm with the bias; transB reads a [N, K] weight as it is.
        attrs = {"transB": 1} if list(cr) == [1] else {}
        return e.op("Gemm", [lhs, rhs, e.const(bias, "bias")], attrs, main=True)
    if bl:
        a_shape, b_shape, mm_shape = batch + [m, k], batch + [k, n], batch + [m, n]
    else:
        a_shape, b_shape = mdims + [k], [k, n] if fr else [k]
        mm_shape = mdims + ([n] if fr else [])
    a = e.relayout(lhs, list(bl) + fl + list(cl), a_shape)
    b = e.relayout(rhs, list(br) + list(cr) + fr, b_shape)
    y = e.op("MatMul", [a, b], main=True)
    y = e.reshape(e.cast(y, out_dtype, current=dtype), mm_shape, batch + mdims + ndims)
    if swap:
        nb, nm, nn = len(batch), len(mdims), len(ndims)
        y = e.transpose(y, list(range(nb)) + list(range(nb + nm, nb + nm + nn)) + list(range(nb, nb + nm)))
    return y


def _conv_specs(node: ir.Node) -> tuple[list[int], list[int], list[int]]:
    dn, rank = op_facts.jax_params(node)["dimension_numbers"], len(node.inputs[0].shape)
    if dn is None:
        return [list(range(rank))] * 3
    return list(dn.lhs_spec), list(dn.rhs_spec), list(dn.out_spec)


def _conv_check(node: ir.Node) -> str | None:
    p = op_facts.jax_params(node)
    if p["batch_group_count"] != 1:
        return f"batch_group_count={p['batch_group_count']} (a weight-gradient convolution) has no ONNX form"
    if node.inputs[0].dtype.numpy().kind != "f":
        return f"{node.inputs[0].dtype} convolution: ONNX Conv is float only"
    if any(int(d) != 1 for d in p["lhs_dilation"]):
        if any(int(s) != 1 for s in p["window_strides"]) or p["feature_group_count"] != 1:
            return "a transposed convolution (lhs_dilation) with window strides or groups"
        _, rhs_spec, _ = _conv_specs(node)
        kernel = [_shape(node.inputs[1])[d] for d in rhs_spec[2:]]
        if any(lo > r * (k - 1) or lo < 0 or hi < 0
               for (lo, hi), r, k in zip(p["padding"], p["rhs_dilation"], kernel)):
            return (f"a transposed convolution with padding {tuple(p['padding'])} "
                    "(negative, or a low pad past the kernel)")
    elif any(lo < 0 or hi < 0 for lo, hi in p["padding"]):
        return f"negative padding {tuple(p['padding'])}"
    return None


@lowering("conv_general_dilated", check=_conv_check)
def _conv(node: ir.Node, e: Emitter) -> Lowered:
    """Conv on channel-first operands; ConvTranspose when the input is dilated (lax.conv_transpose)."""
    p = e.params
    lhs_spec, rhs_spec, out_spec = _conv_specs(node)
    x, w = node.inputs
    dtype = np.dtype(p["preferred_element_type"] or x.dtype.numpy())
    xs, ws = _shape(x), _shape(w)
    x = e.relayout(e.cast(x, dtype), lhs_spec, [xs[d] for d in lhs_spec])
    kernel = [ws[d] for d in rhs_spec[2:]]
    spatial = list(range(2, len(ws)))
    transposed = any(int(d) != 1 for d in p["lhs_dilation"])
    if transposed:
        # conv(dilate(x), W) = ConvTranspose(x, W') with W' = W flipped spatially, [I, O, k...].
        order = [rhs_spec[1], rhs_spec[0], *rhs_spec[2:]]
        w = e.relayout(e.cast(w, dtype), order, [ws[d] for d in order], flip=spatial)
        rd = [int(r) for r in p["rhs_dilation"]]
        lo, hi = [int(lo) for lo, _ in p["padding"]], [int(hi) for _, hi in p["padding"]]
        # High padding past the dilated kernel only adds output rows at the end: output_padding.
        pads = [r * (k - 1) - a for a, r, k in zip(lo, rd, kernel)] + [
            max(r * (k - 1) - b, 0) for b, r, k in zip(hi, rd, kernel)]
        extra = [max(b - r * (k - 1), 0) for b, r, k in zip(hi, rd, kernel)]
        attrs = {"strides": [int(s) for s in p["lhs_dilation"]], "dilations": rd}
        if any(extra):
            attrs["output_padding"] = extra
    else:
        w = e.relayout(e.cast(w, dtype), rhs_spec, [ws[d] for d in rhs_spec])
        pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
        attrs = {"strides": [int(s) for s in p["window_strides"]], "group": int(p["feature_group_count"]),
                 "dilations": [int(r) for r in p["rhs_dilation"]]}
    inputs = [x, w]
    out_dtype = node.outputs[0].dtype.numpy()
    if dtype == out_dtype and (bias := _bias_add(node, e, out_spec[1])) is not None:
        inputs.append(e.const(bias, "bias"))
    attrs |= {"kernel_shape": kernel, "pads": pads}
    y = e.op("ConvTranspose" if transposed else "Conv", inputs, attrs, main=True)
    return e.transpose(e.cast(y, out_dtype, current=dtype), _inverse(out_spec))
