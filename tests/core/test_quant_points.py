from __future__ import annotations

from qinject.core.quant_points import activation_points, integer_joins, range_source
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import c2f_net


def _joins(held: dict[str, int]) -> set[str]:
    graph = load_onnx(c2f_net()).graph
    return set(integer_joins(graph, held, lambda v: v.name in held))


def test_joins_that_read_each_other_are_decided_together() -> None:
    """YOLOv8's C2f block with every convolution's output held at 8 bits: the SiLUs, the residual Add
    and the Concat all join, though the Add's output and the Split's first piece are held by nobody
    but other joins. With b1's output float (heavy tails), its SiLU cannot join, so neither can the
    Add it feeds nor the Concat that reads the Add: they fall together; the SiLUs before it stay."""
    held = {"c0_h": 8, "b0_h": 8, "b": 8, "b0_m": 8, "b1_h": 8, "cat": 8}
    assert _joins(held) == {"c0_silu", "b0_silu", "b1_silu", "residual", "concat"}
    del held["b1_h"]
    assert _joins(held) == {"c0_silu", "b0_silu"}


def test_inputs_held_at_different_keys_do_not_join() -> None:
    held = {"c0_h": 8, "b0_h": 8, "b": 8, "b0_m": 8, "b1_h": 16, "cat": 8}
    assert "residual" not in _joins(held) and "concat" not in _joins(held)


def test_every_piece_of_a_split_carries_its_range_and_join_outputs_are_calibrated() -> None:
    model = load_onnx(c2f_net())
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert range_source(values["a"]) is values["c0_m"] and range_source(values["b"]) is values["c0_m"]
    points = {v.name for v in activation_points(model)}
    assert {"c0_m", "r", "cat"} <= points  # the SiLU before the Split, the Add, the Concat
