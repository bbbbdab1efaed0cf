"""Asking bots: timeouts, retries, the circuit breaker, rich and late answers, assist mode.

The demo bot's ``ask`` is replaced per test, so these tests are about the service's side of
the bot path, whatever the platform; each platform's connector has its own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from connectors.base import BotButton, BotCallback, BotMessage, BotReply, BotRequest
from controller.bots import CircuitBreaker, reply_events
from controller.clock import ManualClock
from controller.errors import BotError, Conflict, NotFound
from controller.keys import BOT_GATEWAY, BOTS
from controller.settings import ConnectorInstance
from controller.testing import Service, rules_with_assisting_bot

Ask = Callable[[BotRequest], Awaitable[BotReply]]


def _bot_instance(**settings: Any) -> list[ConnectorInstance]:
    return [
        ConnectorInstance(name="webchat", type="webchat"),
        ConnectorInstance(name="demo", type="demo_bot", settings=settings),
    ]


async def _service(
    make_service: Callable[..., Any], clock: ManualClock, ask: Ask, **bot_settings: Any
) -> Service:
    svc: Service = await make_service(clock=clock, connectors=_bot_instance(**bot_settings))
    svc.app[BOTS]["demo"].ask = ask  # type: ignore[method-assign]
    return svc


async def _events(svc: Service, cid: str, kind: str) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if ev.type == kind]


async def _refusals(svc: Service, cid: str) -> str:
    return str([d["refused"] for d in await svc.store.decisions(cid) if d.get("refused")])


def test_breaker_opens_after_failures_lets_one_trial_through_and_closes_on_success() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(failures=3, reset=30, clock=clock)
    assert [breaker.failed() for _ in range(3)] == [False, False, True]
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(30)
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    assert breaker.failed()  # the trial failed: open again for another period
    assert not breaker.allow()
    clock.advance(30)
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_an_answer_becomes_messages_then_its_outcome_with_stable_keys() -> None:
    reply = BotReply(
        messages=(
            BotMessage("Pick one", buttons=(BotButton("Yes", "/affirm"),)),
            BotMessage(custom={"handoff": True, "queue": "billing"}),
        ),
        handoff=True,
        handoff_data={"queue": "billing"},
        intent="human_handoff",
        confidence=0.97,
        attributes={"order": "A-17"},
    )
    first = reply_events("rasa", "c1", reply, "k", 4)
    assert [e.type for e in first] == ["bot.message", "bot.message", "bot.handoff"]
    assert [e.dedupe_key for e in first] == ["k:0", "k:1", "k:bot.handoff"]
    assert first[0].data["buttons"] == [{"title": "Yes", "payload": "/affirm"}]
    assert first[1].data["custom"] == {"handoff": True, "queue": "billing"}
    assert first[2].data["queue"] == "billing" and first[2].data["intent"] == "human_handoff"
    assert all(e.data["attributes"] == {"order": "A-17"} for e in first)
    assert [e.dedupe_key for e in reply_events("rasa", "c1", reply, "k", 4)] == [
        e.dedupe_key for e in first
    ]


async def test_a_bot_slower_than_its_timeout_fails_and_the_customer_is_queued(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    never = asyncio.Event()

    async def slow(request: BotRequest) -> BotReply:
        await never.wait()
        raise AssertionError("unreachable")

    svc = await _service(make_service, clock, slow, timeout=0.05, max_attempts=1)
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    await svc.until(cid, lambda c: c.state == "queued")
    failed = await _events(svc, cid, "bot.failed")
    assert len(failed) == 1 and failed[0].data["reason"] == "timeout"
    assert not customer.texts("bot")


async def test_retryable_failures_follow_the_bots_own_policy_and_answer_once(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    calls: list[str] = []

    async def flaky(request: BotRequest) -> BotReply:
        calls.append(request.idempotency_key)
        if len(calls) < 3:
            raise BotError("unavailable: 503", retryable=True)
        return BotReply(messages=(BotMessage("Hello after all"),))

    svc = await _service(make_service, clock, flaky, max_attempts=3, retry_backoff=0.5)
    customer = await svc.customer()
    await customer.say("hi")
    for _ in range(10):
        if len(calls) >= 3:
            break
        clock.advance(4)  # the bot's own backoff (0.5 s doubling, at most 4 s)
        await svc.settle()
    await customer.wait_message("bot", "Hello after all")
    assert len(calls) == 3 and len(set(calls)) == 1  # one question, asked three times
    await svc.settle()
    assert customer.texts("bot") == ["Hello after all"]


async def test_an_open_circuit_fails_fast_without_asking_then_a_trial_closes_it(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    calls: list[str] = []
    healthy = False

    async def ask(request: BotRequest) -> BotReply:
        calls.append(request.conversation_id)
        if not healthy:
            raise BotError("unavailable: connection refused", retryable=True)
        return BotReply(messages=(BotMessage("Back again"),))

    svc = await _service(
        make_service, clock, ask, max_attempts=1, breaker_failures=2, breaker_reset=60
    )
    cids = []
    for _ in range(3):
        customer = await svc.customer()
        cids.append(str((await customer.say("hi"))["conversation_id"]))
        await svc.until(cids[-1], lambda c: c.state == "queued")
    assert len(calls) == 2  # the third customer's question never reached the bot
    reasons = [(await _events(svc, cid, "bot.failed"))[0].data["reason"] for cid in cids]
    assert reasons == ["unavailable", "unavailable", "circuit_open"]
    assert svc.app[BOT_GATEWAY].breakers["demo"].state == "open"

    healthy = True
    clock.advance(60)
    customer = await svc.customer()
    await customer.say("hi")
    await customer.wait_message("bot", "Back again")
    assert svc.app[BOT_GATEWAY].breakers["demo"].state == "closed"


async def test_rich_answers_reach_the_customer_and_the_transcript_and_custom_stays_hidden(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    async def rich(request: BotRequest) -> BotReply:
        return BotReply(
            messages=(
                BotMessage(
                    "Anything else?",
                    buttons=(BotButton("Track order", "track my order"),),
                    image="https://example.com/help.png",
                ),
                BotMessage(custom={"survey": "csat"}),
            ),
            intent="menu",
            confidence=0.9,
            slots={"topic": "orders"},
        )

    svc = await _service(make_service, clock, rich)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    frame = await customer.wait_message("bot", "Anything else?")
    assert frame["buttons"] == [{"id": "track my order", "title": "Track order"}]
    assert frame["image"] == "https://example.com/help.png"
    await svc.settle()
    assert customer.texts("bot") == ["Anything else?"]  # the custom payload is not shown
    transcript = await svc.store.messages(cid, include_agent_only=True)
    bot_lines = [m for m in transcript if m.sender_role == "bot"]
    assert len(bot_lines) == 1 and bot_lines[0].content == {
        "buttons": [{"id": "track my order", "title": "Track order"}],
        "image": "https://example.com/help.png",
    }
    messages = await _events(svc, cid, "bot.message")
    assert messages[1].data["custom"] == {"survey": "csat"}
    assert messages[0].data["slots"] == {"topic": "orders"}


async def test_a_tapped_button_asks_the_bot_with_its_payload(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    asked: list[str] = []

    async def ask(request: BotRequest) -> BotReply:
        asked.append(request.text)
        return BotReply(messages=(BotMessage("ok"),))

    svc = await _service(make_service, clock, ask)
    customer = await svc.customer()
    await customer.start_with_bot("hi")
    await customer.say("Track order", payload="/track_order")
    await svc.settle()
    assert asked == ["hi", "/track_order"]


async def test_session_attributes_go_to_the_bot_and_come_back_on_the_conversation(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    seen: list[dict[str, str]] = []

    async def ask(request: BotRequest) -> BotReply:
        seen.append(dict(request.attributes))
        n = str(len(seen))
        return BotReply(messages=(BotMessage("turn " + n),), attributes={"turns": n})

    svc = await _service(make_service, clock, ask)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("again")
    await customer.wait_message("bot", "turn 2")
    conv = await svc.until(cid, lambda c: c.attributes.get("turns") == "2")
    assert seen[0].get("turns") is None and seen[1]["turns"] == "1"
    assert conv.attributes["turns"] == "2"


async def test_a_late_answer_to_an_older_message_is_dropped(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    async def later(request: BotRequest) -> BotReply:
        return BotReply(pending=True)  # answers come through the callback route

    svc = await _service(make_service, clock, later)
    gateway = svc.app[BOT_GATEWAY]
    customer = await svc.customer()
    cid = str((await customer.say("first"))["conversation_id"])
    await customer.say("second")
    await svc.settle()
    seqs = [ev.seq for ev in await _events(svc, cid, "customer.message")]

    def answer(text: str, seq: int, key: str) -> BotCallback:
        reply = BotReply(messages=(BotMessage(text),))
        return BotCallback(
            bot="demo", conversation_id=cid, reply=reply, dedupe_key=key, reply_to_seq=seq
        )

    await gateway.callback(answer("answer to second", seqs[1], "a2"))
    await customer.wait_message("bot", "answer to second")
    await gateway.callback(answer("answer to first", seqs[0], "a1"))
    await gateway.callback(answer("answer to second", seqs[1], "a2"))  # redelivered
    await svc.settle()
    assert customer.texts("bot") == ["answer to second"]
    assert "late answer to message" in await _refusals(svc, cid)


async def test_assist_mode_the_agent_gets_suggestions_and_the_customer_never_sees_the_bot(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    rules = rules_with_assisting_bot(tmp_path / "rules")

    async def ask(request: BotRequest) -> BotReply:
        if request.mode == "assist":
            # An assisting bot's handoff or end is not its to decide: both are refused.
            return BotReply(
                messages=(BotMessage(f"Suggested: we open at 9 ({request.text})"),),
                handoff=True,
                ended=True,
            )
        if "agent" in request.text:
            return BotReply(messages=(BotMessage("Finding a person"),), handoff=True)
        return BotReply(messages=(BotMessage("Hello, I am the bot"),))

    svc: Service = await make_service(clock=clock, connectors=_bot_instance(), rules_dir=rules)
    svc.app[BOTS]["demo"].ask = ask  # type: ignore[method-assign]
    alice = await svc.agent("alice")
    await alice.available()
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("agent please")
    await alice.take(cid)
    await customer.wait_message("controller", "now chatting with alice")
    conv = await svc.until(cid, lambda c: c.state == "agent")
    assert [(p.role, p.mode, p.primary) for p in conv.participants if p.role == "bot"] == [
        ("bot", "assist", False)
    ]

    await customer.say("when do you open?")
    suggestion = await alice.wait_for(lambda f: f["type"] == "suggestion")
    assert suggestion["message"]["text"].startswith("Suggested: we open at 9")
    # The agent sends it as is; then an edited version.
    await alice.say(cid, suggestion["message"]["text"])
    await alice.say(cid, "We open at 9:00, Monday to Friday.")
    await customer.wait_message("agent", "Monday to Friday")
    await svc.settle()
    conv = await svc.until(cid, lambda c: c.state == "agent")
    assert customer.texts("bot") == ["Hello, I am the bot", "Finding a person"]
    assert customer.texts("agent") == [
        "Suggested: we open at 9 (when do you open?)",
        "We open at 9:00, Monday to Friday.",
    ]
    assert len(await _events(svc, cid, "bot.handoff")) == 2
    assert "is assisting; only the serving bot hands over" in await _refusals(svc, cid)


async def test_a_callback_for_a_closed_conversation_is_refused_with_a_conflict(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    async def ask(request: BotRequest) -> BotReply:
        return BotReply(messages=(BotMessage("bye"),), ended=True)

    svc = await _service(make_service, clock, ask)
    customer = await svc.customer()
    cid = await customer.start_with_bot("bye")
    await svc.until(cid, lambda c: c.state == "closed")
    late = BotCallback(
        bot="demo",
        conversation_id=cid,
        reply=BotReply(messages=(BotMessage("too late"),)),
        dedupe_key="late-1",
    )
    with pytest.raises(Conflict, match="is closed"):  # the callback route answers 409
        await svc.app[BOT_GATEWAY].callback(late)
    await svc.settle()
    assert "too late" not in customer.texts("bot")


async def test_a_callback_that_never_comes_fails_the_bot_and_one_that_comes_does_not(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    async def later(request: BotRequest) -> BotReply:
        return BotReply(pending=True)

    svc = await _service(make_service, clock, later, timeout=0.2)
    silent = await svc.customer()
    silent_cid = str((await silent.say("hi"))["conversation_id"])
    await silent.wait_message("controller", "assistant is not available")
    failed = await _events(svc, silent_cid, "bot.failed")
    assert [e.data["reason"] for e in failed] == ["timeout"]

    answered = await svc.customer()
    cid = str((await answered.say("hi"))["conversation_id"])
    seq = (await _events(svc, cid, "customer.message"))[0].seq
    reply = BotReply(messages=(BotMessage("answered by callback"),))
    await svc.app[BOT_GATEWAY].callback(
        BotCallback(bot="demo", conversation_id=cid, reply=reply, dedupe_key="cb", reply_to_seq=seq)
    )
    await answered.wait_message("bot", "answered by callback")
    # Another conversation's callback timing out later does not touch this one.
    other = await svc.customer()
    other_cid = str((await other.say("hi"))["conversation_id"])
    await other.wait_message("controller", "assistant is not available")
    assert await _events(svc, cid, "bot.failed") == []
    assert (await svc.until(cid, lambda c: True)).state == "bot"
    assert (await svc.until(other_cid, lambda c: True)).state == "queued"


async def test_a_hanging_bot_does_not_hold_up_other_conversations(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    release = asyncio.Event()

    async def ask(request: BotRequest) -> BotReply:
        if request.text == "slow":
            await release.wait()
        return BotReply(messages=(BotMessage(f"answer to {request.text}"),))

    svc = await _service(make_service, clock, ask, timeout=60)
    slow = await svc.customer()
    await slow.say("slow")
    fast = await svc.customer()
    for i in range(3):
        await fast.say(f"fast {i}")
        await fast.wait_message("bot", f"answer to fast {i}")
    assert slow.texts("bot") == []  # still waiting for its bot
    release.set()
    await slow.wait_message("bot", "answer to slow")


async def test_one_fallback_is_the_bots_to_handle_two_in_a_row_reach_the_rules(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    async def ask(request: BotRequest) -> BotReply:
        if request.text.startswith("?"):
            return BotReply(messages=(BotMessage("Sorry, say again?"),), failed="fallback")
        return BotReply(messages=(BotMessage("Understood"),), intent="known")

    svc = await _service(make_service, clock, ask)
    customer = await svc.customer()
    cid = await customer.start_with_bot("?huh")
    await customer.say("fine")
    await customer.wait_message("bot", "Understood")
    await customer.say("?what")
    conv = await svc.until(cid, lambda c: c.attributes.get("bot_fallbacks") == "1")
    assert conv.state == "bot" and await _events(svc, cid, "bot.failed") == []
    await customer.say("?again")  # the second in a row
    await customer.wait_message("controller", "assistant is not available")
    failed = await _events(svc, cid, "bot.failed")
    assert [e.data["reason"] for e in failed] == ["fallback"]
    assert customer.texts("bot").count("Sorry, say again?") == 3


async def test_a_callback_naming_an_unknown_bot_is_a_404(service: Service) -> None:
    answer = BotCallback(
        bot="nobody", conversation_id="cv_x", reply=BotReply(), dedupe_key="k", reply_to_seq=None
    )
    with pytest.raises(NotFound, match="no bot instance 'nobody'"):
        await service.app[BOT_GATEWAY].callback(answer)
