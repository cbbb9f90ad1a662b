"""The layer contract (docs/ARCHITECTURE.md, "Layers"): every module imports only from its own layer or
the layers below it, at module level *and* inside functions; nothing imports a sibling of its layer
(the frontends and the backends know nothing of each other); the module-level imports form no cycle;
no project import hides inside a function; a function-level import of a third-party library is only
for a heavy optional one and says why in a comment.

The imports are read with ``ast`` from the source tree (``qinject/`` and ``passes/``, which installs as
``qinject.passes``), so the check needs nothing installed and sees every import, executed or not.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom. A module belongs to the layer of the longest prefix naming it; names joined by "|" are
# siblings of one layer that must not import each other. The facade (the package root, its
# documented re-export modules and the lazy `qinject.passes` package) sits above everything: no layer
# may import it.
LAYERS: list[tuple[str, ...]] = [
    ("qinject", "qinject.cli", "qinject.jax", "qinject.latency_table", "qinject.plan", "qinject.passes"),
    ("qinject.app",),
    ("qinject.compiler",),
    ("qinject.passes.search",),
    ("qinject.passes.rounding",),
    ("qinject.passes.sensitivity", "|", "qinject.passes.target"),
    ("qinject.runtime",),
    ("qinject.passes.transforms",),
    ("qinject.cost",),
    ("qinject.frontends", "|", "qinject.backends"),
    ("qinject.core",),
]

# Function-level imports are allowed only for these third-party libraries, slow to import and needed
# by few calls; each such import carries a comment saying why.
HEAVY = {"scipy", "optax", "matplotlib", "tqdm", "networkx", "sklearn", "ray"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module imported (or the third-party top-level name)
    line: int
    in_function: bool
    commented: bool


def modules(root: Path) -> dict[str, Path]:
    """Every project module under ``root`` by dotted name (``passes/x.py`` is ``qinject.passes.x``)."""
    out = {}
    for base, package in ((root / "qinject", "qinject"), (root / "passes", "qinject.passes")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(root: Path) -> list[Import]:
    """Every import statement in the project, resolved to the project module it names."""
    mods = modules(root)
    found: list[Import] = []
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        is_package = path.name == "__init__.py"

        def commented(node: ast.stmt, lines: list[str] = lines) -> bool:
            return any("#" in lines[i - 1] for i in range(max(1, node.lineno - 1), node.end_lineno + 1))

        def visit(node: ast.AST, in_function: bool, name: str = name, is_package: bool = is_package,
                  commented=commented) -> None:
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    module = child.module or ""
                    if child.level:
                        package = name.split(".") if is_package else name.split(".")[:-1]
                        package = package[:len(package) - child.level + 1]
                        module = ".".join([*package, *([module] if module else [])])
                    targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module
                               for a in child.names]
                for target in targets:
                    if target.split(".")[0] == "qinject":
                        while target not in mods and "." in target:
                            target = target.rsplit(".", 1)[0]
                    else:
                        target = target.split(".")[0]
                    found.append(Import(name, target, child.lineno, in_function, commented(child)))
                visit(child, inner)

        visit(ast.parse(text, str(path)), False)
    return found


def layer_of(module: str) -> tuple[int, str]:
    """(layer index from the top, the prefix that placed it)."""
    best = (-1, "")
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if prefix != "|" and (module == prefix or module.startswith(prefix + ".")) and \
                    len(prefix) > len(best[1]):
                best = (index, prefix)
    return best


def violations(root: Path) -> list[str]:
    """Every breach of the contract in the tree at ``root``, one line each."""
    mods = modules(root)
    out = []
    for module in mods:
        if layer_of(module)[0] < 0:
            out.append(f"{module}: in no layer (add it to LAYERS in tests/test_layers.py)")
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for imp in imports(root):
        where = f"{mods[imp.source].relative_to(root)}:{imp.line}"
        if imp.target not in mods:  # a third-party library
            if imp.in_function and imp.target not in HEAVY:
                out.append(f"{where}: imports {imp.target} inside a function; only heavy optional libraries "
                           f"({', '.join(sorted(HEAVY))}) may be imported lazily")
            elif imp.in_function and not imp.commented:
                out.append(f"{where}: lazy import of {imp.target} without a comment saying why")
            continue
        if imp.in_function:
            out.append(f"{where}: imports {imp.target} inside a function (project imports go at module level)")
        (src, src_prefix), (dst, dst_prefix) = layer_of(imp.source), layer_of(imp.target)
        if dst < src:
            out.append(f"{where}: {imp.source} ({src_prefix}) imports {imp.target} from the layer above "
                       f"({dst_prefix})")
        elif dst == src and src_prefix != dst_prefix and "|" in LAYERS[src]:
            out.append(f"{where}: {imp.source} ({src_prefix}) imports its sibling layer {dst_prefix}")
        if not imp.in_function and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    out += [f"import cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the module-level import graph that has one."""
    state: dict[str, int] = {}
    found: list[list[str]] = []
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return found


def test_imports_only_go_down():
    assert violations(ROOT) == []


def test_every_module_is_in_a_layer_and_every_layer_has_modules():
    mods = modules(ROOT)
    assert all(layer_of(m)[0] >= 0 for m in mods)
    for layer in LAYERS:
        for prefix in layer:
            assert prefix == "|" or any(m == prefix or m.startswith(prefix + ".") for m in mods), prefix


def _planted(tmp_path: Path, file: str, line: str) -> list[str]:
    for folder in ("qinject", "passes"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    target.write_text(target.read_text() + line)
    return violations(tmp_path)


def test_an_upward_import_breaks_the_contract(tmp_path):
    found = _planted(tmp_path, "qinject/core/numerics.py", "\nfrom qinject.runtime.executor import Executor\n")
    assert any("qinject.core.numerics (qinject.core) imports qinject.runtime.executor" in v for v in found), found


def test_an_import_hidden_in_a_function_breaks_the_contract(tmp_path):
    found = _planted(tmp_path, "qinject/core/op_facts.py",
                     "\ndef _late():\n    from qinject.compiler import plugins  # dodges the cycle\n")
    assert any("inside a function" in v for v in found) and any("layer above" in v for v in found), found


def test_a_sibling_import_breaks_the_contract(tmp_path):
    found = _planted(tmp_path, "qinject/frontends/onnx_frontend.py", "\nfrom qinject.backends import onnx_backend\n")
    assert any("imports its sibling layer qinject.backends" in v for v in found), found


def test_a_cycle_breaks_the_contract(tmp_path):
    found = _planted(tmp_path, "qinject/core/errors.py", "\nfrom qinject.core import ir\n")
    assert any(v.startswith("import cycle:") for v in found), found
