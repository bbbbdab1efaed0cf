"""WhatsApp sends whose fate is unknown: held for the delivery status instead of sent twice.

Graph has no idempotency key. When a send's answer never reaches us (the request timed out,
or the process died with the row claimed), Graph may or may not have the message. The row is
held for ``resend_unconfirmed_after`` seconds: a status webhook naming the send (its
``biz_opaque_callback_data`` is the row's idempotency key) marks it done, and only a row no
status confirmed goes out again. The fake Graph posts a ``sent`` status for every message it
takes, like Meta, and can answer a send too late (taking it, or not).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.keys import INBOX, METRICS
from controller.models import NewEvent
from controller.testing import Service
from controller.testing_graph import (
    FakeGraph,
    GraphRequest,
    MetaSender,
    change,
    envelope,
    text_message,
)
from tests.connectors.test_whatsapp import (
    NUMBER_A,
    SECRET,
    TOKENS,
    USER,
    Setup,
    conversation_of,
    start,
    wait_event,
)
from tests.connectors.test_whatsapp import whatsapp_settings as base_settings

HOLD = 60.0


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = await FakeGraph(tokens=dict(TOKENS)).start()
    yield fake
    await fake.stop()


async def _service(make_service: Callable[..., Any], graph: FakeGraph, clock: ManualClock) -> Setup:
    # A send answered after 0.3 s is a timeout: the fake's stalls answer after 1.5 s.
    settings = base_settings(graph, http_timeout_s=0.3, resend_unconfirmed_after=HOLD)
    svc, sender, graph = await start(make_service, graph, settings, clock=clock)
    graph.post_statuses(svc.base_url + "/webhooks/whatsapp", SECRET)
    return svc, sender, graph


def _to_user(graph: FakeGraph) -> list[GraphRequest]:
    return graph.sent(lambda r: r.json.get("to") == USER)


def _counter(svc: Service, name: str) -> float:
    metric = getattr(svc.app[METRICS], name)
    return float(metric.labels("channel")._value.get())


async def _until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _pending_channel_rows(svc: Service) -> list[dict[str, Any]]:
    return [
        r
        for r in await svc.store.outbox_rows("pending")
        if str(r["destination"]).startswith("channel:")
    ]


async def _held_reply(svc: Service, sender: MetaSender, graph: FakeGraph) -> None:
    """The customer says hi; Graph never takes the bot's reply and answers too late: the
    reply is held for its status."""
    graph.stall(1, taken=False, seconds=1.5)
    await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.IN1")])])
    )
    await _until(lambda: _counter(svc, "outbox_held") == 1, "the send to be held")
    await svc.settle()


async def test_a_send_graph_took_but_never_answered_is_confirmed_by_its_status_not_resent(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc, sender, graph = await _service(make_service, graph, clock)
    # the status comes after the send timed out (0.3 s) and was held
    graph.stall(1, taken=True, seconds=1.5, status_after=1.0)
    code, _ = await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.IN1")])])
    )
    assert code == 200
    cid = await conversation_of(svc, USER)
    # the reply was taken, its answer came too late: held, then confirmed by the status
    await _until(lambda: _counter(svc, "outbox_confirmed") == 1, "the status to confirm it")
    assert _counter(svc, "outbox_held") == 1
    taken = _to_user(graph)
    assert len(taken) == 1
    key = taken[0].json["biz_opaque_callback_data"]
    assert key.count(":") == 1  # the row's own key: event id and place
    # the status that confirmed it names our message (the provider id was recorded then)
    statuses = await wait_event(svc, cid, "delivery.status")
    bot_lines = [m for m in await svc.store.messages(cid, include_agent_only=False)]
    ours = {m.id for m in bot_lines if m.sender_role == "bot"}
    assert statuses[0].data["wamid"] == taken[0].provider_id
    assert statuses[0].data["message_id"] in ours
    # long after the hold would have passed, it was still sent once
    clock.advance(HOLD * 2)
    await svc.settle()
    assert len(_to_user(graph)) == 1
    assert _counter(svc, "outbox_unconfirmed_resent") == 0
    assert await _pending_channel_rows(svc) == []


async def test_a_send_graph_never_took_goes_out_again_once_the_hold_has_passed(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc, sender, graph = await _service(make_service, graph, clock)
    await _held_reply(svc, sender, graph)
    assert _to_user(graph) == []  # nothing taken, and nothing tried again before the hold
    held = await _pending_channel_rows(svc)
    assert len(held) == 1
    # a later message of the conversation waits behind it (order per conversation)
    await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "agent", "wamid.IN2")])])
    )
    await svc.settle()
    assert _to_user(graph) == []
    clock.advance(HOLD + 1)
    await _until(lambda: len(_to_user(graph)) >= 2, "the held reply and the next one")
    await svc.settle()
    sent = _to_user(graph)
    keys = [r.json["biz_opaque_callback_data"] for r in sent]
    assert len(keys) == len(set(keys))  # each message once
    assert keys[0] == f"{held[0]['event_id']}:{held[0]['n']}"  # the held one first
    assert _counter(svc, "outbox_unconfirmed_resent") == 1
    assert _counter(svc, "outbox_confirmed") == 0
    assert Counter(k for k in keys)[keys[0]] == 1


async def test_a_status_that_comes_before_the_late_answer_keeps_the_send_from_repeating(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc, sender, graph = await _service(make_service, graph, clock)
    # the status arrives at once, while the send still waits for its (late) answer
    graph.stall(1, taken=True, seconds=1.5)
    await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.IN1")])])
    )
    cid = await conversation_of(svc, USER)
    await _until(lambda: graph.statuses_posted >= 1, "the status")
    # The send times out after the status came: the row is done either at once (the status
    # was stored in the conversation) or by a retry that finds the send known (the status
    # was still on its way into the store); never held, never sent again.
    for _ in range(100):
        clock.advance(1)  # a retry's backoff
        await svc.settle()
        if not await _pending_channel_rows(svc):
            break
        await asyncio.sleep(0.05)
    # no hold, one send, row done
    assert len(_to_user(graph)) == 1
    assert _counter(svc, "outbox_held") == 0
    assert await _pending_channel_rows(svc) == []
    clock.advance(HOLD * 2)
    await svc.settle()
    assert len(_to_user(graph)) == 1
    statuses = await wait_event(svc, cid, "delivery.status")
    assert statuses[0].data["wamid"] == _to_user(graph)[0].provider_id


async def test_a_held_send_whose_status_was_stored_elsewhere_is_not_sent_again(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    # With several processes, the status webhook may reach a process that does not hold the
    # row: it is stored, not confirmed there. When the hold ends the stored status is found.
    svc, sender, graph = await _service(make_service, graph, clock)
    await _held_reply(svc, sender, graph)
    [held] = await _pending_channel_rows(svc)
    key = f"{held['event_id']}:{held['n']}"
    await svc.app[INBOX].submit(
        [
            NewEvent(
                type="delivery.status",
                source="channel:whatsapp",
                dedupe_key="wamid.ELSEWHERE:sent",
                conversation_id=held["conversation_id"],
                data={"status": "sent", "wamid": "wamid.ELSEWHERE", "callback_data": key},
            )
        ]
    )
    await svc.settle()
    clock.advance(HOLD + 1)
    await svc.settle()
    assert _to_user(graph) == []  # not sent again: the stored status showed Graph has it
    assert await _pending_channel_rows(svc) == []
    assert _counter(svc, "outbox_confirmed") == 1
    assert _counter(svc, "outbox_unconfirmed_resent") == 0
