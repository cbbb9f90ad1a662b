"""Instrumentation of a pass pipeline: hooks around every pass (``PassManager.before/after``).

- ``IRDump(folder)``: the IR after every pass, one text file each (``03-calibrate.txt``);
- ``PrintIRAfter(names, echo)``: the IR after the named passes, printed;
- ``VerifyEach()``: the full verifier (onnx.checker with type and shape checks) after every pass;
- ``timing_table(manager)``: seconds per pass, with shares.

A Python callback is any ``hook(pass, model)`` appended to ``before`` or ``after``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.pass_manager import Pass, PassManager


def ir_text(model: ir.Model) -> str:
    """The IR as text (onnx-ir's printer: every value, node and attribute)."""
    return str(model)


class IRDump:
    """After every pass, write the IR to ``folder/NN-<pass>.txt`` (the folder is created)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder, self.count = Path(folder), 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, p: Pass, model: ir.Model) -> None:
        self.count += 1
        (self.folder / f"{self.count:02d}-{p.name}.txt").write_text(ir_text(model))


class PrintIRAfter:
    """After each pass whose name is in ``names``, print the IR through ``echo``."""

    def __init__(self, names: Iterable[str], echo: Callable[[str], None] = print) -> None:
        self.names, self.echo = set(names), echo

    def __call__(self, p: Pass, model: ir.Model) -> None:
        if p.name in self.names:
            self.echo(f"// ----- IR after {p.name} -----")
            self.echo(ir_text(model))


class VerifyEach:
    """After every pass (analyses too), run the full verifier."""

    def __call__(self, p: Pass, model: ir.Model) -> None:
        qir.verify(model, full=True)


def timing_table(manager: PassManager) -> str:
    total = sum(s for _, s in manager.timings) or 1e-12
    width = max([len("pass"), *(len(n) for n, _ in manager.timings)])
    lines = [f"{'pass':<{width}}  {'seconds':>9}  {'share':>6}"]
    lines += [f"{name:<{width}}  {s:>9.3f}  {s / total:>6.1%}" for name, s in manager.timings]
    lines.append(f"{'total':<{width}}  {total:>9.3f}")
    return "\n".join(lines)
