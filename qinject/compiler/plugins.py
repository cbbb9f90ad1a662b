"""Third-party extensions, found through Python entry points (no fork needed):

- ``qinject.passes``: a ``Pass`` subclass with a ``name`` (its pipeline name), ``options`` (a tuple of
  ``qinject.registry.Option``) and a docstring; built as ``cls(**options)`` (plus ``context=`` if
  its ``__init__`` takes it).
- ``qinject.op_facts``: a dict ``{(domain, op_type): qinject.op_facts.OpFact}``, or a function
  returning one: new quantizable ops (with their weight input and channel axis) or other op facts.
- ``qinject.targets``: a latency table: a path to its JSON file, a dict in the table format, or a
  function returning either; selectable by its ``target`` name like the built-ins.

A package declares them in its ``pyproject.toml``, e.g.::

    [project.entry-points."qinject.passes"]
    my-pass = "my_package.passes:MyPass"

``load()`` reads every group once per process; an entry point that fails to load or gives the
wrong kind of object is a one-line ``PluginError`` naming it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass
from qinject.cost.latency_table import PLUGIN_TARGETS, LatencyTable, register_target

_loaded = False
TARGETS = PLUGIN_TARGETS  # target name -> LatencyTable from plugins (the cost layer's table)
PASSES: list[tuple[type[Pass], str]] = []  # plugin pass classes and their sources, for the registry


class PluginError(QinjectError):
    """A plugin entry point could not be loaded or gave the wrong kind of object."""


def entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda e: e.name)


def _load(ep: metadata.EntryPoint) -> Any:
    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001  (any import failure of a third-party package)
        raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
    return obj


def _source(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"plugin {dist.name}" if dist is not None else f"plugin {ep.value}"


def load() -> None:
    """Load every plugin (once per process): op facts join ``op_facts``, targets the cost layer's
    ``PLUGIN_TARGETS``, pass classes ``PASSES`` (``registry.passes`` registers them)."""
    global _loaded
    if _loaded:
        return
    _loaded = True

    for ep in entry_points("qinject.passes"):
        cls = _load(ep)
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PluginError(f"plugin pass {ep.name!r} ({ep.value}) is not a qinject Pass subclass")
        PASSES.append((cls, _source(ep)))
    for ep in entry_points("qinject.op_facts"):
        facts = _load(ep)
        facts = facts() if callable(facts) else facts
        if not isinstance(facts, dict) or not all(isinstance(k, tuple) and len(k) == 2 and
                                                  isinstance(v, op_facts.OpFact) for k, v in facts.items()):
            raise PluginError(f"plugin op facts {ep.name!r} ({ep.value}) must map (domain, op_type) to OpFact")
        op_facts.register_facts(facts)
    for ep in entry_points("qinject.targets"):
        for table in _target(ep).values():
            register_target(table)


def _target(ep: metadata.EntryPoint) -> dict[str, Any]:


    raw = _load(ep)
    raw = raw() if callable(raw) and not isinstance(raw, LatencyTable) else raw
    if isinstance(raw, LatencyTable):
        table = raw
    elif isinstance(raw, (str, Path)):
        table = LatencyTable.load(raw)
    elif isinstance(raw, dict):
        table = LatencyTable.from_dict(raw, f"plugin target {ep.name!r}")
    else:
        raise PluginError(f"plugin target {ep.name!r} ({ep.value}) is not a latency table, path or dict")
    return {table.target: table}
