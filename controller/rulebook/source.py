"""Reading rule files as YAML node trees, so every problem can name its file, line and column.

PyYAML's composer keeps a start mark on every node; we walk the nodes ourselves instead of
loading plain Python objects, and build plain values only where a rule needs them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Where:
    """A position in a rule file, 1-based as editors show it."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Problems:
    """Collects every load error, so an analyst sees all of them at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: Where, rule: str | None, message: str) -> None:
        """Record ``message`` at ``where``, naming the rule when there is one."""
        prefix = f"{where}: rule '{rule}': " if rule is not None else f"{where}: "
        self.messages.append(prefix + message)


class SourceFile:
    """One parsed rule file: its display name, its root node and a scalar constructor."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        # libyaml composes about 10x faster (1,000 rules: 0.3 s instead of 3 s); a file it
        # rejects is parsed again in pure Python so syntax errors read the same everywhere.
        fast: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            self._loader = fast(text)
            self.root: yaml.Node | None = self._compose()
        except yaml.YAMLError:
            if fast is yaml.SafeLoader:
                raise
            self._loader = yaml.SafeLoader(text)
            self.root = self._compose()

    def _compose(self) -> yaml.Node | None:
        try:
            return self._loader.get_single_node()
        finally:
            self._loader.dispose()

    def where(self, node: yaml.Node) -> Where:
        """The position where ``node`` starts."""
        mark = node.start_mark
        return Where(self.name, mark.line + 1, mark.column + 1)

    def value(self, node: yaml.Node) -> Any:
        """The plain Python value of ``node`` (scalars, lists, dicts), as safe_load gives it."""
        if isinstance(node, yaml.ScalarNode):
            return self._loader.construct_object(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item) for item in node.value]
        if isinstance(node, yaml.MappingNode):
            return {self.value(key): self.value(item) for key, item in node.value}
        raise TypeError(f"unexpected YAML node {node!r}")


def syntax_error_where(name: str, error: yaml.YAMLError) -> tuple[Where, str]:
    """Position and text of a YAML syntax error."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = Where(name, mark.line + 1, mark.column + 1) if mark is not None else Where(name, 1, 1)
    problem = getattr(error, "problem", None) or str(error)
    return where, f"YAML syntax error: {problem}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A "; did you mean 'x'?" suffix when ``word`` is close to one of ``choices``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def kind_of(value: Any) -> str:
    """A short analyst-facing name for the type of a YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
