"""Backtest: recorded decisions decided again with candidate rules, read-only."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from controller.backtest import BacktestReport, backtest, parse_since
from controller.cli import main
from controller.clock import ManualClock
from controller.rulebook import Rulebook
from controller.store.readonly import ReadOnlyStore
from controller.testing import RULES_DIR, Service

TABLES = ("events", "conversations", "decisions", "outbox", "timers", "messages", "assignments")
SINCE = datetime(2026, 1, 5, tzinfo=UTC)


@pytest.fixture
def no_convctl_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CONVCTL_"):
            monkeypatch.delenv(key)
    yield


def _rules_copy(tmp_path: Path, name: str, change: Callable[[list[dict[str, Any]]], None]) -> Path:
    """A copy of the default rules with ``change`` applied to the rule list."""
    folder = tmp_path / name
    folder.mkdir()
    rules = yaml.safe_load((RULES_DIR / "default.yaml").read_text(encoding="utf-8"))
    change(rules)
    (folder / "default.yaml").write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return folder


def _counts(path: str) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


def _run(service: Service, rules: Path) -> BacktestReport:
    settings = service.settings.rule_settings()
    with (
        ReadOnlyStore(service.settings.database_path) as store,
        Rulebook.load(rules, settings=settings, matcher="reference") as book,
    ):
        return backtest(book, store.decisions(SINCE), since=SINCE)


def _json_out(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out = capsys.readouterr().out
    data: dict[str, Any] = json.loads(out[out.index("{\n") :])
    return data


async def test_backtest_finds_no_difference_with_the_same_rules_and_shows_changes(
    make_service: Callable[..., Any],
    clock: ManualClock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_convctl_env: None,
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules, ignore=shutil.ignore_patterns("tests"))
    service: Service = await make_service(clock=clock, rules_dir=rules)
    conversations = []
    for n in range(3):
        customer = await service.customer()
        conversations.append(await customer.start_with_bot(f"hello {n}"))
        await customer.say("and more")
    await service.settle()
    db = service.settings.database_path
    before = _counts(db)

    same = _run(service, rules)
    assert same.events == before["decisions"] and same.conversations == 3
    assert not same.differs and same.examples == []
    assert all(c.recorded == c.candidate for c in same.rules + same.actions)
    wrote = next(c for c in same.rules if c.name == "customer-wrote")
    assert wrote.recorded == 6  # two customer messages in each of three conversations

    def drop(rules: list[dict[str, Any]]) -> None:
        rules[:] = [r for r in rules if r["name"] != "customer-wrote"]

    dropped = _run(service, _rules_copy(tmp_path, "dropped", drop))
    wrote = next(c for c in dropped.rules if c.name == "customer-wrote")
    assert (wrote.recorded, wrote.candidate, wrote.delta) == (6, 0, -6)
    cancels = next(c for c in dropped.actions if c.name == "cancel_timer")
    assert cancels.candidate == cancels.recorded - 18  # three cancel_timer actions each
    assert dropped.differing_events == 6 and dropped.differing_conversations == 3
    assert sorted(ex.conversation_id for ex in dropped.examples) == sorted(conversations)
    first = dropped.examples[0]
    assert first.event_type == "customer.message"
    assert "customer-wrote" in first.recorded_rules
    assert "customer-wrote" not in first.candidate_rules

    def longer_wait(rules: list[dict[str, Any]]) -> None:
        rule = next(r for r in rules if r["name"] == "wait-for-customer-reply")
        for action in rule["then"]:
            if isinstance(action, dict) and "start_timer" in action:
                action["start_timer"]["after"] = "17m"

    changed = _run(service, _rules_copy(tmp_path, "changed", longer_wait))
    assert changed.differs and changed.differing_conversations == 3
    example = changed.examples[0]
    assert example.event_type == "bot.message"
    assert example.recorded_rules == example.candidate_rules
    assert example.recorded_actions != example.candidate_actions
    assert all(c.recorded == c.candidate for c in changed.rules)  # the same rules fired

    # the command: exit 0 without a difference, 1 with one; JSON and text
    config = tmp_path / "convctl.yaml"
    config.write_text(f"data_dir: {tmp_path}\n", encoding="utf-8")
    argv = ["--config", str(config), "rules", "backtest", "--since", "2026-01-05"]
    capsys.readouterr()
    assert main([*argv, "--rules", str(rules), "--json"]) == 0
    assert _json_out(capsys)["differing_events"] == 0
    dropped_dir = tmp_path / "dropped"
    assert main([*argv, "--rules", str(dropped_dir), "--progress"]) == 1
    captured = capsys.readouterr()
    assert "differences: 6 of" in captured.out and "3 of 3 conversation(s)" in captured.out
    assert "customer-wrote" in captured.out
    assert f"{before['decisions']}/{before['decisions']} decisions" in captured.err
    # the two oldest decisions: a conversation.created and its first customer.message
    assert main([*argv, "--rules", str(dropped_dir), "--limit", "2", "--json"]) == 1
    limited = _json_out(capsys)
    assert limited["events"] == 2 and limited["limited"] is True
    assert limited["differing_events"] == 1

    assert _counts(db) == before  # nothing was written


async def test_decisions_recorded_before_facts_are_counted_as_skipped(
    make_service: Callable[..., Any],
    clock: ManualClock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_convctl_env: None,
) -> None:
    service: Service = await make_service(clock=clock)
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    db = service.settings.database_path
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE decisions SET facts = NULL WHERE seq = 1")
    conn.close()
    config = tmp_path / "convctl.yaml"
    config.write_text(f"data_dir: {tmp_path}\n", encoding="utf-8")
    capsys.readouterr()
    argv = ["--config", str(config), "rules", "backtest", "--since", "2026-01-05", "--json"]
    assert main(argv) == 0
    report = _json_out(capsys)
    assert report["skipped_without_facts"] == 1
    assert report["events"] == _counts(db)["decisions"] - 1


def test_since_takes_durations_dates_and_datetimes() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    berlin = ZoneInfo("Europe/Berlin")
    assert parse_since("24h", now, berlin) == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_since("1h30m", now, berlin) == datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    assert parse_since("2026-11-01", now, berlin) == datetime(2026, 11, 1, tzinfo=berlin)
    assert parse_since("2026-11-01T08:00:00+00:00", now, berlin) == datetime(
        2026, 11, 1, 8, tzinfo=UTC
    )
