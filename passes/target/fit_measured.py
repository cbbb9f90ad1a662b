"""Fit a plan to this machine by measurement: the rewrite must not run slower than the float model.

An analysis run last before the rewrite, on a CPU target (a measured table: this machine's
onnxruntime), after the plan is final (fitted by ``fit-target``, or chosen by a search). The latency
table prices each node alone; what it cannot see is the fixed cost of every extra kernel and of the
conversions between them, which decides sub-millisecond models (a small BERT export, a Keras toy):
their rewrite can be priced faster and run slower. So the plan's rewrite is timed against the float
model on the calibration sample, interleaved (``qinject.runtime.measure``). Unless it is faster by
more than the timing noise (``MIN_GAIN``), plans keeping only the nodes the estimate credits most
(all again, half, a quarter, ..., one) are timed together with the float model, and the fastest one
is kept if it beats float by that margin; if none does, every node stays float (and quantize says
nothing was quantized). A plan that wins is timed once more in fresh sessions and kept only if it
wins again: timings minutes apart differ by more than the margin on sub-millisecond models, and the
fastest of several candidates is also the luckiest. Each floated node gets a note; the kept plan is stored in
``qinject.core.ir.CHOSEN_PLAN`` and the timing in ``MEASURED_LATENCY`` for the report.

Before that, where ``fit-target`` fitted a second plan with the nodes kept float for onnxruntime's slower
kernel alone set free (``qinject.core.ir.ALTERNATIVE_PLAN``: depthwise convolutions), the two plans are
timed against each other, and the second is taken only where it wins two timings by the same margin.
So is the rewrite with the Adds onnxruntime would fuse into SkipLayerNormalization written as Sum
(``passes/transforms/split_skip_layernorm.py``), where the model has any: if it wins, every rewrite
timed after, and the one written, keeps them apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import onnx_ir as ir

from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import QinjectError, UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult
from qinject.core.plan import NodeQuant, Plan
from qinject.core.rules import Rules
from qinject.core.search_result import chosen_plan
from qinject.cost.estimate import estimate
from qinject.cost.latency_table import LatencyTable, load_target
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.split_skip_layernorm import SplitSkipLayerNorm, fused_adds
from qinject.runtime.measure import interleaved_latency, quiet_session_options

# A rewrite is kept only if it measures under this share of the float model's time: closer than that,
# a difference is within the noise of timing a shared machine for a couple of seconds (the same plan
# of magika measured 0.84x in quantize and 0.97x-1.48x in tools/bench_realworld.py minutes apart).
MIN_GAIN = 0.97

class FitMeasured(Pass):
    """Time the plan's rewrite against the float model here; when slower, keep float the nodes the
    estimate credits least until it is faster, or all of them.

    Options:
        plan: the plan to fit (None: the one a search or ``fit-target`` chose).
        target: the measured latency table whose estimate orders the nodes.
        batch: the size given to a symbolic batch dimension.
        method, percentile: the activation ranges the rewrite uses (as ``insert-qdq``'s).
        budget_s: seconds each timing takes (the float model's and the candidates' runs interleaved).
        pinned: the nodes the user's plan names, or the user's rules (a search's): the nodes they name
            keep what was asked, as in ``fit-target``.
    """

    name = "fit-measured"
    analysis = True

    def __init__(self, plan: Plan | None, target: LatencyTable | str, batch: int = 1, method: str = "minmax",
                 percentile: float = 99.99, budget_s: float = 2.0, pinned: Iterable[str] | Rules = ()) -> None:
        self.plan, self.batch, self.pinned = plan, batch, pinned
        self.table = target if isinstance(target, LatencyTable) else load_target(target)
        self.method, self.percentile, self.budget_s = method, percentile, budget_s

    def call(self, model: ir.Model) -> PassResult:
        model.meta.pop(qir.SPLIT_SKIP_LAYERNORM, None)  # decided below, for this plan
        feed = model.meta.get(qir.SAMPLE_FEED)
        plan = chosen_plan(model, self.plan)
        alternative = model.meta.pop(qir.ALTERNATIVE_PLAN, None)
        named = set(self.pinned.pins(model)[0]) if isinstance(self.pinned, Rules) else set(self.pinned)
        baseline = _float_model(model)
        tried = 0
        if alternative is not None and feed is not None:
            try:
                plan, freed = self._either(model, plan, alternative, baseline, feed)
            except QinjectError as exc:
                warnings.warn(f"measuring the rewrite on this machine skipped: {exc}", QinjectWarning, stacklevel=2)
                return PassResult(model, False)
            named -= freed
            tried = 2
        chosen = [n.name for n in qir.searchable_nodes(model) if plan.choice(n.name) is not None]
        if feed is None or not chosen:
            return PassResult(model, False)
        rewrite = self._rewrite(model, plan)
        if fused_adds(rewrite.graph):  # a join on integers is no longer an Add
            split = rewrite.clone()
            SplitSkipLayerNorm(always=True)(split)
            try:
                ratio = self._beats(rewrite, split, feed)
            except QinjectError as exc:
                warnings.warn(f"measuring the rewrite on this machine skipped: {exc}", QinjectWarning, stacklevel=2)
                return PassResult(model, False)
            tried += 1
            if ratio is not None:  # every rewrite timed below, and the one written, keeps them apart
                model.meta[qir.SPLIT_SKIP_LAYERNORM] = ratio
                rewrite = split
        try:
            float_ms, full_ms = self._confirmed(baseline, rewrite, feed)
        except QinjectError as exc:  # a timing never stops a quantization: the rewrite runs it again
            warnings.warn(f"measuring the rewrite on this machine skipped: {exc}", QinjectWarning, stacklevel=2)
            return PassResult(model, False)
        kept, kept_ms, first_ratio = chosen, full_ms, full_ms / float_ms
        tried += 1
        pinned = [n for n in chosen if n in named]
        if first_ratio > MIN_GAIN and len(pinned) < len(chosen):
            # One timing, all candidates interleaved with float (the whole plan again: the first timing
            # may have been unlucky); each must beat float beyond the noise, since it was found slower.
            ranked = self._ranked(model, plan, [n for n in chosen if n not in named])
            sizes = [len(ranked), *_halvings(len(ranked)), *([0] if pinned else [])]
            candidates = [_keeping(plan, pinned + ranked[:k], chosen) for k in sizes]
            times = interleaved_latency([baseline, *(self._rewrite(model, p) for p in candidates)], feed,
                                        self.budget_s)
            tried += len(candidates)
            best = min(range(len(candidates)), key=lambda i: times[1 + i])
            kept, float_ms, kept_ms = pinned, times[0], times[-1] if pinned else times[0]
            if times[1 + best] < MIN_GAIN * times[0]:
                # the fastest of several is the luckiest too: kept only if it wins a timing of its own
                again = interleaved_latency([baseline, self._rewrite(model, candidates[best])], feed,
                                            self.budget_s)
                if again[1] < MIN_GAIN * again[0]:
                    kept, (float_ms, kept_ms) = pinned + ranked[:sizes[best]], again
            plan = _keeping(plan, kept, chosen)
            self._note(model, sorted(set(chosen) - set(kept)), first_ratio, len(chosen))
        model.meta[qir.CHOSEN_PLAN] = plan
        model.meta[qir.MEASURED_LATENCY] = {"float_ms": float_ms, "quantized_ms": kept_ms, "tried": tried}
        return PassResult(model, False)

    def _either(self, model: ir.Model, plan: Plan, alternative: tuple, baseline: ir.Model | str, feed: dict
                ) -> tuple[Plan, set[str]]:
        """The fitted plan, or the one fitted with the slow kernels free (``fit-target``'s
        ``slow_kernels``) where that runs faster here by the margin, in two timings; and the slow
        kernels that plan frees. The notes on the nodes follow the plan kept."""
        other, other_notes, notes, slow = alternative
        ratio = self._beats(self._rewrite(model, plan), self._rewrite(model, other), feed, beside=baseline)
        if ratio is None:
            return plan, set()
        nodes = {n.name: n for n in model.graph.all_nodes()}
        for name, written in notes.items():  # the first plan's, written by fit-target
            kept = [note for note in nodes[name].meta.get(qir.QUANT_NOTES, []) if note not in written]
            nodes[name].meta[qir.QUANT_NOTES] = kept
        for name, extra in other_notes.items():
            nodes[name].meta.setdefault(qir.QUANT_NOTES, []).extend(extra)
        freed = {name for name in slow if other.choice(name) is not None}
        for name in sorted(freed):
            nodes[name].meta.setdefault(qir.QUANT_NOTES, []).append(
                f"quantized though onnxruntime's CPU kernel for it alone is slower than float: beside its integer "
                f"neighbours the plan measured {ratio:.2f}x of the plan with it float here")
        model.meta[qir.CHOSEN_PLAN] = other
        return other, freed

    def _beats(self, first: ir.Model, second: ir.Model, feed: dict, beside: ir.Model | str | None = None
               ) -> float | None:
        """``second``'s time over ``first``'s if under the margin in two interleaved timings (the
        second's ratio), else None; ``beside`` (the float model) runs in the first timing too."""
        extra = [] if beside is None else [beside]
        for models in ([*extra, first, second], [first, second]):
            times = interleaved_latency(models, feed, self.budget_s)[-2:]
            if times[1] >= MIN_GAIN * times[0]:
                return None
        return times[1] / times[0]

    def _confirmed(self, baseline: ir.Model | str, rewrite: ir.Model, feed: dict) -> tuple[float, float]:
        """Float's and the rewrite's time: a rewrite that beats float by the margin is timed again in
        fresh sessions, and the slower of its two ratios stands (one sub-millisecond BERT export
        measured 0.95x in one pair of sessions, 1.01x-1.06x in the next ones)."""
        first = interleaved_latency([baseline, rewrite], feed, self.budget_s)
        if first[1] >= MIN_GAIN * first[0]:
            return first[0], first[1]
        again = interleaved_latency([baseline, rewrite], feed, self.budget_s)
        worse = max(first, again, key=lambda t: t[1] / t[0])
        return worse[0], worse[1]

    def _rewrite(self, model: ir.Model, plan: Plan) -> ir.Model:
        variant = model.clone()
        InsertQDQ(plan, method=self.method, percentile=self.percentile)(variant)
        if qir.SPLIT_SKIP_LAYERNORM in model.meta:  # timed faster (call): as the pipeline writes it
            SplitSkipLayerNorm(always=True)(variant)
        return variant

    def _ranked(self, model: ir.Model, plan: Plan, chosen: list[str]) -> list[str]:
        """The chosen nodes, the estimate's largest saving over float first (graph order when the
        model cannot be priced)."""
        try:
            quantized = {n.node: n.latency_us for n in estimate(model, plan, self.table, self.batch,
                                                                 baselines=False).nodes}
            floating = {n.node: n.latency_us for n in estimate(model, Plan(None), self.table, self.batch,
                                                                baselines=False).nodes}
        except UnsupportedModelError:
            return chosen
        return sorted(chosen, key=lambda n: -(floating.get(n, 0.0) - quantized.get(n, 0.0)))

    @staticmethod
    def _note(model: ir.Model, floated: list[str], ratio: float, total: int) -> None:
        nodes = {n.name: n for n in model.graph.all_nodes()}
        why = (f"kept float: the rewrite of all {total} chosen node(s) measured {ratio:.2f}x the float model's "
               f"time on this machine (kept only under {MIN_GAIN:.2f}x), and this node's estimated saving was "
               "among the smallest (--force quantizes anyway)")
        for name in floated:
            nodes[name].meta.setdefault(qir.QUANT_NOTES, []).append(why)


def _float_model(model: ir.Model) -> ir.Model | str:
    """The float model the rewrite must beat, as the user runs it: its source file when onnxruntime
    loads it, else the pipeline's float IR. The IR is re-serialised at opset 21 and can run slower
    than its source: a 40 us TorchScript If export ran 0.061 ms from the IR against 0.040 ms from its
    file, so its rewrite timed 0.86x of the IR here and then measured 1.10x of the file."""
    source = model.graph.meta.get(qir.SOURCE_FILE)
    if source is None:
        return model
    try:
        onnx_backend.session(source, quiet_session_options())
    except QinjectError:  # a source onnxruntime cannot run as it is (an old opset): the IR stands in
        return model
    return source


def _halvings(n: int) -> list[int]:
    """n/2, n/4, ..., 1: how many of the best-credited nodes each candidate keeps (n itself was timed)."""
    sizes, k = [], n // 2
    while k >= 1:
        sizes.append(k)
        k //= 2
    return sizes


def _keeping(plan: Plan, kept: list[str], chosen: list[str]) -> Plan:
    """``plan`` with the chosen nodes outside ``kept`` float (named, so the plan still says what was asked)."""
    keep = set(kept)
    choices: dict[str, NodeQuant | None] = {name: plan.choice(name) if name in keep else None for name in chosen}
    return Plan(plan.default, {**plan.nodes, **choices})
