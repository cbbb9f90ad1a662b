"""The inter-layer (conditional) signal."""

from __future__ import annotations

import pytest
from qinject.passes.sensitivity.base import signal_of
from qinject.passes.sensitivity.interlayer import Interlayer, adjacent_pairs
from qinject.passes.sensitivity.quant_error import QuantError

from qinject.core.errors import QinjectError
from tests.passes.sensitivity.fixtures import conv_case


def test_conditional_sensitivity_telescopes_to_the_prefix_curve():
    model, data = conv_case()
    QuantError(data, workers=1, progress=False)(model)
    Interlayer(data, base="quant_error", workers=1, progress=False)(model)
    values = signal_of(model, "interlayer")
    for bits in (16, 8, 4):
        order = sorted(values, key=lambda n: values[n].details["position"][bits])
        base = signal_of(model, "quant_error")
        assert order == sorted(base, key=lambda n: base[n].score[bits])  # least sensitive first
        # The conditional damages add up to the damage of all nodes quantized together.
        total = values[order[-1]].details["prefix_damage"][bits]
        assert sum(values[n].score[bits] for n in order) == pytest.approx(total)
        # The first node is measured alone: its conditional damage is its plain damage.
        assert values[order[0]].score[bits] == pytest.approx(base[order[0]].score[bits], rel=1e-6)


def test_adjacent_pairs_and_their_interactions():
    model, data = conv_case()
    assert adjacent_pairs(model) == [("conv1", "conv2"), ("conv2", "fc")]
    QuantError(data, bits=(4,), workers=1, progress=False)(model)
    Interlayer(data, bits=(4,), base="quant_error", pairs=True, workers=1, progress=False)(model)
    details = signal_of(model, "interlayer")["conv2"].details["pair_interaction"][4]
    assert set(details) == {"conv1", "fc"}


def test_it_needs_its_base_signal():
    model, data = conv_case()
    with pytest.raises(QinjectError, match="run sensitivity-hessian first"):
        Interlayer(data, workers=1, progress=False)(model)
