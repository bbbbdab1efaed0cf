"""Several processes on one PostgreSQL database: three ``convctl serve`` subprocesses share a
schema, web chat visitors and WhatsApp users write to any of them, and one of them is killed
with SIGKILL again and again (and started again once the others took its work over).

Afterwards the database must show every acknowledged message stored once and decided once, in
order, one bot request per customer message, every WhatsApp answer sent once (a second send
only for rows that were in flight in a killed process), the grace timers fired after the last
kill, and after each kill the dead process's leases, timers and outbox claims taken over by
the survivors within the bound (heartbeat timeout plus two intervals; the wait allows a noisy
machine some slack on top).

Skipped without CONVCTL_TEST_DATABASE_URL (fails when CI=true). Size knobs:
CONVCTL_MULTI_CONVERSATIONS (web chat visitors, default 60; WhatsApp users are half that),
CONVCTL_MULTI_KILLS (default 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.keys import READY
from controller.testing import (
    ResendingVisitor,
    Service,
    ServiceProcess,
    next_frame,
    postgres_url_or_skip,
)
from controller.testing import test_settings as settings_for
from controller.testing_graph import (
    FakeGraph,
    GraphRequest,
    MetaSender,
    change,
    envelope,
    text_message,
)

VISITORS = int(os.environ.get("CONVCTL_MULTI_CONVERSATIONS", "60"))
WA_USERS = max(1, VISITORS // 2)
KILLS = int(os.environ.get("CONVCTL_MULTI_KILLS", "3"))
PROCESSES = 3
WORDS = ("hi", "hours", "prices", "hello")
GRACE = 8.0  # longer than a takeover plus a reconnect, so no visitor is closed early
INTERVAL = 0.2  # heartbeat interval (s)
TIMEOUT = 1.0  # heartbeat timeout (s)
# The design bound of a takeover, and the wait allowed for it on a loaded test machine.
BOUND = TIMEOUT + 2 * INTERVAL
TAKEOVER_WAIT = BOUND + 20.0
SPREAD = 3.0 * KILLS  # seconds over which clients arrive (a kill and a restart take ~3 s)
NUMBER, WA_TOKEN, SECRET, VERIFY = "1065432100", "EAAG-multi-token", "multi-secret", "multi-v"


class Cluster:
    """Three service processes on one schema; ``alive`` are those a client may use now."""

    def __init__(self, root: Path, url: str, schema: str, graph: FakeGraph) -> None:
        whatsapp = {
            "graph_base_url": graph.base_url,
            "graph_api_version": graph.version,
            "app_secret": SECRET,
            "verify_token": VERIFY,
            "endpoints": [{"phone_number_id": NUMBER, "access_token": WA_TOKEN}],
            "mark_read": False,
            "media_download": False,
            # at least once: a row in flight in a killed process is sent again at once
            "resend_unconfirmed_after": 0,
        }
        connectors = [
            {
                "name": "webchat",
                "type": "webchat",
                "settings": {"sessions_per_ip_per_minute": 100000, "messages_per_window": 1000},
            },
            {"name": "whatsapp", "type": "whatsapp", "settings": whatsapp},
            {"name": "demo", "type": "demo_bot"},
        ]
        env = {
            "CONVCTL_DATABASE_URL": url,
            "CONVCTL_DATABASE_SCHEMA": schema,
            "CONVCTL_CONNECTORS": json.dumps(connectors),
            "CONVCTL_TIMEOUTS__CUSTOMER_GRACE": str(GRACE),
            "CONVCTL_TIMEOUTS__IDLE_REMINDER": "3600",
            "CONVCTL_TIMEOUTS__IDLE_CLOSE": "3600",
            "CONVCTL_CLUSTER_HEARTBEAT_INTERVAL": str(INTERVAL),
            "CONVCTL_CLUSTER_HEARTBEAT_TIMEOUT": str(TIMEOUT),
            "CONVCTL_OUTBOX_BACKOFF_BASE": "0.05",
            "CONVCTL_OUTBOX_BACKOFF_MAX": "0.5",
        }
        self.procs = []
        for n in range(PROCESSES):
            folder = root / f"p{n}"
            folder.mkdir()
            self.procs.append(ServiceProcess(folder, env=env))
        self.alive: set[int] = set()
        self.ids: dict[int, str] = {}  # process index -> its current process id

    async def start(self, n: int) -> None:
        self.procs[n].start()
        await self.procs[n].wait_ready()
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.procs[n].base_url + "/readyz") as r,
        ):
            self.ids[n] = (await r.json())["process_id"]
        self.alive.add(n)

    def any_url(self) -> str:
        return self.procs[random.choice(sorted(self.alive))].base_url

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate()


class Visitor(ResendingVisitor):
    """A web chat visitor who resends unacknowledged messages on reconnect, to any process."""

    def __init__(self, n: int) -> None:
        texts = [f"{WORDS[(n + i) % len(WORDS)]} #{n}.{i}" for i in range(3)]
        super().__init__(texts, pause=random.uniform(0.1, 0.8))
        self.start = random.uniform(0.0, SPREAD)

    async def run(self, cluster: Cluster, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(self.start)  # arrivals spread over the kills
        await self.send_all(cluster.any_url, http)

    async def leave(self, cluster: Cluster, http: aiohttp.ClientSession) -> None:
        """Open the page once more, then close it: the service sees the visitor leave (its
        earlier socket may have ended with a killed process, which tells nobody)."""
        while True:
            try:
                ws = await http.ws_connect(f"{cluster.any_url()}/webchat/ws?token={self.token}")
                try:
                    await next_frame(ws, "history")
                finally:
                    await ws.close()
                return
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(0.05)


class WhatsAppUser:
    """A WhatsApp user: Meta posts each message to any process until one answers 200."""

    def __init__(self, n: int) -> None:
        self.wa_id = f"4915100{n:06d}"
        self.texts = [f"{WORDS[(n + i) % len(WORDS)]} wa#{n}.{i}" for i in range(3)]
        self.wamids = [f"wamid.MULTI{n:05d}{i}" for i in range(3)]
        self.pause = random.uniform(0.1, 0.8)
        self.start = random.uniform(0.0, SPREAD)

    async def run(self, cluster: Cluster, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(self.start)  # arrivals spread over the kills
        for text, wamid in zip(self.texts, self.wamids, strict=True):
            body = envelope([change(NUMBER, messages=[text_message(self.wa_id, text, wamid)])])
            while True:
                meta = MetaSender(http, cluster.any_url() + "/webhooks/whatsapp", SECRET)
                try:
                    status, _ = await meta.post(body)
                    if status == 200:
                        break
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)  # Meta redelivers
            await asyncio.sleep(self.pause)


@pytest.fixture
async def database() -> AsyncIterator[tuple[str, str, Any]]:
    """The test database URL, a fresh schema and a connection that reads it."""
    import asyncpg

    url = postgres_url_or_skip()
    schema = f"convctl_m_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    db = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        yield url, schema, db
    finally:
        await db.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def _wait(db: Any, sql: str, want: int, timeout: float, *args: Any) -> float:
    """Seconds until ``sql`` counts ``want`` (the processes write; there is nothing to wait
    on but the database's state)."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while await db.fetchval(sql, *args) != want:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _kill_and_take_over(cluster: Cluster, db: Any, n: int) -> float:
    """SIGKILL process ``n``; wait until the survivors hold its leases, timers and rows."""
    cluster.alive.discard(n)
    dead = cluster.ids[n]
    cluster.procs[n].kill()
    return await _wait(
        db,
        "SELECT (SELECT COUNT(*) FROM processes WHERE id = $1) "
        "+ (SELECT COUNT(*) FROM conversation_leases WHERE owner = $1) "
        "+ (SELECT COUNT(*) FROM outbox WHERE claimed_by = $1) "
        "+ (SELECT COUNT(*) FROM timers WHERE claimed_by = $1)",
        0,
        TAKEOVER_WAIT,
        dead,
    )


async def _kill_loop(cluster: Cluster, db: Any, done: asyncio.Event, takeovers: list[float]) -> int:
    """Kill ``KILLS`` times; returns how many kills happened while clients were writing."""
    rng = random.Random()
    under_load = 0
    for _ in range(KILLS):
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        under_load += not done.is_set()
        victim = rng.choice(sorted(cluster.alive))
        takeovers.append(await _kill_and_take_over(cluster, db, victim))
        await cluster.start(victim)
    return under_load


@pytest.mark.timeout(900)
async def test_three_processes_survive_kills_and_lose_or_double_nothing(
    tmp_path: Path, database: tuple[str, str, Any]
) -> None:
    url, schema, db = database
    graph = await FakeGraph(tokens={NUMBER: WA_TOKEN}).start()
    cluster = Cluster(tmp_path, url, schema, graph)
    visitors = [Visitor(n) for n in range(VISITORS)]
    wa_users = [WhatsAppUser(n) for n in range(WA_USERS)]
    takeovers: list[float] = []
    try:
        for n in range(PROCESSES):
            await cluster.start(n)
        done = asyncio.Event()
        async with aiohttp.ClientSession() as http:
            killer = asyncio.create_task(_kill_loop(cluster, db, done, takeovers))
            await asyncio.gather(
                *(v.run(cluster, http) for v in visitors),
                *(u.run(cluster, http) for u in wa_users),
            )
            done.set()
            under_load = await killer
            # Every visitor leaves; their grace timers start (on whichever process decided
            # the disconnect). Kill a process while they are pending.
            await asyncio.gather(*(v.leave(cluster, http) for v in visitors))
        await _wait(
            db,
            "SELECT COUNT(*) FROM conversations WHERE instance = 'webchat' AND NOT closed "
            "AND (snapshot->>'customer_present')::boolean",
            0,
            60,
        )
        pending_timers = await db.fetchval("SELECT COUNT(*) FROM timers")
        takeovers.append(
            await _kill_and_take_over(cluster, db, random.choice(sorted(cluster.alive)))
        )
        await _wait(
            db,
            "SELECT COUNT(*) FROM conversations WHERE instance = 'webchat' AND NOT closed",
            0,
            120,
        )
        await _wait(db, "SELECT COUNT(*) FROM events WHERE status = 'pending'", 0, 60)
        await _wait(db, "SELECT COUNT(*) FROM outbox WHERE status = 'pending'", 0, 60)
        sends = graph.sent()
    finally:
        cluster.stop_all()
        await graph.stop()

    assert len(takeovers) == KILLS + 1
    assert under_load > 0, "the clients finished before the first kill"
    assert pending_timers > 0, "no timer was pending at the last kill"
    print(f"takeover after SIGKILL (s): {[round(t, 2) for t in takeovers]} (bound {BOUND} s)")

    # 1-4. Every acknowledged message stored and decided once, in order, one bot request and
    #      answer each; a second WhatsApp send only for a row a killed process had in flight.
    await check_decided_once(db, visitors, wa_users, sends, messages_each=3)

    # 5. The grace timers fired (on any process, pending ones taken over at the last kill),
    #    and nothing is left to a process that is gone.
    closed = await db.fetch(
        "SELECT snapshot->>'close_reason' AS reason FROM conversations WHERE instance = 'webchat'"
    )
    assert {r["reason"] for r in closed} == {"customer_left"}
    assert not await db.fetchval(
        "SELECT COUNT(*) FROM conversation_leases WHERE owner NOT IN (SELECT id FROM processes)"
    )
    assert not await db.fetchval("SELECT COUNT(*) FROM outbox WHERE status <> 'done'")


async def check_decided_once(
    db: Any,
    visitors: Sequence[Any],
    wa_users: Sequence[Any],
    sends: list[GraphRequest],
    *,
    messages_each: int,
) -> None:
    """What the tests that kill processes or the database check in the store: every
    acknowledged message (``visitors``: web chat, with ``visitor``, ``client_ids`` and
    ``texts``; ``wa_users``: with ``wa_id`` and ``texts``) stored once and decided once;
    decisions of each conversation in sequence; one bot request and one bot answer per
    customer message; each WhatsApp answer sent to Graph (``sends``) once, twice only for a
    row whose claim was released as unsure."""
    for v in visitors:
        rows = await db.fetch(
            "SELECT dedupe_key, status FROM events WHERE source = 'webchat:webchat' "
            "AND type = 'customer.message' AND dedupe_key LIKE $1 ORDER BY accepted_at, seq",
            f"{v.visitor}:%",
        )
        assert [r["dedupe_key"] for r in rows] == [f"{v.visitor}:{c}" for c in v.client_ids]
        assert {r["status"] for r in rows} == {"decided"}
    for u in wa_users:
        rows = await db.fetch(
            "SELECT e.data->>'text' AS text, e.status FROM events e "
            "JOIN conversations c ON c.id = e.conversation_id WHERE c.instance = 'whatsapp' "
            "AND c.identity = $1 AND e.type = 'customer.message' ORDER BY e.seq",
            u.wa_id,
        )
        assert [r["text"] for r in rows] == u.texts
        assert {r["status"] for r in rows} == {"decided"}
    decided = await db.fetchval("SELECT COUNT(*) FROM events WHERE status <> 'pending'")
    assert decided == await db.fetchval("SELECT COUNT(*) FROM decisions")
    seqs: dict[str, list[int]] = defaultdict(list)
    for r in await db.fetch("SELECT conversation_id, seq FROM decisions ORDER BY decided_at, seq"):
        seqs[r["conversation_id"]].append(r["seq"])
    for cid, order in seqs.items():
        assert order == list(range(1, len(order) + 1)), (cid, order)
    per_conv = await db.fetch(
        "SELECT c.id, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
        " AND m.sender_role = 'customer') AS customer, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
        " AND m.sender_role = 'bot') AS bot, "
        "(SELECT COUNT(*) FROM outbox o WHERE o.conversation_id = c.id "
        " AND o.destination LIKE 'bot:%') AS requests FROM conversations c"
    )
    assert sum(r["customer"] for r in per_conv) == messages_each * (len(visitors) + len(wa_users))
    for r in per_conv:
        if not r["customer"] == r["bot"] == r["requests"]:
            story = await db.fetch(
                "SELECT e.seq, e.type, e.status, d.outcome, d.matcher, e.source "
                "FROM events e LEFT JOIN decisions d ON d.event_id = e.id "
                "WHERE e.conversation_id = $1 ORDER BY e.seq",
                r["id"],
            )
            rows = await db.fetch(
                "SELECT destination, status, attempts, last_error FROM outbox "
                "WHERE conversation_id = $1 ORDER BY id",
                r["id"],
            )
            raise AssertionError(
                f"{dict(r)}: {[tuple(x) for x in story]} {[tuple(x) for x in rows]}"
            )
    for v in visitors:
        texts = [
            r["text"]
            for r in await db.fetch(
                "SELECT m.text FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE c.identity = $1 AND m.sender_role = 'customer' ORDER BY m.created_at, m.ord",
                v.visitor,
            )
        ]
        assert texts == v.texts
    rows = await db.fetch(
        "SELECT c.identity, COUNT(*) AS rows, COUNT(*) FILTER (WHERE o.unsure > 0) AS unsure "
        "FROM outbox o JOIN conversations c ON c.id = o.conversation_id "
        "WHERE o.destination = 'channel:whatsapp' AND o.status = 'done' GROUP BY c.identity"
    )
    sent_to: dict[str, int] = defaultdict(int)
    for request in sends:
        sent_to[str(request.json["to"])] += 1
    assert {r["identity"] for r in rows} == {u.wa_id for u in wa_users}
    for r in rows:
        assert r["rows"] <= sent_to[r["identity"]] <= r["rows"] + r["unsure"], dict(r)


async def _two_services(tmp_path: Path, url: str, schema: str) -> tuple[Service, Service]:
    """Two in-process services, ``a`` and ``b``, on one PostgreSQL schema."""
    services = []
    for name in ("a", "b"):
        settings = settings_for(
            tmp_path / name,
            database_url=url,
            database_schema=schema,
            cluster_heartbeat_interval=INTERVAL,
            cluster_heartbeat_timeout=TIMEOUT,
        )
        services.append(await Service(settings).start())
    return services[0], services[1]


async def test_a_socket_on_one_process_gets_what_another_process_decided(
    tmp_path: Path, database: tuple[str, str, Any]
) -> None:
    """Fan-out: the visitor's conversation is decided by process A (it holds the lease), the
    visitor's socket is on process B now; B pushes what A delivered."""
    url, schema, db = database
    services = a, b = await _two_services(tmp_path, url, schema)
    try:
        # exactly one of them runs the router (once the first has taken the role), and says so
        routers: list[bool] = []
        async with asyncio.timeout(30):
            while True not in routers:
                routers = []
                for svc in services:
                    assert svc.http is not None
                    async with svc.http.get(svc.base_url + "/readyz") as r:
                        routers.append((await r.json())["runs_router"])
                await asyncio.sleep(0.05)
        assert sorted(routers) == [False, True]
        on_a = await a.customer()
        cid = await on_a.start_with_bot("hi")
        owner = await db.fetchval(
            "SELECT owner FROM conversation_leases WHERE conversation_id = $1", cid
        )
        assert owner == a.app[READY]["process_id"]
        on_b = await b.customer(on_a.token)  # the page reloaded, behind another process
        await on_a.close()
        seen = len(on_b.frames)
        ack = await on_b.say("hours")  # accepted by b, decided by a (told by NOTIFY)
        assert ack["type"] == "ack" and ack["conversation_id"] == cid
        answer = await on_b.wait_message("bot", "open", after=seen)
        decided_by = await db.fetchval(
            "SELECT owner FROM conversation_leases WHERE conversation_id = $1", cid
        )
        assert decided_by == a.app[READY]["process_id"]
        assert answer["conversation_id"] == cid
    finally:
        for svc in reversed(services):
            await svc.stop()


async def test_a_process_taken_for_dead_loses_its_conversations_to_the_living(
    tmp_path: Path, database: tuple[str, str, Any]
) -> None:
    """A is alive but was silent too long (its heartbeat is moved back): B takes its leases
    with new tokens. Whatever A still holds in memory, the conversation's next events are
    decided once, under B's lease, and the answers still reach the visitor's socket on A."""
    url, schema, db = database
    services = a, b = await _two_services(tmp_path, url, schema)
    a_id, b_id = a.app[READY]["process_id"], b.app[READY]["process_id"]
    try:
        visitor = await a.customer()
        cid = await visitor.start_with_bot("hi")
        lease = "SELECT owner, token FROM conversation_leases WHERE conversation_id = $1"
        before = await db.fetchrow(lease, cid)
        assert before["owner"] == a_id
        await db.execute(
            "UPDATE processes SET heartbeat_at = heartbeat_at - 100 WHERE id = $1", a_id
        )
        assert await b.store.release_dead_processes(TIMEOUT) == [a_id]  # type: ignore[attr-defined]
        after = await db.fetchrow(lease, cid)
        assert after["owner"] == b_id and after["token"] > before["token"]
        seen = len(visitor.frames)
        ack = await visitor.say("hours")  # accepted by a, which may still think it owns it
        assert ack["type"] == "ack"
        await visitor.wait_message("bot", "open", after=seen)
        statuses = await db.fetch(
            "SELECT e.status, (SELECT COUNT(*) FROM decisions d WHERE d.event_id = e.id) AS n "
            "FROM events e WHERE e.conversation_id = $1 AND e.type = 'customer.message'",
            cid,
        )
        assert [(r["status"], r["n"]) for r in statuses] == [("decided", 1), ("decided", 1)]
        assert (await db.fetchrow(lease, cid))["owner"] == b_id
    finally:
        for svc in reversed(services):
            await svc.stop()
