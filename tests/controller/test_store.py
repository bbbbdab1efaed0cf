"""The Store contract, run against every backend: SQLite and PostgreSQL.

Each test gets a fresh store (PostgreSQL: a schema of its own, dropped afterwards). The
PostgreSQL runs need ``CONVCTL_TEST_DATABASE_URL`` (scripts/test sets it up); without it they
are skipped on a developer machine and fail when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.errors import Conflict, NotFound, PreconditionFailed, RequestError
from controller.models import Conversation, Event, NewEvent
from controller.store.base import (
    AgentRecord,
    AppRecord,
    AppSubscription,
    CampaignOutcome,
    CampaignRecord,
    CustomerQuery,
    CustomerRecord,
    DecisionRecord,
    IdempotencyKey,
    Identity,
    Message,
    NewOutbox,
    OfferRecord,
    Replay,
    RulesVersion,
    Store,
    TimerOp,
)
from controller.store.sqlite import SqliteStore
from controller.testing import postgres_url_or_skip

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Store]]:
    """Stores of one backend on one database (several are several processes sharing it)."""
    if request.param == "sqlite":
        yield lambda: SqliteStore(tmp_path / "store.db")
        return
    from controller.store.postgres import PostgresStore

    url = postgres_url_or_skip()
    schema = f"convctl_s_{secrets.token_hex(6)}"
    try:
        yield lambda: PostgresStore(url, schema=schema, min_size=1, max_size=8)
    finally:
        await _drop_schema(url, schema)


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


def message(
    identity: str = "visitor-1", key: str | None = None, text: str = "hi", **data: Any
) -> NewEvent:
    """A web chat customer message that finds (or opens) its conversation by identity."""
    return NewEvent(
        type="customer.message",
        source="webchat:webchat",
        dedupe_key=key or secrets.token_hex(6),
        channel="webchat",
        instance="webchat",
        endpoint="web",
        identity=identity,
        data={"text": text, **data},
    )


def to(conversation_id: str, type_: str = "customer.message", **data: Any) -> NewEvent:
    return NewEvent(
        type=type_,  # type: ignore[arg-type]
        source="test",
        dedupe_key=secrets.token_hex(6),
        conversation_id=conversation_id,
        data=data,
    )


async def pending(store: Store, conversation_id: str) -> tuple[Conversation, list[Event]]:
    conv, events = await store.load_for_decision(conversation_id)
    assert conv is not None
    return conv, events


def record(conv: Conversation, event: Event, **changes: Any) -> DecisionRecord:
    """A decision of ``event`` on ``conv``: ``changes`` are fields of the record (outbox,
    timers, messages…), the others change the snapshot (state, queue…)."""
    fields = DecisionRecord.__dataclass_fields__
    snapshot = {k: changes.pop(k) for k in list(changes) if k not in fields}
    return DecisionRecord(
        event=event,
        before_version=conv.version,
        after=conv.model_copy(update=snapshot),
        rules_version="v-test",
        matcher="reference",
        **changes,
    )


async def decide_all(store: Store, conversation_id: str, **changes: Any) -> Conversation:
    """Decide every pending event of the conversation (the last one with ``changes``)."""
    conv, events = await pending(store, conversation_id)
    for i, event in enumerate(events):
        await store.commit_decision(
            record(conv, event, **(changes if i == len(events) - 1 else {})), T0
        )
        loaded = await store.load_conversation(conversation_id)
        assert loaded is not None
        conv = loaded
    return conv


async def new_conversation(store: Store, identity: str = "visitor-1") -> str:
    [acc] = await store.accept([message(identity)], T0)
    return acc.conversation_id


# inbox ----------------------------------------------------------------------------------------
async def test_accept_opens_a_conversation_and_dedupes(store: Store) -> None:
    first = await store.accept([message(key="k1"), message(key="k2")], T0)
    assert [a.duplicate for a in first] == [False, False]
    assert first[0].conversation_id == first[1].conversation_id
    # conversation.created is seq 1, then the two messages in order
    assert [a.seq for a in first] == [2, 3]
    again = await store.accept([message(key="k1")], T0 + timedelta(seconds=1))
    assert again[0].duplicate and again[0].event_id == first[0].event_id and again[0].seq == 2
    cid = first[0].conversation_id
    events = await store.events(cid)
    assert [(e.type, e.seq, status) for e, status in events] == [
        ("conversation.created", 1, "pending"),
        ("customer.message", 2, "pending"),
        ("customer.message", 3, "pending"),
    ]
    assert events[1][0].data == {"text": "hi"}
    assert events[1][0].accepted_at == T0
    assert await store.count("events") == 3
    assert await store.count("conversations") == 1
    conv = await store.load_conversation(cid)
    assert conv is not None and conv.state == "new" and conv.version == 0
    assert conv.identity == "visitor-1" and conv.channel == "webchat"
    event = await store.event(first[1].event_id)
    assert event is not None and event.dedupe_key == "k2"
    assert await store.event("ev_missing") is None


async def test_accept_refuses_unknown_and_closed_conversations(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.accept([to("cv_missing")], T0)
    cid = await new_conversation(store)
    await decide_all(store, cid, state="closed")
    with pytest.raises(Conflict) as caught:
        await store.accept([to(cid)], T0)
    assert caught.value.code == "conversation_closed"
    # nothing of a refused batch is stored
    with pytest.raises(Conflict):
        await store.accept([message("someone-else"), to(cid)], T0)
    assert await store.latest_conversation_id("webchat", "web", "someone-else") is None
    # after the close, the same identity starts a new conversation linked to the old one
    [acc] = await store.accept([message()], T0)
    assert acc.conversation_id != cid
    conv = await store.load_conversation(acc.conversation_id)
    assert conv is not None and conv.previous_conversation_id == cid
    assert await store.latest_conversation_id("webchat", "web", "visitor-1") == acc.conversation_id


async def test_concurrent_duplicates_store_one_event(store: Store) -> None:
    results = await asyncio.gather(*(store.accept([message(key="same")], T0) for _ in range(12)))
    accepted = [r[0] for r in results]
    assert sum(not a.duplicate for a in accepted) == 1
    assert len({a.event_id for a in accepted}) == 1
    assert len({a.seq for a in accepted}) == 1
    assert await store.count("events") == 2  # conversation.created and the message


async def test_concurrent_first_messages_share_one_conversation_without_gaps(
    store: Store,
) -> None:
    results = await asyncio.gather(*(store.accept([message(key=f"m{i}")], T0) for i in range(12)))
    accepted = [r[0] for r in results]
    assert len({a.conversation_id for a in accepted}) == 1
    assert sorted(a.seq for a in accepted) == list(range(2, 14))
    assert await store.count("conversations") == 1
    events = await store.events(accepted[0].conversation_id)
    assert [e.seq for e, _ in events] == list(range(1, 14))


async def test_pending_events_in_order_and_first_pending(store: Store) -> None:
    one = await new_conversation(store, "a")
    two = await new_conversation(store, "b")
    await store.accept([to(one, text="second")], T0)
    _, events = await pending(store, one)
    assert [e.seq for e in events] == [1, 2, 3]
    _, limited = await store.load_for_decision(one, limit=2)
    assert [e.seq for e in limited] == [1, 2]
    heads = dict(await store.first_pending_events())
    assert heads[one] == events[0].id and set(heads) == {one, two}
    await decide_all(store, one)
    assert dict(await store.first_pending_events()).keys() == {two}
    assert await store.load_for_decision("cv_missing") == (None, [])


async def test_text_with_a_nul_character_is_stored(store: Store) -> None:
    # PostgreSQL cannot hold NUL in text or jsonb; the store must not fail on it.
    [acc] = await store.accept([message(text="a\x00b", nested={"k": ["\x00"]})], T0)
    event = await store.event(acc.event_id)
    assert event is not None and event.data["text"] in ("a\x00b", "a\ufffdb")
    conv, events = await pending(store, acc.conversation_id)
    rec = record(conv, events[0])
    rec.messages.append(
        Message("msg_nul", conv.id, "customer", conv.identity, "x\x00y", T0, "all", None)
    )
    await store.commit_decision(rec, T0)
    [stored] = await store.messages(conv.id, include_agent_only=True)
    assert stored.text in ("x\x00y", "x\ufffdy")


# decisions ------------------------------------------------------------------------------------
async def test_commit_decision_applies_everything_at_once(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    created = events[0]
    rec = record(
        conv,
        created,
        state="bot",
        attributes={"k": "v"},
        fired=[{"rule": "start"}],
        refused=[{"rule": "r", "action": "a"}],
        facts={"event": {"type": "conversation.created"}, "when": T0},
        outbox=[NewOutbox("bot:demo", {"text": "hi"}), NewOutbox("channel:webchat", {"n": 2})],
        timers=[TimerOp("idle", 1, T0 + timedelta(minutes=5))],
        messages=[
            Message("msg_1", cid, "bot", "demo", "hello", T0, "all", {"buttons": [{"id": "b"}]}),
            Message("msg_2", cid, "bot", "demo", "psst", T0, "agents"),
        ],
        emitted=[to(cid, "conversation.unattended")],
    )
    committed = await store.commit_decision(rec, T0)
    assert [o.destination for o in committed.outbox] == ["bot:demo", "channel:webchat"]
    assert [o.n for o in committed.outbox] == [0, 1]
    assert committed.outbox[0].idempotency_key == f"{created.id}:0"
    assert committed.outbox[0].payload == {"text": "hi"}
    [emitted] = committed.accepted
    assert not emitted.duplicate and emitted.seq == 3
    after = await store.load_conversation(cid)
    assert after is not None and after.version == 1 and after.state == "bot"
    assert after.attributes == {"k": "v"}
    statuses = [(e.type, status) for e, status in await store.events(cid)]
    assert statuses == [
        ("conversation.created", "decided"),
        ("customer.message", "pending"),
        ("conversation.unattended", "pending"),
    ]
    [decision] = await store.decisions(cid)
    assert decision["event_id"] == created.id and decision["event_type"] == "conversation.created"
    assert decision["state_after"] == "bot" and decision["fired"] == [{"rule": "start"}]
    assert decision["refused"] == [{"rule": "r", "action": "a"}]
    assert decision["facts"]["when"] == str(T0)  # facts keep what JSON cannot hold as text
    assert decision["decided_at"] == T0.isoformat()
    # the committed rows are claimed already: the dispatcher has them from memory
    assert await store.claim_outbox(T0 + timedelta(hours=1), 10) == []
    [timer] = await store.timers()
    assert (timer.conversation_id, timer.name, timer.generation) == (cid, "idle", 1)
    assert timer.due_at == T0 + timedelta(minutes=5)
    shown = await store.messages(cid, include_agent_only=False)
    assert [(m.id, m.text, m.content) for m in shown] == [
        ("msg_1", "hello", {"buttons": [{"id": "b"}]})
    ]
    everything = await store.messages(cid, include_agent_only=True)
    assert [(m.id, m.visibility, m.content) for m in everything] == [
        ("msg_1", "all", {"buttons": [{"id": "b"}]}),
        ("msg_2", "agents", None),
    ]
    # the next event decides on version 1
    conv, events = await pending(store, cid)
    assert conv.version == 1 and [e.type for e in events] == [
        "customer.message",
        "conversation.unattended",
    ]


async def test_a_stale_snapshot_is_refused_whole(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    await store.commit_decision(record(conv, events[0], state="bot"), T0)
    stale = record(
        conv,  # version 0: another decision committed meanwhile
        events[1],
        state="queued",
        outbox=[NewOutbox("bot:demo", {})],
        timers=[TimerOp("idle", 1, T0)],
        messages=[Message("msg_stale", cid, "bot", "demo", "x", T0)],
        emitted=[to(cid, "conversation.unattended")],
    )
    with pytest.raises(Conflict) as caught:
        await store.commit_decision(stale, T0)
    assert caught.value.code == "version_conflict"
    after = await store.load_conversation(cid)
    assert after is not None and after.state == "bot" and after.version == 1
    assert await store.count("outbox") == 0
    assert await store.count("timers") == 0
    assert await store.count("messages") == 0
    assert await store.count("decisions") == 1
    assert [s for _, s in await store.events(cid)] == ["decided", "pending"]
    # the same event decided twice is refused too
    fresh, _ = await pending(store, cid)
    with pytest.raises(Conflict) as again:
        await store.commit_decision(record(fresh, events[0]), T0)
    assert again.value.code == "already_decided"
    after = await store.load_conversation(cid)
    assert after is not None and after.version == 1


async def test_concurrent_commits_on_one_version_one_wins(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    outcomes = await asyncio.gather(
        *(store.commit_decision(record(conv, events[i % 2], priority=i), T0) for i in range(6)),
        return_exceptions=True,
    )
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(won) == 1 and len(lost) == 5
    after = await store.load_conversation(cid)
    assert after is not None and after.version == 1
    assert await store.count("decisions") == 1


async def test_emitted_events_are_deduped(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    emitted = NewEvent(
        type="conversation.closed", source="controller", dedupe_key="x:1", conversation_id=cid
    )
    committed = await store.commit_decision(
        record(conv, events[0], state="closed", emitted=[emitted]), T0
    )
    assert not committed.accepted[0].duplicate  # accepted although the conversation closed
    conv, events = await pending(store, cid)
    again = await store.commit_decision(record(conv, events[0], emitted=[emitted]), T0)
    assert again.accepted[0].duplicate
    assert again.accepted[0].event_id == committed.accepted[0].event_id


# outbox ---------------------------------------------------------------------------------------
async def _outbox(store: Store, lanes: list[tuple[str, str]]) -> list[int]:
    """Commit one decision per (identity, destination) with one outbox row, then unclaim."""
    ids: list[int] = []
    for identity, destination in lanes:
        [acc] = await store.accept([message(identity)], T0)
        conv, events = await pending(store, acc.conversation_id)
        committed = await store.commit_decision(
            record(conv, events[0], outbox=[NewOutbox(destination, {"to": identity})]), T0
        )
        ids += [o.id for o in committed.outbox]
    await store.outbox_release(ids)
    return ids


async def test_outbox_claim_done_retry_dead_release(store: Store) -> None:
    a1, b1, a2 = await _outbox(store, [("a", "bot:demo"), ("b", "bot:demo"), ("a", "bot:demo")])
    assert a1 < b1 < a2
    assert await store.outbox_next_due() == T0
    assert sorted(await store.outbox_pending_lanes()) == sorted(
        {((await store.outbox_rows())[i]["conversation_id"], "bot:demo") for i in range(3)}
    )
    # a2 waits behind a1 (same lane): only the heads of lanes are claimed, oldest first
    claimed = await store.claim_outbox(T0, 10)
    assert [r.id for r in claimed] == [a1, b1]
    assert claimed[0].payload == {"to": "a"} and claimed[0].attempts == 0
    assert await store.claim_outbox(T0, 10) == []  # claimed rows are not handed out twice
    lane = (claimed[0].conversation_id, "bot:demo")
    assert await store.outbox_lane_pending(*lane) == 2
    # a1 fails: retried later, a2 still waits behind it
    await store.outbox_retry(a1, T0 + timedelta(seconds=30), "timeout")
    await store.outbox_done(b1)
    assert await store.claim_outbox(T0 + timedelta(seconds=29), 10) == []
    assert await store.outbox_next_due() == T0 + timedelta(seconds=30)
    [again] = await store.claim_outbox(T0 + timedelta(seconds=30), 10)
    assert again.id == a1 and again.attempts == 1
    await store.outbox_dead(a1, "gave up")
    [last] = await store.claim_outbox(T0 + timedelta(seconds=30), 10)
    assert last.id == a2
    await store.outbox_release([a2])  # released without an attempt
    [released] = await store.claim_outbox(T0 + timedelta(seconds=30), 10)
    assert released.id == a2 and released.attempts == 0
    await store.outbox_done(a2)
    assert await store.outbox_next_due() is None
    assert await store.outbox_pending_lanes() == []
    rows = {r["id"]: r for r in await store.outbox_rows()}
    assert (rows[a1]["status"], rows[a1]["attempts"], rows[a1]["last_error"]) == (
        "dead",
        2,
        "gave up",
    )
    assert (rows[b1]["status"], rows[b1]["attempts"]) == ("done", 1)
    assert (rows[a2]["status"], rows[a2]["attempts"]) == ("done", 1)
    assert [r["id"] for r in await store.outbox_rows("dead")] == [a1]
    assert rows[a1]["payload"] == {"to": "a"} and rows[a1]["n"] == 0


async def test_rows_claimed_at_a_crash_are_unsure_held_and_confirmed(
    make_store: Callable[[], Store],
) -> None:
    first = make_store()
    await first.open()
    a, b, c = await _outbox(first, [("a", "channel:wa"), ("b", "channel:wa"), ("c", "channel:wa")])
    claimed = await first.claim_outbox(T0, 10)
    assert [r.unsure for r in claimed] == [0, 0, 0]
    await first.outbox_done(c)
    await first.close()  # as if the process died with a and b claimed
    store = make_store()
    await store.open()
    try:
        # rows that were claimed come back unsure; a finished one does not
        rows = await store.claim_outbox(T0, 10)
        assert [(r.id, r.unsure) for r in rows] == [(a, 1), (b, 1)]
        # held: unclaimed, due at the hold's end, waiting for a status; an attempt only with
        # an error (a send that got no answer)
        await store.outbox_hold(a, T0 + timedelta(seconds=60))
        await store.outbox_hold(b, T0 + timedelta(seconds=60), "no answer")
        assert await store.claim_outbox(T0 + timedelta(seconds=59), 10) == []
        assert await store.outbox_next_due() == T0 + timedelta(seconds=60)
        assert [(r.id, r.unsure) for r in await store.outbox_held()] == [(a, 2), (b, 2)]
        listed = {r["id"]: r for r in await store.outbox_rows()}
        assert (listed[a]["attempts"], listed[b]["attempts"]) == (0, 1)
        assert listed[b]["last_error"] == "no answer"
        # a status confirms a: done; confirming again, or a row that is not held, does nothing
        done = await store.outbox_confirm(a)
        assert done is not None and done.id == a and done.payload == {"to": "a"}
        assert await store.outbox_confirm(a) is None
        assert await store.outbox_confirm(c) is None
        # b's hold passes: it is claimed again (still marked held) and cannot be confirmed
        # while claimed
        [again] = await store.claim_outbox(T0 + timedelta(seconds=60), 10)
        assert (again.id, again.unsure) == (b, 2)
        assert await store.outbox_confirm(b) is None
        await store.outbox_done(b)
        assert await store.outbox_held() == []
        statuses = {r["id"]: r["status"] for r in await store.outbox_rows()}
        assert statuses == {a: "done", b: "done", c: "done"}
    finally:
        await store.close()


async def test_a_stored_delivery_status_names_the_send_it_confirms(store: Store) -> None:
    [acc] = await store.accept([message("v")], T0)
    cid = acc.conversation_id
    assert await store.delivery_status_of(cid, "ev_1:0") is None
    await store.accept(
        [
            to(cid, "delivery.status", status="sent", wamid="wamid.A", callback_data="ev_1:0"),
            to(cid, "delivery.status", status="sent", wamid="wamid.B", callback_data=None),
        ],
        T0,
    )
    assert await store.delivery_status_of(cid, "ev_1:0") == "wamid.A"
    assert await store.delivery_status_of(cid, "ev_1:1") is None
    [other] = await store.accept([message("w")], T0)
    assert await store.delivery_status_of(other.conversation_id, "ev_1:0") is None


async def test_concurrent_claims_never_share_a_row(store: Store) -> None:
    ids = await _outbox(store, [(f"v{i}", "bot:demo") for i in range(20)])
    batches = await asyncio.gather(*(store.claim_outbox(T0, 3) for _ in range(10)))
    claimed = [r.id for batch in batches for r in batch]
    assert len(claimed) == len(set(claimed))
    assert sorted(claimed) == sorted(ids)
    for batch in batches:
        assert [r.id for r in batch] == sorted(r.id for r in batch)


async def test_a_restart_unclaims_rows_of_the_dead_process(
    make_store: Callable[[], Store],
) -> None:
    first = make_store()
    await first.open()
    try:
        await _outbox(first, [("a", "bot:demo")])
        [row] = await first.claim_outbox(T0, 10)
    finally:
        await first.close()  # the process that claimed the row is gone
    second = make_store()
    await second.open()
    try:
        [again] = await second.claim_outbox(T0, 10)
        assert again.id == row.id
    finally:
        await second.close()


# timers ---------------------------------------------------------------------------------------
async def test_timers_fire_once_and_newer_generations_win(store: Store) -> None:
    cid = await new_conversation(store)
    due = T0 + timedelta(minutes=1)
    conv, events = await pending(store, cid)
    await store.commit_decision(
        record(conv, events[0], timers=[TimerOp("idle", 1, due), TimerOp("grace", 1, due)]), T0
    )
    conv, events = await pending(store, cid)
    await store.commit_decision(
        record(conv, events[0], timers=[TimerOp("idle", 2, due), TimerOp("grace", 0, None)]), T0
    )
    [timer] = await store.timers()
    assert (timer.name, timer.generation) == ("idle", 2)
    old = type(timer)(cid, "idle", 1, due)
    assert await store.fire_timer(old, due) is None
    results = await asyncio.gather(*(store.fire_timer(timer, due) for _ in range(4)))
    fired = [r for r in results if r is not None]
    assert len(fired) == 1 and not fired[0].duplicate
    assert await store.timers() == []
    event = await store.event(fired[0].event_id)
    assert event is not None and event.type == "timer.fired" and event.source == "timer"
    assert event.data == {"name": "idle", "generation": 2}


async def test_closing_deletes_timers_and_a_timer_fires_into_a_closed_conversation(
    store: Store,
) -> None:
    cid = await new_conversation(store)
    due = T0 + timedelta(minutes=1)
    conv, events = await pending(store, cid)
    await store.commit_decision(record(conv, events[0], timers=[TimerOp("idle", 1, due)]), T0)
    conv, events = await pending(store, cid)
    await store.commit_decision(
        record(conv, events[0], state="wrap_up", timers=[TimerOp("wrap", 1, due)]), T0
    )
    assert {t.name for t in await store.timers()} == {"idle", "wrap"}
    [wrap] = [t for t in await store.timers() if t.name == "wrap"]
    await store.accept([to(cid, "agent.wrap_up_done")], T0)
    conv = await decide_all(store, cid, state="closed")
    assert await store.timers() == []
    assert await store.fire_timer(wrap, due) is None


# conversations --------------------------------------------------------------------------------
async def test_present_customers_follow_the_last_presence_event(store: Store) -> None:
    here = await new_conversation(store, "here")
    gone = await new_conversation(store, "gone")
    back = await new_conversation(store, "back")
    await store.accept([to(gone, "customer.disconnected")], T0)
    await store.accept([to(back, "customer.disconnected")], T0)
    await store.accept([to(back, "customer.returned")], T0)
    present = sorted(await store.present_customers("webchat"))
    assert present == sorted([(here, "here", 2), (back, "back", 4)])
    assert await store.present_customers("other") == []
    await decide_all(store, here, state="closed")
    assert [p[0] for p in await store.present_customers("webchat")] == [back]


async def test_customer_conversations_and_open_ones(store: Store) -> None:
    first = await new_conversation(store)
    conv = await store.load_conversation(first)
    assert conv is not None
    await decide_all(store, first, state="closed")
    second = await new_conversation(store)
    assert await store.customer_open_conversations(conv.customer_id) == [second]
    summaries = await store.customer_conversations(conv.customer_id)
    assert [s["id"] for s in summaries] == [first, second]
    assert summaries[0] == {
        "id": first,
        "channel": "webchat",
        "instance": "webchat",
        "endpoint": "web",
        "identity": "visitor-1",
        "state": "closed",
        "created_at": T0.isoformat(),
    }


async def test_messages_keep_their_order(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    # equal times: the order they were stored in, whatever their ids
    batch = [Message(f"msg_{99 - i}", cid, "bot", "demo", str(i), T0) for i in range(12)]
    batch.insert(0, Message("msg_late", cid, "bot", "demo", "late", T0 + timedelta(seconds=1)))
    await store.commit_decision(record(conv, events[0], messages=batch[:7]), T0)
    conv, events = await pending(store, cid)
    await store.commit_decision(record(conv, events[0], messages=batch[7:]), T0)
    texts = [m.text for m in await store.messages(cid, include_agent_only=False)]
    assert texts == [str(i) for i in range(12)] + ["late"]


# agents, offers, tokens, rules ----------------------------------------------------------------
async def test_agents_offers_and_the_router_snapshot(store: Store) -> None:
    await store.upsert_agent(AgentRecord("alice", "Alice", "offline", 2, {"en": 1}, T0))
    changed = AgentRecord(
        "alice", "Alice B", "available", 5, {"en": 1, "fr": 7}, T0, {"webchat": 3}, ("t1",)
    )
    await store.upsert_agent(changed)
    agent = await store.agent("alice")
    # an upsert keeps presence and idle time
    assert agent == replace(changed, presence="offline")
    await store.set_presence("alice", "available", T0)
    await store.touch_agent_idle("alice", T0 + timedelta(seconds=5))
    agent = await store.agent("alice")
    assert agent is not None and agent.presence == "available"
    assert agent.idle_since == T0 + timedelta(seconds=5)
    with pytest.raises(NotFound):
        await store.set_presence("bob", "available", T0)
    assert await store.agent("bob") is None

    cid = await new_conversation(store)
    await decide_all(store, cid, state="queued", queue="support", priority=5, skills=["fr"])
    snap = await store.router_snapshot()
    assert [(q.conversation_id, q.queue, q.priority, q.skills) for q in snap.queued] == [
        (cid, "support", 5, ("fr",))
    ]
    offer = OfferRecord("of_1", cid, "alice", "pending", T0, T0 + timedelta(seconds=30))
    offered = await store.create_offer(offer, T0)
    offered_event = await store.event(offered.event_id)
    assert offered_event is not None and offered_event.type == "agent.offered"
    assert offered_event.data == {"agent_id": "alice", "offer_id": "of_1"}
    assert (await store.router_snapshot()).pending_offers == [offer]
    outcomes = await asyncio.gather(
        store.resolve_offer("of_1", "accepted", "agent.accepted", T0),
        store.resolve_offer("of_1", "expired", "agent.offer_expired", T0),
    )
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    stored = await store.offer("of_1")
    assert stored is not None and stored.status in ("accepted", "expired")
    snap = await store.router_snapshot()
    assert snap.pending_offers == []
    if stored.status == "accepted":
        assert snap.assignments == [("alice", cid)]
        assert snap.accepting == [cid] and snap.queued == []
    else:
        assert snap.tried == [(cid, "alice")] and snap.assignments == []
    assert await store.offer("of_missing") is None
    assert await store.resolve_offer("of_1", "declined", "agent.declined", T0) is None


async def test_offers_of_one_pass_are_stored_together(store: Store) -> None:
    """create_offers: every offer and its agent.offered event in one transaction; a closed
    conversation gets none (None in its place) and does not stop the others."""
    open_ids = [await new_conversation(store, f"visitor-{i}") for i in range(3)]
    for cid in open_ids:
        await decide_all(store, cid, state="queued", queue="support")
    closed = await new_conversation(store, "visitor-closed")
    await decide_all(store, closed, state="closed")
    expires = T0 + timedelta(seconds=30)
    offers = [
        OfferRecord(f"of_{i}", cid, "alice", "pending", T0, expires)
        for i, cid in enumerate([open_ids[0], closed, *open_ids[1:]])
    ]
    results = await store.create_offers(offers, T0)
    assert results[1] is None
    made = [r for r in results if r is not None]
    assert [r.conversation_id for r in made] == open_ids
    for result, offer in zip(made, [offers[0], *offers[2:]], strict=True):
        event = await store.event(result.event_id)
        assert event is not None and event.type == "agent.offered"
        assert event.data == {"agent_id": "alice", "offer_id": offer.id}
    snap = await store.router_snapshot()
    assert sorted(o.id for o in snap.pending_offers) == ["of_0", "of_2", "of_3"]
    assert await store.offer("of_1") is None
    assert {cid: snap.channels[cid] for cid in open_ids} == dict.fromkeys(open_ids, "webchat")
    assert await store.create_offers([], T0) == []


async def test_assignments_follow_decisions(store: Store) -> None:
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    await store.commit_decision(record(conv, events[0], assigned_agents=["alice", "bob"]), T0)
    assert sorted((await store.router_snapshot()).assignments) == [("alice", cid), ("bob", cid)]
    conv, events = await pending(store, cid)
    await store.commit_decision(record(conv, events[0], released_agents=["alice"]), T0)
    assert (await store.router_snapshot()).assignments == [("bob", cid)]


async def test_tokens(store: Store) -> None:
    await store.put_token("h1", "agent", "alice", T0)
    await store.put_token("h1", "admin", "root", T0)  # the first one stays
    assert await store.token("h1") == ("agent", "alice")
    assert await store.token("h2") is None


async def test_rules_versions(store: Store) -> None:
    v1 = RulesVersion("v1", {"default.yaml": "a: 1\n"}, T0, "start")
    v2 = RulesVersion("v2", {"default.yaml": "a: 2\n", "x.yaml": "b"}, T0, "api")
    assert await store.save_rules_version(v1)
    assert await store.save_rules_version(v2)
    assert not await store.save_rules_version(RulesVersion("v1", {}, T0, "watch"))
    assert [v.version for v in await store.rules_versions()] == ["v2", "v1"]  # newest first
    assert (await store.rules_versions())[0].files == {}
    assert await store.rules_version("v2") == v2
    assert await store.rules_version("v3") is None


async def test_count_knows_its_tables(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.count("customers; DROP TABLE events")


# customers ------------------------------------------------------------------------------------
def _key(key: str, body: str) -> IdempotencyKey:
    return IdempotencyKey("admin:/api/v1/customers", key, body)


async def _create(store: Store, **profile: Any) -> CustomerRecord:
    record = await store.create_customer(profile, (), T0)
    assert isinstance(record, CustomerRecord)
    return record


async def test_customer_crud_with_versions_and_identities(store: Store) -> None:
    created = await store.create_customer(
        {"name": "Ann", "email": "ann@example.com", "custom": {"tier": "gold"}},
        [Identity("whatsapp", "+4915112345678")],
        T0,
        _key("k1", "h1"),
    )
    assert isinstance(created, CustomerRecord)
    assert created.known and created.version == 1
    assert created.profile["name"] == "Ann" and created.profile["phone"] is None
    assert created.custom == {"tier": "gold"}
    assert set(created.identities) == {
        Identity("email", "ann@example.com"),
        Identity("whatsapp", "+4915112345678"),
    }
    replay = await store.create_customer({"name": "Ann"}, (), T0, _key("k1", "h1"))
    assert replay == Replay(201, created.as_dict())
    with pytest.raises(RequestError) as reused:
        await store.create_customer({"name": "Other"}, (), T0, _key("k1", "h2"))
    assert reused.value.status == 422
    with pytest.raises(Conflict):
        await store.create_customer({"email": "ann@example.com"}, (), T0)

    later = T0 + timedelta(minutes=1)
    updated = await store.update_customer(
        created.id,
        {"email": "ann@new.example", "phone": "+4930123456", "custom": {"tier": None, "x": 1}},
        later,
        expected_version=1,
    )
    assert updated.version == 2 and updated.updated_at == later
    assert updated.custom == {"x": 1}
    assert Identity("email", "ann@example.com") not in updated.identities
    assert {Identity("email", "ann@new.example"), Identity("phone", "+4930123456")} <= set(
        updated.identities
    )
    with pytest.raises(PreconditionFailed):
        await store.update_customer(created.id, {"name": "B"}, later, expected_version=1)
    with pytest.raises(NotFound):
        await store.update_customer("cu_missing", {"name": "B"}, later, expected_version=None)
    assert await store.lookup_customer(Identity("phone", "+4930123456")) == updated
    assert await store.lookup_customer(Identity("phone", "+1")) is None
    assert await store.customer(created.id) == updated

    assert await store.delete_customer(created.id, later, expected_version=2) == 3
    assert await store.customer(created.id) is None
    assert await store.lookup_customer(Identity("phone", "+4930123456")) is None
    with pytest.raises(NotFound):
        await store.delete_customer(created.id, later)


async def test_concurrent_updates_with_one_version_one_wins(store: Store) -> None:
    created = await _create(store, name="Ann")
    outcomes = await asyncio.gather(
        *(
            store.update_customer(created.id, {"name": f"N{i}"}, T0, expected_version=1)
            for i in range(5)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(o, CustomerRecord) for o in outcomes) == 1
    assert sum(isinstance(o, PreconditionFailed) for o in outcomes) == 4


async def test_list_customers_pages_and_filters(store: Store) -> None:
    names = ["Zoe", "ann", "Anna", "Bob", "Ánne"]
    for name in names:
        await _create(store, name=name, external_id=f"ext-{name}")
    page, cursor = await store.list_customers(CustomerQuery(limit=2))
    assert len(page) == 2 and cursor == page[-1].id
    rest, end = await store.list_customers(CustomerQuery(limit=10, cursor=cursor))
    assert end is None and len(rest) == 3
    ids = [r.id for r in page + rest]
    assert ids == sorted(ids)  # id order, bytewise
    prefix, _ = await store.list_customers(CustomerQuery(name_prefix="An"))
    assert [r.profile["name"] for r in prefix] == ["Anna"]  # case- and accent-sensitive
    by_ext, _ = await store.list_customers(CustomerQuery(external_id="ext-Bob"))
    assert [r.profile["name"] for r in by_ext] == ["Bob"]
    known, _ = await store.list_customers(CustomerQuery(known=False))
    assert known == []


async def test_an_anonymous_channel_customer_is_identified(store: Store) -> None:
    cid = await new_conversation(store, "visitor-9")
    conv = await store.load_conversation(cid)
    assert conv is not None
    anonymous = await store.customer(conv.customer_id)
    assert anonymous is not None and not anonymous.known
    assert anonymous.identities == (Identity("webchat", "visitor-9"),)
    identified = await store.attach_identity(
        conv.customer_id, Identity("email", "v9@example.com"), T0, _key("i1", "h")
    )
    assert isinstance(identified, CustomerRecord)
    assert identified.known and identified.profile["email"] == "v9@example.com"
    assert identified.version == anonymous.version + 1
    again = await store.attach_identity(
        conv.customer_id, Identity("email", "v9@example.com"), T0, _key("i1", "h")
    )
    assert again == Replay(200, identified.as_dict())
    other = await _create(store, name="Other")
    with pytest.raises(Conflict):
        await store.attach_identity(other.id, Identity("email", "v9@example.com"), T0)
    # a known profile made first is linked at first contact
    known = await store.create_customer({}, [Identity("whatsapp", "+4915100000001")], T0)
    assert isinstance(known, CustomerRecord)
    [acc] = await store.accept(
        [
            NewEvent(
                type="customer.message",
                source="whatsapp:wa",
                dedupe_key="wamid.1",
                channel="whatsapp",
                instance="wa",
                endpoint="123",
                identity="4915100000001",
                data={"text": "hi"},
            )
        ],
        T0,
    )
    wa = await store.load_conversation(acc.conversation_id)
    assert wa is not None and wa.customer_id == known.id


async def test_bulk_upsert_lines_are_atomic_each(store: Store) -> None:
    taken = await _create(store, email="taken@example.com")
    lines = [
        (1, {"external_id": "e1", "name": "One"}),
        (2, {"external_id": "e2", "name": "Two", "email": "taken@example.com"}),
        (3, {"external_id": "e1", "name": "One"}),
        (4, {"external_id": "e1", "name": "Uno", "custom": {"a": 1}}),
    ]
    outcomes = await store.bulk_upsert_customers(lines, T0)
    assert [(o.line, o.outcome) for o in outcomes] == [
        (1, "created"),
        (2, "failed"),
        (3, "unchanged"),
        (4, "updated"),
    ]
    assert outcomes[1].code == "identity_taken" and outcomes[1].record is None
    page, _ = await store.list_customers(CustomerQuery(external_id="e2"))
    assert page == []  # the failed line left nothing behind
    uno = outcomes[3].record
    assert uno is not None and uno.profile["name"] == "Uno" and uno.custom == {"a": 1}
    assert await store.customer(taken.id) == taken


async def test_merge_moves_identities_and_conversations(store: Store) -> None:
    cid = await new_conversation(store, "visitor-m")
    conv = await store.load_conversation(cid)
    assert conv is not None
    into = await _create(store, name="Main", custom={"a": "main"})
    result = await store.merge_customers(into.id, conv.customer_id, T0)
    assert not result.repeated and result.conversations == 1 and result.identities == 1
    assert Identity("webchat", "visitor-m") in result.record.identities
    moved = await store.load_conversation(cid)
    assert moved is not None and moved.customer_id == into.id
    assert moved.version == conv.version + 1  # a decision in flight is retried
    assert await store.customer(conv.customer_id) is None
    assert await store.merged_into(conv.customer_id) == into.id
    assert await store.merged_from(into.id) == [conv.customer_id]
    again = await store.merge_customers(into.id, conv.customer_id, T0)
    assert again.repeated and again.conversations == 1
    third = await _create(store, name="Third")
    with pytest.raises(Conflict) as caught:
        await store.merge_customers(third.id, conv.customer_id, T0)
    assert caught.value.code == "already_merged"
    with pytest.raises(RequestError):
        await store.merge_customers(into.id, into.id, T0)
    # a chain: into merged further
    await store.merge_customers(third.id, into.id, T0)
    assert await store.merged_into(conv.customer_id) == third.id


async def test_erasure_rewrites_personal_values_everywhere(store: Store) -> None:
    [acc] = await store.accept([message("+4915199999999", text="I am Ann, ann@example.com")], T0)
    cid = acc.conversation_id
    conv = await store.load_conversation(cid)
    assert conv is not None
    customer = await store.attach_identity(
        conv.customer_id, Identity("email", "ann@example.com"), T0, _key("e1", "h")
    )
    assert isinstance(customer, CustomerRecord)
    conv, events = await pending(store, cid)
    await store.commit_decision(
        record(
            conv,
            events[1],
            facts={"event": {"text": "I am Ann, ann@example.com"}},
            outbox=[NewOutbox("bot:demo", {"body": "mail ann@example.com", "text": "Ann"})],
            messages=[Message("msg_e", cid, "customer", conv.identity, "ann@example.com", T0)],
        ),
        T0,
    )
    version = await store.erase_customer(conv.customer_id, T0, "[erased]")
    assert version == customer.version + 1
    assert await store.customer(conv.customer_id) is None
    [stored] = await store.messages(cid, include_agent_only=True)
    assert stored.text == "[erased]"
    event = await store.event(events[1].id)
    assert event is not None and event.data["text"] == "[erased]"
    [row] = await store.outbox_rows()
    # values of personal keys go whole, the customer's values anywhere else
    assert row["payload"] == {"body": "mail [erased]", "text": "[erased]"}
    decision = next(d for d in await store.decisions(cid) if d["event_id"] == events[1].id)
    assert decision["facts"] == {"event": {"text": "[erased]"}}
    after = await store.load_conversation(cid)
    assert after is not None and after.identity == f"erased:{cid}"
    assert await store.lookup_customer(Identity("email", "ann@example.com")) is None
    # the idempotent answer naming the customer is gone too: the key is free again
    fresh = await store.attach_identity(
        (await _create(store)).id, Identity("email", "ann@example.com"), T0, _key("e1", "h")
    )
    assert isinstance(fresh, CustomerRecord)
    with pytest.raises(NotFound):
        await store.erase_customer(conv.customer_id, T0, "[erased]")


# apps -----------------------------------------------------------------------------------------
def _app(app_id: str, name: str) -> AppRecord:
    return AppRecord(app_id, name, None, ("events:read",), "https://x.test/hook", "s", True, T0, T0)


async def test_apps_subscriptions_and_deliveries(store: Store) -> None:
    app = await store.create_app(_app("ap_1", "survey"), "token-1")
    assert app == _app("ap_1", "survey")
    assert await store.token("token-1") == ("app", "ap_1")
    with pytest.raises(Conflict):
        await store.create_app(_app("ap_2", "survey"), "token-2")
    changed = await store.update_app("ap_1", {"enabled": False, "scopes": ["a", "b"]}, T0)
    assert not changed.enabled and changed.scopes == ("a", "b")
    await store.replace_app_token("ap_1", "token-3", T0)
    assert await store.token("token-1") is None and await store.token("token-3") == ("app", "ap_1")
    await store.add_app_subscription(AppSubscription("su_1", "ap_1", ("conversation.closed",), T0))
    await store.add_app_subscription(AppSubscription("su_2", "ap_1", ("customer.message",), T0))
    assert [s.id for s in await store.app_subscriptions("ap_1")] == ["su_1", "su_2"]
    assert await store.delete_app_subscriptions("ap_1", ["su_2", "su_9"]) == 1
    # deliveries are outbox rows to app:<id>
    cid = await new_conversation(store)
    conv, events = await pending(store, cid)
    committed = await store.commit_decision(
        record(conv, events[0], outbox=[NewOutbox("app:ap_1", {"n": 1})]), T0
    )
    [row] = committed.outbox
    await store.outbox_dead(row.id, "410 gone")
    [entry] = await store.outbox_entries("app:ap_1")
    assert entry.status == "dead" and entry.last_error == "410 gone" and entry.replays == 0
    assert await store.outbox_entry("app:ap_1", row.event_id, 0) == entry
    assert await store.outbox_entries("app:ap_1", status="done") == []
    assert await store.outbox_replay(row.id, T0)
    assert not await store.outbox_replay(row.id, T0)
    [replayed] = await store.outbox_entries("app:ap_1")
    assert replayed.status == "pending" and replayed.replays == 1 and replayed.row.attempts == 0
    assert await store.delete_app("ap_1", T0, "app deleted") == 1
    assert await store.app_records() == []
    deleted = await store.app_record("ap_1")
    assert deleted is not None and deleted.deleted_at == T0
    assert await store.app_subscriptions() == []
    assert await store.token("token-3") is None
    with pytest.raises(Conflict):
        await store.update_app("ap_1", {"name": "x"}, T0)
    with pytest.raises(NotFound):
        await store.update_app("ap_missing", {"name": "x"}, T0)
    # the name is free again
    await store.create_app(_app("ap_3", "survey"), "token-4")


async def test_provider_message_ids(store: Store) -> None:
    await store.record_provider_message("wa", "wamid.1", "cv_1", "msg_1", T0)
    await store.record_provider_message("wa", "wamid.1", "cv_2", "msg_2", T0)  # first one stays
    found = await store.provider_message("wa", "wamid.1")
    assert found is not None and (found.conversation_id, found.message_id) == ("cv_1", "msg_1")
    assert found.sent_at == T0
    assert await store.provider_message("other", "wamid.1") is None


# campaigns ------------------------------------------------------------------------------------
def _campaign(campaign_id: str = "cp_1", status: str = "running") -> CampaignRecord:
    return CampaignRecord(
        id=campaign_id,
        name="Spring sale",
        owner="admin",
        channel="whatsapp",
        endpoint="106540352242922",
        template={"name": "spring_sale", "language": "en", "parameters": ["{{ params.code }}"]},
        text=None,
        audience={"customer_ids": 3},
        rate=5.0,
        starts_at=None,
        ends_at=T0 + timedelta(days=1),
        hours_from="09:00",
        hours_to="18:00",
        status=status,
        recipients=0,
        created_at=T0,
        updated_at=T0,
    )


def _campaign_message(campaign_id: str, customer_id: str, wa_id: str) -> NewEvent:
    return NewEvent(
        type="campaign.message",
        source="campaign",
        dedupe_key=f"campaign:{campaign_id}:{customer_id}",
        channel="whatsapp",
        instance="whatsapp",
        endpoint="106540352242922",
        identity=wa_id,
        data={"campaign_id": campaign_id, "customer_id": customer_id, "text": "Spring!"},
    )


async def test_campaign_recipients_are_one_per_customer(store: Store) -> None:
    created, fresh = await store.create_campaign(
        _campaign(),
        [("cu_a", {"code": "A"}), ("cu_b", {}), ("cu_a", {"code": "again"}), ("cu_c", {})],
    )
    assert fresh and created.recipients == 3
    assert created == replace(_campaign(), recipients=3)
    assert await store.campaign("cp_1") == created
    assert await store.campaign("cp_missing") is None
    listed = await store.campaign_recipients("cp_1")
    assert [(r.customer_id, r.position, r.params) for r in listed] == [
        ("cu_a", 1, {"code": "A"}),
        ("cu_b", 2, {}),
        ("cu_c", 3, {}),
    ]
    assert all(r.status == "pending" and r.sent_at is None for r in listed)
    assert await store.campaign_counts("cp_1") == {"pending": 3}
    page = await store.campaign_recipients("cp_1", limit=1, after=1)
    assert [r.customer_id for r in page] == ["cu_b"]
    # an idempotency key answers the first campaign again, and refuses another request
    key = IdempotencyKey("admin:admin POST /api/v1/campaigns", "k1", "hash-1")
    first, fresh = await store.create_campaign(_campaign("cp_2"), [("cu_a", {})], key)
    again, fresh_again = await store.create_campaign(_campaign("cp_3"), [("cu_b", {})], key)
    assert fresh and not fresh_again and again.id == first.id == "cp_2"
    assert await store.campaign("cp_3") is None
    with pytest.raises(RequestError):
        await store.create_campaign(
            _campaign("cp_4"), [], IdempotencyKey(key.scope, "k1", "hash-2")
        )
    # newest first, by owner and status, in pages
    assert [c.id for c in await store.campaigns()] == ["cp_2", "cp_1"]
    assert [c.id for c in await store.campaigns(before="cp_2")] == ["cp_1"]
    assert await store.campaigns(owner="ap_other") == []
    assert [c.id for c in await store.campaigns(statuses=["running"], limit=1)] == ["cp_2"]


async def test_a_campaign_send_is_one_transaction(store: Store) -> None:
    ana = await store.create_customer({"name": "Ana", "phone": "+351910000001"}, [], T0)
    ben = await store.create_customer({"name": "Ben", "phone": "+351910000002"}, [], T0)
    assert isinstance(ana, CustomerRecord) and isinstance(ben, CustomerRecord)
    await store.create_campaign(_campaign(), [(ana.id, {}), (ben.id, {}), ("cu_gone", {})])
    batch = await store.campaign_batch("cp_1", 10)
    assert [(w.recipient.customer_id, w.customer) for w in batch] == [
        (ana.id, ana),
        (ben.id, ben),
        ("cu_gone", None),
    ]
    event = _campaign_message("cp_1", ana.id, "351910000001")
    sent = await store.campaign_send("cp_1", ana.id, event, T0)
    assert sent.outcome == "sent" and sent.accepted is not None
    assert not sent.accepted.duplicate
    # the event opened the conversation of the customer's WhatsApp identity, as outbound
    events = [e for e, _ in await store.events(sent.accepted.conversation_id)]
    assert [e.type for e in events] == ["conversation.created", "campaign.message"]
    assert events[0].data["direction"] == "outbound"
    conv = await store.load_conversation(sent.accepted.conversation_id)
    assert conv is not None and conv.customer_id == ana.id
    # the number the campaign wrote to is the customer's WhatsApp identity from now on
    found = await store.lookup_customer(Identity("whatsapp", "+351910000001"))
    assert found is not None and found.id == ana.id and found.version == ana.version + 1
    [row] = await store.campaign_recipients("cp_1", status="sent")
    assert row.customer_id == ana.id and row.sent_at == T0
    assert (row.conversation_id, row.event_id) == (
        sent.accepted.conversation_id,
        sent.accepted.event_id,
    )
    # never twice
    assert (await store.campaign_send("cp_1", ana.id, event, T0)).outcome == "not_pending"
    assert [w.recipient.customer_id for w in await store.campaign_batch("cp_1", 10)] == [
        ben.id,
        "cu_gone",
    ]
    # opted out at send time: skipped, nothing stored
    assert await store.add_opt_out(ben.id, "admin", T0)
    assert not await store.add_opt_out(ben.id, "admin", T0)
    assert [o.customer_id for o in await store.opt_outs()] == [ben.id]
    ben_event = _campaign_message("cp_1", ben.id, "351910000002")
    assert (await store.campaign_send("cp_1", ben.id, ben_event, T0)).outcome == "opted_out"
    assert await store.latest_conversation_id("whatsapp", "106540352242922", "351910000002") is None
    assert await store.remove_opt_out(ben.id) and not await store.remove_opt_out(ben.id)
    assert await store.campaign_skip("cp_1", "cu_gone", "unknown_customer", T0)
    assert not await store.campaign_skip("cp_1", "cu_gone", "unknown_customer", T0)
    counts = await store.campaign_counts("cp_1")
    assert counts == {"sent": 1, "skipped": 2}
    skipped = await store.campaign_recipients("cp_1", status="skipped")
    assert [(r.customer_id, r.reason) for r in skipped] == [
        (ben.id, "opted_out"),
        ("cu_gone", "unknown_customer"),
    ]


async def test_campaign_status_moves_and_sends_stop_with_it(store: Store) -> None:
    ana = await store.create_customer({"phone": "+351910000001"}, [], T0)
    assert isinstance(ana, CustomerRecord)
    await store.create_campaign(_campaign(), [(ana.id, {}), ("cu_b", {}), ("cu_c", {})])
    paused = await store.set_campaign_status(
        "cp_1", "paused", allowed_from=("running", "scheduled"), now=T0
    )
    assert paused is not None and paused.status == "paused" and paused.finished_at is None
    event = _campaign_message("cp_1", ana.id, "351910000001")
    assert (await store.campaign_send("cp_1", ana.id, event, T0)).outcome == "not_running"
    assert (
        await store.set_campaign_status("cp_1", "paused", allowed_from=("running",), now=T0) is None
    )
    later = T0 + timedelta(minutes=5)
    cancelled = await store.set_campaign_status(
        "cp_1", "cancelled", allowed_from=("paused",), now=later, skip_pending="cancelled"
    )
    assert cancelled is not None and cancelled.finished_at == later
    assert await store.campaign_counts("cp_1") == {"skipped": 3}
    assert {r.reason for r in await store.campaign_recipients("cp_1")} == {"cancelled"}
    with pytest.raises(NotFound):
        await store.set_campaign_status("cp_missing", "paused", allowed_from=("running",), now=T0)


async def test_campaign_outcomes_never_move_a_recipient_back(store: Store) -> None:
    people = []
    for n in range(3):
        made = await store.create_customer({"phone": f"+35191000000{n}"}, [], T0)
        assert isinstance(made, CustomerRecord)
        people.append(made)
    await store.create_campaign(_campaign(), [(p.id, {}) for p in people])
    sent = {}
    for n, person in enumerate(people):
        event = _campaign_message("cp_1", person.id, f"35191000000{n}")
        result = await store.campaign_send("cp_1", person.id, event, T0)
        assert result.accepted is not None
        sent[person.id] = result.accepted
    a, b, c = (sent[p.id] for p in people)
    t1, t2, t3 = (T0 + timedelta(seconds=s) for s in (1, 2, 3))
    changed = await store.campaign_outcomes(
        [
            CampaignOutcome("delivered", t1, event_id=a.event_id),
            CampaignOutcome("read", t2, event_id=a.event_id),
            CampaignOutcome("delivered", t3, event_id=a.event_id),  # late: stays read
            CampaignOutcome("failed", t1, event_id=b.event_id, reason="invalid_recipient"),
            CampaignOutcome("replied", t2, campaign_id="cp_1", conversation_id=c.conversation_id),
            CampaignOutcome("read", t3, event_id=c.event_id),  # after the reply: read_at only
            CampaignOutcome("delivered", t1, event_id="ev_unknown"),
        ],
        T0,
    )
    assert changed == 6
    rows = {r.customer_id: r for r in await store.campaign_recipients("cp_1")}
    ra, rb, rc = (rows[p.id] for p in people)
    assert (ra.status, ra.delivered_at, ra.read_at) == ("read", t1, t2)
    assert (rb.status, rb.reason, rb.failed_at) == ("failed", "invalid_recipient", t1)
    assert (rc.status, rc.replied_at, rc.read_at) == ("replied", t2, t3)
    assert await store.campaign_counts("cp_1") == {"read": 1, "failed": 1, "replied": 1}
    # a message that moved to a new conversation is followed there
    await store.campaign_outcomes(
        [
            CampaignOutcome(
                "moved",
                t3,
                event_id="ev_new",
                campaign_id="cp_1",
                customer_id=people[1].id,
                conversation_id="cv_new",
            )
        ],
        T0,
    )
    moved = {r.customer_id: r for r in await store.campaign_recipients("cp_1")}[people[1].id]
    assert (moved.conversation_id, moved.event_id) == ("cv_new", "ev_new")


# PostgreSQL only ------------------------------------------------------------------------------
async def test_postgres_processes_starting_together_migrate_once() -> None:
    from controller.store.postgres import PostgresStore

    url = postgres_url_or_skip()
    schema = f"convctl_s_{secrets.token_hex(6)}"
    stores = [PostgresStore(url, schema=schema, max_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        import asyncpg

        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        finally:
            await conn.close()
        assert versions == sorted(set(versions)) and versions[0] == 1
        # every process sees the same data
        [acc] = await stores[0].accept([message()], T0)
        assert (await stores[3].load_conversation(acc.conversation_id)) is not None
    finally:
        for s in stores:
            await s.close()
        await _drop_schema(url, schema)


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    from controller.settings import Settings
    from controller.store.factory import make_store, store_location
    from controller.store.postgres import PostgresStore

    assert isinstance(make_store(Settings(data_dir=tmp_path)), SqliteStore)
    url = "postgresql://u:pw@db.example:5432/convctl"
    settings = Settings(data_dir=tmp_path, database_url=url, database_schema="tenant_a")
    assert isinstance(make_store(settings), PostgresStore)
    where = "postgresql://u:***@db.example:5432/convctl (schema tenant_a)"
    assert store_location(settings) == where
    with pytest.raises(ValueError):
        Settings(database_url="mysql://x")
    with pytest.raises(ValueError):
        Settings(database_url=url, database_schema="Bad-Name")


async def test_concurrent_creates_with_one_external_id_make_one_customer(store: Store) -> None:
    """Ten creates racing for one CRM id: one customer, nine 409 ``identity_taken`` (on
    PostgreSQL the loser of the unique index is retried and then sees the winner)."""
    results = await asyncio.gather(
        *(store.create_customer({"external_id": "crm-race"}, (), T0) for _ in range(10)),
        return_exceptions=True,
    )
    made = [r for r in results if isinstance(r, CustomerRecord)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(made) == 1 and len(refused) == 9, results
    assert {r.code for r in refused} == {"identity_taken"}
