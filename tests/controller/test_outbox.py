"""Outbox delivery: retries with backoff, dead letters, order per conversation, bot failures."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.base import BotReply, BotRequest, OutboundMessage
from controller.clock import ManualClock
from controller.errors import BotError, ChannelSendError
from controller.keys import BOTS, CHANNELS
from controller.testing import Service


class Flaky:
    """Wraps a connector method: fails ``failures`` times with ``error``, then calls through."""

    def __init__(self, real: Any, failures: int, error: Exception) -> None:
        self.real, self.failures, self.error = real, failures, error
        self.calls: list[Any] = []

    async def __call__(self, arg: Any) -> Any:
        self.calls.append(arg)
        if len(self.calls) <= self.failures:
            raise self.error
        return await self.real(arg)


async def test_retryable_send_failures_are_retried_in_order(
    service: Service, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = service.app[CHANNELS]["webchat"]
    flaky = Flaky(channel.send, 2, ChannelSendError("provider busy", retryable=True))
    monkeypatch.setattr(channel, "send", flaky)
    customer = await service.customer()
    ack = await customer.say("agent")  # bot reply and the queue notice: two rows, one lane
    await service.settle()
    rows = await service.store.outbox_rows()
    channel_rows = [r for r in rows if r["destination"] == "channel:webchat"]
    assert channel_rows[0]["status"] == "pending" and channel_rows[0]["attempts"] == 1
    assert channel_rows[1]["attempts"] == 0  # waits behind the first: no overtaking
    for _ in range(2):
        clock.advance(service.settings.outbox_backoff_max)
        await service.settle()
    rows = [r for r in await service.store.outbox_rows() if r["destination"] == "channel:webchat"]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["attempts"] for r in rows] == [3, 1]
    texts = [m.message["text"] for m in flaky.calls if isinstance(m, OutboundMessage)]
    assert texts[-2:] == [
        "Let me find an agent for you.",
        "You are in the queue. An agent will be with you shortly.",
    ]
    await customer.wait_message("controller", "in the queue")
    assert ack["conversation_id"] == rows[0]["conversation_id"]


async def test_permanent_failure_becomes_a_dead_letter_and_the_lane_moves_on(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = service.app[CHANNELS]["webchat"]
    flaky = Flaky(channel.send, 1, ChannelSendError("invalid recipient", retryable=False))
    monkeypatch.setattr(channel, "send", flaky)
    customer = await service.customer()
    await customer.say("agent")
    await service.settle()
    allrows = await service.store.outbox_rows()
    rows = [r for r in allrows if r["destination"] == "channel:webchat"]
    assert [r["status"] for r in rows] == ["dead", "done"], allrows
    assert "invalid recipient" in rows[0]["last_error"]
    metrics = await (await service.http.get(service.base_url + "/metrics")).text()  # type: ignore[union-attr]
    assert 'convctl_outbox_dead_total{destination="channel"} 1.0' in metrics


async def test_retries_stop_after_the_configured_attempts(
    make_service: Any, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    service: Service = await make_service(clock=clock, outbox_max_attempts=3)
    channel = service.app[CHANNELS]["webchat"]
    flaky = Flaky(channel.send, 100, ChannelSendError("503", retryable=True))
    monkeypatch.setattr(channel, "send", flaky)
    customer = await service.customer()
    await customer.say("hi")
    await service.settle()
    for _ in range(5):
        clock.advance(service.settings.outbox_backoff_max)
        await service.settle()
    rows = [r for r in await service.store.outbox_rows() if r["destination"] == "channel:webchat"]
    assert rows[0]["status"] == "dead" and rows[0]["attempts"] == 3
    key = f"{rows[0]['event_id']}:{rows[0]['n']}"
    assert [m.idempotency_key for m in flaky.calls].count(key) == 3


async def test_a_bot_that_fails_hands_the_customer_to_the_queue(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = service.app[BOTS]["demo"]

    async def down(request: BotRequest) -> BotReply:
        raise BotError("connection refused", retryable=False)

    monkeypatch.setattr(bot, "ask", down)
    customer = await service.customer()
    ack = await customer.say("hi")
    await customer.wait_message("controller", "assistant is not available")
    conv = await service.until(ack["conversation_id"], lambda c: c.state == "queued")
    assert conv.priority == 10 and conv.queue == "support"
    assert conv.participants == []  # the failed bot is gone; nobody answers as the bot
