"""Measure, on this machine, the latency entries a measured table lacks for this model, before the
plan is fitted or searched.

An analysis run after calibration (which gives symbolic dims their sizes): every quantizable node's
shape is timed in each width and mode (``qinject.profiler``) unless the table already has it, the
table is extended in place, so the passes after it price the model from measurements, and it is
saved to the user's profile cache under its target name, so the next run reuses it
(``qinject.latency_table.user_dir``). Only for measured tables: a spec-sheet roofline describes
another machine, and timing this one would not improve it.
"""

from __future__ import annotations

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass, PassResult
from qinject.cost.latency_table import LatencyTable, user_dir
from qinject.runtime.profiler import run_profile


class ProfileTarget(Pass):
    """Profile the shapes ``table`` lacks for the model, extend it and cache it.

    Options:
        table: a measured latency table (extended in place).
        batch: the size given to a symbolic batch dimension.
        progress: show a progress bar.
        save: write the extended table to the user's profile cache.
    """

    name = "profile-target"
    analysis = True

    def __init__(self, table: LatencyTable, batch: int = 1, progress: bool = True, save: bool = True) -> None:
        if table.kind != "measured":
            raise QinjectError(f"--profile measures this machine: target {table.target!r} is a spec-sheet "
                               "(analytic) table, not a measured one")
        self.table, self.batch, self.progress, self.save = table, batch, progress, save

    def call(self, model: ir.Model) -> PassResult:
        feed = model.meta.get(qir.SAMPLE_FEED)
        run = run_profile(model, self.table, batch=self.batch, progress=self.progress,
                          feeds=feed if feed is not None and self.batch == 1 else None,
                          input_shapes=self._shapes(model))
        if self.save and run.measured:
            folder = user_dir()
            folder.mkdir(parents=True, exist_ok=True)
            self.table.save(folder / f"{self.table.target}.json")
        return PassResult(model, False)

    def _shapes(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        """The shapes calibration saw (or the user gave), a symbolic batch at ``batch``: the shapes
        the cost estimate prices."""
        seen = model.meta.get(qir.INPUT_SHAPES, {})
        given = model.meta.get(qir.SHAPES_GIVEN, False)
        out = {}
        for value in model.graph.inputs:
            if value.name in seen:
                dims = list(seen[value.name])
                if not given and dims and value.shape is not None and not isinstance(value.shape[0], int):
                    dims[0] = self.batch
                out[value.name] = tuple(dims)
        return out
