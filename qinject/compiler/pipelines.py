"""The standard pipelines, built here and nowhere else: ``standard_pipeline`` (what ``qinject
quantize`` and ``qinject.quantize_onnx`` run: prepare, opset, calibrate, then the target, search and
rounding passes asked for, then the rewrite) and ``analysis_pipeline`` (``qinject analyze``:
prepare, calibrate, the sensitivity signals). Plugins are loaded before either is built, so their op
facts are in the table before any pass runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from qinject.compiler import plugins
from qinject.core.errors import CalibrationDataError, QinjectError
from qinject.core.pass_manager import Pass
from qinject.core.plan import Plan
from qinject.cost.latency_table import LatencyTable, load_target
from qinject.passes.rounding.adaround import AdaRound
from qinject.passes.rounding.bias_correction import BiasCorrection
from qinject.passes.rounding.finetune import Finetune
from qinject.passes.search import SEARCH_PASSES, SEARCHES, SearchWidths
from qinject.passes.sensitivity import SIGNALS, signal_pass
from qinject.passes.target.estimate_cost import EstimateCost
from qinject.passes.target.fit_measured import FitMeasured
from qinject.passes.target.fit_target import FitTarget
from qinject.passes.target.profile_target import ProfileTarget
from qinject.passes.transforms import prepare
from qinject.passes.transforms.calibrate import Calibrate
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.split_skip_layernorm import SplitSkipLayerNorm
from qinject.passes.transforms.upgrade_opset import UpgradeOpset
from qinject.runtime import ray_executor
from qinject.runtime.evaluation import Budget


@dataclass
class SearchOptions:
    """What ``quantize_onnx``/``quantize_jax`` need to search for a mixed-precision plan.

    Attributes:
        max_drop: the budget: "1%" (relative), "0.5pt" (absolute points) or a number (absolute).
        eval_data: evaluation inputs (``.npz``/dict/array, optional ``labels``); None: the calibration data.
        metric: a callable ``fn(executable) -> float`` (higher is better); None: accuracy with labels,
            else agreement with the float model (classifiers) or output fidelity.
        search: bisection, greedy, ilp or pareto.
        signal: the sensitivity signal nodes are ranked by (``qinject.passes.sensitivity.SIGNALS``).
        adaround, bias_correction: AdaRound / bias-correct the 4-bit nodes the search chooses,
            during the search's evaluations too.
        pareto_plot: where the Pareto sweep draws its frontier (PNG).
        limit: at most this many samples for the sensitivity analysis and the evaluations.
        rules: ``qinject.rules.Rules`` pinning the nodes they match; the search chooses the rest.
        modes: the execution modes a width may run in (``qinject.plan.MODES``; static always).
        executor: where the sensitivity analysis and the search evaluate: None or "process" (the
            local process pool of ``workers``), "ray" (a local Ray), "ray://HOST:PORT" (a Ray cluster).
    """

    max_drop: str | float = "1%"
    eval_data: object = None
    metric: Callable[..., float] | None = None
    search: str = "bisection"
    signal: str = "quant-error"
    adaround: bool = False
    bias_correction: bool = False
    pareto_plot: str | os.PathLike | None = None
    workers: int | None = None
    seed: int = 0
    limit: int | None = 2048
    rules: Any = None
    modes: tuple[str, ...] = ("static", "dynamic", "weight-only")
    executor: str | None = None

    def __post_init__(self) -> None:

        if self.search not in SEARCHES:
            raise QinjectError(f"unknown search {self.search!r} (expected one of {', '.join(SEARCHES)})")
        if self.signal not in SIGNALS:
            raise QinjectError(f"unknown sensitivity signal {self.signal!r} (expected one of {', '.join(SIGNALS)})")
        Budget.parse(self.max_drop)  # a bad budget fails before any work
        ray_executor.check(self.executor)  # so does an unknown executor, or Ray asked for and missing


@dataclass
class FinetuneOptions:
    """Quantization-aware fine-tuning of the plan before the rewrite (``passes/rounding/finetune.py``).

    Attributes:
        data: training inputs (``.npz``/dict/array, optional ``labels``); None: the calibration data.
        steps, batch, lr, weight_lr, loss, optimizer, train_weights, init, act_init, oscillation, checkpoint,
        checkpoint_every, seed, limit: as ``Finetune`` takes them.
    """

    data: object = None
    steps: int = 500
    batch: int = 32
    lr: float = 1e-2
    weight_lr: float = 1e-2
    loss: Callable[..., Any] | None = None
    optimizer: Any = None
    train_weights: bool = True
    init: str = "mse"
    act_init: str = "calib"
    oscillation: str = "auto"
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 100
    seed: int = 0
    limit: int | None = None

    def build(self, data: object, plan: Plan | None, method: str, percentile: float, progress: bool) -> Finetune:
        """The pass, training on ``self.data`` or else ``data`` (the calibration data)."""
        if self.data is None and data is None:
            raise CalibrationDataError("fine-tuning needs training data (or calibration data to train on)")
        return Finetune(self.data if self.data is not None else data, plan, steps=self.steps, batch=self.batch,
                        lr=self.lr, weight_lr=self.weight_lr, loss=self.loss, optimizer=self.optimizer,
                        train_weights=self.train_weights, init=self.init, act_init=self.act_init,
                        oscillation=self.oscillation,
                        method=method, percentile=percentile,
                        checkpoint=None if self.checkpoint is None else str(self.checkpoint),
                        checkpoint_every=self.checkpoint_every, seed=self.seed, progress=progress, limit=self.limit)


def standard_pipeline(plan: Plan | None, calib: object = None, method: str = "minmax", batch_size: int = 16,
                      percentile: float = 99.99, progress: bool = True,
                      target: LatencyTable | str | None = None, latency_batch: int = 1,
                      search: SearchOptions | None = None, analysis_data: object = None,
                      adaround: bool = False, bias_correction: bool = False, fit: bool = False,
                      auto_mode: bool = False, profile: bool = False, measure: bool = False,
                      finetune: FinetuneOptions | None = None, slow_kernels: Collection[str] = ()) -> list:
    """The passes of ``qinject quantize``, in order. With ``target``, the plan's latency is estimated
    on it just before the rewrite. With ``search``, the plan is chosen: a sensitivity signal on the
    calibration data, then a search pass on the evaluation data (and AdaRound / bias correction of the
    chosen 4-bit weights when asked), and ``plan`` is ignored. The analyses read ``analysis_data``
    (arrays by input name; default: ``calib`` itself). ``adaround`` / ``bias_correction`` round the
    plan's static nodes with at most 4-bit per-channel or 8-bit per-tensor weights by AdaRound /
    correct their biases (a search takes them in its options).
    ``fit`` fits the plan to a measured ``target`` first (``passes/target/fit_target.py``: float where the
    table prices float faster; with ``auto_mode``, each node in its fastest execution mode). ``profile`` measures
    the shapes a measured ``target`` lacks on this machine before anything is priced
    (``passes/target/profile_target.py``, cached). ``finetune`` trains the plan's scales and weights
    (quantization-aware, ``passes/rounding/finetune.py``) just before the rewrite. ``measure`` (with
    ``fit``, on a measured ``target``) then times the final plan's rewrite against the float model on
    this machine and keeps float the nodes that make it slower (``passes/target/fit_measured.py``);
    ``slow_kernels``, nodes ``plan`` (or a search's rules) keep float for onnxruntime's slower kernel
    alone, are then tried on integers too, and kept so where that measures faster."""

    # the nodes a user's plan or rules name: every fit leaves them as named
    pinned = set(plan.nodes) if plan is not None and search is None else set()
    if profile or (fit and target is not None):
        target = target if isinstance(target, LatencyTable) else load_target(target or "local-cpu")
    # a CPU's measured table: the plan is fitted to it, and with ``measure`` timed on this machine
    fitted = search is None and fit and target is not None and target.kind == "measured"
    timed = measure and fit and target is not None and target.kind == "measured"
    plugins.load()
    passes = [
        *prepare(),
        UpgradeOpset(21 if search is not None or (fit and auto_mode) else plan.min_opset()),
        Calibrate(calib, method=method, batch_size=batch_size, progress=progress),
    ]
    if profile:
        passes.append(ProfileTarget(target, latency_batch, progress))  # extends the table the passes below read
    if fitted:
        # a CPU's measured table says which kernels onnxruntime runs slower than float; a spec-sheet
        # accelerator's roofline prices what its units would do, and its estimate is only reported
        # with a measurement to settle it, a plan with the slow kernels on integers is fitted too
        passes.append(FitTarget(plan, target, latency_batch, auto_mode, slow_kernels=slow_kernels if timed else ()))
        plan = None  # the passes below read the fitted plan from the model
    if search is not None:
        passes += _search_passes(search, calib if analysis_data is None else analysis_data, method, percentile,
                                 progress, target or "local-cpu", latency_batch, slow_kernels if timed else ())
        plan = None
    else:

        data = calib if analysis_data is None else analysis_data
        if adaround:
            passes.append(AdaRound(data, plan, progress=progress))
        if bias_correction:
            passes.append(BiasCorrection(data, plan))
    if finetune is not None:
        data = calib if analysis_data is None else analysis_data
        passes.append(finetune.build(data, plan, method, percentile, progress))
    if timed:
        # last before the rewrite: it times the plan every pass above settled, and the estimate prices its result
        passes.append(FitMeasured(plan, target, latency_batch, method=method, percentile=percentile,
                                  pinned=pinned if search is None else search.rules or ()))
        plan = None
    if target is not None:
        passes.append(EstimateCost(plan, target, latency_batch))
    passes.append(InsertQDQ(plan, method=method, percentile=percentile))
    if timed:
        # where it timed them faster, the Adds onnxruntime fuses into a slower SkipLayerNormalization
        # are written as Sum
        passes.append(SplitSkipLayerNorm())
    return passes


def _search_passes(options: SearchOptions, analysis: object, method: str, percentile: float, progress: bool,
                   target: LatencyTable | str, latency_batch: int, slow_kernels: Collection[str] = ()) -> list:

    if analysis is None:

        raise CalibrationDataError("a mixed-precision search needs calibration data (random inputs would "
                                   "rank the nodes by noise)")
    evaluation = options.eval_data if options.eval_data is not None else analysis
    # the levels that pay on the target, decided from its table before any evaluation: the signal
    # measures only those (on a CPU, 8 bits alone: 291 evaluations on BERT-base became 97)
    widths = SearchWidths(target, latency_batch, tuple(options.modes), rules=options.rules)
    signals = ["hessian", "interlayer"] if options.signal == "interlayer" else [options.signal]  # its base order
    passes = [signal_pass(signal, analysis, bits=widths.measured, seed=options.seed, workers=options.workers,
                          progress=progress, method=method, executor=options.executor, skip=widths.floated)
              for signal in signals]
    kwargs = {"metric": options.metric, "signal": options.signal, "batch": latency_batch,
              "workers": options.workers, "method": method, "percentile": percentile, "limit": options.limit,
              "executor": options.executor}
    kwargs.update(adaround=options.adaround, bias_correction=options.bias_correction, calib=analysis,
                  progress=progress, rules=options.rules, modes=options.modes, levels=widths.levels,
                  floated=widths.floated, slow_kernels=tuple(slow_kernels))
    if options.search == "pareto":
        kwargs["plot"] = options.pareto_plot
    passes.append(SEARCH_PASSES[options.search](evaluation, options.max_drop, target, **kwargs))
    return passes


def analysis_pipeline(metrics: Sequence[str], calib: object, data: object, bits: tuple[int, ...] = (16, 8, 4),
                      method: str = "minmax", workers: int | None = None, seed: int = 0,
                      progress: bool = True, executor: str | None = None) -> list[Pass]:
    """The passes of ``qinject analyze``: prepare, opset 21, calibrate on ``calib``, then each signal in
    ``metrics`` measured on ``data`` (an ``AnalysisData``; interlayer brings the hessian it orders by),
    evaluated where ``executor`` says (``qinject.runtime.executor.Executor``)."""
    ray_executor.check(executor)
    plugins.load()
    wanted = list(dict.fromkeys(metrics))
    if "interlayer" in wanted and "hessian" not in wanted:
        wanted.insert(wanted.index("interlayer"), "hessian")  # its base order
    return [*prepare(), UpgradeOpset(21), Calibrate(calib, method=method, progress=progress),
            *(signal_pass(m, data, bits=bits, seed=seed, workers=workers, progress=progress, method=method,
                          executor=executor)
              for m in wanted)]


__all__ = ["SEARCHES", "FinetuneOptions", "SearchOptions", "analysis_pipeline", "standard_pipeline"]
