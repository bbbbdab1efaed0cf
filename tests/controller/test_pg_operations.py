"""Operations: the connection pool's metrics (PostgreSQL), a graceful stop (both stores) and
the hand-over of a stopping process's conversations to the others (PostgreSQL).

The PostgreSQL tests are skipped without CONVCTL_TEST_DATABASE_URL (fails when CI=true).
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.errors import Conflict
from controller.keys import READY
from controller.store.base import Committed, DecisionRecord
from controller.store.factory import open_store
from controller.store.postgres import PostgresStore
from controller.testing import (
    Service,
    ServiceProcess,
    WebChatClient,
    drop_postgres_test_schemas,
    postgres_test_schema,
    postgres_url_or_skip,
)
from controller.testing import test_settings as settings_for
from tests.controller.test_store import message


async def test_metrics_show_the_connection_pool(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        database_url=postgres_url_or_skip(),
        database_schema=postgres_test_schema(tmp_path),
        database_pool_min=2,
        database_pool_max=6,
    )
    service = await Service(settings).start()
    try:
        visitor = await service.customer()
        await visitor.start_with_bot("hi")  # a conversation decided: queries went through
        m = await _metrics_of(service.base_url)
    finally:
        await service.stop()
        await drop_postgres_test_schemas([settings.database_schema or ""])
    assert m["convctl_db_pool_min"] == 2 and m["convctl_db_pool_max"] == 6
    assert 2 <= m["convctl_db_pool_size"] <= 6
    assert 0 <= m["convctl_db_pool_idle"] <= m["convctl_db_pool_size"]
    assert m["convctl_db_pool_in_use"] == m["convctl_db_pool_size"] - m["convctl_db_pool_idle"]
    assert m["convctl_db_pool_waiting"] >= 0
    acquires = m["convctl_db_pool_acquire_seconds_count"]
    assert acquires > 10  # registering, recovery, the inbox, the decision, the outbox...
    assert m['convctl_db_pool_acquire_seconds_bucket{le="+Inf"}'] == acquires
    buckets = sorted(
        (float(key.split('"')[1]), value)
        for key, value in m.items()
        if key.startswith("convctl_db_pool_acquire_seconds_bucket")
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative
    assert m["convctl_db_pool_acquire_seconds_sum"] >= 0


async def test_sqlite_exports_no_pool(service: Service) -> None:
    if service.settings.database_url:
        pytest.skip("the service runs on PostgreSQL here")
    m = await _metrics_of(service.base_url)
    assert "convctl_db_pool_size" not in m
    assert m['convctl_cluster_takeovers_total{how="handover"}'] == 0


# graceful stop -------------------------------------------------------------------------------
async def test_a_stop_is_not_ready_first_and_lets_the_decision_in_flight_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (the app's shutdown): readiness goes false before anything stops, and a
    decision in flight commits instead of being cut short (SQLite, or PostgreSQL with
    CONVCTL_TEST_STORE=postgres)."""
    settings = settings_for(tmp_path)
    service = await Service(settings).start()
    store = service.store
    entered, gate = asyncio.Event(), asyncio.Event()
    commit = store.commit_decision

    async def held(record: DecisionRecord, now: datetime) -> Committed:
        if record.event.type == "customer.message":
            entered.set()
            await gate.wait()
        return await commit(record, now)

    monkeypatch.setattr(store, "commit_decision", held)
    stopping: asyncio.Task[None] | None = None
    try:
        visitor = await service.customer()
        ack = await visitor.say("hi")
        assert ack["type"] == "ack"
        cid = str(ack["conversation_id"])
        async with asyncio.timeout(30):
            await entered.wait()  # the decision is in flight, held before its commit
            stopping = asyncio.create_task(service.stop())
            while not service.app[READY].get("stopping"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert service.app[READY]["ready"] is False  # while the decision still waits
        gate.set()
        await stopping
    finally:
        gate.set()
        if stopping is None:
            await service.stop()
    reopened = await open_store(settings)
    try:
        events = await reopened.events(cid)
    finally:
        await reopened.close()
        if settings.database_schema:
            await drop_postgres_test_schemas([settings.database_schema])
    said = [status for event, status in events if event.type == "customer.message"]
    assert said == ["decided"]


async def _metrics_of(base_url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def _wait_for(db: Any, sql: str, want: int, *args: Any) -> None:
    """Until ``sql`` counts ``want``: the processes write, the database is what to watch.
    The guard is far below the heartbeat timeout, so only a hand-over can get there."""
    async with asyncio.timeout(GUARD):
        while await db.fetchval(sql, *args) != want:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


HANDOVER_VISITORS = 8
INTERVAL = 0.2
# Far longer than the test may wait (GUARD): B cannot take A's conversations by the timeout.
HEARTBEAT_TIMEOUT = 600.0
GUARD = 120.0


@pytest.mark.timeout(600)
async def test_sigterm_hands_the_conversations_over_at_once(tmp_path: Path) -> None:
    """Two ``convctl serve`` on one schema; A owns the conversations, some of them with
    messages still undecided when A gets SIGTERM. A finishes what is in flight, releases its
    leases and tells B; B decides the rest and every later message — by the hand-over path
    (B counts a hand-over, no dead process, no event recovered as after a crash), since the
    heartbeat timeout is far longer than the test waits. Nothing lost, nothing doubled."""
    import asyncpg

    url = postgres_url_or_skip()
    schema = f"convctl_h_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    db = await asyncpg.connect(url, server_settings={"search_path": schema})
    env = {
        "CONVCTL_DATABASE_URL": url,
        "CONVCTL_DATABASE_SCHEMA": schema,
        "CONVCTL_LOG_LEVEL": "info",
        "CONVCTL_TIMEOUTS__CUSTOMER_GRACE": "3600",
        "CONVCTL_TIMEOUTS__IDLE_REMINDER": "3600",
        "CONVCTL_TIMEOUTS__IDLE_CLOSE": "3600",
        "CONVCTL_CLUSTER_HEARTBEAT_INTERVAL": str(INTERVAL),
        "CONVCTL_CLUSTER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServiceProcess(tmp_path / "a", env=env)
    b = ServiceProcess(tmp_path / "b", env=env)
    visitors: list[WebChatClient] = []
    try:
        for proc in (a, b):
            proc.start()
            await proc.wait_ready()
        a_id = await _process_id(a.base_url)
        b_id = await _process_id(b.base_url)
        # 1. Every conversation is decided by A (the socket that opened it is A's).
        conversations = []
        for _ in range(HANDOVER_VISITORS):
            visitor = WebChatClient(a.base_url)
            visitors.append(visitor)
            await visitor.connect()
            conversations.append(await visitor.start_with_bot("hi"))
        owners = await db.fetch(
            "SELECT owner FROM conversation_leases WHERE conversation_id = ANY($1::text[])",
            conversations,
        )
        assert [r["owner"] for r in owners] == [a_id] * HANDOVER_VISITORS
        # 2. A burst on A, acknowledged (stored), then SIGTERM before all of it is decided.
        acks = await asyncio.gather(*(v.say("hours") for v in visitors))
        assert {ack["type"] for ack in acks} == {"ack"}
        for visitor in visitors:
            await visitor.close()
        assert a.proc is not None
        a.proc.terminate()
        assert await asyncio.to_thread(a.proc.wait, 60) == 0
        # A left: registered no more, holding nothing.
        assert [r["id"] for r in await db.fetch("SELECT id FROM processes")] == [b_id]
        # 3. The visitors come back behind B and write again; B decides everything.
        for visitor, cid in zip(list(visitors), conversations, strict=True):
            again = WebChatClient(b.base_url, visitor.token)
            visitors.append(again)
            await again.connect()
            ack = await again.say("prices")
            assert ack["type"] == "ack" and ack["conversation_id"] == cid
        await _wait_for(
            db,
            "SELECT COUNT(*) FROM events WHERE type = 'customer.message' AND status = 'decided'",
            3 * HANDOVER_VISITORS,
        )
        await _wait_for(db, "SELECT COUNT(*) FROM events WHERE status = 'pending'", 0)
        await _wait_for(db, "SELECT COUNT(*) FROM outbox WHERE status = 'pending'", 0)
        b_metrics = await _metrics_of(b.base_url)
        b_owners = [
            r["owner"]
            for r in await db.fetch(
                "SELECT owner FROM conversation_leases WHERE conversation_id = ANY($1::text[])",
                conversations,
            )
        ]
        a_log = a.log_path.read_text(errors="replace")
    finally:
        for visitor in visitors:
            await visitor.close()
            await visitor.http.close()
        a.terminate()
        b.terminate()
    try:
        # Taken over by the hand-over, not as after a crash.
        assert "conversations_handed_over" in a_log
        assert b_metrics['convctl_cluster_takeovers_total{how="handover"}'] >= 1
        assert b_metrics['convctl_cluster_takeovers_total{how="dead"}'] == 0
        assert b_metrics.get("convctl_recovered_events_total", 0) == 0
        assert b_owners == [b_id] * HANDOVER_VISITORS
        # Nothing lost, nothing doubled: three messages each, decided once, in order, and
        # one bot request and one bot answer per message.
        for cid in conversations:
            said = await db.fetch(
                "SELECT data->>'text' AS text, status, "
                "(SELECT COUNT(*) FROM decisions d WHERE d.event_id = e.id) AS n "
                "FROM events e WHERE conversation_id = $1 AND type = 'customer.message' "
                "ORDER BY seq",
                cid,
            )
            assert [(r["text"], r["status"], r["n"]) for r in said] == [
                ("hi", "decided", 1),
                ("hours", "decided", 1),
                ("prices", "decided", 1),
            ]
            seqs = [
                r["seq"]
                for r in await db.fetch(
                    "SELECT seq FROM decisions WHERE conversation_id = $1 ORDER BY decided_at, seq",
                    cid,
                )
            ]
            assert seqs == list(range(1, len(seqs) + 1))
            counts = await db.fetchrow(
                "SELECT (SELECT COUNT(*) FROM messages WHERE conversation_id = $1 "
                " AND sender_role = 'bot') AS bot, "
                "(SELECT COUNT(*) FROM outbox WHERE conversation_id = $1 "
                " AND destination = 'bot:demo') AS requests",
                cid,
            )
            assert (counts["bot"], counts["requests"]) == (3, 3), cid
    finally:
        await db.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def _process_id(base_url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/readyz") as r:
        return str((await r.json())["process_id"])


async def test_hand_over_releases_leases_and_timer_claims_and_tells_the_others(
    tmp_path: Path,
) -> None:
    """The store's part of a clean stop: A gives up its leases (a commit under an old token
    is refused afterwards) and its timer claims, stays registered until it closes, and B is
    told; B then takes the conversations with new tokens."""
    import asyncpg

    url = postgres_url_or_skip()
    schema = f"convctl_o_{secrets.token_hex(6)}"
    a = PostgresStore(url, schema=schema, min_size=1, max_size=3)
    b = PostgresStore(url, schema=schema, min_size=1, max_size=3)
    heard: list[dict[str, Any]] = []
    got = asyncio.Event()

    def on_message(message: dict[str, Any]) -> None:
        heard.append(message)
        got.set()

    await a.open()
    await b.open()
    link = await b.listen(on_message)
    try:
        cids, tokens = [], []
        for n in range(2):
            [acc] = await a.accept([message(f"v{n}")], T0)
            cids.append(acc.conversation_id)
            owner, token = await a.acquire_lease(acc.conversation_id)
            assert owner == a.process_id
            tokens.append(token)
        await _sql(
            a,
            "INSERT INTO timers (conversation_id, name, generation, due_at, claimed_by) "
            "VALUES ($1, 'grace', 1, 0, $2)",
            cids[0],
            a.process_id,
        )
        assert await a.hand_over() == 2
        async with asyncio.timeout(30):
            await got.wait()
        assert heard == [{"kind": "handover", "from": a.process_id, "leases": 2}]
        assert await _sql(a, "SELECT COUNT(*) FROM conversation_leases") == 0
        assert await _sql(a, "SELECT COUNT(*) FROM timers WHERE claimed_by IS NOT NULL") == 0
        assert {p["id"] for p in await b.processes()} == {a.process_id, b.process_id}
        conv, events = await a.load_for_decision(cids[0])
        assert conv is not None
        record = DecisionRecord(
            event=events[0],
            before_version=conv.version,
            after=conv.model_copy(),
            rules_version="v-test",
            matcher="reference",
            lease=tokens[0],
        )
        with pytest.raises(Conflict) as refused:
            await a.commit_decision(record, T0)
        assert refused.value.code == "lease_lost"
        for cid, token in zip(cids, tokens, strict=True):
            owner, newer = await b.acquire_lease(cid)
            assert owner == b.process_id and newer > token
    finally:
        await link.close()
        await a.close()
        await b.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


async def _sql(store: PostgresStore, sql: str, *args: Any) -> Any:
    async def run(conn: Any) -> Any:
        return await conn.fetchval(sql, *args)

    return await store._read(run)
