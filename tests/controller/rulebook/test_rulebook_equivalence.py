"""Property: durable-rules and the reference matcher pick the same rules, and the right ones.

Conditions are random lint-valid trees; facts mix types on purpose (text that looks like a
number, booleans next to 0/1, missing and null values, lists).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.rulebook import Rulebook

# free-form fields take any literal; typed fields only literals of their type
FREE = ["conversation.attributes.a", "conversation.attributes.b", "customer.profile.c"]
TYPED = {"conversation.priority": "num", "conversation.state": "str", "customer.known": "bool"}

mixed_scalar = st.one_of(
    st.sampled_from([0, 1, 2, -1, 1.0, 2.5]),
    st.booleans(),
    st.sampled_from(["1", "2", "a", "ab", "b", "true", ""]),
)
fact_value = st.one_of(st.none(), mixed_scalar, st.lists(mixed_scalar, max_size=3))
numbers = st.sampled_from([0, 1, 2, -1, 1.5])
texts = st.sampled_from(["1", "a", "ab", "b", "true"])


def literal_for(kind: str) -> st.SearchStrategy[Any]:
    if kind == "num":
        return numbers
    if kind == "str":
        return texts
    if kind == "bool":
        return st.booleans()
    return mixed_scalar


@st.composite
def leaf(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(st.sampled_from(FREE + list(TYPED)))
    kind = TYPED.get(path, "any")
    ops = ["eq", "ne", "in", "not_in", "exists"]
    if kind in ("num", "any"):
        ops += ["gt", "gte", "lt", "lte"]
    if kind in ("str", "any"):
        ops += ["contains", "matches"]
    op = draw(st.sampled_from(ops))
    if op == "exists":
        value: Any = draw(st.booleans())
    elif op in ("in", "not_in"):
        value = draw(st.lists(literal_for(kind), min_size=1, max_size=3))
    elif op in ("gt", "gte", "lt", "lte"):
        value = draw(numbers)
    elif op == "contains":
        value = draw(texts)
    elif op == "matches":
        value = draw(st.sampled_from(["^a", "b$", "1", "a|b", "^$"]))
    else:
        value = draw(literal_for(kind))
    return {path: value if op == "eq" and draw(st.booleans()) else {op: value}}


conditions = st.recursive(
    leaf(),
    lambda inner: st.one_of(
        st.builds(lambda items: {"all": items}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda items: {"any": items}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda item: {"not": item}, inner),
    ),
    max_leaves=8,
)


def lookup(facts: dict[str, Any], path: str) -> Any:
    current: Any = facts
    for part in path.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    return current


def num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if num(a) and num(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def oracle(cond: dict[str, Any], facts: dict[str, Any]) -> bool:
    """An independent evaluator of the documented semantics, on the raw (un-normalized) tree."""
    ((key, arg),) = cond.items()
    if key == "all":
        return all(oracle(item, facts) for item in arg)
    if key == "any":
        return any(oracle(item, facts) for item in arg)
    if key == "not":
        return not oracle(arg, facts)
    op, value = next(iter(arg.items())) if isinstance(arg, dict) else ("eq", arg)
    actual = lookup(facts, key)
    if op == "exists":
        return (actual is not None) == value
    if actual is None:
        return False
    if op == "eq":
        return same(actual, value)
    if op == "ne":
        return not same(actual, value)
    if op == "in":
        return any(same(actual, v) for v in value)
    if op == "not_in":
        return not any(same(actual, v) for v in value)
    if op in ("gt", "gte", "lt", "lte"):
        if not (num(actual) and num(value)):
            return False
        return {
            "gt": actual > value,
            "gte": actual >= value,
            "lt": actual < value,
            "lte": actual <= value,
        }[op]
    if op == "contains":
        if isinstance(actual, str):
            return value in actual
        return isinstance(actual, list) and any(same(item, value) for item in actual)
    if op == "matches":
        return isinstance(actual, str) and re.search(value, actual) is not None
    raise AssertionError(op)


def build_facts(values: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {"event": {"type": "customer.message"}}
    for path, value in values.items():
        *parents, last = path.split(".")
        node = facts
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return facts


fact_sets = st.lists(
    st.fixed_dictionaries({}, optional={path: fact_value for path in FREE + list(TYPED)}),
    min_size=1,
    max_size=6,
)


@pytest.mark.timeout(120)
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(rules=st.lists(conditions, min_size=1, max_size=5), fact_values=fact_sets)
def test_durable_and_reference_agree(
    rules: list[dict[str, Any]], fact_values: list[dict[str, Any]]
) -> None:
    document = [
        {"name": f"r{n}", "when": {"event": "customer.message", **cond}, "then": [{"label": "x"}]}
        for n, cond in enumerate(rules)
    ]
    text = yaml.safe_dump(document, sort_keys=False)
    book = Rulebook.from_sources([("p.yaml", text)], settings={})
    try:
        for values in fact_values:
            facts = build_facts(values)
            durable = [rule.rule for rule in book.decide(facts, matcher="durable")]
            reference = [rule.rule for rule in book.decide(facts, matcher="reference")]
            expected = [f"r{n}" for n, cond in enumerate(rules) if oracle(cond, facts)]
            assert durable == reference == expected
    finally:
        book.close()
