"""Textual pass pipelines, MLIR style: ``calibrate{method=mse},sensitivity{metric=hessian},
search{algo=bisection,max-drop=1%},insert-qdq``.

Grammar::

    pipeline := pass ("," pass)*
    pass     := NAME ["{" [option ("," option)*] "}"]
    option   := NAME "=" VALUE
    NAME     := [a-z][a-z0-9-]*
    VALUE    := a run of characters other than , { } = " and space | "a quoted string" (\\" escapes)

Whitespace between tokens is ignored. ``parse`` gives a ``Pipeline`` of ``PassSpec`` (name and raw
option strings, in order); ``str()`` prints it back in canonical form, so
``str(parse(text)) == text`` for canonical text and ``parse(str(p)) == p`` always. Malformed text
raises ``PipelineSyntaxError`` naming the column (1-based) and the expected token. Which passes exist
and what their options mean is the registry's business (``qinject.registry``), not the parser's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qinject.core.errors import QinjectError

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_BARE = re.compile(r'[^,{}="\s]+')


class PipelineSyntaxError(QinjectError):
    """Malformed pipeline text; ``column`` is 1-based."""

    def __init__(self, text: str, column: int, expected: str, found: str) -> None:
        self.text, self.column, self.expected, self.found = text, column, expected, found
        super().__init__(f"pipeline column {column}: expected {expected}, found {found}")


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline as written: its name and its options (raw strings, in order)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_quote(v)}" for k, v in self.options) + "}"


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)


def parse(text: str) -> Pipeline:
    """Parse pipeline text (see the module docstring)."""
    return _Parser(text).pipeline()


def _quote(value: str) -> str:
    if value and _BARE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, expected: str) -> PipelineSyntaxError:
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end of the text"
        return PipelineSyntaxError(self.text, self.pos + 1, expected, found)

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.error(what)
        self.pos += 1

    def name(self, what: str) -> str:
        self.skip()
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.error(what)
        self.pos = match.end()
        return match.group()

    def value(self, key: str) -> str:
        self.skip()
        if self.peek() == '"':
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                raise self.error(f"a closing '\"' for the value of option {key!r}")
            self.pos += 1
            return "".join(out)
        match = _BARE.match(self.text, self.pos)
        if not match:
            raise self.error(f"a value for option {key!r}")
        self.pos = match.end()
        return match.group()

    def pipeline(self) -> Pipeline:
        if not self.text.strip():
            raise self.error("a pass name")
        passes = [self.pass_spec()]
        while self.peek() == ",":
            self.pos += 1
            passes.append(self.pass_spec())
        if self.peek():
            raise self.error("',' between passes or the end of the pipeline")
        return Pipeline(tuple(passes))

    def pass_spec(self) -> PassSpec:
        name = self.name("a pass name")
        options: list[tuple[str, str]] = []
        if self.peek() == "{":
            self.pos += 1
            if self.peek() != "}":
                while True:
                    key = self.name(f"an option name for pass {name!r}")
                    if any(k == key for k, _ in options):
                        self.pos -= len(key)
                        raise self.error(f"an option of {name!r} not given before ({key!r} is repeated)")
                    self.expect("=", f"'=' after option {key!r}")
                    options.append((key, self.value(key)))
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            self.expect("}", f"',' or '}}' in the options of pass {name!r}")
        return PassSpec(name, tuple(options))
