"""The two matchers over the compiled terms: durable-rules, and a pure-Python reference.

durable-rules is native code with sharp edges (see docs notes/durable-rules.md); everything
here exists to keep it on the measured-safe path:

- each durable rule is a flat conjunction of ``event.type == T`` (a positive test every fact
  passes for its own group) and boolean leaf tests, so no ``$nex``, no nested objects, no
  regex, no loose-typed comparisons, and exactly one firing per satisfied term;
- at most ``SHARD_SIZE`` durable rules per ruleset (512 hangs the process) and
  ``SHARD_LEAVES`` leaves per fact (larger objects are refused), plus a catch-all
  on ``$ex event.type`` so no fact is ever unmatched (unmatched + delete_state segfaults);
- one quiet host per rulebook (no background threads stealing actions), one lock around
  every assert_fact/delete_state pair, a fresh sid per call, deleted in ``finally``;
- actions only record the rule index in a per-call ContextVar list; a swallowed action
  exception is detected through the returned state.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import durable_rules_engine  # type: ignore[import-not-found, unused-ignore]
from durable.engine import Host  # type: ignore[import-untyped, unused-ignore]

from controller.errors import ConvctlError
from controller.rulebook.conditions import Term

SHARD_SIZE = 400
# A fact object with more than about 249 properties is refused (error 302, measured), so a
# shard tests at most this many distinct leaves.
SHARD_LEAVES = 200
_CATCH_ALL_PRI = 65535  # durable stores priorities as unsigned 16-bit numbers
_MAX_PRI = _CATCH_ALL_PRI - 1


@dataclass(frozen=True)
class Shard:
    """One durable ruleset: some terms of the rules for one event type."""

    name: str
    event_type: str
    entries: tuple[tuple[int, Term], ...]  # (global rule index, term)
    leaves: tuple[int, ...]  # leaf ids its terms test


@dataclass(frozen=True)
class Group:
    """Everything needed to decide one event type."""

    event_type: str
    rules: tuple[int, ...]
    shards: tuple[Shard, ...]
    leaves: tuple[int, ...]  # leaf ids to compute, dependencies first


def reference_match(group: Group, values: Mapping[int, bool]) -> set[int]:
    """Indices of the rules with at least one satisfied term."""
    return {
        index
        for shard in group.shards
        for index, term in shard.entries
        if all(values[lit.leaf] == lit.positive for lit in term)
    }


_FIRED: ContextVar[list[int] | None] = ContextVar("convctl_rulebook_fired", default=None)


def _recorder(index: int) -> Callable[[Any], None]:
    # durable inspects the function's argument count, so this must be a plain 1-arg function.
    def run(c: Any) -> None:
        fired = _FIRED.get()
        if fired is not None:
            fired.append(index)

    return run


def _catch_all(c: Any) -> None:
    """Matches every fact, so no fact is unmatched (which would crash delete_state)."""


class _QuietHost(Host):  # type: ignore[misc]
    """A durable Host without its background dispatcher threads.

    Those threads can run a pending action on another thread between the C calls of one
    assert_fact, which would lose the firing from our per-call list.
    """

    def _run(self) -> None:
        return None


def _definition(shard: Shard) -> dict[str, Any]:
    """A freshly built ruleset definition (durable mutates what it is given)."""
    rules: dict[str, Any] = {}
    for number, (index, term) in enumerate(shard.entries):
        tests: list[dict[str, Any]] = [{"event.type": shard.event_type}]
        tests.extend({f"leaf.c{lit.leaf}": lit.positive} for lit in term)
        condition = tests[0] if len(tests) == 1 else {"$and": tests}
        rules[f"r{index}_{number}"] = {
            "all": [{"m": condition}],
            "pri": min(index, _MAX_PRI),
            "run": _recorder(index),
        }
    rules["catch_all"] = {
        "all": [{"m": {"$ex": {"event.type": 1}}}],
        "pri": _CATCH_ALL_PRI,
        "run": _catch_all,
    }
    return rules


class DurableMatcher:
    """The rulesets of one rulebook, registered on their own quiet host."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self._host = _QuietHost()
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._names: list[str] = []
        self._closed = False
        try:
            for shard in shards:
                self._host.set_rulesets({shard.name: _definition(shard)})
                self._names.append(shard.name)
        except Exception as error:
            self.close()
            raise ConvctlError(
                f"durable-rules refused ruleset {shard.name!r}: {error}", code="matcher_failed"
            ) from error

    def match(self, group: Group, values: Mapping[int, bool]) -> set[int]:
        """Indices of the rules whose durable rules fired for these leaf values."""
        fired: list[int] = []
        token = _FIRED.set(fired)
        try:
            with self._lock:
                if self._closed:
                    raise ConvctlError("the rulebook is closed", code="rulebook_closed")
                for shard in group.shards:
                    self._assert(shard, values)
        finally:
            _FIRED.reset(token)
        return set(fired)

    def _assert(self, shard: Shard, values: Mapping[int, bool]) -> None:
        sid = str(next(self._sids))
        fact = {
            "sid": sid,
            "event": {"type": shard.event_type},
            "leaf": {f"c{leaf}": values[leaf] for leaf in shard.leaves},
        }
        try:
            state = self._host.assert_fact(shard.name, fact)
        finally:
            self._host.delete_state(shard.name, sid)
        if isinstance(state, dict) and "exception" in state:
            raise ConvctlError(
                f"durable-rules action failed in {shard.name!r}: {state['exception']}",
                code="matcher_failed",
            )

    def close(self) -> None:
        """Remove every ruleset from the native engine (there is no public API for it)."""
        with self._lock:
            self._closed = True
            directory: dict[str, Any] = self._host._ruleset_directory
            listing: list[Any] = self._host._ruleset_list
            for name in self._names:
                ruleset = directory.pop(name, None)
                if ruleset is None:
                    continue
                if ruleset in listing:
                    listing.remove(ruleset)
                durable_rules_engine.delete_ruleset(ruleset._handle)
            self._names.clear()
