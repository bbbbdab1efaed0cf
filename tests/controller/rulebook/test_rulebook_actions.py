"""Actions: every kind parsed to its model, templates, durations, languages, order and stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.errors import RuleError
from controller.models.actions import (
    Assign,
    CancelTimer,
    Close,
    InviteBot,
    Label,
    RemoveParticipant,
    Route,
    Send,
    SetAttributes,
    SetBotMode,
    StartTimer,
    Transfer,
    Unlabel,
    Whisper,
)
from controller.rulebook import Rulebook

EVENT = {"event": {"type": "conversation.created"}}


def actions_of(make_book: Any, then: str, facts: dict[str, Any] | None = None, **kw: Any) -> Any:
    book = make_book(
        f"""
- name: r
  when: {{event: conversation.created}}
  then:
{then}
""",
        **kw,
    )
    result = book.decide({**EVENT, **(facts or {})})
    assert result == book.decide({**EVENT, **(facts or {})}, matcher="reference")
    assert [rule.rule for rule in result] == ["r"]
    return result[0].actions


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ("- invite_bot: {bot: greeter}", InviteBot(bot="greeter")),
        ("- invite_bot: {bot: greeter, mode: assist}", InviteBot(bot="greeter", mode="assist")),
        ("- set_bot_mode: {mode: assist}", SetBotMode(mode="assist")),
        ("- set_bot_mode: {mode: direct, bot: b}", SetBotMode(mode="direct", bot="b")),
        ("- remove_participant: {role: bot}", RemoveParticipant(role="bot")),
        (
            "- remove_participant: {role: agent, id: a1, reason: idle}",
            RemoveParticipant(role="agent", id="a1", reason="idle"),
        ),
        ("- route: {queue: sales}", Route(queue="sales")),
        ("- route: {queue: sales, priority: urgent}", Route(queue="sales", priority=20)),
        ("- route: {queue: sales, priority: -3}", Route(queue="sales", priority=-3)),
        (
            "- route: {queue: sales, priority: low, skills: [de, billing]}",
            Route(queue="sales", priority=-10, skills=("de", "billing")),
        ),
        ("- assign: {agent: a7}", Assign(agent="a7")),
        ("- transfer: {queue: billing}", Transfer(queue="billing")),
        ("- transfer: {agent: a2}", Transfer(agent="a2")),
        ("- send: {text: hi}", Send(text="hi")),
        ("- send: {to: agents, text: heads up}", Send(to="agents", text="heads up")),
        ("- whisper: {text: psst}", Whisper(text="psst")),
        ("- start_timer: {name: idle, after: 90}", StartTimer(name="idle", after=90)),
        ("- start_timer: {name: idle, after: 1.5}", StartTimer(name="idle", after=1.5)),
        ("- start_timer: {name: idle, after: 90s}", StartTimer(name="idle", after=90)),
        ("- start_timer: {name: idle, after: 5m}", StartTimer(name="idle", after=300)),
        ("- start_timer: {name: idle, after: 1h}", StartTimer(name="idle", after=3600)),
        ("- start_timer: {name: idle, after: 1h30m}", StartTimer(name="idle", after=5400)),
        ("- start_timer: {name: idle, after: settings.idle}", StartTimer(name="idle", after=42)),
        ("- cancel_timer: {name: idle}", CancelTimer(name="idle")),
        ("- cancel_timer: idle", CancelTimer(name="idle")),
        (
            "- set: {tier: gold, score: 3, vip: true}",
            SetAttributes(values={"tier": "gold", "score": 3, "vip": True}),
        ),
        ("- label: vip", Label(label="vip")),
        ("- unlabel: vip", Unlabel(label="vip")),
        ("- close: {reason: resolved}", Close(reason="resolved")),
        ("- close: resolved", Close(reason="resolved")),
        ("- close: {}", Close()),
    ],
)
def test_every_action_kind(make_book: Any, then: str, expected: Any) -> None:
    assert actions_of(make_book, "    " + then, settings={"idle": 42}) == (expected,)


def test_templates_with_fallback(make_book: Any) -> None:
    then = """    - route: {queue: "{{ conversation.queue | support }}"}
    - send: {text: "Hi {{ customer.profile.first_name | there }}, you are #{{queue.position}}"}
    - set: {last: "{{ event.type }}", flag: "{{ conversation.has_primary }}"}
    - whisper: {text: "missing:[{{ customer.profile.nothing }}]"}"""
    assert actions_of(make_book, then) == (
        Route(queue="support"),
        Send(text="Hi there, you are #"),
        SetAttributes(values={"last": "conversation.created", "flag": ""}),
        Whisper(text="missing:[]"),
    )
    filled = {
        "conversation": {"queue": "billing", "has_primary": True},
        "customer": {"profile": {"first_name": "Ada"}},
        "queue": {"position": 2},
    }
    assert actions_of(make_book, then, filled) == (
        Route(queue="billing"),
        Send(text="Hi Ada, you are #2"),
        SetAttributes(values={"last": "conversation.created", "flag": "true"}),
        Whisper(text="missing:[]"),
    )


def test_template_resolving_to_empty_required_argument_raises(make_book: Any) -> None:
    book = make_book(
        """
- name: r
  when: {event: conversation.created}
  then: [{route: {queue: "{{ conversation.queue }}"}}]
"""
    )
    assert book.decide({**EVENT, "conversation": {"queue": "q"}})[0].actions == (Route(queue="q"),)
    with pytest.raises(RuleError, match=r"rules.yaml:4:\d+: rule 'r': 'route'"):
        book.decide(EVENT)


@pytest.mark.parametrize(
    ("facts", "default", "expected"),
    [
        ({"customer": {"language": "de"}, "conversation": {"language": "fr"}}, "en", "Hallo"),
        ({"customer": {"language": "it"}, "conversation": {"language": "fr"}}, "en", "Salut"),
        ({"customer": {"language": "it"}}, "en", "Hello"),
        ({}, "de", "Hallo"),
        ({}, "es", "Salut"),
    ],
)
def test_language_selection(
    make_book: Any, facts: dict[str, Any], default: str, expected: str
) -> None:
    then = "    - send: {text: {fr: Salut, en: Hello, de: Hallo}}"
    result = actions_of(make_book, then, facts, default_language=default)
    assert result == (Send(text=expected),)


def test_language_selection_whisper_with_template(make_book: Any) -> None:
    then = "    - whisper: {text: {en: 'from {{ customer.id }}', de: 'von {{ customer.id }}'}}"
    facts = {"customer": {"language": "de", "id": "c9"}}
    assert actions_of(make_book, then, facts) == (Whisper(text="von c9"),)


def test_all_matching_rules_fire_in_file_then_rule_order(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        """
- name: b1
  when: {event: customer.message}
  then: [{label: b1}]
- name: b2
  when: {event: customer.message, customer.known: true}
  then: [{label: b2}]
"""
    )
    (tmp_path / "a.yml").write_text(
        """
- name: a1
  when: {event: customer.message}
  then: [{label: a1}]
"""
    )
    (tmp_path / "ignored.txt").write_text("not rules")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "0.yaml").write_text("- this is not read\n")
    with Rulebook.load(tmp_path, settings={}) as book:
        assert [rule.name for rule in book.rules] == ["a1", "b1", "b2"]
        facts = {"event": {"type": "customer.message"}, "customer": {"known": True}}
        for matcher in ("durable", "reference"):
            result = book.decide(facts, matcher=matcher)
            assert [r.rule for r in result] == ["a1", "b1", "b2"]
            assert [r.actions for r in result] == [
                (Label(label="a1"),),
                (Label(label="b1"),),
                (Label(label="b2"),),
            ]
        assert book.event_types() == frozenset({"customer.message"})
        first = book.version
    with Rulebook.load([tmp_path / "b.yaml", tmp_path / "a.yml"], settings={}) as same:
        assert same.version == first
    (tmp_path / "a.yml").write_text((tmp_path / "a.yml").read_text() + "\n")
    with Rulebook.load(tmp_path, settings={}, matcher="reference") as changed:
        assert changed.version != first


def test_stop_ends_the_decision(make_book: Any, fired: Any) -> None:
    book = make_book(
        """
- name: first
  when: {event: customer.message}
  then: [{label: one}]
- name: stopper
  when: {event: customer.message, customer.known: true}
  then: [{label: two}, stop]
- name: last
  when: {event: customer.message}
  then: [{label: three}]
"""
    )
    facts = {"event": {"type": "customer.message"}, "customer": {"known": True}}
    result = book.decide(facts)
    assert [r.rule for r in result] == ["first", "stopper"]
    assert result[1].actions == (Label(label="two"),)
    assert fired(book, {"event": {"type": "customer.message"}}) == ["first", "last"]


def test_stop_alone(make_book: Any) -> None:
    book = make_book(
        """
- name: gate
  when: {event: customer.message}
  then: [stop]
- name: never
  when: {event: customer.message}
  then: [{label: x}]
"""
    )
    assert book.decide({"event": {"type": "customer.message"}}) == [("gate", ())]


def test_unknown_event_type_and_no_rules(make_book: Any) -> None:
    book = make_book("- name: r\n  when: {event: customer.message}\n  then: [{label: x}]\n")
    assert book.decide({"event": {"type": "bot.message"}}) == []
    assert book.decide({"event": {}}) == []
    assert book.decide({}) == []
    empty = make_book("")
    assert empty.decide({"event": {"type": "bot.message"}}) == []
    assert empty.event_types() == frozenset()


def test_close_frees_durable_but_reference_still_works(make_book: Any) -> None:
    book = make_book("- name: r\n  when: {event: customer.message}\n  then: [{label: x}]\n")
    facts = {"event": {"type": "customer.message"}}
    assert len(book.decide(facts)) == 1
    book.close()
    book.close()
    assert len(book.decide(facts, matcher="reference")) == 1
    with pytest.raises(Exception, match="closed"):
        book.decide(facts)
