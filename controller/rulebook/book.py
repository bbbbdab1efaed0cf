"""Rulebook: loads rule files, compiles them, and decides which rules fire for given facts."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import yaml

from controller.errors import ConvctlError, RuleError
from controller.models.actions import Action
from controller.rulebook.actions import ActionParser, ActionSpec
from controller.rulebook.conditions import (
    ConditionParser,
    LeafTable,
    Lit,
    Node,
    Term,
    bound_terms,
    leaves_of,
    lookup,
    to_terms,
)
from controller.rulebook.matching import (
    SHARD_LEAVES,
    SHARD_SIZE,
    DurableMatcher,
    Group,
    Shard,
    reference_match,
)
from controller.rulebook.source import Problems, SourceFile, did_you_mean, syntax_error_where

Matcher = Literal["durable", "reference"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_RULE_KEYS = ("name", "description", "when", "then")
MAX_RULE_LEAVES = 64  # a rule testing more leaves is evaluated as one computed leaf


class FiredRule(NamedTuple):
    """A rule that fired, with its actions resolved for the facts (``stop`` left out)."""

    rule: str
    actions: tuple[Action, ...]


@dataclass(frozen=True)
class CompiledRule:
    """One rule after compilation; ``index`` is its place in firing order."""

    index: int
    name: str
    description: str
    file: str
    line: int
    column: int
    events: tuple[str, ...]
    condition: Node  # negation-free tree over leaf ids, wide groups folded
    terms: tuple[Term, ...]  # the same condition as a disjunction of conjunctions
    actions: tuple[ActionSpec, ...]
    stops: bool


class Rulebook:
    """A loaded, immutable version of the rules, and the matchers that evaluate it."""

    version: str
    rules: tuple[CompiledRule, ...]

    def __init__(
        self,
        *,
        version: str,
        rules: tuple[CompiledRule, ...],
        leaves: LeafTable,
        groups: Mapping[str, Group],
        matcher: Matcher,
        default_language: str,
        sources: Mapping[str, str] | None = None,
    ) -> None:
        self.version = version
        # the text of every file as compiled, by name: explain re-reads conditions as written
        self.sources: Mapping[str, str] = dict(sources or {})
        self.rules = rules
        self.leaves = leaves
        self.matcher: Matcher = matcher
        self.default_language = default_language
        self._groups = dict(groups)
        self._durable: DurableMatcher | None = None
        self._durable_lock = threading.Lock()
        self._closed = False
        if matcher == "durable":
            self._durable_matcher()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        paths: Sequence[Path] | Path,
        *,
        settings: Mapping[str, Any],
        matcher: Matcher = "durable",
        default_language: str = "en",
    ) -> Rulebook:
        """Load rule files (a directory means its *.yaml / *.yml files, not subfolders).

        Raises RuleError listing every problem found, each as ``file:line:col: ...``.
        """
        files: set[Path] = set()
        missing: list[str] = []
        for path in [paths] if isinstance(paths, Path) else list(paths):
            if path.is_dir():
                files.update(
                    child
                    for child in path.iterdir()
                    if child.is_file() and child.suffix in (".yaml", ".yml")
                )
            elif path.is_file():
                files.add(path)
            else:
                missing.append(f"{path}:1:1: no such rules file or directory")
        if missing:
            raise RuleError(missing)
        sources = [(str(path), path.read_text(encoding="utf-8")) for path in files]
        return cls.from_sources(
            sources, settings=settings, matcher=matcher, default_language=default_language
        )

    @classmethod
    def from_sources(
        cls,
        sources: Sequence[tuple[str, str]],
        *,
        settings: Mapping[str, Any],
        matcher: Matcher = "durable",
        default_language: str = "en",
    ) -> Rulebook:
        """Load rules from ``(name, text)`` pairs, ordered by name (e.g. an uploaded file)."""
        ordered = sorted(sources, key=lambda source: source[0])
        digest = hashlib.sha256()
        for name, text in ordered:
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        problems = Problems()
        table = LeafTable()
        compiler = _Compiler(problems, table, settings, default_language)
        for name, text in ordered:
            compiler.compile_file(name, text)
        if problems.messages:
            raise RuleError(problems.messages)
        rules = tuple(compiler.rules)
        return cls(
            version=digest.hexdigest()[:12],
            rules=rules,
            leaves=table,
            groups=_groups(rules, table),
            matcher=matcher,
            default_language=default_language,
            sources=dict(ordered),
        )

    # ------------------------------------------------------------------ deciding

    def decide(
        self, facts: Mapping[str, Any], *, matcher: Matcher | None = None
    ) -> list[FiredRule]:
        """The rules that fire for ``facts``, in order, up to and including a ``stop``."""
        event_type = lookup(facts, "event.type")
        group = self._groups.get(event_type) if isinstance(event_type, str) else None
        if group is None:
            return []
        values = self.leaves.compute(group.leaves, facts)
        if (matcher or self.matcher) == "durable":
            hits = self._durable_matcher().match(group, values)
        else:
            hits = reference_match(group, values)
        fired: list[FiredRule] = []
        for index in sorted(hits):
            rule = self.rules[index]
            actions = tuple(
                spec.build(facts, self.default_language, rule.name) for spec in rule.actions
            )
            fired.append(FiredRule(rule.name, actions))
            if rule.stops:
                break
        return fired

    def event_types(self) -> frozenset[str]:
        """The event types at least one rule is written for."""
        return frozenset(self._groups)

    def close(self) -> None:
        """Free the durable rulesets; the reference matcher keeps working."""
        with self._durable_lock:
            self._closed = True
            if self._durable is not None:
                self._durable.close()
                self._durable = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _durable_matcher(self) -> DurableMatcher:
        # Built lazily, so a rulebook loaded for the reference matcher never touches native code.
        with self._durable_lock:
            if self._closed:
                raise ConvctlError("the rulebook is closed", code="rulebook_closed")
            if self._durable is None:
                shards = [shard for group in self._groups.values() for shard in group.shards]
                self._durable = DurableMatcher(shards)
            return self._durable


def _groups(rules: Sequence[CompiledRule], table: LeafTable) -> dict[str, Group]:
    """One group per event type, its terms sharded into rulesets of at most SHARD_SIZE."""
    by_type: dict[str, list[CompiledRule]] = {}
    for rule in rules:
        for event_type in rule.events:
            by_type.setdefault(event_type, []).append(rule)
    groups: dict[str, Group] = {}
    for number, (event_type, members) in enumerate(by_type.items()):
        chunks: list[list[tuple[int, Term]]] = [[]]
        chunk_leaves: set[int] = set()
        for rule in members:
            entries = [(rule.index, term) for term in rule.terms]
            rule_leaves = {lit.leaf for term in rule.terms for lit in term}
            if chunks[-1] and (
                len(chunks[-1]) + len(entries) > SHARD_SIZE
                or len(chunk_leaves | rule_leaves) > SHARD_LEAVES
            ):
                chunks.append([])
                chunk_leaves = set()
            chunks[-1].extend(entries)
            chunk_leaves |= rule_leaves
        shards = tuple(
            Shard(
                name=f"g{number}-{event_type}-{part}",
                event_type=event_type,
                entries=tuple(chunk),
                leaves=tuple(sorted({lit.leaf for _, term in chunk for lit in term})),
            )
            for part, chunk in enumerate(chunks)
        )
        used = {leaf for shard in shards for leaf in shard.leaves}
        groups[event_type] = Group(
            event_type=event_type,
            rules=tuple(rule.index for rule in members),
            shards=shards,
            leaves=table.closure(used),
        )
    return groups


class _Compiler:
    """Parses files into CompiledRules, collecting every problem."""

    def __init__(
        self,
        problems: Problems,
        table: LeafTable,
        settings: Mapping[str, Any],
        default_language: str,
    ) -> None:
        self.problems = problems
        self.table = table
        self.conditions = ConditionParser(table, problems)
        self.actions = ActionParser(problems, settings, default_language)
        self.rules: list[CompiledRule] = []
        self._names: dict[str, str] = {}

    def compile_file(self, name: str, text: str) -> None:
        try:
            src = SourceFile(name, text)
        except yaml.YAMLError as error:
            where, message = syntax_error_where(name, error)
            self.problems.add(where, None, message)
            return
        root = src.root
        if root is None:
            return
        if not isinstance(root, yaml.SequenceNode):
            self.problems.add(src.where(root), None, "a rules file is a list of rules")
            return
        for position, node in enumerate(root.value, start=1):
            self._rule(src, node, position)

    def _rule(self, src: SourceFile, node: yaml.Node, position: int) -> None:
        where = src.where(node)
        if not isinstance(node, yaml.MappingNode):
            self.problems.add(where, f"#{position}", "a rule is a mapping with name, when, then")
            return
        fields: dict[str, yaml.Node] = {}
        label = f"#{position}"
        for key_node, value_node in node.value:
            key = src.value(key_node)
            if key == "name" and isinstance(src.value(value_node), str):
                label = src.value(value_node)
        ok = True
        for key_node, value_node in node.value:
            key = src.value(key_node)
            if not isinstance(key, str) or key not in _RULE_KEYS:
                self.problems.add(
                    src.where(key_node),
                    label,
                    f"unknown rule key '{key}'" + did_you_mean(str(key), _RULE_KEYS),
                )
                ok = False
            elif key in fields:
                self.problems.add(src.where(key_node), label, f"'{key}' appears twice")
                ok = False
            else:
                fields[key] = value_node
        name = self._name(src, node, fields.get("name"), label)
        ok = ok and name is not None
        description = ""
        if "description" in fields:
            value = src.value(fields["description"])
            if not isinstance(value, str):
                self.problems.add(
                    src.where(fields["description"]), label, "'description' must be text"
                )
                ok = False
            else:
                description = value
        if "when" not in fields:
            self.problems.add(where, label, "missing 'when'")
            when = None
        else:
            when = self.conditions.parse_when(src, fields["when"], label)
        if "then" not in fields:
            self.problems.add(where, label, "missing 'then'")
            then = None
        else:
            then = self.actions.parse_then(src, fields["then"], label)
        if not ok or name is None or when is None or then is None:
            return
        events, tree = when
        condition = bound_terms(tree, self.table)
        if len(leaves_of(condition)) > MAX_RULE_LEAVES:
            # keeps every rule well inside one shard's leaf budget
            condition = Lit(self.table.composite(condition), True)
        actions, stops = then
        self.rules.append(
            CompiledRule(
                index=len(self.rules),
                name=name,
                description=description,
                file=src.name,
                line=where.line,
                column=where.col,
                events=events,
                condition=condition,
                terms=to_terms(condition),
                actions=actions,
                stops=stops,
            )
        )

    def _name(
        self, src: SourceFile, rule_node: yaml.Node, node: yaml.Node | None, label: str
    ) -> str | None:
        if node is None:
            self.problems.add(src.where(rule_node), label, "missing 'name'")
            return None
        name = src.value(node)
        where = src.where(node)
        if not isinstance(name, str) or not _NAME.match(name):
            self.problems.add(
                where,
                label,
                "'name' must be lowercase letters, digits, '-' and '_', starting with a letter "
                "or digit",
            )
            return None
        first = self._names.get(name)
        if first is not None:
            self.problems.add(where, label, f"duplicate rule name (first defined at {first})")
            return None
        self._names[name] = str(where)
        return name
