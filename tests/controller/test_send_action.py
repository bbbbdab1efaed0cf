"""The rules' ``send`` with buttons: shown on the web chat, the tap read as event.reply_id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.clock import ManualClock
from controller.testing import RULES_DIR, Service

SURVEY = """
- name: offer-a-rating
  description: the customer asks to rate us; two choices
  when:
    event: customer.message
    event.text: rate
  then:
    - send:
        text: "How did we do?"
        buttons: [{ title: Great, payload: csat_5 }, { title: Poor, payload: csat_1 }]
    - stop

- name: keep-the-rating
  description: a tapped rating is kept on the conversation
  when:
    event: customer.message
    event.reply_id: { in: [csat_5, csat_1] }
  then:
    - set: { csat: "{{ event.reply_id }}" }
    - send: { text: "Thank you!" }
    - stop
"""


async def test_rule_buttons_reach_the_customer_and_the_tap_is_read_by_rules(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.yaml").write_text((RULES_DIR / "default.yaml").read_text())
    (rules / "a-survey.yaml").write_text(SURVEY)  # fires before default.yaml
    svc: Service = await make_service(clock=clock, rules_dir=rules)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("rate")
    frame = await customer.wait_message("controller", "How did we do?")
    assert frame["buttons"] == [
        {"id": "csat_5", "title": "Great"},
        {"id": "csat_1", "title": "Poor"},
    ]
    await customer.say("Great", payload="csat_5")
    await customer.wait_message("controller", "Thank you!")
    conv = await svc.until(cid, lambda c: "csat" in c.attributes)
    assert conv.attributes["csat"] == "csat_5"
