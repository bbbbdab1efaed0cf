"""``convctl rules explain`` and ``convctl rules backtest``: offline tools over the rules.

Both load the rules with the reference matcher (no native code) and read the database, if at
all, through a read-only connection: nothing is sent, nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.errors import ConfigError
from controller.facts import build_facts
from controller.models import Event
from controller.models.events import EventType
from controller.rulebook import Rulebook
from controller.settings import Settings
from controller.store.readonly import ReadOnlyStore


class FactsInput(BaseModel):
    """EVENT.json holding full facts, as the rules see them."""

    model_config = ConfigDict(extra="allow")

    event: dict[str, Any]
    conversation: dict[str, Any] = Field(default_factory=dict)
    customer: dict[str, Any] = Field(default_factory=dict)


class EventInput(BaseModel):
    """EVENT.json holding one event, to be placed in a stored conversation."""

    model_config = ConfigDict(extra="forbid")

    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)
    source: str = "explain"
    accepted_at: datetime | None = None  # the rules' clock; default: now


def add_parsers(rules_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``explain`` and ``backtest`` to the ``rules`` subcommands."""
    explain = rules_sub.add_parser(
        "explain", help="why each rule did or did not fire for one event's facts"
    )
    explain.add_argument(
        "event",
        metavar="EVENT.json",
        help='full facts {"event": ..., "conversation": ..., "customer": ...} or an event '
        '{"type": ..., "data": ...} together with --conversation',
    )
    explain.add_argument(
        "--conversation", metavar="ID", help="build the facts from this stored conversation"
    )
    explain.add_argument("--rules", help="the rules folder or file (default: the configured one)")
    explain.add_argument("--all", action="store_true", help="also list other events' rules")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    backtest = rules_sub.add_parser(
        "backtest",
        help="decide recorded events again with candidate rules and compare (read-only); "
        "exit code 1 when they differ",
    )
    backtest.add_argument(
        "--since",
        required=True,
        help="a date (2026-11-01), an ISO datetime (in the timezone setting unless it names "
        "one) or a duration back from now (24h, 7d, 1h30m)",
    )
    backtest.add_argument("--rules", help="the candidate rules (default: the configured ones)")
    backtest.add_argument("--limit", type=int, help="read at most N decisions, oldest first")
    backtest.add_argument("--json", action="store_true", help="print the report as JSON")
    backtest.add_argument(
        "--progress", action="store_true", help="show progress on stderr even when not a TTY"
    )


def run_tool(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``rules explain`` or ``rules backtest`` with the parsed arguments."""
    rules = Path(args.rules) if args.rules else settings.resolved_rules_dir()
    with Rulebook.load(
        rules,
        settings=settings.rule_settings(),
        matcher="reference",
        default_language=settings.default_language,
    ) as book:
        if args.rules_command == "explain":
            return _explain(settings, book, args)
        return _backtest(settings, book, args)


def _explain(settings: Settings, book: Rulebook, args: argparse.Namespace) -> int:
    """Explain one event (exit 0); unusable input is a ConfigError (exit 2)."""
    from controller.rulebook.explain import explain, render

    facts = facts_from_file(Path(args.event), args.conversation, settings)
    explanation = explain(book, facts, include_all=args.all)
    if args.json:
        print(explanation.model_dump_json(indent=2))
    else:
        print("\n".join(render(explanation)))
    return 0


def facts_from_file(path: Path, conversation_id: str | None, settings: Settings) -> dict[str, Any]:
    """The facts EVENT.json describes: given whole, or built from a stored conversation."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        if isinstance(raw.get("event"), dict):
            if conversation_id is not None:
                raise ConfigError(
                    f"{path} holds full facts; --conversation goes with an event "
                    '{"type": ..., "data": ...}'
                )
            return FactsInput.model_validate(raw).model_dump()
        given = EventInput.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {details}") from exc
    if conversation_id is None:
        raise ConfigError(
            f"{path} holds an event: give --conversation ID to take the conversation from the "
            'database, or write full facts {"event": ..., "conversation": ..., "customer": ...}'
        )
    with ReadOnlyStore(settings.database_path) as store:
        conv = store.conversation(conversation_id)
    if conv is None:
        raise ConfigError(f"unknown conversation {conversation_id} in {settings.database_path}")
    event = Event(
        id="explain",
        type=given.type,
        conversation_id=conv.id,
        seq=0,
        source=given.source,
        dedupe_key="explain",
        accepted_at=given.accepted_at or datetime.now(UTC),
        data=given.data,
    )
    return build_facts(conv, event, ZoneInfo(settings.timezone))


def _backtest(settings: Settings, book: Rulebook, args: argparse.Namespace) -> int:
    """Backtest: exit 0 no difference, 1 differences; unusable input is a ConfigError (2)."""
    from controller.backtest import ProgressBar, backtest, parse_since, render

    since = parse_since(args.since, datetime.now(UTC), ZoneInfo(settings.timezone))
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    with ReadOnlyStore(settings.database_path) as store:
        with_facts, without = store.count_decisions(since)
        total = with_facts if args.limit is None else min(with_facts, args.limit)
        bar = ProgressBar(total) if args.progress or sys.stderr.isatty() else None
        report = backtest(book, store.decisions(since, args.limit), since=since, progress=bar)
        if bar is not None:
            bar.finish()
    report.skipped_without_facts = without
    report.limited = total < with_facts
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print("\n".join(render(report)))
    return 1 if report.differs else 0
