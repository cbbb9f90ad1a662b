"""The bit-error signal."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from qinject.passes import Calibrate, FoldConstants, FoldConvAffine, UpgradeOpset
from qinject.passes.sensitivity.base import EVALUATIONS, AnalysisData, signal_of
from qinject.passes.sensitivity.bit_error import BitError, bernoulli_positions, flip_bits
from qinject.passes.sensitivity.quant_error import QuantError

from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import PassManager
from qinject.frontends.onnx_frontend import load_onnx
from tests.builders import calibrated_jax_mlp, conv_net, matmul_net


def case(builder=conv_net, labels: bool = False):
    shape = (32, 3, 8, 8) if builder is conv_net else (64, 16)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    model = PassManager([FoldConstants(), FoldConvAffine(), UpgradeOpset(21),
                         Calibrate({"x": x}, progress=False)]).run(load_onnx(builder())).model
    y = np.random.default_rng(2).integers(0, 10 if builder is conv_net else 4, len(x)) if labels else None
    return model, AnalysisData({"x": x}, y)


def test_zero_rate_is_the_plain_quantization_damage_and_the_graph_is_untouched():
    model, data = case(labels=True)
    before = onnx_backend.to_proto(model).SerializeToString()
    BitError(data, rates=(0.0, 1e-2), seeds=2, score_rate=0.0, workers=1, progress=False)(model)
    assert onnx_backend.to_proto(model).SerializeToString() == before
    QuantError(data, workers=1, progress=False)(model)
    quant = signal_of(model, "quant_error")
    for name, v in signal_of(model, "bit_error").items():
        assert v.score == quant[name].score == v.details["baseline"]
        for bits in (16, 8, 4):
            assert v.details["flips_mean"][bits][0.0] == 0
            assert v.details["damage_std"][bits][0.0] == 0
    # The reference, then per node and width the baseline and 2 seeds at the one nonzero rate.
    assert model.meta[EVALUATIONS]["bit_error"][0] == 1 + 3 * 3 * (1 + 2)


def test_damage_and_flips_grow_with_the_rate():
    rates = (1e-4, 1e-3, 1e-2)
    for builder in (conv_net, matmul_net):
        model, data = case(builder)
        BitError(data, bits=(8, 4), rates=rates, seeds=3, workers=1, progress=False)(model)
        values = signal_of(model, "bit_error")
        for v in values.values():
            for bits in (8, 4):
                mean, flips = v.details["damage_mean"][bits], v.details["flips_mean"][bits]
                assert mean[1e-2] > mean[1e-4] >= 0  # KL to float, no labels
                assert mean[1e-2] > v.details["baseline"][bits]
                assert flips[1e-4] <= flips[1e-3] <= flips[1e-2]
                # The flipped bits are Binomial(stored bits, rate): mean of 3 seeds within 4 sigma.
                n = v.details["stored_bits"][bits]
                for r in rates:
                    assert abs(flips[r] - r * n) <= 4 * math.sqrt(n * r * (1 - r) / 3) + 0.5
                assert v.details["net_mean"][bits][1e-2] == pytest.approx(mean[1e-2] - v.details["baseline"][bits])
            assert v.score[8] == v.details["damage_mean"][8][1e-3]
        # Averaged over the nodes, damage rises at every step of the rate.
        for bits in (8, 4):
            avg = [np.mean([v.details["damage_mean"][bits][r] for v in values.values()]) for r in rates]
            assert avg[0] < avg[1] < avg[2]


def test_same_seed_same_results_and_the_default_pool():
    model, data = case(labels=True)
    BitError(data, bits=(4,), rates=(1e-2,), score_rate=1e-2, seeds=2, progress=False)(model)  # default pool
    runs = [signal_of(model, "bit_error")]
    for seed in (0, 1):
        m, _ = case(labels=True)
        BitError(data, bits=(4,), rates=(1e-2,), score_rate=1e-2, seeds=2, seed=seed, workers=1,
                  progress=False)(m)
        runs.append(signal_of(m, "bit_error"))
    same = [{n: (v.score, v.details) for n, v in run.items()} for run in runs[:2]]
    assert same[0] == same[1]
    assert {n: v.score for n, v in runs[0].items()} != {n: v.score for n, v in runs[2].items()}
    # 4-bit weights: 4 stored bits per element (fc: 10 x 256).
    assert runs[0]["fc"].details["stored_bits"][4] == 4 * 2560


def test_int4_codes_flip_within_4_bits():
    q = np.arange(-8, 8).repeat(64).astype(ml_dtypes.int4)
    flipped = flip_bits(q, bernoulli_positions(np.random.default_rng(0), q.size * 4, 0.3))
    assert flipped.dtype == q.dtype and flipped.shape == q.shape
    values = flipped.astype(np.int8)
    assert values.min() == -8 and values.max() == 7
    # Every bit flipped: the one's complement, -x - 1, still inside [-8, 7].
    everything = flip_bits(q, np.arange(q.size * 4))
    np.testing.assert_array_equal(everything.astype(np.int8), -q.astype(np.int8) - 1)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, ml_dtypes.int4, np.uint8])
def test_flip_bits_flips_exactly_the_given_bits(dtype):
    width = 4 if dtype is ml_dtypes.int4 else np.dtype(dtype).itemsize * 8
    rng = np.random.default_rng(0)
    info = (-8, 8) if width == 4 else (np.iinfo(dtype).min, np.iinfo(dtype).max + 1)
    q = rng.integers(*info, size=(7, 5)).astype(dtype)
    positions = bernoulli_positions(rng, q.size * width, 0.05)
    flipped = flip_bits(q, positions)
    mask = (1 << width) - 1
    diff = (q.astype(np.int64) ^ flipped.astype(np.int64)).ravel() & mask
    assert sum(int(d).bit_count() for d in diff) == len(positions)
    assert set(np.nonzero(diff)[0]) == set(positions // width)
    top = flip_bits(np.zeros(1, dtype), np.array([width - 1]))  # the sign bit of a signed code
    assert int(top.astype(np.int64)[0]) == (2 ** (width - 1) if dtype is np.uint8 else -(2 ** (width - 1)))


def test_bernoulli_positions_follow_the_rate():
    rng = np.random.default_rng(0)
    n, rate = 2_000_000, 1e-3
    p = bernoulli_positions(rng, n, rate)
    assert abs(len(p) - n * rate) < 5 * math.sqrt(n * rate)
    assert np.all(np.diff(p) > 0) and p[0] >= 0 and p[-1] < n
    assert len(bernoulli_positions(rng, n, 0.0)) == 0
    assert len(bernoulli_positions(rng, 10, 1.0)) == 10
    # Uniform over the range: each half holds about half.
    assert abs(np.sum(p < n // 2) - len(p) / 2) < 5 * math.sqrt(len(p) / 4)


def test_options_are_checked():
    _, data = case()
    with pytest.raises(QinjectError, match="score_rate"):
        BitError(data, rates=(1e-4,), score_rate=1e-3)
    with pytest.raises(QinjectError, match="probabilities"):
        BitError(data, rates=(2.0,), score_rate=2.0)


def test_a_jax_graph_flips_its_dot_general_weights():
    model, x = calibrated_jax_mlp()
    BitError(AnalysisData({"x": x}), bits=(8,), rates=(1e-2,), score_rate=1e-2, seeds=2, workers=1,
              progress=False)(model)
    values = signal_of(model, "bit_error")
    assert len(values) == 2  # the two dot_generals
    for v in values.values():
        assert v.details["stored_bits"][8] > 0 and v.details["flips_mean"][8][1e-2] > 0
