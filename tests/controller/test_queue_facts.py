"""queue.* facts seen by rules, and the router's queue and offer metrics."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from controller.clock import ManualClock
from controller.keys import ROUTER
from controller.testing import RULES_DIR, Service

_QUEUE_RULE = """
- name: tell-queue-position
  when:
    event: customer.message
    conversation.state: queued
    queue.position: { gte: 1 }
  then:
    - send:
        to: customer
        text: >-
          You are number {{ queue.position }} in {{ queue.name }};
          {{ queue.agents_available }} agents free; about {{ queue.estimated_wait }}s;
          open {{ queue.open }}
"""


async def _with_queue_rule(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> Service:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", rules / "default.yaml")
    (rules / "queue.yaml").write_text(_QUEUE_RULE)
    service: Service = await make_service(clock=clock, rules_dir=rules)
    return service


async def test_a_rule_reads_the_queue_position_and_the_wait(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    service = await _with_queue_rule(make_service, tmp_path, clock)
    first, second = await service.customer(), await service.customer()
    one = (await first.say("agent"))["conversation_id"]
    await first.wait_message("controller", "You are in the queue")
    clock.advance(1)
    await second.say("agent")
    await second.wait_message("controller", "You are in the queue")

    await second.say("hello?")
    told = await second.wait_message("controller", "You are number")
    offer = service.settings.timeouts.offer
    assert told["text"] == (
        f"You are number 2 in support; 0 agents free; about {round(2 * offer)}s; open true"
    )
    await first.say("still here")
    told = await first.wait_message("controller", "You are number")
    assert told["text"].startswith("You are number 1 in support; 0 agents free;")

    # The facts are stored with the decision (explain and backtest replay them).
    decisions = await service.store.decisions(one)
    facts = [d["facts"] for d in decisions if d["facts"]["event"].get("text") == "still here"]
    assert facts[0]["queue"] == {
        "name": "support",
        "open": True,
        "agents_available": 0,
        "waiting": 2,
        "position": 1,
        "estimated_wait": round(offer),
    }


async def test_agents_available_counts_free_capacity(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    service = await _with_queue_rule(make_service, tmp_path, clock)
    bob = await service.agent("bob", capacity=3)
    carol = await service.agent("carol")
    await bob.available()
    await carol.available()
    await carol.command({"type": "presence", "presence": "away"})
    customer = await service.customer()
    conversation_id = (await customer.say("agent"))["conversation_id"]
    await bob.wait_offer(conversation_id)  # pending: still waiting, bob has room for more

    await customer.say("anyone?")
    told = await customer.wait_message("controller", "You are number")
    assert told["text"].startswith("You are number 1 in support; 1 agents free;")


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_queue_and_offer_metrics(service: Service, clock: ManualClock) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    bob = await service.agent("bob")
    await alice.available()
    await bob.available()
    assert service.http is not None

    async def metrics() -> str:
        assert service.http is not None
        return await (await service.http.get(service.base_url + "/metrics")).text()

    conversation_id = (await customer.say("agent"))["conversation_id"]
    first = await alice.wait_offer(conversation_id)
    clock.advance(10)
    text = await metrics()
    assert _sample(text, "convctl_queue_length", queue="support") == 1
    assert _sample(text, "convctl_queue_longest_wait_seconds", queue="support") == 10

    clock.advance(service.settings.timeouts.offer)  # alice's offer expires, bob gets one
    offered = await bob.wait_offer(conversation_id)
    declined = await bob.command({"type": "decline", "offer_id": offered["offer_id"]})
    assert declined["type"] == "ack", declined
    again = await alice.wait_for(
        lambda f: f["type"] == "offer" and f["offer_id"] != first["offer_id"]
    )
    assert (await alice.accept(again["offer_id"]))["type"] == "ack"
    await customer.wait_message("controller", "now chatting with alice")
    await service.settle()
    text = await metrics()
    assert _sample(text, "convctl_queue_length", queue="support") == 0  # back to 0
    assert _sample(text, "convctl_queue_longest_wait_seconds", queue="support") == 0
    counts = {
        outcome: _sample(text, "convctl_offers_total", outcome=outcome)
        for outcome in ("offered", "accepted", "declined", "expired", "cancelled")
    }
    assert counts == {
        "offered": 3,
        "accepted": 1,
        "declined": 1,
        "expired": 1,
        "cancelled": 0,
    }

    clock.advance(90)
    left = await alice.command({"type": "leave", "conversation_id": conversation_id})
    assert left["type"] == "ack", left
    final = await bob.wait_for(
        lambda f: f["type"] == "offer" and f["offer_id"] != offered["offer_id"]
    )
    assert (await bob.accept(final["offer_id"]))["type"] == "ack"
    await customer.wait_message("controller", "now chatting with bob")
    await service.settle()
    text = await metrics()
    assert _sample(text, "convctl_handle_seconds_count", queue="support") == 1
    assert _sample(text, "convctl_handle_seconds_sum", queue="support") == 90
    assert _sample(text, "convctl_offers_total", outcome="accepted") == 2
    assert _sample(text, "convctl_queue_length", queue="support") == 0
    # The handle time now drives the estimate: two places ahead x 90 s.
    assert service.app[ROUTER].estimated_wait("support", 2) == 180
    await customer.close()
