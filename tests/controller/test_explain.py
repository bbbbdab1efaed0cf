"""Explain: each rule's verdict for one event's facts, with the first failing condition."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.cli import main
from controller.clock import ManualClock
from controller.rulebook import Rulebook
from controller.rulebook.explain import Explanation, RuleExplanation, explain, render
from controller.testing import Service

RULES = """\
- name: greet
  when:
    event: customer.message
    conversation.state: bot
  then:
    - label: greeted
- name: vip
  description: gold customers who are not blocked
  when:
    event: customer.message
    all:
      - conversation.attributes.tier: gold
      - not: { conversation.labels: { contains: blocked } }
  then:
    - label: vip
    - stop
- name: after-stop
  when:
    event: customer.message
    any:
      - conversation.idle: { gt: 60 }
      - event.text: { matches: "(?i)help" }
  then:
    - label: late
- name: on-close
  when: { event: conversation.closed }
  then:
    - label: closed
"""


def _book() -> Rulebook:
    return Rulebook.from_sources([("rules.yaml", RULES)], settings={}, matcher="reference")


def _facts(**conversation: Any) -> dict[str, Any]:
    return {
        "event": {"type": "customer.message", "text": "hello"},
        "conversation": {"state": "bot", "idle": 5, "labels": [], **conversation},
        "customer": {"present": True},
    }


def _rule(explanation: Explanation, name: str) -> RuleExplanation:
    return next(r for r in explanation.rules if r.rule == name)


def test_a_matching_rule_is_reported_with_its_actions() -> None:
    with _book() as book:
        result = explain(book, _facts())
    greet = _rule(result, "greet")
    assert greet.status == "matched"
    assert greet.actions == [{"kind": "label", "label": "greeted"}]
    assert greet.failed is None
    assert result.fired == ["greet"]
    assert [r.rule for r in result.rules] == ["greet", "vip", "after-stop"]


def test_the_first_failing_condition_is_named_as_written_with_the_value_seen() -> None:
    with _book() as book:
        result = explain(book, _facts(state="queued"))
    greet = _rule(result, "greet")
    assert greet.status == "not_matched"
    failed = greet.failed
    assert failed is not None
    assert (failed.path, failed.op, failed.expected, failed.seen) == (
        "conversation.state",
        "eq",
        "bot",
        "queued",
    )
    assert failed.missing is False
    assert failed.where == "rules.yaml:4:5"
    assert failed.text == 'conversation.state: "bot"'


def test_a_missing_field_is_reported_as_missing() -> None:
    with _book() as book:
        result = explain(book, _facts())
    vip = _rule(result, "vip")
    assert vip.status == "not_matched"
    assert vip.failed is not None
    assert vip.failed.path == "conversation.attributes.tier"
    assert vip.failed.missing is True and vip.failed.seen is None
    assert vip.failed.where == "rules.yaml:12:9"
    text = "\n".join(render(result))
    assert "✗ vip" in text and "saw: missing" in text


def test_a_failing_not_keeps_the_negation_and_shows_what_held() -> None:
    with _book() as book:
        result = explain(book, _facts(attributes={"tier": "gold"}, labels=["blocked"]))
    failed = _rule(result, "vip").failed
    assert failed is not None
    assert failed.negated and failed.path == "conversation.labels" and failed.op == "contains"
    assert failed.seen == ["blocked"]
    assert failed.text.startswith("not: ")


def test_a_failing_any_lists_why_each_alternative_failed() -> None:
    with _book() as book:
        result = explain(book, _facts())
    failed = _rule(result, "after-stop").failed
    assert failed is not None and failed.group == "any"
    assert [(p.path, p.seen) for p in failed.parts] == [
        ("conversation.idle", 5),
        ("event.text", "hello"),
    ]


def test_rules_after_a_stop_are_not_reached() -> None:
    with _book() as book:
        result = explain(book, _facts(attributes={"tier": "gold"}, idle=300))
    assert result.fired == ["greet", "vip"]
    assert _rule(result, "vip").status == "matched"
    after = _rule(result, "after-stop")
    assert after.status == "not_reached"
    assert after.stopped_by == "vip" and after.would_match is True
    assert "not reached: 'vip' stopped the decision" in "\n".join(render(result))


def test_other_events_rules_are_listed_only_when_asked() -> None:
    with _book() as book:
        assert "on-close" not in [r.rule for r in explain(book, _facts()).rules]
        everything = explain(book, _facts(), include_all=True)
    assert _rule(everything, "on-close").status == "not_applicable"
    assert [r.rule for r in everything.rules] == ["greet", "vip", "after-stop", "on-close"]


def test_without_source_text_the_compiled_condition_is_described() -> None:
    with _book() as book:
        book.sources = {}
        failed = _rule(explain(book, _facts(state="queued")), "greet").failed
    assert failed is not None and failed.path == "conversation.state" and failed.where is None


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture
def no_convctl_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CONVCTL_"):
            monkeypatch.delenv(key)
    yield


def test_the_cli_explains_full_facts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_convctl_env: None
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(RULES, encoding="utf-8")
    event = tmp_path / "event.json"
    event.write_text(json.dumps(_facts(state="queued")), encoding="utf-8")
    config = tmp_path / "convctl.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n", encoding="utf-8")
    argv = ["--config", str(config), "rules", "explain", str(event), "--rules", str(rules)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1. ✗ greet" in out and 'saw: "queued"' in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rules"][0]["failed"]["seen"] == "queued"
    # an event without --conversation cannot be explained
    event.write_text(json.dumps({"type": "customer.message", "data": {}}), encoding="utf-8")
    assert main(argv) == 2
    assert "--conversation" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the API


async def test_the_api_explains_a_stored_event_against_the_current_rules(
    make_service: Callable[..., Any],
    clock: ManualClock,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_convctl_env: None,
) -> None:
    service: Service = await make_service(clock=clock)
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    await service.settle()
    events = await service.store.events(conversation_id)
    message = next(ev for ev, _ in events if ev.type == "customer.message")
    assert service.http is not None
    url = f"{service.base_url}/api/v1/conversations/{conversation_id}/events/{message.id}/explain"
    r = await service.http.get(url, headers=service.admin_headers())
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["recorded"]["rules"] == body["current"]["fired"]
    assert body["same_rules"] is True
    assert body["recorded"]["rules_version"] == body["current"]["rules_version"]
    assert body["facts"]["event"]["text"] == "hi"
    statuses = {r["rule"]: r["status"] for r in body["current"]["rules"]}
    assert statuses["customer-wrote"] == "matched"

    agent = {"Authorization": f"Bearer {service.settings.agent_token}"}
    assert (await service.http.get(url, headers=agent)).status == 403
    base = f"{service.base_url}/api/v1/conversations/{conversation_id}/events"
    r = await service.http.get(f"{base}/nope/explain", headers=service.admin_headers())
    assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_event"
    r = await service.http.get(
        f"{service.base_url}/api/v1/conversations/nope/events/{message.id}/explain",
        headers=service.admin_headers(),
    )
    assert r.status == 404

    # the CLI builds the same facts from the stored conversation (read-only)
    event_file = tmp_path / "event.json"
    event_file.write_text(
        json.dumps({"type": "customer.message", "data": {"text": "hi"}}), encoding="utf-8"
    )
    config = tmp_path / "convctl.yaml"
    config.write_text(f"data_dir: {tmp_path}\n", encoding="utf-8")
    argv = ["--config", str(config), "rules", "explain", str(event_file)]
    capsys.readouterr()  # the running service's log lines so far
    assert main([*argv, "--conversation", conversation_id, "--json"]) == 0
    out = capsys.readouterr().out
    assert "customer-wrote" in json.loads(out[out.index("{\n") :])["fired"]

    # a decision recorded before facts were stored
    with sqlite3.connect(service.settings.database_path) as conn:
        conn.execute("UPDATE decisions SET facts = NULL WHERE event_id = ?", (message.id,))
    conn.close()
    r = await service.http.get(url, headers=service.admin_headers())
    assert r.status == 409 and (await r.json())["error"]["code"] == "no_facts"
