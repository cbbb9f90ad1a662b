"""Quantization-aware fine-tuning (passes/rounding/finetune.py): it trains, needs no labels, resumes,
and what it writes is what it trained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qinject
from models.realworld import exports_loader
from qinject.backends import lsq, onnx_backend
from qinject.compiler.pipelines import standard_pipeline
from qinject.core.errors import UnsupportedModelError
from qinject.compiler.registry import Context, build
from qinject.core.pass_manager import PassManager
from qinject.core.plan import NodeQuant, Plan
from qinject.passes.rounding import _finetune_state as fs
from qinject.passes.rounding.finetune import RESULT, Finetune
from qinject.passes.rounding._finetune_model import Trainable
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.runtime.damage import kl_divergence
from tests.builders import conv_net, run_cli

W4A8 = Plan(NodeQuant(weights=4, activations=8))


def _images(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _calibrated(plan: Plan, data: dict[str, np.ndarray]):
    passes = standard_pipeline(plan, data, progress=False)[:-1]  # all but the rewrite
    return PassManager(passes).run(qinject.load_onnx(conv_net())).model


@pytest.mark.slow  # the test that proves the feature end to end (about 20 s on 2 cores)
def test_distillation_without_labels_lowers_the_loss_and_the_onnx_equals_the_jax_simulation(tmp_path):
    data = _images()
    model = _calibrated(W4A8, data)
    ptq = model.clone()
    InsertQDQ(W4A8)(ptq)
    Finetune(data, W4A8, steps=40, batch=16, progress=False)(model)  # no labels in the data
    report = model.meta[RESULT]
    assert report.loss_end < 0.5 * report.loss_start
    trained = Trainable(model.clone(), W4A8, init="minmax")  # the written values, as the trainer sees them
    InsertQDQ(W4A8)(model)
    path = onnx_backend.save(model, tmp_path / "qat.onnx")
    x = _images(16, seed=1)["x"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": x})[0]
    jax_out = np.asarray(qinject.to_jax(model, "simulated")(x))
    step = float(np.abs(jax_out).max()) / 127
    assert np.abs(onnx_out - jax_out).max() <= step  # "within rounding": one output step at most
    # the same learned graph as the integer JAX function (int8 kernels, jittable)
    integer_out = np.asarray(jax.jit(qinject.to_jax(model, "integer"))(x))
    assert np.abs(integer_out - jax_out).max() <= 2 * step
    # the trainer's own forward with the learned parameters computes the same function
    trainer_out = np.asarray(trained.forward(jax.tree_util.tree_map(jnp.asarray, trained.params), {}, [x])[0])
    assert np.abs(trainer_out - jax_out).max() <= step
    # learned numbers reached the file: the weight scales differ from the min/max ones PTQ wrote
    names = [n for n in ptq.graph.initializers if n.endswith("weight_scale_int4") or n.endswith("W_scale_int4")
             or "scale_int4" in n]
    assert names and any(not np.allclose(ptq.graph.initializers[n].const_value.numpy(),
                                         model.graph.initializers[n].const_value.numpy()) for n in names)
    # and on the data it trained on (64 random images: too few to generalise), the fine-tuned model's
    # output distribution is closer to float's than round-to-nearest's (KL, what distillation minimises)
    seen = data["x"]
    float_out = np.asarray(qinject.to_jax(qinject.load_onnx(conv_net()), "simulated")(seen))
    errors = [kl_divergence(float_out, np.asarray(qinject.to_jax(m, "simulated")(seen))) for m in (model, ptq)]
    assert errors[0] < 0.7 * errors[1]


def test_a_user_loss_sees_labels_and_teacher():
    data = {**_images(32), "labels": np.arange(32) % 10}
    model = _calibrated(W4A8, data)
    seen = {}

    def loss(outputs, batch):
        seen.update(keys=sorted(batch), shape=outputs.shape)
        logp = jax.nn.log_softmax(outputs)
        return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))

    Finetune(data, W4A8, steps=20, batch=16, loss=loss, progress=False)(model)
    assert seen["keys"] == ["labels", "teacher", "x"] and seen["shape"] == (16, 10)
    assert model.meta[RESULT].loss_end < model.meta[RESULT].loss_start


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    data = _images(32)

    def trained(checkpoint=None):
        model = _calibrated(W4A8, data)
        Finetune(data, W4A8, steps=6, batch=8, checkpoint=checkpoint, checkpoint_every=3, progress=False)(model)
        return model

    whole = trained()
    path = str(tmp_path / "ft.npz")
    save = fs.save_checkpoint

    def killed(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the run dies just after its first checkpoint

    monkeypatch.setattr(fs, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        trained(path)
    monkeypatch.setattr(fs, "save_checkpoint", save)
    resumed = trained(path)
    assert resumed.meta[RESULT].resumed_from == 3 and resumed.meta[RESULT].steps == 3
    for name, value in whole.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), resumed.graph.initializers[name].const_value.numpy())
    # a checkpoint of another plan is refused, not silently loaded
    other = _calibrated(Plan(NodeQuant(weights=8, activations=8, per_channel=False)), data)
    with pytest.raises(qinject.QinjectError, match="holds the parameters of another model or plan"):
        Finetune(data, Plan(NodeQuant(weights=8, activations=8, per_channel=False)), steps=6, checkpoint=path,
                 progress=False)(other)


def test_oscillating_weights_freeze_and_steady_ones_do_not():
    state = fs.init_oscillation(jnp.zeros(2))
    for t in range(40):  # weight 0 flips 0,1,0,1,...; weight 1 climbs by one code every 4 steps
        state = fs.update_oscillation(state, jnp.array([t % 2, (t + 1) // 4], jnp.float32), 0.1, 0.3)
    assert bool(state["mask"][0]) and not bool(state["mask"][1])
    assert float(state["held"][0]) in (0.0, 1.0)


def test_jax_function_w4a4_fine_tunes_in_memory_and_is_written_as_onnx(tmp_path):
    rng = np.random.default_rng(0)
    params = {"fc1.weight": rng.standard_normal((16, 12)).astype(np.float32) / 4,
              "fc2.weight": rng.standard_normal((12, 5)).astype(np.float32) / 3}

    def forward(p, x):
        return jnp.maximum(x @ p["fc1.weight"], 0) @ p["fc2.weight"]

    x = rng.standard_normal((256, 16)).astype(np.float32)
    plan = Plan(NodeQuant(weights=4, activations=4))
    ptq = qinject.quantize_jax(forward, params, x[:32], calib=x, plan=plan, progress=False)
    tuned = qinject.finetune(ptq, x, steps=60, batch=32, progress=False)
    assert tuned.finetune.loss_end < tuned.finetune.loss_start
    float_out = forward(params, x[:32])
    err = {name: float(jnp.mean((r.to_jax("simulated")(x[:32]) - float_out) ** 2)) for name, r in
           (("ptq", ptq), ("qat", tuned))}
    assert err["qat"] < err["ptq"]
    # written as ONNX (4-bit activation pairs as Clip -> 8-bit Q/DQ), onnxruntime's default session runs it
    path = tuned.save(tmp_path / "qat.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = np.asarray(tuned.to_jax("simulated")(x[:32]))
    got = session.run(None, {session.get_inputs()[0].name: x[:32]})[0]
    assert np.abs(got - want).max() <= float(np.abs(want).max()) / 127  # within one output step


def test_finetune_is_a_registered_pipeline_pass():
    passes = build("finetune{steps=3,weights=4}", Context(calib=_images(8)))
    assert isinstance(passes[0], Finetune) and passes[0].steps == 3
    assert passes[0].fallback == Plan.uniform(4, 8)


def test_cli_finetune_writes_a_model_and_its_plan(tmp_path):
    np.savez(tmp_path / "train.npz", **_images(32))
    import onnx

    onnx.save(conv_net(), tmp_path / "m.onnx")
    Plan(NodeQuant(weights=4, activations=8)).save(tmp_path / "p.json")
    done = run_cli("finetune", tmp_path / "m.onnx", "--plan", tmp_path / "p.json", "--data", tmp_path / "train.npz",
                   "--steps", "5", "--batch", "8", "-o", tmp_path / "out.onnx", "--save-plan", tmp_path / "out.plan.json")
    assert done.returncode == 0, done.stderr
    assert "fine-tuned" in done.stdout and (tmp_path / "out.onnx").exists()
    assert Plan.load(tmp_path / "out.plan.json") == Plan.load(tmp_path / "p.json")  # the plan round-trips


def test_mse_initialisation_lowers_the_error_of_a_skewed_activation_below_its_calibrated_range():
    # a heavy right tail (log-normal): the calibrated min/max range spends most of the 16 codes on it
    skewed = {"x": np.random.default_rng(0).lognormal(0.0, 1.0, (64, 3, 8, 8)).astype(np.float32)}
    plan = Plan.uniform(4, 4)
    model = _calibrated(plan, skewed)
    calibrated, mse = Trainable(model, plan), Trainable(model, plan)
    mse.init_activations_mse([[skewed["x"][i:i + 32]] for i in (0, 32)])
    key = "a:x:uint4"
    fresh = np.random.default_rng(1).lognormal(0.0, 1.0, 200_000).astype(np.float32)

    def error(net):
        q = net.quantizers[key]
        scale, offset = (jnp.asarray(net.params[p][key]) for p in ("scale", "offset"))
        return float(jnp.mean((lsq.fake_quant(fresh, scale, offset, q.qmin, q.qmax) - fresh) ** 2))

    assert error(mse) < 0.7 * error(calibrated)
    assert not np.allclose(mse.params["scale"][key], calibrated.params["scale"][key])
    # the weights' initialisation is untouched
    for k, s in calibrated.params["scale"].items():
        if k.startswith("w:"):
            np.testing.assert_array_equal(mse.params["scale"][k], s)


def test_act_init_is_an_option_of_the_pass_the_pipeline_and_the_api():
    assert build("finetune{steps=3,act-init=mse}", Context(calib=_images(8)))[0].act_init == "mse"
    with pytest.raises(qinject.QinjectError, match="act_init must be 'calib' or 'mse'"):
        Finetune(_images(8), W4A8, act_init="minmax")
    data = _images(32)
    model = _calibrated(W4A8, data)
    Finetune(data, W4A8, steps=2, batch=16, act_init="mse", progress=False)(model)
    assert model.meta[RESULT].steps == 2


def test_the_progress_bar_shows_the_loss_and_the_agreement_with_float(monkeypatch):
    import tqdm.auto

    shown = []

    class Bar(tqdm.auto.tqdm):
        def set_postfix(self, *args, **kwargs):
            shown.append(kwargs)
            return super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    data = _images(32)
    model = _calibrated(W4A8, data)
    Finetune(data, W4A8, steps=10, batch=16, progress=True)(model)
    assert shown and set(shown[-1]) == {"loss", "agree"}
    assert 0.0 <= float(shown[-1]["agree"]) <= 1.0 and float(shown[-1]["loss"]) >= 0.0


def _onnx_and_jax(result, feeds):
    """The written file's onnxruntime output and the JAX simulation of the same rewritten model."""
    order = [v.name for v in result.model.graph.inputs]
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0], np.asarray(qinject.to_jax(result.model, "simulated")(*[feeds[k] for k in order]))


def test_quantizers_inside_an_if_branch_train_and_their_learned_scales_reach_the_onnx(tmp_path):
    # A real TorchScript export: mode == 0 runs the then branch (a_conv -> a_fc), read outer-scope
    # weights. Its scalar input is bound as a constant, so the branch is taken and trains.
    name = "torchscript_if_conv_torchscript"
    data = exports_loader.example_feeds(name, batch=32, height=16, width=16)
    plan = Plan.uniform(8, 4)
    ptq = qinject.quantize_onnx(exports_loader.load(name), tmp_path / "ptq.onnx", calib=data, plan=plan,
                                progress=False)
    tuned = qinject.finetune(exports_loader.load(name), data, steps=8, batch=8, plan=plan, output=tmp_path / "q.onnx",
                             progress=False)
    assert tuned.finetune.quantizers >= 4 and tuned.finetune.steps == 8
    assert {"/a_conv/Conv", "/a_fc/Gemm"} <= set(tuned.quantized)  # nodes of the then branch
    branch = next(n for n in tuned.model.graph if n.op_type == "If").attributes["then_branch"].value
    assert any(n.op_type == "DequantizeLinear" for n in branch)  # their Q/DQ sit inside the body
    feeds = exports_loader.example_feeds(name, batch=4, seed=1, height=16, width=16)
    onnx_out, jax_out = _onnx_and_jax(tuned, feeds)
    assert np.abs(onnx_out - jax_out).max() <= np.abs(jax_out).max() / 127  # within rounding
    # learned scales of body quantizers reached the file: the 4-bit activation scale of the tensor the
    # branch's Gemm reads, and the conv's weight scales, differ from the round-to-nearest ones
    def scale(result, initializer):
        return result.model.graph.initializers[initializer].const_value.numpy()

    act = "/ReduceMean_output_0_scale_uint4"
    assert not np.allclose(scale(tuned, act), scale(ptq, act))
    assert not np.allclose(scale(tuned, "a_conv.weight_scale"), scale(ptq, "a_conv.weight_scale"))
    saved = onnx.load(str(tuned.output))
    assert np.allclose(onnx.numpy_helper.to_array(next(t for t in saved.graph.initializer if t.name == act)),
                       scale(tuned, act))


# PyTorch's for loop (TorchScript) and while loop (dynamo): a steps input bound as a constant makes
# both differentiable (lax.scan; the dynamo loop unrolled by its condition, known at each iteration)
@pytest.mark.parametrize("name", ["torchscript_loop_mlp_torchscript", "torchscript_loop_mlp_dynamo"])
def test_a_loop_with_a_trip_count_from_a_scalar_input_fine_tunes(name, tmp_path):
    data = exports_loader.example_feeds(name, batch=32)
    tuned = qinject.finetune(exports_loader.load(name), data, steps=4, batch=8, plan=W4A8, output=tmp_path / "q.onnx",
                             progress=False)
    assert tuned.finetune.steps == 4 and tuned.finetune.weights > 0  # the body's step.weight among them
    assert "/step/Gemm" in tuned.quantized or "node_linear_2" in tuned.quantized
    onnx_out, jax_out = _onnx_and_jax(tuned, exports_loader.example_feeds(name, batch=4, seed=1))
    assert np.abs(onnx_out - jax_out).max() <= np.abs(jax_out).max() / 127


def test_a_loop_whose_condition_is_data_is_refused_in_one_line_naming_the_node(tmp_path):
    # halve h = x @ W until its largest magnitude is below 1: a lax.while_loop, which JAX cannot
    # reverse-differentiate
    body = helper.make_graph(
        [helper.make_node("Mul", ["st", "half"], ["st_out"], name="halve"),
         helper.make_node("Abs", ["st_out"], ["a"], name="abs"),
         helper.make_node("ReduceMax", ["a"], ["m"], name="max", keepdims=0),
         helper.make_node("Greater", ["m", "one"], ["cond_out"], name="gt")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("st", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("st_out", TensorProto.FLOAT, [4, 8])])
    inits = {"w": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "trip": np.array(20, np.int64),
             "true": np.array(True), "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32)}
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Loop", ["trip", "true", "h"], ["y"], name="halving", body=body)],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": np.random.default_rng(1).standard_normal((32, 4, 8)).astype(np.float32).reshape(-1, 8)}
    with pytest.raises(UnsupportedModelError, match=r"^finetune: Loop node 'halving' has a trip count or condition "
                       "computed from the data, which JAX cannot differentiate through; quantize this model without "
                       "fine-tuning$"):
        qinject.finetune(model, data, steps=3, plan=Plan.uniform(8, 8), output=tmp_path / "q.onnx", progress=False)
    assert not (tmp_path / "q.onnx").exists()


# about 25 s on 2 cores (a conv net through MaxPool): outside the default suite, where
# test_jax_function_w4a4_fine_tunes_in_memory_and_is_written_as_onnx writes a small one
@pytest.mark.long
def test_a_w4a4_fine_tuned_model_is_written_and_onnxruntime_runs_it_as_the_jax_simulation(tmp_path):
    data = _images(64)
    import onnx

    onnx.save(conv_net(), tmp_path / "m.onnx")
    result = qinject.finetune(tmp_path / "m.onnx", data, steps=10, batch=16, plan=Plan.uniform(4, 4),
                              output=tmp_path / "qat.onnx", progress=False)
    session = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])  # default options
    x = _images(16, seed=1)["x"]
    want = np.asarray(result.to_jax("simulated")(x))
    step = float(np.abs(want).max()) / 127
    assert np.abs(session.run(None, {"x": x})[0] - want).max() <= step
    assert np.abs(np.asarray(jax.jit(result.to_jax("integer"))(x)) - want).max() <= 2 * step
