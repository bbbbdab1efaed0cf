"""Backtest: what candidate rules would have decided for events that really happened.

Every decision is stored with the facts the rules saw (migration 2). A backtest reads those
decisions (read-only: nothing is sent, nothing is written), decides each event's recorded
facts again with the candidate rules (the reference matcher) and compares the rules fired and
their actions with the recorded ones, per rule and per action kind.

What a backtest is not: it compares per-event decisions on the recorded facts. It does not
re-simulate how a conversation would have continued. If the candidate rules would have routed
a conversation instead of closing it, the later events (and their facts) are still the ones
that really happened, so differences after a conversation's first differing event show what
the candidate rules say about those facts, not what would have happened.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from controller.errors import ConfigError
from controller.rulebook import Rulebook
from controller.store.readonly import RecordedDecision

MAX_EXAMPLES = 5
_DURATION = re.compile(r"^(?:\d+[smhdw])+$")
_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Count(BaseModel):
    """How often a rule fired (or an action kind was produced): recorded vs candidate."""

    name: str
    recorded: int
    candidate: int

    @property
    def delta(self) -> int:
        return self.candidate - self.recorded


class Example(BaseModel):
    """The first event of a conversation that the candidate rules decide differently."""

    conversation_id: str
    event_id: str
    seq: int
    event_type: str
    decided_at: datetime
    recorded_rules: list[str]
    candidate_rules: list[str]
    recorded_actions: list[dict[str, Any]]
    candidate_actions: list[dict[str, Any]]


class BacktestReport(BaseModel):
    """The outcome of one backtest."""

    since: datetime
    candidate_version: str
    recorded_versions: list[str]
    events: int = 0
    conversations: int = 0
    skipped_without_facts: int = 0  # decided before facts were recorded
    skipped_not_decided: int = 0  # stale timers and failed decisions: no rule was consulted
    limited: bool = False  # --limit cut the decisions read
    differing_events: int = 0
    differing_conversations: int = 0
    rules: list[Count] = Field(default_factory=list)
    actions: list[Count] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)

    @property
    def differs(self) -> bool:
        return self.differing_events > 0


def parse_since(text: str, now: datetime, tz: ZoneInfo) -> datetime:
    """``24h``, ``7d``, ``1h30m`` (before ``now``), or a date or ISO datetime (zone: ``tz``)."""
    value = text.strip()
    if _DURATION.match(value):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
        return now - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(
            f"--since {text!r}: give a date (2026-11-01), an ISO datetime or a duration (24h, 7d)"
        ) from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=tz)


def _normal(value: Any) -> Any:
    """The JSON form, so recorded (stored JSON) and candidate actions compare exactly."""
    return json.loads(json.dumps(value, default=str))


def backtest(
    book: Rulebook,
    decisions: Iterable[RecordedDecision],
    *,
    since: datetime,
    progress: Callable[[int], None] | None = None,
) -> BacktestReport:
    """Decide each recorded event's facts with ``book`` and compare with what was recorded."""
    report = BacktestReport(since=since, candidate_version=book.version, recorded_versions=[])
    versions: dict[str, None] = {}
    conversations: set[str] = set()
    differing: set[str] = set()
    rules_recorded: Counter[str] = Counter()
    rules_candidate: Counter[str] = Counter()
    kinds_recorded: Counter[str] = Counter()
    kinds_candidate: Counter[str] = Counter()
    for done, recorded in enumerate(decisions, start=1):
        if progress is not None:
            progress(done)
        if recorded.outcome != "decided":
            report.skipped_not_decided += 1
            continue
        report.events += 1
        conversations.add(recorded.conversation_id)
        versions[recorded.rules_version] = None
        old = [(str(f["rule"]), _normal(f.get("actions", []))) for f in recorded.fired]
        new = [
            (f.rule, _normal([a.model_dump(mode="json") for a in f.actions]))
            for f in book.decide(recorded.facts, matcher="reference")
        ]
        for rule, actions in old:
            rules_recorded[rule] += 1
            kinds_recorded.update(str(a.get("kind")) for a in actions)
        for rule, actions in new:
            rules_candidate[rule] += 1
            kinds_candidate.update(str(a.get("kind")) for a in actions)
        if old == new:
            continue
        report.differing_events += 1
        if recorded.conversation_id in differing:
            continue
        differing.add(recorded.conversation_id)
        if len(report.examples) < MAX_EXAMPLES:
            report.examples.append(
                Example(
                    conversation_id=recorded.conversation_id,
                    event_id=recorded.event_id,
                    seq=recorded.seq,
                    event_type=recorded.event_type,
                    decided_at=recorded.decided_at,
                    recorded_rules=[rule for rule, _ in old],
                    candidate_rules=[rule for rule, _ in new],
                    recorded_actions=[a for _, actions in old for a in actions],
                    candidate_actions=[a for _, actions in new for a in actions],
                )
            )
    report.conversations = len(conversations)
    report.differing_conversations = len(differing)
    report.recorded_versions = list(versions)
    order = {rule.name: rule.index for rule in book.rules}
    names = sorted(
        set(rules_recorded) | set(rules_candidate), key=lambda n: (order.get(n, len(order)), n)
    )
    report.rules = [
        Count(name=n, recorded=rules_recorded[n], candidate=rules_candidate[n]) for n in names
    ]
    report.actions = [
        Count(name=k, recorded=kinds_recorded[k], candidate=kinds_candidate[k])
        for k in sorted(set(kinds_recorded) | set(kinds_candidate))
    ]
    return report


def render(report: BacktestReport) -> list[str]:
    """The report for people: counts, differences and examples."""
    lines = [
        f"backtest of rules version {report.candidate_version} on {report.events} recorded "
        f"event(s) in {report.conversations} conversation(s) since {report.since.isoformat()}",
        "recorded with rules version(s): " + (", ".join(report.recorded_versions) or "-"),
        "(a per-event comparison on the recorded facts: later events are not re-simulated)",
    ]
    if report.skipped_without_facts:
        lines.append(
            f"skipped {report.skipped_without_facts} decision(s) recorded before facts were stored"
        )
    if report.skipped_not_decided:
        lines.append(
            f"skipped {report.skipped_not_decided} event(s) no rule decided "
            "(stale timers, failed decisions)"
        )
    if report.limited:
        lines.append("stopped at --limit: later decisions were not read")
    lines.extend(_table("rule", report.rules))
    lines.extend(_table("action", report.actions))
    lines.append("")
    if not report.differs:
        lines.append(f"no difference: all {report.events} event(s) decided the same")
        return lines
    lines.append(
        f"differences: {report.differing_events} of {report.events} event(s), "
        f"{report.differing_conversations} of {report.conversations} conversation(s)"
    )
    lines.append("examples (the first differing event of each conversation):")
    for ex in report.examples:
        lines.append(
            f"  conversation {ex.conversation_id}, event #{ex.seq} {ex.event_type} "
            f"({ex.event_id}) at {ex.decided_at.isoformat()}"
        )
        lines.append("    recorded:  " + (", ".join(ex.recorded_rules) or "no rule"))
        lines.append("    candidate: " + (", ".join(ex.candidate_rules) or "no rule"))
        if ex.recorded_rules == ex.candidate_rules:
            lines.append("    same rules, different actions:")
            lines.append("      recorded:  " + json.dumps(ex.recorded_actions, ensure_ascii=False))
            lines.append("      candidate: " + json.dumps(ex.candidate_actions, ensure_ascii=False))
    return lines


def _table(title: str, counts: list[Count]) -> list[str]:
    if not counts:
        return ["", f"{title}s: none fired"]
    width = max(len(title) + 1, *(len(c.name) for c in counts))
    lines = ["", f"{title + 's':<{width}}  recorded  candidate    +/-"]
    for c in counts:
        delta = f"{c.delta:+d}" if c.delta else "0"
        mark = "  *" if c.delta else ""
        lines.append(f"{c.name:<{width}}  {c.recorded:>8}  {c.candidate:>9}  {delta:>5}{mark}")
    return lines


class ProgressBar:
    """A plain-text progress bar on a stream (stderr), redrawn in place about 100 times."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._step = max(1, total // 100)
        self._shown = -1

    def __call__(self, done: int) -> None:
        if done != self.total and done - self._shown < self._step:
            return
        self._shown = done
        filled = self.width * done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rbacktest [{bar}] {done}/{self.total} decisions")
        self.stream.flush()

    def finish(self) -> None:
        if self._shown >= 0:
            self.stream.write("\n")
            self.stream.flush()
