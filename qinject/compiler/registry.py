"""The pass registry: every pass a pipeline string can name, with its typed options.

Built-in passes register here under stable names; third-party passes arrive through the
``qinject.passes`` entry-point group (``qinject.plugins``). ``build`` turns a parsed ``Pipeline``
into pass instances: option names are checked against the pass's declared options and values
converted to their types, with one clear error per mistake. Passes that need data or a target
(calibration, sensitivity, search) take it from the ``Context`` the caller supplies (the command
line's ``--calib``, ``--eval``, ``--target``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qinject.compiler import plugins
from qinject.compiler.pipeline import Pipeline, PipelineSyntaxError, parse
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import Pass


class PipelineError(QinjectError):
    """A pipeline names an unknown pass or option, or gives an option a bad value."""


@dataclass(frozen=True)
class Option:
    """A typed option of a registered pass."""

    name: str
    type: type = str  # str, int, float or bool
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()

    def convert(self, pass_name: str, raw: str) -> Any:
        where = f"option {self.name!r} of pass {pass_name!r}"
        if self.choices and raw not in self.choices:
            raise PipelineError(f"{where} must be one of {', '.join(self.choices)}, got {raw!r}")
        if self.type is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise PipelineError(f"{where} must be true or false, got {raw!r}")
            return raw.lower() in ("true", "1", "yes")
        try:
            return self.type(raw)
        except ValueError:
            raise PipelineError(f"{where} must be {self.type.__name__}, got {raw!r}") from None

    def describe(self) -> str:
        kind = "|".join(self.choices) if self.choices else self.type.__name__
        shown = str(self.default).lower() if self.type is bool else self.default
        default = "" if self.default is None else f" = {shown}"
        return f"{self.name}: {kind}{default}" + (f"  ({self.help})" if self.help else "")


@dataclass
class Context:
    """What passes that need data or a target take from the caller."""

    calib: object = None
    eval_data: object = None
    target: str = "local-cpu"
    latency_batch: int = 1
    workers: int | None = None
    executor: str | None = None  # where sensitivity and search evaluations run (``Executor``)
    progress: bool = True
    metric: Callable[..., float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredPass:
    """A pipeline name, how to build its pass, and the class it builds (for a group such as
    ``search``, the group's base class: an option picks the member)."""

    name: str
    factory: Callable[[Context, dict[str, Any]], Pass]
    options: tuple[Option, ...]
    doc: str
    source: str = "built-in"
    pass_class: type[Pass] | None = None

    def build(self, context: Context, raw: dict[str, str]) -> Pass:
        known = {o.name: o for o in self.options}
        unknown = [k for k in raw if k not in known]
        if unknown:
            names = ", ".join(known) or "none"
            raise PipelineError(f"pass {self.name!r} has no option {unknown[0]!r} (its options: {names})")
        values = {o.name: o.default for o in self.options}
        values.update({k: known[k].convert(self.name, v) for k, v in raw.items()})
        return self.factory(context, values)


REGISTRY: dict[str, RegisteredPass] = {}


def register(name: str, options: tuple[Option, ...] = (), doc: str = "", source: str = "built-in",
             pass_class: type[Pass] | None = None
             ) -> Callable[[Callable[[Context, dict[str, Any]], Pass]], Callable[[Context, dict[str, Any]], Pass]]:
    """Decorator registering ``factory(context, options) -> Pass`` under ``name``; ``pass_class`` is
    the class it builds (whose ``name``, module and class name say ``name``: tests/compiler/test_names.py)."""
    def wrap(factory: Callable[[Context, dict[str, Any]], Pass]) -> Callable[[Context, dict[str, Any]], Pass]:
        if name in REGISTRY and REGISTRY[name].source != source:
            raise QinjectError(f"pass name {name!r} is already registered by {REGISTRY[name].source}")
        REGISTRY[name] = RegisteredPass(name, factory, tuple(options), inspect.cleandoc(doc or factory.__doc__ or ""),
                                        source, pass_class)
        return factory
    return wrap


def register_pass_class(cls: type[Pass], source: str) -> None:
    """Register a plugin's ``Pass`` subclass: its ``name``, its ``options`` (a tuple of ``Option``)
    and its docstring; it is built as ``cls(**options)``, plus ``context=`` if its ``__init__``
    takes one."""
    options = tuple(getattr(cls, "options", ()))
    takes_context = "context" in inspect.signature(cls.__init__).parameters

    def factory(context: Context, values: dict[str, Any]) -> Pass:
        kwargs = {k.replace("-", "_"): v for k, v in values.items()}
        return cls(**kwargs, context=context) if takes_context else cls(**kwargs)

    register(cls.name, options, cls.__doc__ or "", source, cls)(factory)


def passes() -> dict[str, RegisteredPass]:
    """Every registered pass, built-ins (registered when ``qinject.compiler`` is imported) and
    plugins, by name."""
    plugins.load()
    for cls, source in plugins.PASSES:
        if REGISTRY.get(cls.name, None) is None or REGISTRY[cls.name].source != source:
            register_pass_class(cls, source)
    return REGISTRY


def build(pipeline: Pipeline | str, context: Context | None = None) -> list[Pass]:
    """The pass instances of a pipeline (text or parsed)."""
    if isinstance(pipeline, str):
        pipeline = parse(pipeline)
    registry, context = passes(), context or Context()
    out = []
    for spec in pipeline.passes:
        if spec.name not in registry:
            raise PipelineError(f"unknown pass {spec.name!r} (known: {', '.join(sorted(registry))})")
        out.append(registry[spec.name].build(context, spec.option_dict()))
    return out


def choices(name: str, option: str) -> tuple[str, ...]:
    """The values option ``option`` of pass ``name`` accepts (the command line offers the same:
    ``--search`` is ``search``'s ``algo``, ``--signal`` and ``--metric`` are ``sensitivity``'s ``metric``)."""
    return next(o.choices for o in REGISTRY[name].options if o.name == option)


def describe(name: str) -> str:
    """One pass's name, source, options and docstring (what ``qinject passes`` prints)."""
    entry = passes()[name]
    lines = [f"{entry.name}" + ("" if entry.source == "built-in" else f"  [{entry.source}]")]
    lines += [f"    {o.describe()}" for o in entry.options] or ["    (no options)"]
    lines += ["    " + line if line else "" for line in entry.doc.splitlines()]
    return "\n".join(lines)


__all__ = ["REGISTRY", "Context", "Option", "PipelineError", "PipelineSyntaxError", "RegisteredPass", "build",
           "choices", "describe", "passes", "register", "register_pass_class"]
