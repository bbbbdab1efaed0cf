"""The Store contract of customer writes with their notifications, on SQLite and PostgreSQL:
each write hands its change to ``notify`` inside its transaction and the rows commit (or
roll back) with it; writes that change nothing notify nobody; erasure strips them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest

from controller.errors import Conflict, PreconditionFailed, RequestError
from controller.store.base import (
    CustomerChange,
    CustomerQuery,
    CustomerRecord,
    Identity,
    NewOutbox,
    Notify,
    Store,
)
from tests.controller.test_store import T0, IdempotencyKey, make_store, new_conversation, store

__all__ = ["make_store", "store"]  # the contract's fixtures, parametrized over both backends


class Recorder:
    """A ``Notify`` that records every change and gives each one row for one app."""

    def __init__(self, *, fail: bool = False) -> None:
        self.changes: list[CustomerChange] = []
        self.fail = fail

    def __call__(self, change: CustomerChange) -> Sequence[NewOutbox]:
        if self.fail:
            raise RequestError("refused by the test", code="test_refusal")
        self.changes.append(change)
        body = {"type": f"profile.{change.kind}", "customer_id": change.customer_id}
        if change.record is not None:
            body["customer"] = change.record.as_dict()
        return [NewOutbox("app:ap_test", body)]

    def kinds(self) -> list[str]:
        return [c.kind for c in self.changes]


async def create(store: Store, notify: Notify | None = None, **profile: object) -> CustomerRecord:
    made = await store.create_customer(profile, (), T0, notify=notify)
    assert isinstance(made, CustomerRecord)
    return made


async def lane(store: Store, customer_id: str) -> list[dict[str, Any]]:
    return [r for r in await store.outbox_rows() if r["conversation_id"] == customer_id]


async def test_every_write_notifies_in_its_transaction(store: Store) -> None:
    note = Recorder()
    cid = (await create(store, note, name="Ann")).id
    assert note.kinds() == ["created"]
    updated = await store.update_customer(
        cid, {"name": "Anna"}, T0, expected_version=1, notify=note
    )
    assert note.changes[-1].kind == "updated" and note.changes[-1].version == updated.version
    # a stale version changes nothing and notifies nobody
    with pytest.raises(PreconditionFailed):
        await store.update_customer(cid, {"name": "X"}, T0, expected_version=1, notify=note)
    assert note.kinds() == ["created", "updated"]

    # an anonymous channel customer becomes known: identified (attach, then PATCH)
    conv = await store.load_conversation(await new_conversation(store, "visitor-n"))
    assert conv is not None
    key = IdempotencyKey("crm:x", "k1", "h")
    await store.attach_identity(
        conv.customer_id, Identity("email", "v@example.com"), T0, key, notify=note
    )
    assert note.changes[-1].kind == "identified" and note.changes[-1].record is not None
    # the replay and an identity it already has change nothing
    await store.attach_identity(
        conv.customer_id, Identity("email", "v@example.com"), T0, key, notify=note
    )
    await store.attach_identity(
        conv.customer_id, Identity("email", "v@example.com"), T0, notify=note
    )
    assert note.kinds() == ["created", "updated", "identified"]
    other = await new_conversation(store, "visitor-o")
    anon = await store.load_conversation(other)
    assert anon is not None
    await store.update_customer(
        anon.customer_id, {"phone": "+4930123456"}, T0, expected_version=None, notify=note
    )
    assert note.changes[-1].kind == "identified"

    merged = await store.merge_customers(cid, anon.customer_id, T0, notify=note)
    last = note.changes[-1]
    assert (last.kind, last.customer_id, last.merged_from) == ("merged", cid, anon.customer_id)
    assert last.version == merged.record.version
    await store.merge_customers(cid, anon.customer_id, T0, notify=note)  # a repeat
    assert note.kinds().count("merged") == 1

    with pytest.raises(Conflict):  # the identity is another customer's: nothing
        await store.attach_identity(cid, Identity("email", "v@example.com"), T0, notify=note)
    gone = await store.delete_customer(conv.customer_id, T0, notify=note)
    assert note.changes[-1].kind == "deleted" and note.changes[-1].version == gone
    assert note.changes[-1].record is None
    erased = await store.erase_customer(cid, T0, "[erased]", notify=note)
    assert note.changes[-1].kind == "erased" and note.changes[-1].version == erased
    assert note.kinds() == [
        "created",
        "updated",
        "identified",
        "identified",
        "merged",
        "deleted",
        "erased",
    ]
    # every change is one row on its customer's lane, due at once and unclaimed, keyed by
    # the customer's version
    rows = [r for r in await store.outbox_rows() if str(r["destination"]) == "app:ap_test"]
    assert len(rows) == len(note.changes)
    assert sorted(f"{r['event_id']}:{r['n']}" for r in rows) == sorted(
        f"{c.notice_id}:0" for c in note.changes
    )
    claimed = await store.claim_outbox(T0 + timedelta(seconds=1), 100)
    assert {r.conversation_id for r in claimed} >= {cid, conv.customer_id}
    assert all(r.destination == "app:ap_test" for r in claimed)


async def test_a_failing_notify_rolls_the_change_back(store: Store) -> None:
    cid = (await create(store, name="Bea")).id
    with pytest.raises(RequestError):
        await store.update_customer(
            cid, {"name": "Changed"}, T0, expected_version=None, notify=Recorder(fail=True)
        )
    after = await store.customer(cid)
    assert after is not None and after.profile["name"] == "Bea" and after.version == 1
    with pytest.raises(RequestError):
        await create(store, Recorder(fail=True), external_id="never")
    assert await store.lookup_customer(Identity("external", "never")) is None
    assert await store.outbox_rows() == []


async def test_bulk_notifies_created_and_updated_lines_only(store: Store) -> None:
    note = Recorder()
    lines = [(i, {"external_id": f"e{i}", "name": f"N{i}"}) for i in range(1, 6)]
    first = await store.bulk_upsert_customers(lines, T0, notify=note)
    assert [o.outcome for o in first] == ["created"] * 5
    again = await store.bulk_upsert_customers(lines, T0, notify=note)
    assert [o.outcome for o in again] == ["unchanged"] * 5
    changed = await store.bulk_upsert_customers(
        [(1, {"external_id": "e1", "name": "Other"}), (2, {"external_id": "e2", "name": "N2"})],
        T0,
        notify=note,
    )
    assert [o.outcome for o in changed] == ["updated", "unchanged"]
    assert note.kinds() == ["created"] * 5 + ["updated"]
    assert len(await store.outbox_rows()) == 6


async def test_bulk_required_custom_fields_fail_new_lines_only(store: Store) -> None:
    await store.bulk_upsert_customers([(1, {"external_id": "old"})], T0)
    outcomes = await store.bulk_upsert_customers(
        [
            (1, {"external_id": "new-1", "custom": {"tier": "gold"}}),
            (2, {"external_id": "new-2"}),
            (3, {"external_id": "old", "name": "Still fine"}),
        ],
        T0,
        required_custom=("tier",),
    )
    assert [(o.outcome, o.code) for o in outcomes] == [
        ("created", None),
        ("failed", "invalid_custom"),
        ("updated", None),
    ]
    assert "tier" in (outcomes[1].message or "")
    assert await store.lookup_customer(Identity("external", "new-2")) is None


async def test_erasure_strips_notifications_of_the_customer_and_merged_ones(
    store: Store,
) -> None:
    note = Recorder()
    main_id = (await create(store, note, name="Zed Person", email="zed@example.com")).id
    side_id = (await create(store, note, name="Side Name", external_id="crm-side-77")).id
    await store.merge_customers(main_id, side_id, T0, notify=note)
    for row in await store.claim_outbox(T0 + timedelta(seconds=1), 10):
        await store.outbox_done(row.id)  # delivered ones are stripped too
    await store.erase_customer(main_id, T0, "[erased]", notify=note)
    rows = [*await lane(store, main_id), *await lane(store, side_id)]
    assert len(rows) == 4  # created x2, merged, erased
    text = json.dumps([r["payload"] for r in rows])
    for personal in ("Zed Person", "zed@example.com", "Side Name", "crm-side-77"):
        assert personal not in text
    payloads: list[dict[str, Any]] = [dict(r["payload"]) for r in rows]
    assert {p["customer"]["id"] for p in payloads if "customer" in p} == {main_id, side_id}
    assert all(p["customer"] == {"id": p["customer"]["id"]} for p in payloads if "customer" in p)


async def test_custom_schema_versions(store: Store) -> None:
    assert await store.customer_schema() is None
    document = {"fields": [{"name": "tier", "type": "string"}], "allow_unknown": False}
    first, created = await store.save_customer_schema(document, T0, expected_version=0)
    assert created and first.version == 1 and first.document == document
    same, created = await store.save_customer_schema(dict(document), T0, expected_version=None)
    assert not created and same.version == 1
    with pytest.raises(PreconditionFailed):
        await store.save_customer_schema({"fields": []}, T0, expected_version=0)
    second, created = await store.save_customer_schema({"fields": []}, T0, expected_version=1)
    assert created and second.version == 2
    current = await store.customer_schema()
    assert current is not None and current.version == 2 and current.document == {"fields": []}
    old = await store.customer_schema(1)
    assert old is not None and old.document == document
    assert await store.customer_schema(3) is None
    # two saves at once: both stored, one after the other
    results = await asyncio.gather(
        *(
            store.save_customer_schema({"fields": [], "n": n}, T0, expected_version=None)
            for n in (1, 2)
        )
    )
    assert sorted(r[0].version for r in results) == [3, 4]


async def test_list_pages_carry_identities_and_filter_by_update_time(store: Store) -> None:
    made = [await create(store, email=f"p{i}@example.com", external_id=f"x{i}") for i in range(5)]
    later = T0 + timedelta(hours=1)
    changed = await store.update_customer(
        made[3].id, {"name": "Changed"}, later, expected_version=None
    )
    page, cursor = await store.list_customers(CustomerQuery(limit=3))
    rest, end = await store.list_customers(CustomerQuery(limit=3, cursor=cursor))
    assert end is None
    assert [r.id for r in page + rest] == sorted(r.id for r in made)
    assert {r.id: r for r in page + rest}[made[0].id] == await store.customer(made[0].id)
    assert all(
        {Identity("email", r.profile["email"]), Identity("external", r.profile["external_id"])}
        == set(r.identities)
        for r in page + rest
    )
    recent, _ = await store.list_customers(CustomerQuery(updated_since=later))
    assert recent == [changed]
