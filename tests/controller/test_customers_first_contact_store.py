"""The Store contract of a first contact's anonymous customer, on SQLite and PostgreSQL: the
accept that creates it hands a ``created`` change to ``notify`` inside its transaction, so
the notification rows commit and roll back with the events."""

from __future__ import annotations

import pytest

from controller.errors import NotFound, RequestError
from controller.models import NewEvent
from controller.store.base import Identity, Store
from tests.controller.test_customers_store import Recorder
from tests.controller.test_store import T0, make_store, message, store, to

__all__ = ["make_store", "store"]  # the contract's fixtures, parametrized over both backends


def whatsapp(wa_id: str, key: str) -> NewEvent:
    return NewEvent(
        type="customer.message",
        source="whatsapp:wa-main",
        dedupe_key=key,
        channel="whatsapp",
        instance="wa-main",
        endpoint="4930000000",
        identity=wa_id,
        data={"text": "hallo", "profile_name": "Jo"},
    )


async def app_rows(store: Store) -> list[dict[str, object]]:
    return [r for r in await store.outbox_rows() if r["destination"] == "app:ap_test"]


async def test_a_first_contact_notifies_created_in_the_accept(store: Store) -> None:
    note = Recorder()
    [first] = await store.accept([message("visitor-a", key="a1")], T0, notify=note)
    conv = await store.load_conversation(first.conversation_id)
    assert conv is not None
    [change] = note.changes
    assert (change.kind, change.customer_id) == ("created", conv.customer_id)
    assert change.record is not None and change.record.known is False
    assert change.record.identities == (Identity("webchat", "visitor-a"),)
    assert change.version == change.record.version
    [row] = await app_rows(store)
    assert row["conversation_id"] == conv.customer_id  # the customer's lane
    assert row["event_id"] == change.notice_id and row["status"] == "pending"

    # the second message, a duplicate, and a new conversation of a known customer: none
    await store.accept([message("visitor-a", key="a2"), message("visitor-a", key="a1")], T0)
    await store.accept([message("visitor-a", key="a3")], T0, notify=note)
    await store.accept([to(first.conversation_id, text="x")], T0, notify=note)
    assert len(note.changes) == 1

    # a WhatsApp user: the identity is the E.164 number, the profile name the channel's
    [wa] = await store.accept([whatsapp("4915123456789", "w1")], T0, notify=note)
    wconv = await store.load_conversation(wa.conversation_id)
    assert wconv is not None
    last = note.changes[-1]
    assert last.customer_id == wconv.customer_id and last.record is not None
    assert last.record.identities == (Identity("whatsapp", "+4915123456789"),)
    assert last.record.profile["name"] == "Jo"
    assert len(await app_rows(store)) == 2


async def test_the_notification_rolls_back_with_the_accept(store: Store) -> None:
    note = Recorder()
    # the second event names an unknown conversation: the whole accept rolls back
    with pytest.raises(NotFound):
        await store.accept(
            [message("visitor-b", key="b1"), to("cv_missing", text="x")], T0, notify=note
        )
    assert len(note.changes) >= 1  # it was called inside the transaction ...
    assert await app_rows(store) == []  # ... and its row went with it
    assert await store.lookup_customer(Identity("webchat", "visitor-b")) is None
    assert await store.count("conversations") == 0
    # a failing notify rolls the accept back too: nothing is stored unannounced
    with pytest.raises(RequestError):
        await store.accept([message("visitor-b", key="b1")], T0, notify=Recorder(fail=True))
    assert await store.count("events") == 0
    assert await store.lookup_customer(Identity("webchat", "visitor-b")) is None
    # the same event again commits once, with its one notification
    [acc] = await store.accept([message("visitor-b", key="b1")], T0, notify=note)
    assert not acc.duplicate
    [row] = await app_rows(store)
    customer = await store.lookup_customer(Identity("webchat", "visitor-b"))
    assert customer is not None and row["conversation_id"] == customer.id


async def test_without_notify_a_first_contact_writes_no_rows(store: Store) -> None:
    await store.accept([message("visitor-c", key="c1")], T0)
    assert await store.outbox_rows() == []
    assert await store.lookup_customer(Identity("webchat", "visitor-c")) is not None


async def test_bulk_updated_lines_carry_their_open_conversations(store: Store) -> None:
    [acc] = await store.accept([message("visitor-d", key="d1")], T0)
    conv = await store.load_conversation(acc.conversation_id)
    assert conv is not None
    await store.update_customer(
        conv.customer_id, {"external_id": "crm-d"}, T0, expected_version=None
    )
    lines = [(1, {"external_id": "crm-d", "name": "Dee"}), (2, {"external_id": "crm-new"})]
    first = await store.bulk_upsert_customers(lines, T0)
    assert [(o.outcome, o.conversations) for o in first] == [
        ("updated", (acc.conversation_id,)),
        ("created", ()),
    ]
    again = await store.bulk_upsert_customers(lines, T0)
    assert [(o.outcome, o.conversations) for o in again] == [("unchanged", ()), ("unchanged", ())]
