"""One name per thing: a pass's registry name, its module and its class say the same word.

``fold-constants`` is ``passes/transforms/fold_constants.py``'s ``FoldConstants`` with ``name =
"fold-constants"``; a signal ``bit-error`` is ``passes/sensitivity/bit_error.py``'s ``BitError`` (pass
``sensitivity-bit-error``, values stored under ``bit_error``); a search ``ilp`` is
``passes/search/ilp.py``'s ``Ilp`` (pass ``search-ilp``, ``algorithm = "ilp"``). The class name is
compared without case, so acronyms keep their capitals (``InsertQDQ``, ``AdaRound``). Helper modules
of a pass start with ``_`` (or are a group's ``base``) and define no pass. The command line's choices
are the registry's. Each check is also run on a planted mismatch, to show it fails.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import qinject.passes
from qinject.app import cli
from qinject.compiler import registry
from qinject.compiler.registry import REGISTRY, RegisteredPass
from qinject.core.pass_manager import Pass
from qinject.passes.search import SEARCH_PASSES
from qinject.passes.sensitivity import SIGNALS
from qinject.passes.transforms.fold_constants import FoldConstants

PASSES_DIR = Path(__file__).resolve().parents[2] / "passes"
# A group registers one pipeline name; an option picks its member from the group's table.
GROUPS = {"sensitivity": ("metric", SIGNALS, "signal"), "search": ("algo", SEARCH_PASSES, "algorithm")}


def _word(text: str) -> str:
    return text.replace("-", "").replace("_", "").lower()


def _member_mismatches(group: str, name: str, cls: type[Pass]) -> list[str]:
    """``name`` (a signal or search) against its module, class, pass name and stored key."""
    _, _, key_attr = GROUPS[group]
    where, out = f"{group} {name!r}", []
    if cls.__module__ != f"qinject.passes.{group}.{name.replace('-', '_')}":
        out.append(f"{where}: module {cls.__module__}, expected qinject.passes.{group}.{name.replace('-', '_')}")
    if _word(cls.__name__) != _word(name):
        out.append(f"{where}: class {cls.__name__}")
    if cls.name != f"{group}-{name}":
        out.append(f"{where}: pass name {cls.name!r}, expected '{group}-{name}'")
    key = getattr(cls, key_attr)
    if key != cls.__module__.rsplit(".", 1)[-1] and key != name:
        out.append(f"{where}: {key_attr} {key!r}")
    return out


def name_mismatches(entries: dict[str, RegisteredPass], groups: dict = GROUPS) -> list[str]:
    """Every built-in registry entry whose name, module and class disagree (members of groups too)."""
    out = []
    for name, entry in entries.items():
        if entry.source != "built-in":
            continue
        cls = entry.pass_class
        if cls is None:
            out.append(f"pass {name!r}: the registry does not know its class")
            continue
        if name in groups:
            option, table, _ = groups[name]
            if cls.__module__ != f"qinject.passes.{name}.base":
                out.append(f"group {name!r}: base class {cls.__module__}.{cls.__name__}")
            offered = next((o.choices for o in entry.options if o.name == option), ())
            if tuple(offered) != tuple(table):
                out.append(f"group {name!r}: option {option!r} offers {offered}, its table {tuple(table)}")
            for member, member_cls in table.items():
                out += _member_mismatches(name, member, member_cls)
                if not issubclass(member_cls, cls):
                    out.append(f"{name} {member!r}: {member_cls.__name__} is not a {cls.__name__}")
            continue
        module = cls.__module__.rsplit(".", 1)[-1]
        if not cls.__module__.startswith("qinject.passes.") or module != name.replace("-", "_"):
            out.append(f"pass {name!r}: module {cls.__module__}")
        if _word(cls.__name__) != _word(name):
            out.append(f"pass {name!r}: class {cls.__name__}")
        if cls.name != name:
            out.append(f"pass {name!r}: its class says name = {cls.name!r}")
    return out


def module_mismatches(root: Path = PASSES_DIR) -> list[str]:
    """Modules of ``passes/<group>/``: a public one defines the pass it is named for; a helper (``_x``,
    a group's ``base``) defines none that is concrete."""
    out = []
    for group in sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists()):
        for info in pkgutil.iter_modules([str(root / group)]):
            module = importlib.import_module(f"qinject.passes.{group}.{info.name}")
            defined = [c for _, c in inspect.getmembers(module, inspect.isclass)
                       if issubclass(c, Pass) and c.__module__ == module.__name__]
            where = f"passes/{group}/{info.name}.py"
            if info.name.startswith("_") or info.name == "base":
                concrete = [c.__name__ for c in defined if "name" in vars(c)]
                if concrete:
                    out.append(f"{where}: a helper module defines pass(es) {concrete}")
                continue
            expected = info.name.replace("_", "-")
            if group in GROUPS:
                expected = f"{group}-{expected}"
            named = [c for c in defined if _word(c.__name__) == _word(info.name)]
            if len(named) != 1:
                out.append(f"{where}: no Pass class named for the module (defines {[c.__name__ for c in defined]})")
            elif named[0].name != expected:
                out.append(f"{where}: {named[0].__name__}.name is {named[0].name!r}, expected {expected!r}")
    return out


def _click_choices(command: click.Command, option: str) -> tuple[str, ...]:
    param = next(p for p in command.params if p.name == option)
    return tuple(param.type.choices)


def test_every_registered_pass_signal_and_search_is_one_name():
    assert name_mismatches(registry.passes()) == []


def test_every_pass_module_is_named_for_its_pass_and_helpers_define_none():
    assert module_mismatches() == []


def test_the_command_line_offers_the_registry_s_names():
    searches = registry.choices("search", "algo")
    signals = registry.choices("sensitivity", "metric")
    assert searches == tuple(SEARCH_PASSES) and signals == tuple(SIGNALS)
    assert _click_choices(cli.quantize, "algorithm") == searches
    assert _click_choices(cli.quantize, "signal") == signals
    assert _click_choices(cli.analyze, "metrics") == signals
    assert registry.choices("search", "signal") == signals


def test_qinject_passes_lists_the_registry():
    result = CliRunner().invoke(cli.cli, ["passes"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line and not line.startswith(" ")]
    assert listed == sorted(registry.passes())


# -- planted mismatches: each check fails on the mistake it is there to catch ------------------------------
def test_a_class_not_named_for_its_pass_is_caught():
    class FoldConstantWeights(FoldConstants):
        pass

    FoldConstantWeights.__module__ = FoldConstants.__module__
    entries = dict(REGISTRY)
    entries["fold-constants"] = RegisteredPass("fold-constants", lambda c, o: FoldConstantWeights(), (), "",
                                               pass_class=FoldConstantWeights)
    assert name_mismatches(entries) == ["pass 'fold-constants': class FoldConstantWeights"]


def test_a_pass_whose_name_attribute_differs_is_caught(monkeypatch):
    monkeypatch.setattr(FoldConstants, "name", "fold-constant-weights")
    assert "pass 'fold-constants': its class says name = 'fold-constant-weights'" in name_mismatches(REGISTRY)
    assert any("fold_constants.py" in m for m in module_mismatches())


def test_a_signal_named_unlike_its_module_and_class_is_caught():
    planted = {("bit-errors" if name == "bit-error" else name): cls for name, cls in SIGNALS.items()}
    found = name_mismatches({"sensitivity": REGISTRY["sensitivity"]},
                            {**GROUPS, "sensitivity": ("metric", planted, "signal")})
    assert any("offers" in m for m in found)  # the pipeline option no longer matches the table
    assert any("module qinject.passes.sensitivity.bit_error" in m for m in found)
    assert any("class BitError" in m for m in found)


def test_a_search_whose_pass_name_differs_is_caught(monkeypatch):
    ilp = SEARCH_PASSES["ilp"]
    monkeypatch.setattr(ilp, "name", "search-ilp-solver")
    found = name_mismatches({"search": REGISTRY["search"]})
    assert "search 'ilp': pass name 'search-ilp-solver', expected 'search-ilp'" in found


def test_a_helper_module_defining_a_pass_is_caught(tmp_path, monkeypatch):
    group = tmp_path / "planted"
    group.mkdir()
    (group / "__init__.py").write_text("")
    (group / "_helper.py").write_text(
        "from qinject.core.pass_manager import Pass\n\nclass Sneaky(Pass):\n    name = 'sneaky'\n")
    (group / "good_one.py").write_text(
        "from qinject.core.pass_manager import Pass\n\nclass GoodOne(Pass):\n    name = 'good-one'\n")
    (group / "bad_one.py").write_text(
        "from qinject.core.pass_manager import Pass\n\nclass WrongName(Pass):\n    name = 'bad-one'\n")
    monkeypatch.setattr(qinject.passes, "__path__", [str(tmp_path), *qinject.passes.__path__])
    try:
        found = module_mismatches(tmp_path)
    finally:
        for name in [m for m in sys.modules if m.startswith("qinject.passes.planted")]:
            del sys.modules[name]
    assert found == ["passes/planted/_helper.py: a helper module defines pass(es) ['Sneaky']",
                     "passes/planted/bad_one.py: no Pass class named for the module (defines ['WrongName'])"]


def test_cli_choices_that_drift_from_the_registry_are_caught():
    command = click.Command("q", params=[click.Option(["--search"], type=click.Choice(["bisection", "greedy"]))])
    with pytest.raises(AssertionError):
        assert _click_choices(command, "search") == registry.choices("search", "algo")
