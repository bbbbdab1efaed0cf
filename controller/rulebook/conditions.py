"""Conditions: parsing ``when``, leaf semantics, and the boolean structure both matchers share.

Every leaf test (a path, an operator, a literal) is computed in Python, because strict types,
regular expressions and missing fields are exactly what durable-rules gets wrong. ``not`` is
pushed down to the leaves while parsing (De Morgan), so a condition is a tree of ``AllOf`` /
``AnyOf`` over literals "leaf N is true/false". That tree is then flattened into a small
disjunction of conjunctions (``Term``s): each term becomes one durable rule that only tests
booleans, and the reference matcher evaluates the very same terms.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from controller.models.events import EVENT_TYPES
from controller.rulebook.fields import FieldType, field_type, unknown_field_message
from controller.rulebook.source import Problems, SourceFile, did_you_mean, kind_of

OPERATORS: tuple[str, ...] = (
    "eq",
    "ne",
    "in",
    "not_in",
    "gt",
    "gte",
    "lt",
    "lte",
    "contains",
    "matches",
    "exists",
)
GROUPS: tuple[str, ...] = ("all", "any", "not")

# A rule whose condition expands to more terms than this has its widest ``any`` groups
# folded into one computed leaf each: durable-rules fires once per satisfied alternative and
# counts every alternative against its per-ruleset limits, so wide disjunctions stay in Python.
MAX_TERMS = 8

_MISSING = object()


# --------------------------------------------------------------------------- leaf semantics


def lookup(facts: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` in nested ``facts``; None when absent or not a mapping."""
    current: Any = facts
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return None
        current = current.get(part, None)
        if current is None:
            return None
    return current


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def strict_equal(left: Any, right: Any) -> bool:
    """Equality without coercion: text never equals a number, a boolean is not a number."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if _is_number(left) and _is_number(right):
        return bool(left == right)
    if isinstance(left, str) and isinstance(right, str):
        return left == right
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        return len(left) == len(right) and all(
            strict_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return set(left) == set(right) and all(strict_equal(left[k], right[k]) for k in left)
    return False


def _ordered(actual: Any, expected: Any) -> bool:
    """Whether two values can be ordered: both numbers, or both text."""
    return (_is_number(actual) and _is_number(expected)) or (
        isinstance(actual, str) and isinstance(expected, str)
    )


@dataclass(frozen=True)
class PathLeaf:
    """One test of one field: ``path op value``."""

    path: str
    op: str
    value: Any
    regex: re.Pattern[str] | None = None

    def test(self, facts: Mapping[str, Any]) -> bool:
        """Evaluate the test on ``facts``; a missing or null field fails all but exists:false."""
        actual = lookup(facts, self.path)
        if self.op == "exists":
            return (actual is not None) is bool(self.value)
        if actual is None:
            return False
        op, value = self.op, self.value
        if op == "eq":
            return strict_equal(actual, value)
        if op == "ne":
            return not strict_equal(actual, value)
        if op == "in":
            return any(strict_equal(actual, item) for item in value)
        if op == "not_in":
            return not any(strict_equal(actual, item) for item in value)
        if op in ("gt", "gte", "lt", "lte"):
            if not _ordered(actual, value):
                return False
            if op == "gt":
                return bool(actual > value)
            if op == "gte":
                return bool(actual >= value)
            if op == "lt":
                return bool(actual < value)
            return bool(actual <= value)
        if op == "contains":
            if isinstance(actual, str):
                return isinstance(value, str) and value in actual
            if isinstance(actual, (list, tuple)):
                return any(strict_equal(item, value) for item in actual)
            return False
        if op == "matches":
            assert self.regex is not None
            return isinstance(actual, str) and self.regex.search(actual) is not None
        raise AssertionError(f"unknown operator {op}")

    def describe(self) -> str:
        """Human-readable form, for explanations and debugging."""
        return f"{self.path} {self.op} {json.dumps(self.value)}"


# --------------------------------------------------------------------------- boolean structure


@dataclass(frozen=True)
class Lit:
    """Leaf ``leaf`` must be ``positive`` (true) or not (false)."""

    leaf: int
    positive: bool


@dataclass(frozen=True)
class AllOf:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Node, ...]


Node = Lit | AllOf | AnyOf
Term = tuple[Lit, ...]


@dataclass(frozen=True)
class CompositeLeaf:
    """A folded ``any`` group, computed in Python from other leaves (see MAX_TERMS)."""

    node: Node

    def test_values(self, values: Mapping[int, bool]) -> bool:
        """Evaluate the folded group over already computed leaf values."""
        return evaluate(self.node, values)


Leaf = PathLeaf | CompositeLeaf


def evaluate(node: Node, values: Mapping[int, bool]) -> bool:
    """Evaluate a condition tree over leaf values."""
    if isinstance(node, Lit):
        return values[node.leaf] == node.positive
    if isinstance(node, AllOf):
        return all(evaluate(item, values) for item in node.items)
    return any(evaluate(item, values) for item in node.items)


def leaves_of(node: Node) -> set[int]:
    """Every leaf id a tree refers to."""
    if isinstance(node, Lit):
        return {node.leaf}
    found: set[int] = set()
    for item in node.items:
        found |= leaves_of(item)
    return found


class LeafTable:
    """All leaves of a rulebook, deduplicated by (path, operator, value)."""

    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._index: dict[tuple[str, ...], int] = {}
        self._deps: list[frozenset[int]] = []

    def path_leaf(self, path: str, op: str, value: Any, regex: re.Pattern[str] | None) -> int:
        """The id of the leaf ``path op value``, adding it if new."""
        key = ("path", path, op, json.dumps(value, sort_keys=True))
        return self._add(key, PathLeaf(path, op, value, regex), frozenset())

    def composite(self, node: Node) -> int:
        """The id of a computed leaf standing for ``node``."""
        key = ("composite", repr(node))
        deps = leaves_of(node)
        closure = set(deps)
        for dep in deps:
            closure |= self._deps[dep]
        return self._add(key, CompositeLeaf(node), frozenset(closure))

    def _add(self, key: tuple[str, ...], leaf: Leaf, deps: frozenset[int]) -> int:
        found = self._index.get(key)
        if found is not None:
            return found
        self.leaves.append(leaf)
        self._deps.append(deps)
        self._index[key] = len(self.leaves) - 1
        return len(self.leaves) - 1

    def closure(self, ids: set[int]) -> tuple[int, ...]:
        """``ids`` plus every leaf they are computed from, in evaluation order."""
        needed = set(ids)
        for leaf_id in ids:
            needed |= self._deps[leaf_id]
        return tuple(sorted(needed))

    def compute(self, ids: Sequence[int], facts: Mapping[str, Any]) -> dict[int, bool]:
        """Values of ``ids`` (from ``closure``: dependencies come first) for ``facts``."""
        values: dict[int, bool] = {}
        for leaf_id in ids:
            leaf = self.leaves[leaf_id]
            if isinstance(leaf, PathLeaf):
                values[leaf_id] = leaf.test(facts)
            else:
                values[leaf_id] = leaf.test_values(values)
        return values


def term_count(node: Node) -> int:
    """How many conjunctions ``node`` expands to."""
    if isinstance(node, Lit):
        return 1
    if isinstance(node, AnyOf):
        return sum(term_count(item) for item in node.items)
    return math.prod(term_count(item) for item in node.items)


def bound_terms(node: Node, table: LeafTable, limit: int = MAX_TERMS) -> Node:
    """Fold the widest sub-groups into computed leaves until ``node`` has <= ``limit`` terms."""
    if isinstance(node, Lit) or term_count(node) <= limit:
        return node
    items = [bound_terms(item, table, limit) for item in node.items]
    combine = sum if isinstance(node, AnyOf) else math.prod
    while combine(term_count(item) for item in items) > limit:
        widest = max(range(len(items)), key=lambda i: term_count(items[i]))
        if term_count(items[widest]) == 1:
            return Lit(table.composite(type(node)(tuple(items))), True)
        items[widest] = Lit(table.composite(items[widest]), True)
    return type(node)(tuple(items))


def to_terms(node: Node) -> tuple[Term, ...]:
    """The disjunction of conjunctions equal to ``node``, minus contradictions and repeats."""
    if isinstance(node, Lit):
        raw: list[Term] = [(node,)]
    elif isinstance(node, AnyOf):
        raw = [term for item in node.items for term in to_terms(item)]
    else:
        raw = [
            tuple(lit for part in combo for lit in part)
            for combo in itertools.product(*(to_terms(item) for item in node.items))
        ]
    result: list[Term] = []
    seen: set[frozenset[Lit]] = set()
    for term in raw:
        unique = tuple(dict.fromkeys(term))
        polarity: dict[int, bool] = {}
        if any(polarity.setdefault(lit.leaf, lit.positive) != lit.positive for lit in unique):
            continue
        key = frozenset(unique)
        if key not in seen:
            seen.add(key)
            result.append(unique)
    return tuple(result)


# --------------------------------------------------------------------------- parsing ``when``


def _type_ok(declared: FieldType, value: Any) -> bool:
    """Whether a scalar literal fits a declared scalar field type."""
    if declared == "any":
        return isinstance(value, (str, bool)) or _is_number(value)
    if declared == "str":
        return isinstance(value, str)
    if declared == "num":
        return _is_number(value)
    if declared == "bool":
        return isinstance(value, bool)
    return False


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, bool)) or (_is_number(value) and math.isfinite(value))


class ConditionParser:
    """Turns the ``when`` mapping of one rule into events and a negation-free tree."""

    def __init__(self, table: LeafTable, problems: Problems) -> None:
        self.table = table
        self.problems = problems

    def parse_when(
        self, src: SourceFile, node: yaml.Node, rule: str
    ) -> tuple[tuple[str, ...], Node] | None:
        """Events and condition of a ``when`` block; None (with problems recorded) if invalid."""
        if not isinstance(node, yaml.MappingNode):
            self.problems.add(src.where(node), rule, "'when' must be a mapping")
            return None
        before = len(self.problems.messages)
        events: tuple[str, ...] = ()
        items: list[Node] = []
        seen: set[str] = set()
        event_node: yaml.Node | None = None
        for key_node, value_node in node.value:
            key = src.value(key_node)
            if not isinstance(key, str):
                self.problems.add(
                    src.where(key_node), rule, f"condition key must be text, not {kind_of(key)}"
                )
                continue
            if key in seen:
                self.problems.add(src.where(key_node), rule, f"'{key}' appears twice in 'when'")
                continue
            seen.add(key)
            if key == "event":
                event_node = key_node
                events = self._events(src, value_node, rule)
            else:
                parsed = self._entry(src, key_node, key, value_node, rule, negate=False)
                if parsed is not None:
                    items.append(parsed)
        if event_node is None:
            self.problems.add(src.where(node), rule, "'when' needs an 'event' (one type or a list)")
        if len(self.problems.messages) != before:
            return None
        return events, AllOf(tuple(items))

    def _events(self, src: SourceFile, node: yaml.Node, rule: str) -> tuple[str, ...]:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if isinstance(node, yaml.SequenceNode) and not nodes:
            self.problems.add(src.where(node), rule, "'event' list is empty")
        found: list[str] = []
        for item in nodes:
            name = src.value(item) if not isinstance(item, yaml.MappingNode) else None
            if not isinstance(name, str):
                self.problems.add(
                    src.where(item), rule, "'event' must be an event type or a list of them"
                )
            elif name not in EVENT_TYPES:
                self.problems.add(
                    src.where(item),
                    rule,
                    f"unknown event type '{name}'" + did_you_mean(name, EVENT_TYPES),
                )
            elif name not in found:
                found.append(name)
        return tuple(found)

    def _cond(self, src: SourceFile, node: yaml.Node, rule: str, negate: bool) -> Node | None:
        """A ``<cond>``: a mapping with exactly one key."""
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.problems.add(
                src.where(node),
                rule,
                "a condition must be a mapping with exactly one key (all, any, not or a field)",
            )
            return None
        key_node, value_node = node.value[0]
        key = src.value(key_node)
        if not isinstance(key, str):
            self.problems.add(
                src.where(key_node), rule, f"condition key must be text, not {kind_of(key)}"
            )
            return None
        return self._entry(src, key_node, key, value_node, rule, negate)

    def _entry(
        self,
        src: SourceFile,
        key_node: yaml.Node,
        key: str,
        value_node: yaml.Node,
        rule: str,
        negate: bool,
    ) -> Node | None:
        if key in ("all", "any"):
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                self.problems.add(
                    src.where(value_node), rule, f"'{key}' needs a non-empty list of conditions"
                )
                return None
            parts = [self._cond(src, item, rule, negate) for item in value_node.value]
            if any(part is None for part in parts):
                return None
            items = tuple(part for part in parts if part is not None)
            # De Morgan: not(all) = any(not), not(any) = all(not)
            conjunctive = (key == "all") != negate
            return AllOf(items) if conjunctive else AnyOf(items)
        if key == "not":
            return self._cond(src, value_node, rule, not negate)
        return self._field(src, key_node, key, value_node, rule, negate)

    def _field(
        self,
        src: SourceFile,
        key_node: yaml.Node,
        path: str,
        value_node: yaml.Node,
        rule: str,
        negate: bool,
    ) -> Node | None:
        declared = field_type(path)
        if declared is None:
            hint = "" if "." in path else did_you_mean(path, GROUPS)
            message = (
                unknown_field_message(path) if not hint else f"unknown condition '{path}'{hint}"
            )
            self.problems.add(src.where(key_node), rule, message)
            return None
        if isinstance(value_node, yaml.MappingNode):
            if len(value_node.value) != 1:
                self.problems.add(
                    src.where(value_node),
                    rule,
                    f"'{path}' needs exactly one operator ({', '.join(OPERATORS)})",
                )
                return None
            op_node, literal_node = value_node.value[0]
            op = src.value(op_node)
            if not isinstance(op, str) or op not in OPERATORS:
                self.problems.add(
                    src.where(op_node),
                    rule,
                    f"unknown operator '{op}'" + did_you_mean(str(op), OPERATORS),
                )
                return None
        else:
            op, literal_node = "eq", value_node
        literal = src.value(literal_node)
        problem = _literal_problem(path, declared, op, literal)
        if problem is not None:
            self.problems.add(src.where(literal_node), rule, problem)
            return None
        regex: re.Pattern[str] | None = None
        if op == "matches":
            try:
                regex = re.compile(literal)
            except re.error as error:
                self.problems.add(
                    src.where(literal_node), rule, f"invalid regular expression: {error}"
                )
                return None
        leaf = self.table.path_leaf(path, op, literal, regex)
        return Lit(leaf, not negate)


def _literal_problem(path: str, declared: FieldType, op: str, literal: Any) -> str | None:
    """Why ``literal`` cannot be compared with field ``path`` by ``op``, or None if it can."""
    described = f"'{path}' is {_type_name(declared)}"
    if op == "exists":
        return None if isinstance(literal, bool) else "'exists' takes true or false"
    if literal is None:
        return "null cannot be compared; use 'exists: false'"
    if op in ("eq", "ne"):
        if isinstance(literal, list):
            if declared not in ("list", "any"):
                return f"{described}, not a list (use 'in' to test several values)"
            if not all(_scalar(item) for item in literal):
                return "a list literal may only hold text, numbers and booleans"
            return None
        if declared in ("list", "map"):
            return (
                f"{described}; '{op}' needs a list"
                if declared == "list"
                else (f"{described}; test its keys (e.g. '{path}.name') or use 'exists'")
            )
        if not _scalar(literal) or not _type_ok(declared, literal):
            return (
                f"{described}, but the value is {kind_of(literal)}{_quote_hint(declared, literal)}"
            )
        return None
    if op in ("in", "not_in"):
        if not isinstance(literal, list) or not literal:
            return f"'{op}' needs a non-empty list of values"
        if declared in ("list", "map"):
            return f"{described}; '{op}' compares a single value"
        for item in literal:
            if not _scalar(item) or not _type_ok(declared, item):
                return f"{described}, but the list holds {kind_of(item)}"
        return None
    if op in ("gt", "gte", "lt", "lte"):
        if declared == "num" and _is_number(literal) and math.isfinite(literal):
            return None
        if declared == "str" and isinstance(literal, str):
            return None
        if declared == "any" and (
            isinstance(literal, str) or (_is_number(literal) and math.isfinite(literal))
        ):
            return None
        return (
            f"{described}; '{op}' needs a number (or text for a text field), not {kind_of(literal)}"
        )
    if op == "contains":
        if declared == "str":
            return None if isinstance(literal, str) else f"{described}; 'contains' needs text"
        if declared in ("list", "any"):
            return None if _scalar(literal) else "'contains' needs one text, number or boolean"
        return f"{described}; 'contains' works on text and lists"
    if op == "matches":
        if declared not in ("str", "any"):
            return f"{described}; 'matches' works on text"
        return None if isinstance(literal, str) else "'matches' needs a regular expression as text"
    raise AssertionError(op)


def _type_name(declared: FieldType) -> str:
    return {
        "str": "text",
        "num": "a number",
        "bool": "a boolean",
        "list": "a list",
        "map": "a mapping",
        "any": "free-form",
    }[declared]


def _quote_hint(declared: FieldType, literal: Any) -> str:
    if declared == "str" and _is_number(literal):
        return ' (quote it, e.g. "09:30", if you meant text)'
    if declared == "str" and isinstance(literal, bool):
        return " (quote it: YAML reads yes/no/on/off as booleans)"
    return ""


# What each operator does, which field types it takes, and an example: data for the
# generated reference and the JSON Schema help (a test checks every operator has an entry).
OPERATOR_HELP: Mapping[str, tuple[str, str]] = {
    "eq": ("equal (a bare value means `eq`)", "conversation.state: { eq: bot }"),
    "ne": ("not equal; false on a missing field", "conversation.state: { ne: closed }"),
    "in": ("equal to one of a non-empty list", "conversation.state: { in: [bot, agent] }"),
    "not_in": (
        "equal to none of a non-empty list; false on a missing field",
        "conversation.queue: { not_in: [vip, billing] }",
    ),
    "gt": ("greater than (numbers; text order on text fields)", "conversation.idle: { gt: 300 }"),
    "gte": ("greater than or equal", 'now.local_time: { gte: "09:00" }'),
    "lt": ("less than", "bot.confidence: { lt: 0.5 }"),
    "lte": ("less than or equal", "conversation.agents: { lte: 1 }"),
    "contains": (
        "substring of text, or member of a list",
        "conversation.labels: { contains: vip }",
    ),
    "matches": (
        "Python regular expression found anywhere in the text (`re.search`)",
        'event.text: { matches: "(?i)^cancel" }',
    ),
    "exists": (
        "the field is present and not null (`true`) or missing (`false`)",
        "conversation.attributes.order_id: { exists: true }",
    ),
}

GROUP_HELP: Mapping[str, str] = {
    "all": "a list of conditions that must all hold",
    "any": "a list of conditions of which at least one must hold",
    "not": "one condition that must not hold",
}
