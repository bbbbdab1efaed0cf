"""Fault injection under load: the database stops and starts, providers fail and stall.

1. **PostgreSQL stopped and started.** A private PostgreSQL server (never the shared test
   cluster: see ``controller/testing_pg.py``) serves two ``convctl serve`` processes while web
   chat visitors and WhatsApp users write to both; the server is stopped (``pg_ctl stop -m
   fast``: sessions cut, as in an outage or a failover) for a few seconds and started again.
   During the outage a request that cannot be stored gets a clean refusal (web chat: an
   ``error`` frame ``database_unavailable``; the webhook: a JSON 503, which Meta redelivers)
   and ``/readyz`` says ``database_unavailable``; afterwards, without a restart, both
   processes are ready again and every acknowledged message is decided once, in order.
2. **Providers failing.** The bot (a Rasa fake) answers 5xx, then too slowly (the bot's
   timeout), and the WhatsApp fake answers 5xx and stalls, while traffic continues on a
   healthy service (SQLite; PostgreSQL with ``CONVCTL_TEST_STORE=postgres``): no
   acknowledged message is lost, every effect is applied once per idempotency key (bot
   requests and WhatsApp sends are counted by the fakes), the other customers are served
   while one customer's sends keep failing, and everything drains once the faults stop.

Assertions are on counts and order, never on wall-clock times. Runnable alone:
``python -m pytest tests/reliability``. Size knob: ``CONVCTL_FAULT_CONVERSATIONS`` (web chat
visitors, default 12; WhatsApp users are half that). The PostgreSQL test skips without the
PostgreSQL server binaries (fails when CI=true).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.testing import ServiceProcess
from controller.testing_graph import FakeGraph, MetaSender, change, envelope, text_message
from controller.testing_pg import PrivatePostgres, postgres_bin
from tests.controller.test_multiprocess import check_decided_once

VISITORS = int(os.environ.get("CONVCTL_FAULT_CONVERSATIONS", "12"))
WA_USERS = max(1, VISITORS // 2)
MESSAGES = 4  # per customer
WORDS = ("hi", "hours", "prices", "hello")
OUTAGE = 3.0  # seconds the database is down (the heartbeat timeout is longer: no takeover)
NUMBER, WA_TOKEN, SECRET, VERIFY = "1065432199", "EAAG-fault-token", "fault-secret", "fault-v"
WAIT = 120.0  # the longest wait for the service's state on a loaded machine


def _whatsapp(graph: FakeGraph) -> dict[str, Any]:
    return {
        "graph_base_url": graph.base_url,
        "graph_api_version": graph.version,
        "app_secret": SECRET,
        "verify_token": VERIFY,
        "endpoints": [{"phone_number_id": NUMBER, "access_token": WA_TOKEN}],
        "mark_read": False,
        "media_download": False,
    }


class Traffic:
    """What clients saw: refusals by kind, and everything acknowledged."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = defaultdict(int)  # "webchat:<code>", "webhook:<status>"
        self.bad: list[str] = []  # answers that are not a clean refusal
        self.acked = 0
        self.progress = asyncio.Condition()

    async def ack(self) -> None:
        async with self.progress:
            self.acked += 1
            self.progress.notify_all()

    async def wait_acked(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self.progress:
            await self.progress.wait_for(lambda: self.acked >= count)


class Visitor:
    """A web chat visitor; a message refused or not acknowledged is sent again (same client
    id) on a new socket, to any process."""

    def __init__(self, n: int) -> None:
        self.texts = [f"{WORDS[(n + i) % len(WORDS)]} #{n}.{i}" for i in range(MESSAGES)]
        self.client_ids = [secrets.token_hex(8) for _ in self.texts]
        self.acked: list[str] = []
        self.token: str | None = None
        self.visitor: str | None = None
        self.pause = random.uniform(0.1, 0.5)

    async def run(
        self, urls: Callable[[], str], http: aiohttp.ClientSession, seen: Traffic
    ) -> None:
        while len(self.acked) < len(self.texts):
            try:
                await self._attempt(urls(), http, seen)
            except aiohttp.WSServerHandshakeError as exc:  # the upgrade was refused
                _refusal(seen, f"socket:{exc.status}", None)  # its body is not readable
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                pass
            await asyncio.sleep(0.1)

    async def _attempt(self, base_url: str, http: aiohttp.ClientSession, seen: Traffic) -> None:
        if self.token is None:
            async with http.post(base_url + "/webchat/session") as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    _refusal(seen, f"session:{r.status}", body)
                    return
                self.token, self.visitor = body["token"], body["visitor_id"]
        ws = await http.ws_connect(f"{base_url}/webchat/ws?token={self.token}")
        try:
            await _next_frame(ws, "history")
            pending = list(zip(self.client_ids, self.texts, strict=True))[len(self.acked) :]
            for cid, text in pending:
                await ws.send_json({"type": "message", "client_id": cid, "text": text})
                answer = await _next_frame(ws, "ack", cid)
                if answer["type"] == "error":
                    _refusal(seen, "webchat", answer)
                    return
                self.acked.append(cid)
                await seen.ack()
                await asyncio.sleep(self.pause)
        finally:
            await ws.close()


class WhatsAppUser:
    """A WhatsApp user: Meta posts each message to any process until one answers 200."""

    def __init__(self, n: int) -> None:
        self.wa_id = f"4915200{n:06d}"
        self.texts = [f"{WORDS[(n + i) % len(WORDS)]} wa#{n}.{i}" for i in range(MESSAGES)]
        self.wamids = [f"wamid.FAULT{n:05d}{i}" for i in range(MESSAGES)]
        self.pause = random.uniform(0.1, 0.5)

    async def run(
        self, urls: Callable[[], str], http: aiohttp.ClientSession, seen: Traffic
    ) -> None:
        for text, wamid in zip(self.texts, self.wamids, strict=True):
            body = envelope([change(NUMBER, messages=[text_message(self.wa_id, text, wamid)])])
            while True:
                meta = MetaSender(http, urls() + "/webhooks/whatsapp", SECRET)
                try:
                    status, answer = await meta.post(body)
                    if status == 200:
                        break
                    _refusal(seen, f"webhook:{status}", answer)
                except (aiohttp.ClientError, ConnectionError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)  # Meta redelivers
            await seen.ack()
            await asyncio.sleep(self.pause)


def _refusal(seen: Traffic, where: str, answer: Any) -> None:
    """Count a refusal (``where``: "webchat" for an error frame, "kind:status" for HTTP); one
    that is not a clean JSON error ``database_unavailable`` (a 503 over HTTP) is a finding."""
    code = answer.get("code") if isinstance(answer, dict) else None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        code = answer["error"].get("code")
    seen.refused[f"{where}:{code}"] += 1
    status = where.partition(":")[2]
    clean = code == "database_unavailable" or (where.startswith("socket:") and code is None)
    if not clean or status not in ("", "503"):
        seen.bad.append(f"{where}: {answer!r}"[:300])


async def _next_frame(
    ws: aiohttp.ClientWebSocketResponse, kind: str, cid: str | None = None
) -> dict[str, Any]:
    """The next frame of ``kind`` (for ``cid``), or an error frame for ``cid``."""
    while True:
        msg = await ws.receive(timeout=15)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {msg.type}")
        frame = json.loads(msg.data)
        if frame["type"] == "error" and (cid is None or frame.get("client_id") == cid):
            return dict(frame)
        if frame["type"] == kind and (cid is None or frame.get("client_id") == cid):
            return dict(frame)


async def _until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    """Wait until ``await check()`` is true (the processes write; there is nothing to wait on
    but their state)."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for: {what}") from None


class Readiness:
    """Polls ``/readyz`` of every process and records what it said, by phase."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.phase = "before"
        self.seen: dict[str, set[tuple[int, str]]] = defaultdict(set)
        self.last: dict[str, tuple[int, str]] = {}

    async def run(self, http: aiohttp.ClientSession) -> None:
        while True:
            for url in self.urls:
                try:
                    async with http.get(url + "/readyz") as r:
                        said = (r.status, str((await r.json()).get("status")))
                except (aiohttp.ClientError, ValueError) as exc:
                    said = (0, type(exc).__name__)
                self.seen[self.phase].add(said)
                self.last[url] = said
            await asyncio.sleep(0.1)


@pytest.fixture
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    binaries = postgres_bin()
    if binaries is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PrivatePostgres(binaries)
    try:
        yield await asyncio.to_thread(server.start)
    finally:
        await asyncio.to_thread(server.destroy)


@pytest.mark.timeout(600)
async def test_postgres_stopped_and_started_under_load(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    import asyncpg

    pg = private_postgres
    graph = await FakeGraph(tokens={NUMBER: WA_TOKEN}).start()
    connectors = [
        {
            "name": "webchat",
            "type": "webchat",
            "settings": {"sessions_per_ip_per_minute": 100000, "messages_per_window": 1000},
        },
        {"name": "whatsapp", "type": "whatsapp", "settings": _whatsapp(graph)},
        {"name": "demo", "type": "demo_bot"},
    ]
    env = {
        "CONVCTL_DATABASE_URL": pg.url,
        "CONVCTL_DATABASE_SCHEMA": "faults",
        "CONVCTL_CONNECTORS": json.dumps(connectors),
        "CONVCTL_TIMEOUTS__IDLE_REMINDER": "3600",
        "CONVCTL_TIMEOUTS__IDLE_CLOSE": "3600",
        "CONVCTL_TIMEOUTS__CUSTOMER_GRACE": "3600",
        "CONVCTL_CLUSTER_HEARTBEAT_INTERVAL": "0.2",
        "CONVCTL_CLUSTER_HEARTBEAT_TIMEOUT": "30",  # no takeover: each recovers alone
        "CONVCTL_OUTBOX_BACKOFF_BASE": "0.05",
        "CONVCTL_OUTBOX_BACKOFF_MAX": "0.5",
    }
    procs = []
    for n in range(2):
        (tmp_path / f"p{n}").mkdir()
        procs.append(ServiceProcess(tmp_path / f"p{n}", env=env))
    visitors = [Visitor(n) for n in range(VISITORS)]
    wa_users = [WhatsAppUser(n) for n in range(WA_USERS)]
    seen = Traffic()
    ready = Readiness([p.base_url for p in procs])
    total = MESSAGES * (VISITORS + WA_USERS)
    pids: list[int] = []
    try:
        for proc in procs:
            proc.start()
            await proc.wait_ready()
            assert proc.proc is not None
            pids.append(proc.proc.pid)

        def any_url() -> str:
            return random.choice(procs).base_url

        async with aiohttp.ClientSession() as http:
            poller = asyncio.create_task(ready.run(http))
            clients = asyncio.gather(
                *(v.run(any_url, http, seen) for v in visitors),
                *(u.run(any_url, http, seen) for u in wa_users),
            )
            await seen.wait_acked(total // 4)
            await asyncio.to_thread(pg.stop, "fast")
            acked_at_stop = seen.acked
            ready.phase = "down"
            await asyncio.sleep(OUTAGE)  # the outage: clients keep writing
            await _until(
                lambda: asyncio.sleep(0, all(ready.last[p.base_url][0] == 503 for p in procs)),
                "both processes not ready while the database is down",
            )
            ready.phase = "up"
            await asyncio.to_thread(pg.start)
            await clients
            await _until(
                lambda: asyncio.sleep(0, all(ready.last[p.base_url][0] == 200 for p in procs)),
                "both processes ready again",
            )
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

        db = await asyncpg.connect(pg.url, server_settings={"search_path": "faults"})
        try:

            async def drained() -> bool:
                left = await db.fetchval(
                    "SELECT (SELECT COUNT(*) FROM events WHERE status = 'pending') "
                    "+ (SELECT COUNT(*) FROM outbox WHERE status = 'pending')"
                )
                return bool(left == 0)

            try:
                await _until(drained, "every event decided and every outbox row delivered")
            except AssertionError as exc:
                left = await db.fetch(
                    "SELECT id, destination, claimed, claimed_by, attempts, unsure, last_error "
                    "FROM outbox WHERE status = 'pending' LIMIT 5"
                )
                events = await db.fetch(
                    "SELECT conversation_id, seq, type FROM events WHERE status = 'pending' LIMIT 5"
                )
                raise AssertionError(
                    f"{exc}: outbox {[dict(r) for r in left]}, events {[dict(r) for r in events]}"
                ) from None
            await _check_store(db, visitors, wa_users, graph)
        finally:
            await db.close()
        # recovered by itself: the same processes, never restarted
        for proc, pid in zip(procs, pids, strict=True):
            assert proc.proc is not None and proc.proc.poll() is None and proc.proc.pid == pid
    finally:
        for proc in procs:
            proc.terminate()
        await graph.stop()

    assert acked_at_stop < total, "the clients finished before the outage"
    assert not seen.bad, seen.bad
    assert any(k.startswith(("webchat:", "webhook:")) for k in seen.refused), (
        f"no request was refused during the outage: {dict(seen.refused)}"
    )
    assert (503, "database_unavailable") in ready.seen["down"], dict(ready.seen)
    print(f"refusals during the outage: {dict(seen.refused)}; readiness: {dict(ready.seen)}")


async def _check_store(
    db: Any, visitors: list[Visitor], wa_users: list[WhatsAppUser], graph: FakeGraph
) -> None:
    """Every acknowledged message stored once and decided once, in order, one bot request
    and one answer each; WhatsApp answers sent once (a second send only for rows the store
    marked unsure); no dead letter."""
    await check_decided_once(db, visitors, wa_users, graph.sent(), messages_each=MESSAGES)
    dead = await db.fetch("SELECT destination, last_error FROM outbox WHERE status <> 'done'")
    assert not dead, [dict(r) for r in dead]


@pytest.mark.timeout(600)
async def test_providers_failing_and_stalling_under_load(
    make_service: Callable[..., Any],
) -> None:
    """The bot answers 5xx, then too slowly (its timeout), Graph answers 5xx and stalls
    (sends taken late and confirmed by their status, sends refused late), one WhatsApp user's
    sends fail for as long as the test wants: web chat and WhatsApp traffic continues, the
    other customers are served meanwhile, and everything drains once the faults stop."""
    from controller.testing_rasa import FakeRasa, Turn

    rasa = await FakeRasa(fallback=Turn([{"text": "noted"}], intent="chat")).start()
    graph = await FakeGraph(tokens={NUMBER: WA_TOKEN}).start()
    whatsapp = {
        **_whatsapp(graph),
        "http_timeout_s": 0.5,  # shorter than the stalls: their outcome is unknown
        "resend_unconfirmed_after": 8,  # the status confirms a send taken late first
    }
    svc = await make_service(
        connectors=[
            {
                "name": "webchat",
                "type": "webchat",
                "settings": {"sessions_per_ip_per_minute": 100000, "messages_per_window": 1000},
            },
            {"name": "whatsapp", "type": "whatsapp", "settings": whatsapp},
            {
                "name": "demo",
                "type": "rasa",
                "settings": {
                    "base_url": rasa.base_url,
                    "timeout": 0.5,
                    "max_attempts": 20,
                    "retry_backoff": 0.05,
                    "breaker_failures": 1000,
                },
            },
        ],
        outbox_max_attempts=1000,
        outbox_backoff_base=0.05,
        outbox_backoff_max=0.5,
        timeouts={"idle_reminder": 3600, "idle_close": 3600, "customer_grace": 3600},
    )
    graph.post_statuses(svc.base_url + "/webhooks/whatsapp", SECRET)
    bad = WhatsAppUser(WA_USERS)  # the customer whose sends keep failing
    wa_users = [WhatsAppUser(n) for n in range(WA_USERS)]
    visitors = [Visitor(n) for n in range(VISITORS)]
    seen = Traffic()
    total = MESSAGES * (VISITORS + WA_USERS + 1)
    # faults from the start: bot 5xx, Graph 5xx for everybody, then stalls
    rasa_fails = VISITORS // 2 + 2
    rasa.fail(503, times=rasa_fails)
    graph.fail(status=500, code=2, times=WA_USERS // 2 + 1, message="temporary")
    stuck = graph.fail(status=503, code=2, times=None, to=bad.wa_id, message="unavailable")
    graph.stall(2, taken=True, seconds=2.0)
    graph.stall(1, taken=False, seconds=2.0)
    try:
        async with aiohttp.ClientSession() as http:

            def url() -> str:
                return svc.base_url

            clients = asyncio.gather(
                *(v.run(url, http, seen) for v in visitors),
                *(u.run(url, http, seen) for u in [*wa_users, bad]),
            )
            await seen.wait_acked(total // 3)
            rasa.hold()  # the bot answers too slowly for a while: its timeout cuts it off
            before = len(rasa.webhook_requests())

            def asked_again(r: FakeRasa) -> bool:  # a question cut off by the timeout, retried
                held = [q.message for q in r.webhook_requests()[before:]]
                return len(held) >= 6 and len(set(held)) < len(held)

            await rasa.wait_for(asked_again, timeout=WAIT)
            rasa.release()
            await clients

            def sent_to(wa_id: str) -> int:
                return len(graph.sent(lambda r: r.json.get("to") == wa_id))

            # The others are answered while the bad user's sends still fail: no customer
            # waits behind another one's failing provider.
            await _until(
                lambda: asyncio.sleep(0, all(sent_to(u.wa_id) == MESSAGES for u in wa_users)),
                "every other WhatsApp user answered",
            )
            assert sent_to(bad.wa_id) == 0
            assert not await svc.store.outbox_rows("dead")
            stuck.times = 0  # the fault ends
            await _until(
                lambda: asyncio.sleep(0, sent_to(bad.wa_id) == MESSAGES),
                "the bad user answered once Graph takes its sends",
            )
            await _until(lambda: _drained(svc), "everything delivered")
            asked = await _check_providers(svc, visitors, [*wa_users, bad], rasa, graph)
    finally:
        await graph.stop()
        await rasa.stop()
    assert not seen.bad, seen.bad
    assert asked > total + rasa_fails, "no bot request timed out"


async def _drained(svc: Any) -> bool:
    await svc.settle()
    return not await svc.store.outbox_rows("pending")


async def _check_providers(
    svc: Any, visitors: list[Visitor], wa_users: list[WhatsAppUser], rasa: Any, graph: FakeGraph
) -> int:
    """Checks the store and what the fakes received; returns how many bot requests Rasa got."""
    rows = await svc.store.outbox_rows()
    assert not [r for r in rows if r["status"] != "done"], [
        r for r in rows if r["status"] != "done"
    ]
    # Every customer message was asked of the bot; Rasa received each question once more per
    # failed attempt (a 5xx or a timeout reached it), never beyond (a done row's attempts
    # count its successful one too).
    bot_rows = [r for r in rows if str(r["destination"]).startswith("bot:")]
    texts = [*(t for v in visitors for t in v.texts), *(t for u in wa_users for t in u.texts)]
    asked = defaultdict(int)
    for request in rasa.webhook_requests():
        asked[request.message] += 1
    assert len(bot_rows) == len(texts)
    assert sorted(asked) == sorted(texts)
    assert sum(asked.values()) == sum(int(r["attempts"]) for r in bot_rows)
    # Each conversation: its messages in order, one bot answer per customer message.
    conversations = {str(r["conversation_id"]) for r in rows}
    assert len(conversations) == len(visitors) + len(wa_users)
    for cid in conversations:
        assert {status for _, status in await svc.store.events(cid)} == {"decided"}
        messages = await svc.store.messages(cid, include_agent_only=False)
        customer = [m.text for m in messages if m.sender_role == "customer"]
        bot = [m.text for m in messages if m.sender_role == "bot"]
        assert len(bot) == len(customer) == MESSAGES, (cid, customer, bot)
        owner = next((c.texts for c in [*visitors, *wa_users] if c.texts[0] == customer[0]), None)
        assert customer == owner, (cid, customer)
    # WhatsApp: one accepted send per answer, under its own key: a send taken late (its
    # outcome unknown to the service) was confirmed by its status, not sent again.
    wa_rows = [r for r in rows if r["destination"] == "channel:whatsapp"]
    keys: dict[Any, int] = defaultdict(int)
    for request in graph.sent():
        keys[request.json.get("biz_opaque_callback_data")] += 1
    assert len(keys) == len(wa_rows) == MESSAGES * len(wa_users)
    assert set(keys.values()) == {1}, {k: n for k, n in keys.items() if n != 1}
    return sum(asked.values())
