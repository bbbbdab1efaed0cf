"""Explain: why each rule did or did not fire for the facts of one event.

The verdicts come from the compiled rules exactly as the service decides (the reference
matcher, with ``stop``), so an explanation never disagrees with a decision. For a rule that
did not match, the first failing condition is named as the analyst wrote it: the rule's
``when`` is re-read from the very text the rulebook was compiled from (``Rulebook.sources``),
which gives each condition its ``file:line:col`` and keeps ``not`` as written. Should that
text be unavailable, the compiled (negation-free) structure is described instead, without
positions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from controller.rulebook.book import CompiledRule, Rulebook
from controller.rulebook.conditions import (
    AllOf,
    AnyOf,
    CompositeLeaf,
    Lit,
    Node,
    PathLeaf,
    evaluate,
    leaves_of,
    lookup,
)
from controller.rulebook.source import SourceFile

Status = Literal["matched", "not_matched", "not_reached", "not_applicable"]


class Condition(BaseModel):
    """One condition of a rule, as written, and what it saw in the facts.

    A field test has ``path``/``op``/``expected`` and ``seen`` (``missing`` when the field is
    absent or null); ``negated`` means it stands under a ``not``. A group (``any``, or a
    ``not`` over a group) lists its parts: for a failed ``any``, why each alternative failed;
    for a failed ``not``, the condition that held.
    """

    text: str
    where: str | None = None
    path: str | None = None
    op: str | None = None
    expected: Any = None
    seen: Any = None
    missing: bool = False
    negated: bool = False
    group: Literal["all", "any", "not"] | None = None
    parts: list[Condition] = Field(default_factory=list)


class RuleExplanation(BaseModel):
    """The verdict on one rule for the event."""

    rule: str
    description: str
    where: str
    events: list[str]
    status: Status
    stops: bool
    actions: list[dict[str, Any]] = Field(default_factory=list)  # when it matched
    failed: Condition | None = None  # the first failing condition, when it did not match
    would_match: bool | None = None  # for a rule after a ``stop``
    stopped_by: str | None = None


class Explanation(BaseModel):
    """Every rule's verdict for one event's facts, in firing order."""

    rules_version: str
    event_type: str | None
    fired: list[str]
    rules: list[RuleExplanation]


def explain(book: Rulebook, facts: Mapping[str, Any], *, include_all: bool = False) -> Explanation:
    """Explain ``facts`` against ``book``; ``include_all`` also lists other events' rules."""
    event_type = lookup(facts, "event.type")
    fired = book.decide(facts, matcher="reference")
    fired_by_name = {f.rule: f for f in fired}
    stopper = fired[-1].rule if fired and _rule(book, fired[-1].rule).stops else None
    stopped = False
    results: list[RuleExplanation] = []
    for rule in book.rules:

        def verdict(status: Status, rule: CompiledRule = rule, **extra: Any) -> RuleExplanation:
            return RuleExplanation(
                rule=rule.name,
                description=rule.description,
                where=f"{rule.file}:{rule.line}:{rule.column}",
                events=list(rule.events),
                stops=rule.stops,
                status=status,
                **extra,
            )

        if event_type not in rule.events:
            if include_all:
                results.append(verdict("not_applicable"))
            continue
        if stopped:
            holds, _ = _explain_rule(book, rule, facts)
            results.append(verdict("not_reached", would_match=holds, stopped_by=stopper))
            continue
        found = fired_by_name.get(rule.name)
        if found is not None:
            actions = [a.model_dump(mode="json") for a in found.actions]
            results.append(verdict("matched", actions=actions))
            stopped = rule.name == stopper
        else:
            _, failure = _explain_rule(book, rule, facts)
            results.append(verdict("not_matched", failed=failure))
    return Explanation(
        rules_version=book.version,
        event_type=event_type if isinstance(event_type, str) else None,
        fired=[f.rule for f in fired],
        rules=results,
    )


def _rule(book: Rulebook, name: str) -> CompiledRule:
    return next(rule for rule in book.rules if rule.name == name)


def _explain_rule(
    book: Rulebook, rule: CompiledRule, facts: Mapping[str, Any]
) -> tuple[bool, Condition | None]:
    """Whether the rule's condition holds, and its first failing condition if not."""
    values = book.leaves.compute(book.leaves.closure(leaves_of(rule.condition)), facts)
    holds = evaluate(rule.condition, values)
    if holds:
        return True, None
    written = _written(book, rule, facts)
    if written is not None and not written[0]:
        return False, written[1]
    # no source text (or, against every expectation, a different verdict): the compiled form
    return False, _compiled(book, rule.condition, values, facts)[1]


# ----------------------------------------------------------------- conditions as written


def _written(
    book: Rulebook, rule: CompiledRule, facts: Mapping[str, Any]
) -> tuple[bool, Condition | None] | None:
    """Evaluate the rule's ``when`` as written; None when its source is not available."""
    text = book.sources.get(rule.file)
    if text is None:
        return None
    try:
        src = SourceFile(rule.file, text)
    except yaml.YAMLError:
        return None
    if not isinstance(src.root, yaml.SequenceNode):
        return None
    for node in src.root.value:
        where = src.where(node)
        if (where.line, where.col) == (rule.line, rule.column) and isinstance(
            node, yaml.MappingNode
        ):
            when = next((v for k, v in node.value if src.value(k) == "when"), None)
            if not isinstance(when, yaml.MappingNode):
                return None
            try:
                for key_node, value_node in when.value:
                    if src.value(key_node) == "event":
                        continue
                    ok, condition = _entry(src, key_node, value_node, facts)
                    if not ok:
                        return False, condition
            except (TypeError, ValueError, re.error):
                return None
            return True, None
    return None


def _entry(
    src: SourceFile, key_node: yaml.Node, value_node: yaml.Node, facts: Mapping[str, Any]
) -> tuple[bool, Condition]:
    """One ``key: value`` condition: whether it holds, and the condition to report."""
    key = src.value(key_node)
    where = str(src.where(key_node))
    if key in ("all", "any"):
        assert isinstance(value_node, yaml.SequenceNode)
        parts: list[Condition] = []
        for item in value_node.value:
            assert isinstance(item, yaml.MappingNode) and len(item.value) == 1
            ok, part = _entry(src, item.value[0][0], item.value[0][1], facts)
            if key == "all" and not ok:
                return False, part  # the first failing condition inside
            if key == "any" and ok:
                return True, part
            parts.append(part)
        text = f"{key}: [{len(parts)} conditions]"
        return key == "all", Condition(text=text, where=where, group=key, parts=parts)
    if key == "not":
        assert isinstance(value_node, yaml.MappingNode) and len(value_node.value) == 1
        ok, inner = _entry(src, value_node.value[0][0], value_node.value[0][1], facts)
        if inner.group is None:
            negated = inner.model_copy(update={"text": f"not: {inner.text}", "negated": True})
            return not ok, negated.model_copy(update={"where": where})
        return not ok, Condition(text=f"not: {inner.text}", where=where, group="not", parts=[inner])
    if isinstance(value_node, yaml.MappingNode):
        op = src.value(value_node.value[0][0])
        expected = src.value(value_node.value[0][1])
    else:
        op, expected = "eq", src.value(value_node)
    regex = re.compile(expected) if op == "matches" else None
    leaf = PathLeaf(str(key), str(op), expected, regex)
    return leaf.test(facts), _field(leaf, facts, where, shorthand=op == "eq")


def _field(
    leaf: PathLeaf, facts: Mapping[str, Any], where: str | None, shorthand: bool
) -> Condition:
    seen = lookup(facts, leaf.path)
    value = json.dumps(leaf.value, ensure_ascii=False)
    text = f"{leaf.path}: {value}" if shorthand else f"{leaf.path}: {{ {leaf.op}: {value} }}"
    return Condition(
        text=text,
        where=where,
        path=leaf.path,
        op=leaf.op,
        expected=leaf.value,
        seen=seen,
        missing=seen is None,
    )


# ----------------------------------------------------------------- the compiled form


def _compiled(
    book: Rulebook, node: Node, values: Mapping[int, bool], facts: Mapping[str, Any]
) -> tuple[bool, Condition]:
    """The compiled tree (``not`` already pushed to the leaves), described without positions."""
    if isinstance(node, Lit):
        leaf = book.leaves.leaves[node.leaf]
        ok = values[node.leaf] == node.positive
        if isinstance(leaf, CompositeLeaf):
            _, inner = _compiled(book, leaf.node, values, facts)
            if node.positive:
                return ok, inner
            return ok, Condition(text=f"not: {inner.text}", group="not", parts=[inner])
        condition = _field(leaf, facts, None, shorthand=False)
        if not node.positive:
            condition = condition.model_copy(
                update={"text": f"not: {condition.text}", "negated": True}
            )
        return ok, condition
    parts: list[Condition] = []
    for item in node.items:
        ok, part = _compiled(book, item, values, facts)
        if isinstance(node, AllOf) and not ok:
            return False, part
        if isinstance(node, AnyOf) and ok:
            return True, part
        parts.append(part)
    group: Literal["all", "any"] = "all" if isinstance(node, AllOf) else "any"
    text = f"{group}: [{len(parts)} conditions]"
    return group == "all", Condition(text=text, group=group, parts=parts)


# ----------------------------------------------------------------- text for people


def render(explanation: Explanation) -> list[str]:
    """A numbered list: ✓ with the actions, ✗ with the failing condition and what it saw."""
    lines = [
        f"event {explanation.event_type or '(no type)'}, rules version "
        f"{explanation.rules_version}: fired "
        + (", ".join(explanation.fired) if explanation.fired else "no rule")
    ]
    if not any(r.status != "not_applicable" for r in explanation.rules):
        lines.append(f"no rule is written for event {explanation.event_type or '(no type)'}")
    width = len(str(len(explanation.rules)))
    for number, rule in enumerate(explanation.rules, start=1):
        head = f"{number:>{width}}. "
        pad = " " * len(head) + "  "
        if rule.status == "matched":
            lines.append(f"{head}✓ {rule.rule}  ({rule.where})" + ("  stop" if rule.stops else ""))
            lines.extend(pad + "→ " + _action_text(action) for action in rule.actions)
            if not rule.actions:
                lines.append(pad + "(no actions)")
        elif rule.status == "not_matched":
            lines.append(f"{head}✗ {rule.rule}  ({rule.where})")
            if rule.failed is not None:
                lines.extend(_condition_lines(rule.failed, pad))
        elif rule.status == "not_reached":
            would = "would have matched" if rule.would_match else "would not have matched"
            lines.append(
                f"{head}- {rule.rule}  ({rule.where})  not reached: "
                f"'{rule.stopped_by}' stopped the decision ({would})"
            )
        else:
            lines.append(
                f"{head}· {rule.rule}  ({rule.where})  not applicable: written for "
                + ", ".join(rule.events)
            )
    return lines


def _action_text(action: Mapping[str, Any]) -> str:
    args = {k: v for k, v in action.items() if k != "kind"}
    return (
        f"{action.get('kind')}: {json.dumps(args, ensure_ascii=False)}"
        if args
        else str(action.get("kind"))
    )


def _condition_lines(condition: Condition, pad: str) -> list[str]:
    at = f"  (at {condition.where})" if condition.where else ""
    if condition.group == "any":
        lines = [f"{pad}failed: {condition.text}{at}, none held:"]
        for part in condition.parts:
            lines.extend(_condition_lines(part, pad + "  "))
        return lines
    if condition.group in ("not", "all"):
        lines = [f"{pad}failed: {condition.text}{at}, this held:"]
        for part in condition.parts:
            lines.extend(_held_lines(part, pad + "  "))
        return lines
    seen = "missing" if condition.missing else json.dumps(condition.seen, ensure_ascii=False)
    return [f"{pad}failed: {condition.text}{at}", f"{pad}  saw: {seen}"]


def _held_lines(condition: Condition, pad: str) -> list[str]:
    at = f"  (at {condition.where})" if condition.where else ""
    if condition.group is not None:
        lines = [f"{pad}{condition.text}{at}"]
        for part in condition.parts:
            lines.extend(_held_lines(part, pad + "  "))
        return lines
    seen = "missing" if condition.missing else json.dumps(condition.seen, ensure_ascii=False)
    return [f"{pad}{condition.text}{at}, saw: {seen}"]
