"""Several processes on one PostgreSQL database, at the store: registry, leases with fencing,
claims of outbox rows and timers, and what a takeover hands over.

Each test opens two or three ``PostgresStore`` on one schema: each is one process. A process
"dies" by having its heartbeat moved back in the database (no wall clock is waited on).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.errors import Conflict
from controller.models import Conversation, Event, NewEvent
from controller.store.base import DecisionRecord, NewOutbox, TimerOp
from controller.store.postgres import PostgresStore
from controller.testing import postgres_url_or_skip
from tests.controller.test_store import message

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 5.0


Open = Callable[[], Awaitable[PostgresStore]]


@pytest.fixture
async def process() -> AsyncIterator[Open]:
    """Open another process (a store with its own registration) on one shared schema."""
    import asyncpg

    url = postgres_url_or_skip()
    schema = f"convctl_c_{secrets.token_hex(6)}"
    opened: list[PostgresStore] = []

    async def open_one() -> PostgresStore:
        store = PostgresStore(url, schema=schema, min_size=1, max_size=4)
        await store.open()
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def _sql(store: PostgresStore, sql: str, *args: Any) -> Any:
    async def run(conn: Any) -> Any:
        return await conn.fetch(sql, *args)

    return await store._read(run)


async def _die(store: PostgresStore) -> None:
    """As if the process stopped answering long ago: its heartbeat is past the timeout."""
    await _sql(
        store,
        "UPDATE processes SET heartbeat_at = heartbeat_at - $2 WHERE id = $1",
        store.process_id,
        TIMEOUT * 10,
    )


async def _first_pending(store: PostgresStore, cid: str) -> tuple[Conversation, Event]:
    conv, events = await store.load_for_decision(cid)
    assert conv is not None and events
    return conv, events[0]


def _record(conv: Conversation, event: Event, lease: int | None, **changes: Any) -> DecisionRecord:
    return DecisionRecord(
        event=event,
        before_version=conv.version,
        after=conv.model_copy(),
        rules_version="v-test",
        matcher="reference",
        lease=lease,
        **changes,
    )


async def test_processes_register_heartbeat_and_leave(process: Open) -> None:
    a = await process()
    b = await process()
    listed = {p["id"]: p for p in await a.processes()}
    assert listed.keys() == {a.process_id, b.process_id}
    assert await a.heartbeat() and await b.heartbeat()
    await b.close()
    assert [p["id"] for p in await a.processes()] == [a.process_id]


async def test_one_lease_per_conversation_and_the_owner_is_told(process: Open) -> None:
    a = await process()
    b = await process()
    [acc] = await a.accept([message("v1")], T0)
    cid = acc.conversation_id
    told: list[dict[str, Any]] = []
    got = asyncio.Event()

    def heard(message: dict[str, Any]) -> None:
        told.append(message)
        got.set()

    link = await a.listen(heard)
    try:
        owner, token = await a.acquire_lease(cid)
        assert owner == a.process_id
        assert await a.acquire_lease(cid) == (a.process_id, token)  # the holder keeps it
        assert await b.acquire_lease(cid) == (a.process_id, token)  # the other is refused
        async with asyncio.timeout(10):
            await got.wait()
        assert told == [
            {"kind": "work", "to": a.process_id, "conversation": cid},
        ]
    finally:
        await link.close()
    # A decision commits under the lease; one made by the other process does not.
    conv, event = await _first_pending(b, cid)
    with pytest.raises(Conflict) as refused:
        await b.commit_decision(_record(conv, event, token), T0)
    assert refused.value.code == "lease_lost"
    await a.commit_decision(_record(conv, event, token), T0)
    # Given up, the lease can be taken by anyone, with a larger token.
    await a.release_lease(cid)
    owner, newer = await b.acquire_lease(cid)
    assert owner == b.process_id and newer > token


async def test_takeover_fences_the_dead_and_hands_out_its_work(process: Open) -> None:
    a = await process()
    b = await process()
    c = await process()
    cids = []
    tokens = {}
    for n in range(6):
        [acc] = await a.accept([message(f"v{n}")], T0)
        cids.append(acc.conversation_id)
        _, tokens[acc.conversation_id] = await a.acquire_lease(acc.conversation_id)
    # One decision with an outbox row and a timer; the row is claimed (in flight) by a.
    conv, event = await _first_pending(a, cids[0])
    due = T0 + timedelta(seconds=30)
    committed = await a.commit_decision(
        _record(
            conv,
            event,
            tokens[cids[0]],
            outbox=[NewOutbox("bot:demo", {"n": 1})],
            timers=[TimerOp("idle", 1, due)],
        ),
        T0,
    )
    [row] = committed.outbox
    [timer] = await a.claim_timers(due, 10)  # a is about to fire it
    assert await b.claim_outbox(T0, 10) == []  # claimed by a: nobody else gets it
    assert await b.claim_timers(due, 10) == []

    await _die(a)
    assert await b.release_dead_processes(TIMEOUT) == [a.process_id]
    assert await c.release_dead_processes(TIMEOUT) == []  # done once
    # a's leases went round robin to b and c, with new tokens.
    leases = await _sql(b, "SELECT conversation_id, owner, token FROM conversation_leases")
    owners = {r["owner"] for r in leases}
    assert owners == {b.process_id, c.process_id}
    assert all(r["token"] > tokens[r["conversation_id"]] for r in leases)
    # a cannot commit any more, even though it still thinks it holds its leases.
    conv, event = await _first_pending(a, cids[1])
    with pytest.raises(Conflict) as refused:
        await a.commit_decision(_record(conv, event, tokens[cids[1]]), T0)
    assert refused.value.code == "lease_lost"
    # Its claims are free again: the row once (marked unsure: it may have been in flight),
    # the timer once.
    claims = await asyncio.gather(b.claim_outbox(T0, 10), c.claim_outbox(T0, 10))
    [again] = [r for batch in claims for r in batch]
    assert again.id == row.id and again.unsure == 1
    timers = await asyncio.gather(b.claim_timers(due, 10), c.claim_timers(due, 10))
    assert [t.name for batch in timers for t in batch] == [timer.name]
    # Each survivor sees the conversations it was given that have work.
    work_b = {cid for cid, _, token in await b.pending_work() if token is not None}
    work_c = {cid for cid, _, token in await c.pending_work() if token is not None}
    assert work_b | work_c == set(cids) and not work_b & work_c
    # The dead process learns it was taken for dead at its next heartbeat.
    assert not await a.heartbeat()
    assert await a.heartbeat()


async def test_rows_wait_behind_older_rows_of_their_lane_held_elsewhere(process: Open) -> None:
    a = await process()
    b = await process()
    [acc] = await a.accept([message("v1")], T0)
    cid = acc.conversation_id
    conv, event = await _first_pending(a, cid)
    first = await a.commit_decision(
        _record(conv, event, None, outbox=[NewOutbox("bot:demo", {"n": 1})]), T0
    )
    assert len(first.outbox) == 1  # claimed by a, for its fast path
    # b decides the next event (say a took over): its row must not overtake a's.
    await a.accept([NewEvent(**{**message("v1").model_dump(), "dedupe_key": "k2"})], T0)
    conv, event = await _first_pending(b, cid)
    second = await b.commit_decision(
        _record(conv, event, None, outbox=[NewOutbox("bot:demo", {"n": 2})]), T0
    )
    assert second.outbox == []  # stays in the store, unclaimed
    assert await b.claim_outbox(T0, 10) == []  # not the head of its lane yet
    await a.outbox_done(first.outbox[0].id)
    [row] = await b.claim_outbox(T0, 10)
    assert row.payload == {"n": 2}
