"""Condition semantics: every operator, strict types, missing fields, all/any/not."""

from __future__ import annotations

from typing import Any

import pytest

ATTR = "conversation.attributes"


def one_rule(condition: str) -> str:
    return f"""
- name: r
  when:
    event: customer.message
    {condition}
  then:
    - label: hit
"""


def facts(**attributes: Any) -> dict[str, Any]:
    return {
        "event": {"type": "customer.message", "text": "hello big world"},
        "conversation": {"attributes": attributes, "labels": ["vip", 3], "priority": 5},
    }


CASES: list[tuple[str, dict[str, Any], bool]] = [
    # eq, shorthand and explicit; strict types
    (f"{ATTR}.x: 3", {"x": 3}, True),
    (f"{ATTR}.x: 3", {"x": 3.0}, True),
    (f"{ATTR}.x: 3", {"x": "3"}, False),
    (f"{ATTR}.x: 1", {"x": True}, False),
    (f"{ATTR}.x: true", {"x": 1}, False),
    (f"{ATTR}.x: true", {"x": True}, True),
    (f"{ATTR}.x: 'a'", {"x": "a"}, True),
    (f"{ATTR}.x: {{eq: 'a'}}", {"x": "A"}, False),
    (f"{ATTR}.x: 3", {}, False),
    (f"{ATTR}.x: 3", {"x": None}, False),
    (f"{ATTR}.x: [1, 'a']", {"x": [1, "a"]}, True),
    (f"{ATTR}.x: [1, 'a']", {"x": ["1", "a"]}, False),
    # ne: negation of eq on present values, false on missing
    (f"{ATTR}.x: {{ne: 3}}", {"x": 4}, True),
    (f"{ATTR}.x: {{ne: 3}}", {"x": "3"}, True),
    (f"{ATTR}.x: {{ne: 3}}", {"x": 3}, False),
    (f"{ATTR}.x: {{ne: 3}}", {}, False),
    # in / not_in
    (f"{ATTR}.x: {{in: [1, 2]}}", {"x": 2}, True),
    (f"{ATTR}.x: {{in: [1, 2]}}", {"x": "2"}, False),
    (f"{ATTR}.x: {{in: [1, 2]}}", {"x": True}, False),
    (f"{ATTR}.x: {{in: [1, 2]}}", {}, False),
    (f"{ATTR}.x: {{not_in: [1, 2]}}", {"x": 3}, True),
    (f"{ATTR}.x: {{not_in: [1, 2]}}", {"x": 1}, False),
    (f"{ATTR}.x: {{not_in: [1, 2]}}", {}, False),
    # ordering: numbers only compare with numbers (text with text)
    (f"{ATTR}.x: {{gt: 2}}", {"x": 3}, True),
    (f"{ATTR}.x: {{gt: 2}}", {"x": 2}, False),
    (f"{ATTR}.x: {{gte: 2}}", {"x": 2.0}, True),
    (f"{ATTR}.x: {{lt: 2}}", {"x": 1.5}, True),
    (f"{ATTR}.x: {{lte: 2}}", {"x": 3}, False),
    (f"{ATTR}.x: {{gt: 2}}", {"x": "200"}, False),
    (f"{ATTR}.x: {{gt: 0}}", {"x": True}, False),
    (f"{ATTR}.x: {{gt: 2}}", {}, False),
    (f"{ATTR}.x: {{lt: '10:00'}}", {"x": "09:30"}, True),
    # contains: substring on text, membership on lists
    ("event.text: {contains: big}", {}, True),
    ("event.text: {contains: small}", {}, False),
    ("conversation.labels: {contains: vip}", {}, True),
    ("conversation.labels: {contains: 3}", {}, True),
    ("conversation.labels: {contains: '3'}", {}, False),
    (f"{ATTR}.x: {{contains: 1}}", {"x": "1"}, False),
    (f"{ATTR}.x: {{contains: 'b'}}", {}, False),
    # matches: Python re.search, not anchored
    ("event.text: {matches: 'big\\s+w'}", {}, True),
    ("event.text: {matches: '^big'}", {}, False),
    (f"{ATTR}.x: {{matches: '\\d'}}", {"x": 5}, False),
    (f"{ATTR}.x: {{matches: '\\d'}}", {"x": "a5"}, True),
    # exists
    (f"{ATTR}.x: {{exists: true}}", {"x": 0}, True),
    (f"{ATTR}.x: {{exists: true}}", {"x": None}, False),
    (f"{ATTR}.x: {{exists: false}}", {}, True),
    (f"{ATTR}.x: {{exists: false}}", {"x": False}, False),
    # typed fields
    ("conversation.priority: {gte: 5}", {}, True),
    ("conversation.priority: {gt: 5}", {}, False),
]


@pytest.mark.parametrize(("condition", "attributes", "expected"), CASES)
def test_operator(
    make_book: Any, fired: Any, condition: str, attributes: dict[str, Any], expected: bool
) -> None:
    book = make_book(one_rule(condition))
    assert fired(book, facts(**attributes)) == (["r"] if expected else [])


@pytest.mark.parametrize(
    ("condition", "attributes", "expected"),
    [
        # not negates the whole result, including on missing fields
        (f"not: {{{ATTR}.x: 3}}", {}, True),
        (f"not: {{{ATTR}.x: {{ne: 3}}}}", {}, True),
        (f"not: {{{ATTR}.x: {{exists: false}}}}", {}, False),
        (f"all: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]", {"a": 1, "b": 2}, True),
        (f"all: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]", {"a": 1}, False),
        (f"any: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]", {"b": 2}, True),
        (f"any: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]", {}, False),
        (f"not: {{all: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]}}", {"a": 1}, True),
        (f"not: {{any: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]}}", {"a": 1}, False),
        (f"not: {{any: [{{{ATTR}.a: 1}}, {{{ATTR}.b: 2}}]}}", {"a": 2}, True),
        (f"not: {{not: {{{ATTR}.a: 1}}}}", {"a": 1}, True),
        (
            f"any: [{{all: [{{{ATTR}.a: 1}}, {{not: {{{ATTR}.b: 2}}}}]}}, {{{ATTR}.c: {{gt: 5}}}}]",
            {"a": 1, "b": 3},
            True,
        ),
        (
            f"any: [{{all: [{{{ATTR}.a: 1}}, {{not: {{{ATTR}.b: 2}}}}]}}, {{{ATTR}.c: {{gt: 5}}}}]",
            {"a": 1, "b": 2, "c": 5},
            False,
        ),
        # contradictory and tautological shapes
        (f"all: [{{{ATTR}.a: 1}}, {{not: {{{ATTR}.a: 1}}}}]", {"a": 1}, False),
        (f"any: [{{{ATTR}.a: 1}}, {{not: {{{ATTR}.a: 1}}}}]", {}, True),
    ],
)
def test_nesting(
    make_book: Any, fired: Any, condition: str, attributes: dict[str, Any], expected: bool
) -> None:
    book = make_book(one_rule(condition))
    assert fired(book, facts(**attributes)) == (["r"] if expected else [])


def test_when_keys_are_anded(make_book: Any, fired: Any) -> None:
    book = make_book(
        """
- name: r
  when:
    event: [customer.message, agent.message]
    conversation.state: bot
    customer.present: true
    any: [{conversation.priority: {gt: 3}}, {customer.known: true}]
  then: [{label: hit}]
"""
    )
    base = {"conversation": {"state": "bot", "priority": 5}, "customer": {"present": True}}
    assert fired(book, {**base, "event": {"type": "customer.message"}}) == ["r"]
    assert fired(book, {**base, "event": {"type": "agent.message"}}) == ["r"]
    assert fired(book, {**base, "event": {"type": "bot.message"}}) == []
    other = {"conversation": {"state": "agent", "priority": 5}, "customer": {"present": True}}
    assert fired(book, {**other, "event": {"type": "customer.message"}}) == []
    low = {"conversation": {"state": "bot", "priority": 1}, "customer": {"present": True}}
    assert fired(book, {**low, "event": {"type": "customer.message"}}) == []


def test_wide_any_groups_are_folded_and_still_exact(make_book: Any, fired: Any) -> None:
    # 5 x 4 alternatives would be 1024 durable terms; they are folded into computed leaves.
    groups = "\n".join(
        "      - any: [" + ", ".join(f"{{{ATTR}.g{g}: {v}}}" for v in range(4)) + "]"
        for g in range(5)
    )
    book = make_book(
        f"""
- name: r
  when:
    event: customer.message
    all:
{groups}
  then: [{{label: hit}}]
"""
    )
    assert all(len(rule.terms) <= 8 for rule in book.rules)
    assert fired(book, facts(g0=1, g1=3, g2=0, g3=2, g4=1)) == ["r"]
    assert fired(book, facts(g0=1, g1=3, g2=0, g3=2, g4=9)) == []
    assert fired(book, facts(g0=1, g1=3, g2=0, g3=2)) == []
