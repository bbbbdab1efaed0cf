"""Checks on a loaded rulebook that loading alone cannot make: names that must exist in the
configuration (bots, queues), and rules that can never fire.

``convctl rules check`` runs ``lint`` after a successful load; every finding is an error in
the same ``file:line:col: rule 'name': ...`` form as load errors. The checks are sound and
deliberately simple: a rule reported as never matching really cannot match, but not every
rule that cannot match is found (no solver, composite leaves are treated as unknown).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from controller.rulebook.actions import ActionSpec
from controller.rulebook.book import CompiledRule, Rulebook
from controller.rulebook.conditions import LeafTable, PathLeaf, Term
from controller.rulebook.source import did_you_mean

_NUMERIC = {"gt", "gte", "lt", "lte"}


def lint(book: Rulebook, *, bots: Collection[str], queues: Collection[str]) -> list[str]:
    """Every finding for ``book``, in rule order; ``bots``/``queues`` are the configured names."""
    messages: list[str] = []
    for rule in book.rules:
        for spec in rule.actions:
            messages += _names(rule, spec, bots, queues)
        if _never_matches(rule, book.leaves):
            messages.append(
                _at(rule, rule.line, rule.column)
                + "can never match: its conditions contradict each other"
                + " (the same field must have incompatible values)"
            )
        messages += _shadowed(rule, book.rules)
    return messages


def _at(rule: CompiledRule, line: int, col: int) -> str:
    return f"{rule.file}:{line}:{col}: rule '{rule.name}': "


def _literal(value: Any) -> str | None:
    """A literal (non-templated) text argument, or None."""
    return value if isinstance(value, str) else None


def _names(
    rule: CompiledRule, spec: ActionSpec, bots: Collection[str], queues: Collection[str]
) -> list[str]:
    """Unknown bots in invite_bot/set_bot_mode and unknown queues in route/transfer."""
    at = _at(rule, spec.where.line, spec.where.col)
    found: list[str] = []
    if spec.kind in ("invite_bot", "set_bot_mode"):
        bot = _literal(spec.args.get("bot"))
        if bot is not None and bot not in bots:
            known = ", ".join(sorted(bots)) or "none"
            found.append(
                at + f"unknown bot '{bot}'" + did_you_mean(bot, bots) + f" (configured: {known})"
            )
    if spec.kind in ("route", "transfer"):
        queue = _literal(spec.args.get("queue"))
        if queue is not None and queue not in queues:
            known = ", ".join(sorted(queues)) or "none"
            found.append(
                at
                + f"unknown queue '{queue}'"
                + did_you_mean(queue, queues)
                + f" (setting 'queues': {known})"
            )
    return found


# ------------------------------------------------------------------------ never matches


def _key(value: Any) -> tuple[str, Any] | None:
    """A key under which two literals are equal exactly when ``strict_equal`` says so."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, (list, tuple)):
        return ("list", json.dumps(list(value)))
    return None


@dataclass
class _Domain:
    """What one term requires of one field. Value sets apply only when the field is present."""

    present: bool = False
    missing: bool = False
    allowed: set[tuple[str, Any]] | None = None
    forbidden: set[tuple[str, Any]] = field(default_factory=set)
    low: float = -math.inf
    low_open: bool = False
    high: float = math.inf
    high_open: bool = False
    numeric: bool = False  # an order test on a number: only numbers can pass

    def allow(self, values: Iterable[Any]) -> None:
        keys = {_key(value) for value in values}
        if None in keys:  # a literal we do not model: no restriction
            return
        narrowed = {key for key in keys if key is not None}
        self.allowed = narrowed if self.allowed is None else self.allowed & narrowed

    def bound(self, op: str, value: float) -> None:
        self.numeric = True
        if op in ("gt", "gte") and (value > self.low or (value == self.low and op == "gt")):
            self.low, self.low_open = value, op == "gt"
        if op in ("lt", "lte") and (value < self.high or (value == self.high and op == "lt")):
            self.high, self.high_open = value, op == "lt"

    def _in_bounds(self, key: tuple[str, Any]) -> bool:
        if not self.numeric:
            return True
        if key[0] != "num":
            return False
        value = key[1]
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def impossible(self) -> bool:
        if self.present and self.missing:
            return True
        if not self.present:
            return False  # a missing field satisfies every "when present" restriction
        if self.numeric and (
            self.low > self.high or (self.low == self.high and (self.low_open or self.high_open))
        ):
            return True
        if self.allowed is None:
            return False
        return not any(key not in self.forbidden and self._in_bounds(key) for key in self.allowed)


def _term_impossible(term: Term, table: LeafTable) -> bool:
    domains: dict[str, _Domain] = {}
    for lit in term:
        leaf = table.leaves[lit.leaf]
        if not isinstance(leaf, PathLeaf):
            continue  # a folded group: unknown, so no restriction
        domain = domains.setdefault(leaf.path, _Domain())
        op, value, positive = leaf.op, leaf.value, lit.positive
        if op == "exists":
            if bool(value) == positive:
                domain.present = True
            else:
                domain.missing = True
        elif not positive:
            # a false test allows a missing field; when present, it excludes values
            if op == "eq" and _key(value) is not None:
                domain.forbidden.add(_key(value))  # type: ignore[arg-type]
            elif op == "in":
                domain.forbidden |= {k for k in map(_key, value) if k is not None}
            elif op == "ne":
                domain.allow([value])
            elif op == "not_in":
                domain.allow(value)
        else:
            domain.present = True  # every positive test but exists:false needs the field
            if op == "eq":
                domain.allow([value])
            elif op == "in":
                domain.allow(value)
            elif op == "ne" and _key(value) is not None:
                domain.forbidden.add(_key(value))  # type: ignore[arg-type]
            elif op == "not_in":
                domain.forbidden |= {k for k in map(_key, value) if k is not None}
            elif op in _NUMERIC and isinstance(value, (int, float)):
                domain.bound(op, float(value))
    return any(domain.impossible() for domain in domains.values())


def _never_matches(rule: CompiledRule, table: LeafTable) -> bool:
    """True only when every alternative of the rule's condition is contradictory."""
    return all(_term_impossible(term, table) for term in rule.terms)


# ------------------------------------------------------------------------ shadowed


def _term_set(rule: CompiledRule) -> frozenset[frozenset[Any]]:
    return frozenset(frozenset(term) for term in rule.terms)


def _shadowed(rule: CompiledRule, rules: Iterable[CompiledRule]) -> list[str]:
    """Events for which an earlier stopping rule, always true or with the same condition,
    fires first, so this rule can never fire for them."""
    mine = _term_set(rule)
    found: list[str] = []
    for event in rule.events:
        for earlier in rules:
            if earlier.index >= rule.index:
                break
            if not earlier.stops or event not in earlier.events:
                continue
            theirs = _term_set(earlier)
            if frozenset() in theirs or theirs == mine:
                why = "has no conditions" if frozenset() in theirs else "has the same conditions"
                found.append(
                    _at(rule, rule.line, rule.column)
                    + f"never fires for '{event}': rule '{earlier.name}'"
                    + f" ({earlier.file}:{earlier.line}:{earlier.column}) comes first, {why}"
                    + " and stops"
                )
                break
    return found
