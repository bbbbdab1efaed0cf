"""Workers: refusals are logged and counted; events left undecided by a crash are recovered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from controller.clock import ManualClock
from controller.models import NewEvent
from controller.testing import Service

REFUSING_RULES = """
- name: start-with-bot
  when: { event: conversation.created }
  then:
    - invite_bot: { bot: demo, mode: direct }
- name: invite-again
  description: asks for a transition the state does not allow, then labels
  when: { event: customer.message }
  then:
    - invite_bot: { bot: demo, mode: direct }
    - label: seen
"""


async def test_a_refused_action_is_logged_with_its_rule_and_counted(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.yaml").write_text(REFUSING_RULES, encoding="utf-8")
    service: Service = await make_service(clock=clock, rules_dir=rules)
    customer = await service.customer()
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        ack = await customer.say("hi")
        await customer.wait_message("bot")
        await service.settle()
    refused = [e for e in logs if e["event"] == "action_refused"]
    assert refused and refused[0]["rule"] == "invite-again"
    assert refused[0]["action"] == "invite_bot"
    conv = await service.store.load_conversation(ack["conversation_id"])
    assert conv is not None and conv.labels == ["seen"]  # the rule's other action applied
    assert service.http is not None
    metrics = await (await service.http.get(service.base_url + "/metrics")).text()
    assert 'convctl_actions_refused_total{action="invite_bot",rule="invite-again"} 1.0' in metrics
    decisions = await service.store.decisions(ack["conversation_id"])
    message_decision = next(d for d in decisions if d["event_type"] == "customer.message")
    assert message_decision["refused"][0]["rule"] == "invite-again"


async def test_an_event_left_undecided_is_decided_at_start_by_the_reference_matcher(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    first: Service = await make_service(clock=clock)
    customer = await first.customer()
    ack = await customer.say("hi")
    await customer.wait_message("bot")
    await customer.close()  # nothing may wake the conversation before the "crash" below
    await first.until(ack["conversation_id"], lambda c: not c.customer_present)
    # As if the process died right after storing this event: stored, never decided.
    await first.store.accept(
        [
            NewEvent(
                type="customer.message",
                source="test",
                dedupe_key="in-flight-1",
                conversation_id=ack["conversation_id"],
                data={"text": "hours"},
            )
        ],
        clock.now(),
    )
    await first.stop()

    second: Service = await make_service(clock=clock)
    await second.settle()
    decisions = await second.store.decisions(ack["conversation_id"])
    recovered = [d for d in decisions if d["event_type"] == "customer.message"][-1]
    assert recovered["matcher"] == "reference"
    assert [f["rule"] for f in recovered["fired"]] == ["customer-wrote"]
    assert second.http is not None
    metrics = await (await second.http.get(second.base_url + "/metrics")).text()
    assert "convctl_recovered_events_total 1.0" in metrics
    transcript = await second.store.messages(ack["conversation_id"], include_agent_only=False)
    assert [m.sender_role for m in transcript] == ["customer", "bot", "customer", "bot"]
    assert transcript[-1].text.startswith("We are open")
