"""Pass infrastructure: a pass returns ``PassResult(model, modified)``; a manager runs a list of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.errors import PassContractError


@dataclass(frozen=True)
class PassResult:
    model: ir.Model
    modified: bool


class Pass:
    """Base class. Subclasses set ``name``, take their options in ``__init__`` and implement ``call``.

    ``in_place`` passes must return the model they were given; analyses set ``analysis = True``
    and must report ``modified=False``. The base class checks both.
    """

    name: str = "pass"
    in_place: bool = True
    analysis: bool = False

    def call(self, model: ir.Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: ir.Model) -> PassResult:
        result = self.call(model)
        if self.in_place and result.model is not model:
            raise PassContractError(f"{type(self).__name__} claims in-place but returned a new model")
        if self.analysis and result.modified:
            raise PassContractError(f"{type(self).__name__} is an analysis but reported a modification")
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


Hook = Callable[[Pass, ir.Model], None]


@dataclass
class PassManager:
    """Runs passes in order, optionally verifying the IR after each modifying pass.

    Attributes:
        passes: the passes to run.
        verify: run the verifier after every pass that modified the model (cheap checks always;
            onnx.checker too when the QINJECT_VERIFY switch is on).
        before, after: callbacks ``hook(pass, model)`` around every pass (instrumentation).
        timings: seconds spent in each pass, filled by ``run``.
    """

    passes: Sequence[Pass]
    verify: bool = True
    before: list[Hook] = field(default_factory=list)
    after: list[Hook] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)

    def run(self, model: ir.Model) -> PassResult:
        modified = False
        for p in self.passes:
            for hook in self.before:
                hook(p, model)
            start = time.perf_counter()
            result = p(model)
            self.timings.append((p.name, time.perf_counter() - start))
            model, modified = result.model, modified or result.modified
            if self.verify and result.modified:
                qir.verify(model)
            for hook in self.after:
                hook(p, model)
        return PassResult(model, modified)
