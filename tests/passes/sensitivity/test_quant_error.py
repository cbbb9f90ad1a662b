"""The quantization-error signal."""

from __future__ import annotations

import numpy as np
from qinject.passes.sensitivity.base import EVALUATIONS, signal_of
from qinject.passes.sensitivity.quant_error import QuantError, weight_error

from tests.passes.sensitivity.fixtures import conv_case


def test_errors_grow_as_bits_shrink_and_the_graph_is_untouched():
    model, data = conv_case()
    before = [(n.name, n.op_type) for n in model.graph]
    QuantError(data, workers=1, progress=False)(model)
    assert [(n.name, n.op_type) for n in model.graph] == before
    values = signal_of(model, "quant_error")
    assert set(values) == {"conv1", "conv2", "fc"}
    for v in values.values():
        assert v.score[4] > v.score[8] > v.score[16] >= 0  # KL to float, no labels
        sqnr = v.details["weight_sqnr_db"]
        assert sqnr[16] > sqnr[8] > sqnr[4]
        # Uniform rounding: about 6 dB per bit.
        assert 20 < sqnr[8] - sqnr[4] < 28
        assert v.details["activation_sqnr_db"][8] > v.details["activation_sqnr_db"][4]
    assert model.meta[EVALUATIONS]["quant_error"][0] == 1 + 3 * 3  # the reference, then 3 nodes x 3 widths


def test_a_weight_outlier_makes_its_node_the_most_sensitive_at_4_bits():
    plain, data = conv_case()
    spiked, _ = conv_case(outlier="w2")
    QuantError(data, bits=(4,), workers=1, progress=False)(plain)
    QuantError(data, bits=(4,), workers=1, progress=False)(spiked)
    before, after = signal_of(plain, "quant_error"), signal_of(spiked, "quant_error")
    assert after["conv2"].score[4] > 2 * before["conv2"].score[4]  # per channel: one channel of 16 hit
    assert max(after, key=lambda n: after[n].score[4]) == "conv2"
    assert after["conv2"].details["weight_sqnr_db"][4] < before["conv2"].details["weight_sqnr_db"][4] - 3


def test_labels_make_it_a_loss_change_and_workers_do_not_change_results():
    model, data = conv_case(labels=True)
    QuantError(data, bits=(8, 4), workers=1, progress=False)(model)
    serial = {n: v.score for n, v in signal_of(model, "quant_error").items()}
    model2, _ = conv_case(labels=True)
    QuantError(data, bits=(8, 4), workers=2, progress=False)(model2)
    assert {n: v.score for n, v in signal_of(model2, "quant_error").items()} == serial


def test_weight_error_is_exact_for_a_representable_weight():
    model, _ = conv_case()
    node = next(n for n in model.graph if n.name == "conv1")
    w = node.inputs[1].const_value.numpy()
    grid = np.round(w / np.abs(w).max() * 127) / 127 * np.abs(w).max()  # already on the int8 grid
    node.inputs[1].const_value = type(node.inputs[1].const_value)(grid.astype(np.float32))
    nmse, _ = weight_error(node, 16)
    assert nmse < 1e-8
