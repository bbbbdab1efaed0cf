"""A bulk upsert tells the open conversations of the customers it changed, as single writes
do: ``customer.updated`` once per changed customer and conversation, so rules see a CRM's
change at once; an unchanged line tells nobody."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.api.customers import _customer_event, _tell
from controller.clock import ManualClock
from controller.testing import RULES_DIR, Service
from tests.controller.test_customers_notifications import API, bulk, call

_RULES = """
- name: tell-gold
  when:
    event: customer.updated
    customer.profile.tier: gold
  then:
    - send: { to: customer, text: "Welcome to gold, {{ customer.profile.name }}" }
"""


async def updates_of(svc: Service, conversation_id: str) -> list[Any]:
    return [
        ev for ev, _ in await svc.store.events(conversation_id) if ev.type == "customer.updated"
    ]


async def test_a_bulk_change_reaches_the_rules_of_open_conversations(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", rules / "default.yaml")
    (rules / "crm.yaml").write_text(_RULES)
    service: Service = await make_service(clock=clock, rules_dir=rules)
    web = await service.customer()
    cid = await web.start_with_bot("hello")
    conv = await service.store.load_conversation(cid)
    assert conv is not None
    # the CRM claims the visitor (a PATCH: customer.identified, not an update)
    _, _, headers = await call(service, "GET", f"{API}/{conv.customer_id}")
    status, _, _ = await call(
        service,
        "PATCH",
        f"{API}/{conv.customer_id}",
        {"external_id": "crm-7", "name": "Ada"},
        {"If-Match": headers["ETag"]},
    )
    assert status == 200
    await service.settle()
    assert await updates_of(service, cid) == []

    lines = [
        {"external_id": "crm-7", "custom": {"tier": "gold"}},
        {"external_id": "crm-8", "name": "Someone Else"},  # created: no conversation
    ]
    report = await bulk(service, lines)
    assert (report["updated"], report["created"]) == (1, 1)
    told = await web.wait_message("controller", "Welcome to gold")
    assert told["text"] == "Welcome to gold, Ada"
    [event] = await updates_of(service, cid)
    record = await service.store.customer(conv.customer_id)
    assert record is not None and record.custom == {"tier": "gold"}
    assert event.source == "customers"
    assert event.dedupe_key == f"{record.id}:v{record.version}:customer.updated:{cid}"
    assert event.data == {"customer_id": record.id, "known": True}
    decisions = await service.store.decisions(cid)
    [seen] = [d["facts"] for d in decisions if d["facts"]["event"]["type"] == "customer.updated"]
    assert seen["customer"]["profile"]["tier"] == "gold"

    # the same file again changes nothing: no new event, no new message
    again = await bulk(service, lines)
    assert again["unchanged"] == 2
    await service.settle()
    assert len(await updates_of(service, cid)) == 1
    assert len([t for t in web.texts("controller") if t.startswith("Welcome to gold")]) == 1


async def test_every_open_conversation_of_a_changed_customer_is_told_once(
    service: Service,
) -> None:
    visitors = [await service.customer() for _ in range(3)]
    conversations = [await v.start_with_bot() for v in visitors]
    customers = []
    for n, conversation_id in enumerate(conversations):
        conv = await service.store.load_conversation(conversation_id)
        assert conv is not None
        _, _, headers = await call(service, "GET", f"{API}/{conv.customer_id}")
        status, _, _ = await call(
            service,
            "PATCH",
            f"{API}/{conv.customer_id}",
            {"external_id": f"crm-{n}"},
            {"If-Match": headers["ETag"]},
        )
        assert status == 200
        customers.append(conv.customer_id)
    # two changed lines, one unchanged, one failing
    report = await bulk(
        service,
        [
            {"external_id": "crm-0", "name": "Zero"},
            {"external_id": "crm-1", "language": "de"},
            {"external_id": "crm-2"},
            {"external_id": "crm-2", "email": "not an email"},
        ],
    )
    assert (report["updated"], report["unchanged"], report["failed"]) == (2, 1, 1)
    await service.settle()
    counts = [len(await updates_of(service, c)) for c in conversations]
    assert counts == [1, 1, 0]


async def test_a_refused_conversation_does_not_cost_the_others_their_event(
    service: Service,
) -> None:
    """All events of a batch go in one inbox transaction; one refused (its conversation
    gone meanwhile) rolls it back, and the others are then submitted one by one."""
    web = await service.customer()
    cid = await web.start_with_bot()
    conv = await service.store.load_conversation(cid)
    assert conv is not None
    record = await service.store.customer(conv.customer_id)
    assert record is not None
    await _tell(
        service.app,
        [
            _customer_event(record, "customer.updated", "cv_gone"),
            _customer_event(record, "customer.updated", cid),
        ],
    )
    [event] = await updates_of(service, cid)
    assert event.dedupe_key == f"{record.id}:v{record.version}:customer.updated:{cid}"
