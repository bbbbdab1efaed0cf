"""The state machine and ``apply``: transitions, refusals alone, timers, the unattended net."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from controller.machine import ConversationMachine, Decider
from controller.models import (
    Close,
    Conversation,
    Event,
    InviteBot,
    Label,
    Participant,
    Route,
    SetBotMode,
    StartTimer,
)
from controller.rulebook import FiredRule

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def _conv(state: str = "new", **kw: Any) -> Conversation:
    return Conversation(
        id="cv_1",
        state=state,
        channel="webchat",
        instance="webchat",
        endpoint="web",
        identity="v_1",
        customer_id="cu_1",
        created_at=NOW,
        last_activity_at=NOW,
        **kw,
    )


def _event(kind: str = "customer.message", seq: int = 2, **data: Any) -> Event:
    return Event(
        id=f"ev_{seq}",
        type=kind,
        conversation_id="cv_1",
        seq=seq,  # type: ignore[arg-type]
        source="test",
        dedupe_key=str(seq),
        accepted_at=NOW,
        data=data,
    )


def _apply(conv: Conversation, event: Event, *rules: tuple[str, list[Any]]) -> Any:
    fired = [FiredRule(name, tuple(actions)) for name, actions in rules]
    return Decider().apply(conv, event, fired, rules_version="v", matcher="reference")


def test_states_and_events_are_declared() -> None:
    assert {s.id for s in ConversationMachine.states} == {
        "new",
        "bot",
        "queued",
        "agent",
        "wrap_up",
        "closed",
    }
    assert [s.id for s in ConversationMachine.final_states] == ["closed"]


def test_a_refused_action_is_refused_alone_and_named_with_its_rule() -> None:
    conv = _conv(
        "agent",
        participants=[Participant(role="agent", id="alice", primary=True, joined_at=NOW)],
        handled_by_agent=True,
    )
    record = _apply(
        conv,
        _event(),
        ("wrong-rule", [InviteBot(bot="demo"), Label(label="after")]),
    )
    assert record.refused == [
        {
            "rule": "wrong-rule",
            "action": "invite_bot",
            "reason": "invite_bot is not allowed in state agent",
        }
    ]
    assert record.after.state == "agent"
    assert record.after.labels == ["after"]  # the next action of the same rule applied


def test_route_removes_a_direct_bot_unless_it_was_kept_as_assistant() -> None:
    bot = Participant(role="bot", id="demo", mode="direct", primary=True, joined_at=NOW)
    record = _apply(
        _conv("bot", participants=[bot]),
        _event("bot.handoff"),
        ("handoff", [Route(queue="support")]),
    )
    assert record.after.state == "queued" and record.after.participants == []

    record = _apply(
        _conv("bot", participants=[bot]),
        _event("bot.handoff"),
        ("handoff", [SetBotMode(mode="assist"), Route(queue="support")]),
    )
    assert [(p.id, p.mode, p.primary) for p in record.after.participants] == [
        ("demo", "assist", False)
    ]


def test_close_goes_to_wrap_up_only_after_an_agent_handled_it() -> None:
    record = _apply(_conv("bot"), _event(), ("close", [Close(reason="idle")]))
    assert record.after.state == "closed"
    assert [e.type for e in record.emitted] == ["conversation.closed"]

    record = _apply(_conv("queued", handled_by_agent=True), _event(), ("c", [Close()]))
    assert record.after.state == "wrap_up"
    record = _apply(record.after, _event(seq=3), ("c", [Close()]))
    assert record.after.state == "closed"


def test_nothing_happens_to_a_closed_conversation() -> None:
    record = _apply(_conv("closed"), _event(), ("late", [Route(queue="q"), Label(label="x")]))
    assert record.after.state == "closed" and record.after.labels == []
    assert [r["action"] for r in record.refused] == ["route", "label"]


def test_machine_survives_closing_many_conversations() -> None:
    decider = Decider()
    for n in range(5):
        conv = _conv("bot")
        record = decider.apply(
            conv,
            _event(seq=n + 2),
            [FiredRule("c", (Close(),))],
            rules_version="v",
            matcher="reference",
        )
        assert record.after.state == "closed"


def test_an_agent_leaving_without_a_rule_leaves_the_conversation_unattended() -> None:
    conv = _conv(
        "agent",
        participants=[Participant(role="agent", id="alice", primary=True, joined_at=NOW)],
        handled_by_agent=True,
    )
    record = _apply(conv, _event("agent.left", agent_id="alice"))
    assert record.after.participants == []
    assert [e.type for e in record.emitted] == ["conversation.unattended"]
    assert record.released_agents == ["alice"]


def test_timer_generations_never_repeat() -> None:
    record = _apply(_conv("bot"), _event(), ("t", [StartTimer(name="idle", after=60)]))
    assert record.after.timers["idle"].generation == 1
    fired = _apply(record.after, _event("timer.fired", seq=3, name="idle", generation=1))
    assert "idle" not in fired.after.timers
    again = _apply(fired.after, _event(seq=4), ("t", [StartTimer(name="idle", after=60)]))
    assert again.after.timers["idle"].generation == 2


def test_a_bot_reply_after_handoff_is_dropped() -> None:
    record = _apply(_conv("queued"), _event("bot.message", bot="demo", text="late answer"))
    assert record.outbox == [] and record.messages == []
    assert record.refused and "no longer in the conversation" in record.refused[0]["reason"]


def test_apply_leaves_the_snapshot_it_was_given_unchanged() -> None:
    conv = _conv(
        "agent",
        participants=[Participant(role="agent", id="alice", primary=True, joined_at=NOW)],
        handled_by_agent=True,
        attributes={"topic": "billing"},
        labels=["vip"],
    )
    before = conv.model_dump()
    record = _apply(
        conv,
        _event("agent.left", agent_id="alice"),
        ("r", [Route(queue="support"), Label(label="rerouted"), StartTimer(name="t", after=5)]),
    )
    assert conv.model_dump() == before
    assert record.after.state == "queued" and record.after.labels == ["vip", "rerouted"]


def test_a_customer_message_decided_after_the_close_starts_a_new_conversation() -> None:
    record = _apply(_conv("closed"), _event("customer.message", text="one more thing"))
    assert record.messages == [] and record.outbox == []
    [moved] = record.emitted
    assert moved.type == "customer.message" and moved.conversation_id is None
    assert (moved.instance, moved.endpoint, moved.identity) == ("webchat", "web", "v_1")
    assert moved.data == {"text": "one more thing", "moved_from": "cv_1"}
    late_bot = _apply(_conv("closed"), _event("bot.message", bot="demo", text="late"))
    assert late_bot.outbox == [] and late_bot.refused
