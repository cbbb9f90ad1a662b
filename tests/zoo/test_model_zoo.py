"""The JAX model zoo (``models.zoo``): every model loads, evaluates to the accuracy its README
states, traces to a jaxpr without control flow or gathers, and evaluates partial batches right."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.extend import core as jcore

from models import zoo

README = Path(zoo.__file__).parent / "README.md"
# Primitives a fixed-batch export cannot take: control flow, and gathers/scatters (the transformer
# embeds by a one-hot matmul instead).
REFUSED = frozenset({"cond", "while", "scan", "gather", "scatter", "scatter-add", "dynamic_slice"})


@pytest.fixture(scope="module", params=zoo.NAMES)
def model(request) -> zoo.ZooModel:
    return zoo.load(request.param)


def _readme_counts(name: str) -> tuple[int, int]:
    """(correct, total) from the README's model table row for ``name``."""
    for line in README.read_text().splitlines():
        if line.startswith(f"| `{name}` "):
            match = re.search(r"\((\d+)/(\d+)\)", line)
            assert match, f"README row for {name} states no '(correct/total)' accuracy: {line}"
            return int(match[1]), int(match[2])
    raise AssertionError(f"no row for {name} in {README}")


def _primitives(jaxpr: jcore.Jaxpr, found: set[str]) -> set[str]:
    """Every primitive in ``jaxpr`` and its sub-jaxprs (jit, custom_jvp/vjp bodies, ...)."""
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    _primitives(sub.jaxpr, found)
                elif isinstance(sub, jcore.Jaxpr):
                    _primitives(sub, found)
    return found


def test_names_load_and_unknown_refused() -> None:
    assert zoo.NAMES == ("digits_mlp", "digits_cnn", "text_transformer")
    with pytest.raises(ValueError, match="unknown zoo model 'resnet'"):
        zoo.load("resnet")


def test_model_contents(model) -> None:
    assert model.params and all(v.dtype == np.float32 for v in model.params.values())
    assert len(model.calib_inputs) == 256
    assert len(model.eval_inputs) == len(model.eval_labels) >= 450
    assert model.calib_inputs.shape[1:] == model.eval_inputs.shape[1:]
    assert model.eval_labels.dtype == np.int64
    logits = np.asarray(model.forward(model.params, model.example_input(4)))
    assert logits.shape == (4, int(model.eval_labels.max()) + 1) and np.isfinite(logits).all()


def test_float_accuracy_matches_readme(model) -> None:
    correct, total = _readme_counts(model.name)
    assert len(model.eval_labels) == total
    assert round(model.accuracy_of_params() * total) == correct


def test_forward_traces_without_control_flow_or_gathers(model) -> None:
    closed = jax.make_jaxpr(model.forward)(model.params, model.example_input(8))
    primitives = _primitives(closed.jaxpr, set())
    assert "dot_general" in primitives
    assert not primitives & REFUSED, f"{model.name} forward uses {sorted(primitives & REFUSED)}"
    (out,) = closed.out_avals
    assert out.shape[0] == 8


def test_partial_last_batch(model) -> None:
    calls: list[int] = []
    predict = jax.jit(partial(model.forward, model.params))

    def counting(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return predict(x)

    n = len(model.eval_inputs)
    assert n % 7  # batch 7 ends on a partial batch (450 and 1600 samples)
    assert model.evaluate(counting, batch=7) == model.evaluate(counting, batch=64)
    assert set(calls) == {7, 64}  # predict always sees the full batch size
    assert len(calls) == -(-n // 7) + -(-n // 64)


def test_example_input_repeats_past_the_eval_split(model) -> None:
    n = len(model.eval_inputs)
    np.testing.assert_array_equal(model.example_input(3), model.eval_inputs[:3])
    big = model.example_input(n + 2)
    assert len(big) == n + 2
    np.testing.assert_array_equal(big[n:], model.eval_inputs[:2])


def test_transformer_ignores_trailing_padding() -> None:
    # Training cuts batches of short lines to fewer columns; that is only sound if the logits do not
    # depend on trailing padding.
    from models.zoo import text_transformer as tt

    model = zoo.load("text_transformer")
    ids = model.eval_inputs[:64]
    short = ids[(ids != tt.PAD).sum(axis=1) <= 16][:8]
    assert len(short) >= 2
    full = np.asarray(tt.forward(model.params, short))
    cut = np.asarray(tt.forward(model.params, short[:, :16]))
    np.testing.assert_allclose(cut, full, rtol=1e-5, atol=1e-5)
    assert tt.decode(tt.encode(["x = 'caf\u00e9'"])[0]) == "x = 'caf\ufffd'"


@pytest.mark.slow
def test_digits_mlp_retrains_to_the_committed_weights(monkeypatch) -> None:
    from models.zoo import train_digits_mlp

    written: dict[str, bytes] = {}
    monkeypatch.setattr(train_digits_mlp, "write_atomic",
                        lambda path, data: written.__setitem__(path.name, data))
    train_digits_mlp.main()
    # Deterministic and core-count independent: the same bytes as the committed file (a CPU with
    # another instruction set could change the last bits, and then this test says so).
    assert written["digits_mlp.npz"] == (train_digits_mlp.HERE / "digits_mlp.npz").read_bytes()
