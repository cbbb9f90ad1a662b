"""Per-node policy as an ordered list of frozen rules: the first rule matching a node decides it.

A rule matches on a regular expression over the node name (``re.fullmatch``) and/or a set of op
types, and says what the node gets: weight and activation bits, per-channel or not, or ``skip``
(leave it float). Nodes no rule matches get the ``default`` (W8A8 unless said otherwise, or float).
Rules that matched no node are reported, since a rule that silently does nothing is usually a typo.

A search writes its plan as rules (one exact-name rule per node, in graph order), so a reviewed plan
can be edited by hand and re-applied exactly (``qinject quantize --rules``); given to a search, rules
*pin* the nodes they match: the search leaves them as the rules say and chooses the rest.

File format (version 1)::

    {"format": "qinject-rules", "version": 1, "default": {"weights": 8, "activations": 8},
     "rules": [{"name": "conv_.*", "op_types": ["Conv"], "weights": 4, "activations": 8},
               {"name": "fc2", "skip": true, "comment": "keep the classifier in float"}]}
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from qinject.core import ir as qir
from qinject.core.errors import PlanError
from qinject.core.jsonfile import read_json, write_json
from qinject.core.plan import STATIC, WEIGHT_ONLY, NodeQuant, Plan

FORMAT, VERSION = "qinject-rules", 1
_FIELDS = ("name", "op_types", "weights", "activations", "per_channel", "mode", "block_size", "skip", "comment")


@dataclass(frozen=True)
class Rule:
    """One policy line; ``None`` fields do not constrain (matching) or take the default (choice)."""

    name: str | None = None
    op_types: tuple[str, ...] = ()
    weights: int | None = None
    activations: int | None = None
    per_channel: bool | None = None
    mode: str | None = None
    block_size: int | None = None
    skip: bool = False
    comment: str = ""

    def __post_init__(self) -> None:
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as exc:
                raise PlanError(f"rule name pattern {self.name!r} is not a regular expression: {exc}") from None
        if self.skip and any(v is not None for v in (self.weights, self.activations, self.mode, self.block_size)):
            raise PlanError(f"rule {self.describe()} both skips the node and sets how it is quantized")
        for what in ("weights", "activations"):
            bits = getattr(self, what)
            if bits is not None and (isinstance(bits, bool) or bits not in (4, 8, 16)):
                raise PlanError(f"rule {self.describe()}: {what} must be 4, 8 or 16, got {bits!r}")
        if not self.skip:
            try:
                self.choice(None)  # the mode's own constraints (dynamic: 8 bits), said once here
            except PlanError as exc:
                raise PlanError(f"rule {self.describe()}: {exc}") from None

    def matches(self, node: ir.Node) -> bool:
        if self.name is not None and not re.fullmatch(self.name, node.name):
            return False
        return not self.op_types or node.op_type in self.op_types

    def choice(self, default: NodeQuant | None) -> NodeQuant | None:
        if self.skip:
            return None
        given = {f: getattr(self, f) for f in ("weights", "activations", "per_channel", "mode", "block_size")
                 if getattr(self, f) is not None}
        return dataclasses.replace(default or NodeQuant(), **given)

    def describe(self) -> str:
        parts = [f"name={self.name!r}"] if self.name is not None else []
        parts += [f"op_types={list(self.op_types)}"] if self.op_types else []
        return "{" + ", ".join(parts or ["any node"]) + "}"

    def to_dict(self) -> dict:
        """The fields that differ from their defaults (so a rule file stays short)."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if f.name == "op_types" else value
        return out


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...] = ()
    default: NodeQuant | None = field(default_factory=NodeQuant)

    def resolve(self, model: ir.Model) -> tuple[dict[str, NodeQuant | None], dict[str, int | None], list[Rule]]:
        """(choice per quantizable node, index of the rule that decided it (None: the default),
        the rules that matched no node)."""
        choices, decided_by, used = {}, {}, set()
        for node in qir.quantizable_nodes(model):
            index = next((i for i, r in enumerate(self.rules) if r.matches(node)), None)
            decided_by[node.name] = index
            if index is None:
                choices[node.name] = self.default
            else:
                used.add(index)
                choices[node.name] = self.rules[index].choice(self.default)
        unmatched = [r for i, r in enumerate(self.rules) if i not in used]
        return choices, decided_by, unmatched

    def plan(self, model: ir.Model) -> tuple[Plan, list[Rule]]:
        """The plan the rules give ``model``, and the rules that matched nothing."""
        choices, _, unmatched = self.resolve(model)
        nodes = {n: c for n, c in choices.items() if c != self.default}
        return Plan(self.default, nodes), unmatched

    def pins(self, model: ir.Model) -> tuple[dict[str, NodeQuant | None], list[Rule]]:
        """For a search: the choice (None: float) of every node a rule matches, and the rules that
        matched nothing."""
        choices, decided_by, unmatched = self.resolve(model)
        return {n: c for n, c in choices.items() if decided_by[n] is not None}, unmatched

    @classmethod
    def from_plan(cls, plan: Plan, nodes: Iterable[str]) -> Rules:
        """One exact-name rule per node, in the order given: the plan, written as reviewable rules."""
        rules = []
        for name in nodes:
            choice = plan.choice(name)
            if choice is None:
                rules.append(Rule(name=re.escape(name), skip=True))
            else:
                rules.append(Rule(name=re.escape(name), weights=choice.weights, activations=choice.activations,
                                  per_channel=None if choice.per_channel else False,
                                  mode=None if choice.mode == STATIC else choice.mode,
                                  block_size=choice.block_size if choice.mode == WEIGHT_ONLY else None))
        return cls(tuple(rules), None)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        default = "float" if self.default is None else {"weights": self.default.weights,
                                                          "activations": self.default.activations}
        if self.default is not None and self.default.mode != STATIC:
            default.update(mode=self.default.mode, block_size=self.default.block_size)
        return {"format": FORMAT, "version": VERSION, "default": default, "rules": [r.to_dict() for r in self.rules]}

    def save(self, path: str | os.PathLike) -> Path:

        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: object, source: str = "rules") -> Rules:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{source}: not a qinject rules file (expected 'format': {FORMAT!r})")
        if data.get("version") != VERSION:
            raise PlanError(f"{source}: version {data.get('version')!r} is not supported (expected {VERSION})")
        unknown = set(data) - {"format", "version", "default", "rules"}
        if unknown:
            raise PlanError(f"{source}: unknown key(s) {sorted(unknown)}")
        default_raw = data.get("default", {})
        if default_raw == "float":
            default = None
        elif isinstance(default_raw, dict):
            try:
                default = NodeQuant(**default_raw)
            except TypeError as exc:
                raise PlanError(f"{source}: bad default: {exc}") from None
        else:
            raise PlanError(f"{source}: 'default' must be an object or \"float\"")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list):
            raise PlanError(f"{source}: 'rules' must be a list")
        rules = []
        for i, raw in enumerate(raw_rules):
            if not isinstance(raw, dict) or set(raw) - set(_FIELDS):
                extra = sorted(set(raw) - set(_FIELDS)) if isinstance(raw, dict) else raw
                raise PlanError(f"{source}: rule {i}: unknown field(s) {extra}")
            fields = dict(raw)
            if "op_types" in fields:
                if not isinstance(fields["op_types"], list):
                    raise PlanError(f"{source}: rule {i}: 'op_types' must be a list of op type names")
                fields["op_types"] = tuple(fields["op_types"])
            try:
                rules.append(Rule(**fields))
            except PlanError as exc:
                raise PlanError(f"{source}: rule {i}: {exc}") from None
        return cls(tuple(rules), default)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Rules:
        return cls.from_dict(read_json(path, "rules", PlanError), str(path))


def describe_unmatched(unmatched: Sequence[Rule]) -> str:
    return "rule(s) matched no node: " + ", ".join(r.describe() for r in unmatched)
