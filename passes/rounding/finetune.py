"""Quantization-aware fine-tuning of a plan: learned scales (LSQ+), offsets and weights.

Post-training quantization stops at a floor (4-bit weights lose accuracy that rounding alone does
not recover, 4-bit activations more). This pass trains the plan's quantized model itself, through
the JAX backend's simulated mode (``_finetune_model.Trainable``: the exact QDQ graph the rewrite will
write): per-channel weight scales and per-tensor activation scales and offsets are parameters with
LSQ+'s gradients and gradient scaling (``qinject.backends.lsq``), rounding is straight-through, and
the float weights and biases train too (``train_weights``). The loss is the user's
``loss(outputs, batch)``, or by default distillation from the float model's outputs, so no labels
are needed: KL divergence for classifiers (``[samples, classes]`` outputs: logits, or probabilities
used as they are), normalised MSE otherwise.

Optimiser: Adam (optax) with a cosine decay, each parameter's step in its own unit: a scale or
offset moves by ``lr`` times its initial scale, a weight by ``weight_lr`` times its channel's step, so
one learning rate serves every layer and model; or any optax ``optimizer`` on the raw gradients.
Oscillation control (``_finetune_state``) is on by default for weights of at most 4 bits.

What it writes is what a plain rewrite writes, with the learned numbers: weights on their learned
grid, and the learned scales and zero points in the values' meta, which ``InsertQDQ`` applies; so
the same QDQ ONNX, the same integer JAX function, the same plan. ``checkpoint`` saves everything
every ``checkpoint_every`` steps and a run resumes from it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from qinject.passes.rounding import _finetune_state as fs
from qinject.passes.rounding._finetune_model import Trainable
from qinject.passes.sensitivity.base import AnalysisData

from qinject.backends import lsq
from qinject.backends.jax_backend import Program
from qinject.core.calib_data import rows, take
from qinject.core.errors import QinjectError, UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import Plan
from qinject.core import ir as qir
from qinject.core.search_result import chosen_plan, search_result
from qinject.runtime import damage

RESULT = "qinject.finetune.result"  # model meta: FinetuneReport
OSCILLATION = ("auto", "freeze", "dampen", "both", "off")
ACT_INIT_SAMPLES = 256  # samples whose activations set the MSE initialisation (act_init="mse")


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: steps (this run / in all), seconds, the loss at the first and last
    steps (mean of the last tenth), the metric shown (top-1 agreement with the float model or NMSE),
    weights frozen by oscillation control, and the step it resumed from (0: a fresh run)."""

    steps: int
    total_steps: int
    seconds: float
    loss_start: float
    loss_end: float
    metric: str
    metric_end: float
    quantizers: int
    frozen: int
    weights: int
    resumed_from: int = 0


class Finetune(Pass):
    """Fine-tune the plan's quantized model on ``data`` and hand the learned values to the rewrite.

    Options:
        data: training inputs (as ``qinject.analyze`` takes them; ``labels`` optional).
        plan: the plan (None: the search's or fitted one in the model's meta).
        steps, batch: optimisation steps and samples per step (a graph with a fixed batch dimension
            trains at that size).
        lr, weight_lr: Adam step of scales/offsets (fraction of their initial value) and of weights and
            biases (fraction of their channel's quantization step).
        loss: ``loss(outputs, batch) -> scalar`` in JAX (outputs: an array, or a tuple for several;
            batch: the inputs by name, ``labels`` if any, ``teacher``: the float model's outputs).
        optimizer: an optax optimiser on the raw gradients instead of the default.
        train_weights: train float weights and biases too (else scales and offsets only).
        init: weight scales from "mse" (LSQ+) or "minmax" (the rewrite's).
        act_init: activation scales and offsets from "calib" (the calibrated range, ``method``) or "mse"
            (LSQ+'s MSE on the values each quantizer sees on up to ``ACT_INIT_SAMPLES`` training samples).
        oscillation: "auto" (freeze at <= 4-bit weights), "freeze", "dampen", "both" or "off";
            freeze_threshold, momentum: the oscillation frequency that freezes, its EMA momentum;
            dampening: λ of the dampening term.
        checkpoint, checkpoint_every: an .npz path saved every so many steps, resumed from if present.
        fallback: the plan when none is given and no search or fit-target chose one (a pipeline's
            uniform ``insert-qdq{weights=..}``).
    """

    name = "finetune"

    def __init__(self, data: object, plan: Plan | None = None, *, steps: int = 500, batch: int = 32,
                 lr: float = 1e-2, weight_lr: float = 1e-2, loss: Callable[..., Any] | None = None,
                 optimizer: Any = None, train_weights: bool = True, init: str = "mse", act_init: str = "calib",
                 oscillation: str = "auto",
                 freeze_threshold: float = 0.02, momentum: float = 0.01, dampening: float = 0.0,
                 method: str = "minmax", percentile: float = 99.99, checkpoint: str | None = None,
                 checkpoint_every: int = 100, seed: int = 0, progress: bool = True, limit: int | None = None,
                 fallback: Plan | None = None) -> None:
        if oscillation not in OSCILLATION:
            raise QinjectError(f"finetune: oscillation must be one of {', '.join(OSCILLATION)}, got {oscillation!r}")
        if init not in ("mse", "minmax"):
            raise QinjectError(f"finetune: init must be 'mse' or 'minmax', got {init!r}")
        if act_init not in ("calib", "mse"):
            raise QinjectError(f"finetune: act_init must be 'calib' or 'mse', got {act_init!r}")
        if steps < 1 or batch < 1:
            raise QinjectError(f"finetune: steps and batch must be at least 1, got {steps} and {batch}")
        self.data, self.plan, self.steps, self.batch = data, plan, steps, batch
        self.lr, self.weight_lr, self.loss, self.optimizer = lr, weight_lr, loss, optimizer
        self.train_weights, self.init, self.act_init, self.oscillation = train_weights, init, act_init, oscillation
        self.freeze_threshold, self.momentum, self.dampening = freeze_threshold, momentum, dampening
        self.method, self.percentile, self.seed, self.progress, self.limit = method, percentile, seed, progress, limit
        self.checkpoint, self.checkpoint_every, self.fallback = checkpoint, checkpoint_every, fallback

    def call(self, model: ir.Model) -> PassResult:
        plan = self.plan
        if plan is None and self.fallback is not None and search_result(model) is None and \
                qir.CHOSEN_PLAN not in model.meta:
            plan = self.fallback
        plan = chosen_plan(model, plan)
        data = AnalysisData.load(self.data, model, self.limit)
        net = Trainable(model, plan, method=self.method, percentile=self.percentile,
                        train_weights=self.train_weights, init=self.init)
        if not net.quantizers:
            raise QinjectError("finetune has nothing to train: the plan quantizes no static node of the model "
                               "(dynamic and weight-only nodes have no learned scales); check the plan")
        # A scalar input (an If's mode, a Loop's trip count) holds one value for every sample: it is bound
        # as a constant, so its branch is taken and its loop runs a known number of times (differentiable).
        scalars = {k: np.asarray(a) for k, a in data.inputs.items() if not np.ndim(a)}
        order = [v.name for v in model.graph.inputs if v.name not in scalars]
        bind = _binder([v.name for v in model.graph.inputs], scalars)
        fixed = model.graph.inputs[0].shape[0] if model.graph.inputs[0].shape is not None else None
        size = fixed if isinstance(fixed, int) else min(self.batch, rows(data.inputs))
        teacher = _teacher(model, data.inputs, order, size, bind)
        if self.act_init == "mse":
            n = rows(data.inputs)
            net.init_activations_mse([bind([np.asarray(data.inputs[k])[np.minimum(np.arange(i, i + size), n - 1)]
                                            for k in order]) for i in range(0, min(n, ACT_INIT_SAMPLES), size)])
        loss_fn = self.loss or _distillation([_kind(t) for t in teacher])
        start_time = time.perf_counter()
        params = jax.tree_util.tree_map(jnp.asarray, net.params)
        osc_keys = self._oscillating(net)
        osc = {k: fs.init_oscillation(net.codes(params, k)) for k in osc_keys}
        optimizer, units = self._optimizer(net, params)
        opt_state = optimizer.init(params)
        print_ = fs.fingerprint(params)
        begin = 0
        if self.checkpoint is not None and os.path.exists(self.checkpoint):
            begin, trees = fs.load_checkpoint(self.checkpoint, print_, {"params": params, "opt": opt_state, "osc": osc})
            params, opt_state, osc = trees["params"], trees["opt"], trees["osc"]
        freeze = self.oscillation in ("auto", "freeze", "both")
        damp = self.dampening if self.oscillation in ("dampen", "both") else 0.0

        def objective(p, osc, xs, batch):
            outs = net.forward(p, fs.frozen(osc) if freeze else {}, bind(xs))
            value = loss_fn(outs[0] if len(outs) == 1 else tuple(outs), batch)
            for key in osc_keys if damp else ():
                q, w = net.quantizers[key], p["weight"][key]
                scale = q.broadcast(p["scale"][key], w.ndim)
                zero = 0.0 if q.symmetric else lsq.zero_point(scale, q.broadcast(p["offset"][key], w.ndim), q.qmin, q.qmax)
                value = value + damp * fs.dampening(w, scale, zero, q.qmin, q.qmax)
            return value, outs

        @jax.jit
        def step(p, opt_state, osc, xs, batch):
            (value, outs), grads = jax.value_and_grad(objective, has_aux=True)(p, osc, xs, batch)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            if units is not None:
                updates = jax.tree_util.tree_map(lambda u, m: u * m, updates, units)
            p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
            p["scale"] = {k: jnp.maximum(s, 1e-12) for k, s in p["scale"].items()}
            if freeze:
                osc = {k: fs.update_oscillation(s, net.codes(p, k), self.momentum, self.freeze_threshold)
                       for k, s in osc.items()}
            return p, opt_state, osc, value, _metric(outs[0], batch["teacher"])

        from tqdm.auto import tqdm  # slow to import (notebook support); only a training run shows it

        losses, metrics = [], []
        n = rows(data.inputs)
        bar = tqdm(total=self.steps, initial=begin, desc="finetune", unit="step",
                   disable=None if self.progress else True, leave=False)
        for t in range(begin, self.steps):
            idx = np.random.default_rng([self.seed, t]).integers(0, n, size=size)  # resumes identically
            batch = {**take(data.inputs, idx), "teacher": _pick(teacher, idx)}
            if data.labels is not None:
                batch["labels"] = data.labels[idx]
            params, opt_state, osc, value, metric = step(params, opt_state, osc, [batch[k] for k in order], batch)
            losses.append(float(value))
            metrics.append(float(metric))
            if (t + 1) % 10 == 0 or t + 1 == self.steps:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4g}", **{_metric_name(teacher): f"{np.mean(metrics[-10:]):.4g}"})
            bar.update(1)
            if self.checkpoint is not None and ((t + 1) % self.checkpoint_every == 0 or t + 1 == self.steps):
                fs.save_checkpoint(self.checkpoint, t + 1, print_, {"params": params, "opt": opt_state, "osc": osc})
        bar.close()
        held = fs.frozen(osc) if freeze else {}
        net.write_back(jax.tree_util.tree_map(np.asarray, params), held)
        tail = max(1, len(losses) // 10)
        model.meta[RESULT] = FinetuneReport(
            self.steps - begin, self.steps, time.perf_counter() - start_time, losses[0] if losses else float("nan"),
            float(np.mean(losses[-tail:])) if losses else float("nan"), _metric_name(teacher),
            float(np.mean(metrics[-tail:])) if metrics else float("nan"), len(net.quantizers),
            sum(int(np.sum(m)) for m, _ in held.values()), sum(int(np.size(m)) for m, _ in held.values()), begin)
        return PassResult(model, True)

    def _oscillating(self, net: Trainable) -> list[str]:
        if self.oscillation == "off" or not self.train_weights:
            return []
        low = self.oscillation == "auto"
        return [k for k, q in net.quantizers.items() if q.is_weight and (not low or q.qtype.bits <= 4)]

    def _optimizer(self, net: Trainable, params: dict) -> tuple[Any, Any]:
        """The optimiser, and per-parameter step units (None with a user's optimiser)."""
        import optax  # slow to import (about a second); only fine-tuning and AdaRound use it

        if self.optimizer is not None:
            return self.optimizer, None
        schedule = optax.cosine_decay_schedule(1.0, self.steps, alpha=0.05)
        optimizer = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda t: -schedule(t)))
        scale = params["scale"]
        units = {"scale": {k: self.lr * jnp.abs(s) for k, s in scale.items()},
                 "offset": {k: self.lr * jnp.abs(s) for k, s in scale.items()},
                 "weight": {k: self.weight_lr * net.quantizers[k].broadcast(jnp.abs(scale[k]), w.ndim)
                            for k, w in params["weight"].items()},
                 "bias": {k: self.weight_lr * jnp.maximum(jnp.mean(jnp.abs(b)), jnp.mean(jnp.abs(scale[net.biases[k]])))
                          for k, b in params["bias"].items()}}
        return optimizer, units


def _binder(names: list[str], scalars: dict[str, np.ndarray]) -> Callable[[list[Any]], list[Any]]:
    """``bind(batched inputs) -> every graph input, in order``, the scalar inputs as constants."""
    def bind(xs: list[Any]) -> list[Any]:
        rest = iter(xs)
        return [scalars[k] if k in scalars else next(rest) for k in names]

    return bind


def _teacher(model: ir.Model, inputs: dict[str, np.ndarray], order: list[str], size: int,
             bind: Callable[[list[Any]], list[Any]]) -> list[np.ndarray]:
    """The float model's outputs on every sample (whole batches of ``size``, the last padded).

    Raises:
        UnsupportedModelError: if a Loop's trip count or condition depends on the data (the JAX backend
            runs it as a while loop, which has no reverse-mode gradient).
    """
    program = Program(model)
    run = jax.jit(lambda *xs: program.run(program.constants, bind(list(xs))))
    n = rows(inputs)
    first = np.minimum(np.arange(size), n - 1)
    jax.eval_shape(run, *[np.asarray(inputs[k])[first] for k in order])  # traced once: which loops it made
    if program.forward_only:
        raise UnsupportedModelError(
            f"finetune: Loop node {program.forward_only[0]!r} has a trip count or condition computed from the data, "
            "which JAX cannot differentiate through; quantize this model without fine-tuning")
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        outs = run(*[np.asarray(inputs[k])[idx] for k in order])
        keep = min(size, n - start)
        if not parts:
            parts = [[] for _ in outs]
        for part, out in zip(parts, outs):
            part.append(np.asarray(out)[:keep])
    return [np.concatenate(p) for p in parts]


def _pick(teacher: list[np.ndarray], idx: np.ndarray) -> Any:
    picked = [t[idx] for t in teacher]
    return picked[0] if len(picked) == 1 else tuple(picked)


def _kind(output: np.ndarray) -> str:
    if not damage.is_classifier(output):
        return "nmse"
    probs = np.all(output >= 0) and np.allclose(output.sum(axis=1), 1.0, atol=1e-3)
    return "kl-probabilities" if probs else "kl-logits"


def _distillation(kinds: list[str]) -> Callable[[Any, dict], Any]:
    """The default loss: each output against the float model's (``damage``'s measures, in JAX)."""

    def loss(outputs: Any, batch: dict) -> Any:
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        refs = batch["teacher"] if isinstance(batch["teacher"], tuple) else (batch["teacher"],)
        total = 0.0
        for kind, y, t in zip(kinds, outs, refs):
            if kind == "nmse":
                total = total + jnp.mean((y - t) ** 2) / jnp.maximum(jnp.mean(t**2), damage.EPS)
                continue
            if kind == "kl-logits":
                p, log_q = jax.nn.softmax(t, axis=-1), jax.nn.log_softmax(y, axis=-1)
            else:
                p, log_q = t, jnp.log(jnp.maximum(y, damage.EPS))
            total = total + jnp.mean(jnp.sum(p * (jnp.log(jnp.maximum(p, damage.EPS)) - log_q), axis=-1))
        return total

    return loss


def _metric(output: Any, teacher: Any) -> Any:
    """Top-1 agreement with the float model (classifiers), else the output's NMSE."""
    t = teacher[0] if isinstance(teacher, tuple) else teacher
    if t.ndim == 2 and t.shape[1] >= 2:
        return jnp.mean(jnp.argmax(output, axis=-1) == jnp.argmax(t, axis=-1))
    return jnp.mean((output - t) ** 2) / jnp.maximum(jnp.mean(t**2), damage.EPS)


def _metric_name(teacher: list[np.ndarray]) -> str:
    return "agree" if damage.is_classifier(teacher[0]) else "nmse"
