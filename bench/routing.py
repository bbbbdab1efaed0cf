#!/usr/bin/env python3
"""Routing: offers made per second with N agents and M queued conversations, and the time
from a conversation being queued to its offer reaching an idle agent's desk WebSocket; as a
ratio to a bare aiohttp server pushing the same offers to the same sockets.

What it measures
----------------
Set-up: N agents (``--agents``, default 1000) are created with the admin API
(``POST /api/v1/agents``, capacity ``--capacity``) and each gets a token
(``POST /api/v1/tokens``); each agent's desk connects (``GET /api/v1/agents/ws?token=``,
waits for ``hello``). Every desk accepts every offer the moment it arrives (an ``accept``
command); the agent keeps the conversation, so the capacity is chosen large enough for all
of them (default: ceil((M + L) / N) + 1) and nobody has to close anything.

1. **Queued → offer at an idle agent** (open loop; ``--latency-conversations`` L, default
   200, at ``--latency-rate`` per second, default 20; 0 skips it). All agents are
   ``available`` with nothing to do. Web chat customers arrive on that schedule, each writes
   ``agent``; the demo bot hands over and the default rules route the conversation to queue
   ``support``; the router offers it. Per conversation: *queued* is the conversation's
   ``enqueued_at``, which is the ``bot.handoff`` event's ``accepted_at`` (a decision's
   ``now`` is its event's accepted time); *offer received* is the wall clock of this process
   when the desk read the ``offer`` frame (same machine, same clock). Printed p50/p99/max of
   queued → offer received, split into queued → offer row created (``offers.created_at``,
   the router's share) and offer created → received (the push), and the customer's
   ``agent`` message sent → offer received (the bot's turn included).
2. **Backlog drain** (routing decisions/s): every agent goes ``away``; M web chat customers
   (``--conversations``, default 2000; ``--fill-concurrency`` at a time) write ``agent``,
   wait for the queue notice and leave (their conversations stay queued: ``customer_grace``
   is 10 days for the run). Once the service is quiet and ``convctl_queue_length`` says M
   are waiting, all N desks send ``presence: available`` at once (t0) and the router works
   the backlog off. Offers received per second: overall (M / (last offer - t0)) and steady
   (between the 10th and the 90th percentile of arrivals), the delay to the first offer,
   the rate at which the offers' rows were created (from the db), offer created → received
   under this load, accepts acknowledged per second, CPU of the service and of this process.
   The fill rate (conversations queued per second while the queue grows to M with N agents
   present) is printed too: every committed decision wakes the router and reads the queue
   facts (position, agents available), which must not cost more as the queue grows.
3. **Baseline** (same run, same core, same desk clients): a bare aiohttp server written here
   (``--desk-server PORT CAPACITY``) speaks the desk protocol — ``hello``, ``ack`` for
   presence and accept, ``offer`` frames — and keeps a FIFO queue and a deque of agents
   with room (no storage, no rules, no scan of the agents). For 1 it gets one
   ``POST /bench/queue`` per conversation at the same rate (latency: POST sent → offer
   received); for 2 its queue is filled with M ids in one call, and the same presence flip
   starts the drain. Ratios printed: offers/s convctl / baseline, and the latencies side by
   side.

How
---
The service (``python -m controller.cli serve``, ``_common.PinnedService``) and then the
baseline are each pinned to the same single core with ``taskset -c N`` (``--core``, default
the last core); this process (customers, desks and the count) pins itself to the other
cores. Settings for the run (``CONVCTL_*``): the web chat rate limits raised
(``bench_env``), ``timeouts.customer_grace`` and ``idle_reminder`` 10 days (queued customers
who left are not closed), ``timeouts.offer`` ``--offer-timeout`` (default 600 s, so no offer
expires while the desks catch up), one seeded agent (so the dev profile's demo agents are
not created; the admin API then creates all N). Default rules and the demo bot.

Not measured: agents closing or wrapping up conversations (capacity is large instead), more
than one queue or skills. With capacity > 1 the router gives the longest-idle agent
offers until it is full, so in phase 1 "idle" means "with free capacity" after its first.

Nothing here passes or fails on wall-clock time: it prints numbers. The defaults (1,000
agents, 2,000 queued) take about 40 s on a 2-core machine; issue 8's size, 10,000 queued,
about 2 minutes, most of it filling the queue. Run it by hand:

    python bench/routing.py --agents 1000 --conversations 10000

Measured on the 2-core development machine (quiet runs: under 1.5 CPU s used by other
processes during the drain), 1,000 agents, 10,000 queued, the same command:

| | before (a transaction per offer, scans) | after (a transaction per pass, indexes) |
|---|---|---|
| drain, offers/s (all, from t0) | 152 | 3,458 |
| drain, steady (10th-90th percentile) | 157 | 3,686 |
| drain, ratio to the baseline | 0.2 % | 5.7 % |
| fill, queued/s (10th-90th percentile) | 113 | 279 |
| queued -> offer received at an idle agent, p50 / p99 | 3.0 / 7.4 ms | 2.6 / 9.4 ms |
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import math
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from _common import PinnedService, fmt, percentile

ADMIN_TOKEN = "proc-admin-token"  # what ServiceProcess sets
TEN_DAYS = str(10 * 24 * 3600)
QUEUE = "support"  # where the default rules route a handoff
FRAME_TIMEOUT = 120.0  # one customer not queued after this long: counted as an error

# Everything started here, stopped on any exit (exception, Ctrl-C, SIGTERM).
_STARTED: list[Any] = []


def agent_id(i: int) -> str:
    return f"a{i:05d}"


def sign(visitor: str, instance: str = "webchat") -> str:
    """A web chat session token, as ``POST /webchat/session`` makes it (the service's session
    secret is the one ``ServiceProcess`` sets), so the session call's cost stays out."""
    mac = hmac.new(
        C.SESSION_SECRET.encode(), f"webchat:{instance}:{visitor}".encode(), hashlib.sha256
    ).hexdigest()
    return f"{visitor}.{mac}"


# the baseline server --------------------------------------------------------------------------
def desk_server_main(port: int, capacity: int) -> None:
    """A bare desk look-alike: hello, acks, and offers pushed from a FIFO queue to agents with
    room (the first agent with room is filled first, as the router fills the longest idle)."""
    from aiohttp import WSMsgType, web

    sockets: dict[str, web.WebSocketResponse] = {}
    available: set[str] = set()
    load: dict[str, int] = {}
    ready: deque[str] = deque()  # available agents with room, in the order they came
    in_ready: set[str] = set()
    waiting: deque[str] = deque()
    numbers = itertools.count()

    async def match() -> None:
        while waiting and ready:
            agent = ready[0]
            ws = sockets.get(agent)
            if agent not in available or load[agent] >= capacity or ws is None or ws.closed:
                ready.popleft()
                in_ready.discard(agent)
                continue
            conversation = waiting.popleft()
            load[agent] += 1
            if load[agent] >= capacity:
                ready.popleft()
                in_ready.discard(agent)
            await ws.send_json(
                {
                    "type": "offer",
                    "offer_id": f"of_{next(numbers)}",
                    "conversation_id": conversation,
                    "expires_at": "2100-01-01T00:00:00+00:00",
                }
            )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def queue_one(request: web.Request) -> web.Response:
        body = await request.json()
        waiting.append(str(body["conversation_id"]))
        await match()
        return web.json_response({"queued": True})

    async def fill(request: web.Request) -> web.Response:
        body = await request.json()
        prefix = str(body["prefix"])
        waiting.extend(f"{prefix}{i}" for i in range(int(body["count"])))
        return web.json_response({"waiting": len(waiting)})

    async def desk(request: web.Request) -> web.WebSocketResponse:
        agent = request.query.get("token", "")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        sockets[agent] = ws
        load.setdefault(agent, 0)
        await ws.send_json(
            {"type": "hello", "agent": {"id": agent, "presence": "offline", "capacity": capacity}}
        )
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            cmd = json.loads(msg.data)
            kind = cmd.get("type")
            if kind == "presence":
                if cmd["presence"] == "available":
                    available.add(agent)
                    if agent not in in_ready and load[agent] < capacity:
                        ready.append(agent)
                        in_ready.add(agent)
                else:
                    available.discard(agent)
                await ws.send_json(
                    {"type": "ack", "client_id": cmd.get("client_id"), "presence": cmd["presence"]}
                )
                await match()
            elif kind == "accept":
                await ws.send_json(
                    {
                        "type": "ack",
                        "client_id": cmd.get("client_id"),
                        "event_id": f"ev_{next(numbers)}",
                        "conversation_id": None,
                        "seq": 1,
                        "duplicate": False,
                    }
                )
            else:
                await ws.send_json(
                    {"type": "error", "client_id": cmd.get("client_id"), "code": "bad_frame"}
                )
        if sockets.get(agent) is ws:
            del sockets[agent]
        return ws

    app = web.Application()
    app.router.add_get("/bench/health", health)
    app.router.add_post("/bench/queue", queue_one)
    app.router.add_post("/bench/fill", fill)
    app.router.add_get("/api/v1/agents/ws", desk)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# the desks --------------------------------------------------------------------------------
class Tally:
    """What all desks received, by phase: offers (receive time, conversation, offer id, agent),
    accept acks (receive time), error codes and other frames."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.offers: dict[str, list[tuple[float, str, str, str]]] = {}
        self.accepted: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.offer_closed = 0
        self.other_frames = 0

    def count(self, phase: str) -> tuple[int, int]:
        return len(self.offers.get(phase, ())), len(self.accepted.get(phase, ()))


class Desk:
    """One agent's desk socket: accepts every offer at once; presence commands wait for acks."""

    def __init__(self, http: aiohttp.ClientSession, url: str, agent: str, tally: Tally) -> None:
        self.http = http
        self.url = url
        self.agent = agent
        self.tally = tally
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self._numbers = itertools.count()

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url, heartbeat=None, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._hello, 60)

    async def _read(self) -> None:
        assert self.ws is not None
        tally = self.tally
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.time()
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "offer":
                phase = tally.phase
                offer_id = str(frame["offer_id"])
                tally.offers.setdefault(phase, []).append(
                    (now, str(frame["conversation_id"]), offer_id, self.agent)
                )
                await self.ws.send_str(
                    json.dumps(
                        {
                            "type": "accept",
                            "offer_id": offer_id,
                            "client_id": f"acc.{phase}.{offer_id}",
                        }
                    )
                )
            elif kind in ("ack", "error"):
                client_id = str(frame.get("client_id"))
                if kind == "error":
                    code = str(frame.get("code"))
                    tally.errors[code] = tally.errors.get(code, 0) + 1
                if client_id.startswith("acc."):
                    if kind == "ack":
                        tally.accepted.setdefault(client_id.split(".")[1], []).append(now)
                else:
                    fut = self._pending.pop(client_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
            elif kind == "hello" and not self._hello.done():
                self._hello.set_result(None)
            elif kind == "offer_closed":
                tally.offer_closed += 1
            else:
                tally.other_frames += 1

    async def send_presence(self, presence: str) -> asyncio.Future[dict[str, Any]]:
        assert self.ws is not None
        client_id = f"pr.{self.agent}.{next(self._numbers)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[client_id] = fut
        await self.ws.send_str(
            json.dumps({"type": "presence", "presence": presence, "client_id": client_id})
        )
        return fut

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def connect_desks(
    http: aiohttp.ClientSession, base_url: str, tokens: dict[str, str], tally: Tally
) -> list[Desk]:
    ws_base = base_url.replace("http://", "ws://")
    desks = [
        Desk(
            http, f"{ws_base}/api/v1/agents/ws?token={token}&connection=bench-{agent}", agent, tally
        )
        for agent, token in tokens.items()
    ]
    sem = asyncio.Semaphore(50)

    async def one(d: Desk) -> None:
        async with sem:
            await d.connect()

    await asyncio.gather(*(one(d) for d in desks))
    return desks


async def set_presence(desks: list[Desk], presence: str, timeout: float) -> float:
    """Send ``presence`` on every desk at once; seconds until every ack arrived."""
    started = time.time()
    futures = [await d.send_presence(presence) for d in desks]
    answers = await asyncio.wait_for(asyncio.gather(*futures), timeout)
    refused = [a for a in answers if a.get("type") != "ack"]
    if refused:
        raise RuntimeError(f"presence {presence!r} refused: {refused[:3]}")
    return time.time() - started


async def close_desks(desks: list[Desk], timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(d.close() for d in desks), return_exceptions=True)
    except TimeoutError:
        print(f"desk sockets not closed after {timeout:.0f} s; dropped", file=sys.stderr)


async def wait_offers(tally: Tally, phase: str, expected: int, timeout: float) -> bool:
    """Until ``expected`` offers arrived and each was acked (False on timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        offers, accepted = tally.count(phase)
        if offers >= expected and accepted >= offers:
            return True
        await asyncio.sleep(0.02)
    return False


# the customers ----------------------------------------------------------------------------
class Customer:
    """A web chat visitor who writes ``agent``; ``sent_at`` (wall clock) and the conversation
    id from the ack; ``queued`` is set when the queue notice (a ``controller`` message) came."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, name: str) -> None:
        self.http = http
        self.url = (
            f"{base_url.replace('http://', 'ws://')}/webchat/ws?token={sign(name)}"
            f"&connection={secrets.token_hex(6)}"
        )
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.sent_at = 0.0
        self.conversation_id: str | None = None
        self.error: str | None = None
        self.acked = asyncio.Event()
        self.queued = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, write ``agent`` once the history frame came, read until closed."""
        self.ws = await self.http.ws_connect(self.url, heartbeat=None)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "history":
                self.sent_at = time.time()
                await self.ws.send_str(
                    json.dumps({"type": "message", "client_id": "m1", "text": "agent"})
                )
            elif kind == "ack":
                self.conversation_id = frame.get("conversation_id")
                self.acked.set()
            elif kind == "error":
                self.error = str(frame.get("code"))
                self.acked.set()
                self.queued.set()
            elif kind == "message" and frame.get("from") == "controller":
                self.queued.set()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def fill_queue(base_url: str, n: int, concurrency: int, tag: str) -> dict[str, Any]:
    """``n`` customers write ``agent``, wait until queued, and leave."""
    started = time.monotonic()
    todo = iter(range(n))
    done = [0]
    finished: list[float] = []
    errors: dict[str, int] = {}
    last_print = [started]

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in todo:
            c = Customer(http, base_url, f"v_{tag}_{i}_{secrets.token_hex(3)}")
            try:
                await c.start()
                await asyncio.wait_for(c.queued.wait(), FRAME_TIMEOUT)
                if c.error is None:
                    done[0] += 1
                    finished.append(time.monotonic())
                else:
                    errors[c.error] = errors.get(c.error, 0) + 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
            finally:
                await c.close()
            now = time.monotonic()
            if now - last_print[0] > 10:
                last_print[0] = now
                print(
                    f"  fill: {done[0]:,}/{n:,} queued, {done[0] / (now - started):,.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "queued": done[0],
        "errors": errors,
        "seconds": elapsed,
        "per_s": done[0] / elapsed if elapsed else None,
        **decile_rates(sorted(finished), started),
    }


def decile_rates(times: list[float], start: float) -> dict[str, float | None]:
    """Rates over the first and the last tenth of ``times`` (sorted), and between the 10th
    and the 90th percentile: a rate that falls as the run goes on shows here."""
    n = len(times)
    if n < 10:
        return {"first_tenth_per_s": None, "steady_per_s": None, "last_tenth_per_s": None}
    k, lo, hi = n // 10, int(0.1 * (n - 1)), int(0.9 * (n - 1))

    def rate(count: int, t0: float, t1: float) -> float | None:
        return count / (t1 - t0) if t1 > t0 else None

    return {
        "first_tenth_per_s": rate(k, start, times[k - 1]),
        "steady_per_s": rate(hi - lo, times[lo], times[hi]),
        "last_tenth_per_s": rate(k, times[n - k - 1], times[-1]),
    }


# phases -------------------------------------------------------------------------------------


def _ms(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
    }


async def latency_phase(
    http: aiohttp.ClientSession,
    desks: list[Desk],
    tally: Tally,
    args: argparse.Namespace,
    queue_at: Any,
) -> dict[str, Any]:
    """Agents available and idle; ``queue_at(i, http)`` queues conversation ``i`` and returns
    (conversation id, wall clock it was sent or None) — a customer for the service, a POST
    for the baseline. Returns the offers' receive times by conversation and the send times."""
    tally.phase = "latency"
    n, rate = args.latency_conversations, args.latency_rate
    out: dict[str, Any] = {"conversations": n, "rate": rate}
    out["presence_s"] = await set_presence(desks, "available", args.drain_timeout)
    sent: dict[str, float] = {}
    errors = [0]
    start = time.perf_counter() + 0.2
    tasks = []

    async def one(i: int) -> None:
        try:
            cid, at = await queue_at(i, http)
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            errors[0] += 1
            return
        if cid is None:
            errors[0] += 1
        else:
            sent[cid] = at

    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    complete = await wait_offers(tally, "latency", n - errors[0], args.drain_timeout)
    received = {cid: t for t, cid, _, _ in tally.offers.get("latency", [])}
    out.update(
        {
            "errors": errors[0],
            "complete": complete,
            "offers": len(received),
            "sent": sent,
            "received": received,
        }
    )
    return out


async def drain_phase(
    desks: list[Desk], tally: Tally, expected: int, pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Every desk goes available at once; until ``expected`` offers arrived and were acked."""
    tally.phase = "drain"
    cpu0, me0, all0 = C.cpu_seconds(pid), C.self_cpu(), C.machine_busy_seconds()
    t0 = time.time()
    presence_s = await set_presence(desks, "available", args.drain_timeout)
    complete = await wait_offers(tally, "drain", expected, args.drain_timeout)
    wall = time.time() - t0
    cpu1, me1, all1 = C.cpu_seconds(pid), C.self_cpu(), C.machine_busy_seconds()
    offers = sorted(t for t, _, _, _ in tally.offers.get("drain", []))
    acks = sorted(tally.accepted.get("drain", []))
    server_cpu, loadgen_cpu = cpu1 - cpu0, me1 - me0
    out: dict[str, Any] = {
        "expected": expected,
        "offers": len(offers),
        "accepted": len(acks),
        "complete": complete,
        "presence_acked_s": presence_s,
        "measured_s": wall,
        "server_cpu_s": server_cpu,
        "server_cpu_pct": 100.0 * server_cpu / wall,
        "loadgen_cpu_s": loadgen_cpu,
        "loadgen_cpu_pct": 100.0 * loadgen_cpu / wall,
        # every other process, and kernel time outside ours (part of loopback networking)
        "others_cpu_s": max(0.0, all1 - all0 - server_cpu - loadgen_cpu),
    }
    if not offers:
        return out
    span = offers[-1] - t0
    timeline = [0] * (int(span) + 1)
    for t in offers:
        timeline[int(t - t0)] += 1
    out.update(
        {
            "t0": t0,
            "first_offer_s": offers[0] - t0,
            "last_offer_s": span,
            "offers_per_s": len(offers) / span if span > 0 else None,
            "accepts_per_s": len(acks) / (acks[-1] - t0) if acks and acks[-1] > t0 else None,
            "offers_per_second_timeline": timeline,
            **decile_rates(offers, t0),
        }
    )
    return out


# the service run ------------------------------------------------------------------------------
async def admin_post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.post(url, json=body, headers=headers) as r:
        if r.status not in (200, 201):
            raise RuntimeError(f"POST {url}: {r.status} {await r.text()}")
        return await r.json()


async def create_agents(base_url: str, n: int, capacity: int) -> dict[str, str]:
    """Agents and their tokens through the admin API; {agent id: token}."""
    tokens: dict[str, str] = {}
    sem = asyncio.Semaphore(32)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        agent = agent_id(i)
        async with sem:
            await admin_post(
                http,
                base_url + "/api/v1/agents",
                {"id": agent, "name": f"Agent {i}", "capacity": capacity},
            )
            body = await admin_post(
                http, base_url + "/api/v1/tokens", {"role": "agent", "subject": agent}
            )
        tokens[agent] = body["token"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http, i) for i in range(n)))
    return {agent_id(i): tokens[agent_id(i)] for i in range(n)}


async def queue_length(base_url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("convctl_queue_length{") and f'queue="{QUEUE}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_queue_length(base_url: str, expected: int, timeout: float) -> float:
    end = time.monotonic() + timeout
    length = await queue_length(base_url)
    while length < expected and time.monotonic() < end:
        await asyncio.sleep(0.2)
        length = await queue_length(base_url)
    return length


def db_times(db: Path) -> tuple[dict[str, float], dict[str, float]]:
    """{conversation: bot.handoff accepted_at (= enqueued_at)}, {conversation: first offer's
    created_at}, read from the service's SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        queued = dict(
            conn.execute(
                "SELECT conversation_id, MIN(accepted_at) FROM events "
                "WHERE type = 'bot.handoff' GROUP BY conversation_id"
            ).fetchall()
        )
        offered = dict(
            conn.execute(
                "SELECT conversation_id, MIN(created_at) FROM offers GROUP BY conversation_id"
            ).fetchall()
        )
    finally:
        conn.close()
    return queued, offered


def service_latencies(
    lat: dict[str, Any], queued: dict[str, float], offered: dict[str, float]
) -> dict[str, Any]:
    received, sent = lat["received"], lat["sent"]
    q_to_recv, q_to_created, created_to_recv, sent_to_recv = [], [], [], []
    for cid, t_recv in received.items():
        if cid in queued:
            q_to_recv.append(t_recv - queued[cid])
            if cid in offered:
                q_to_created.append(offered[cid] - queued[cid])
        if cid in offered:
            created_to_recv.append(t_recv - offered[cid])
        if cid in sent:
            sent_to_recv.append(t_recv - sent[cid])
    return {
        "queued_to_offer_received": _ms(q_to_recv),
        "queued_to_offer_created": _ms(q_to_created),
        "offer_created_to_received": _ms(created_to_recv),
        "message_sent_to_offer_received": _ms(sent_to_recv),
    }


def drain_db(
    db: Path, drain: dict[str, Any], received: list[tuple[float, str, str, str]]
) -> dict[str, Any]:
    """The router's own rate (offers.created_at of the drained offers) and the push lag."""
    _, offered = db_times(db)
    created = sorted(offered[cid] for _, cid, _, _ in received if cid in offered)
    lags = [t - offered[cid] for t, cid, _, _ in received if cid in offered]
    out: dict[str, Any] = {"offer_created_to_received": _ms(lags)}
    if len(created) > 1 and created[-1] > created[0]:
        out["created_per_s"] = len(created) / (created[-1] - drain["t0"])
        lo, hi = int(0.1 * (len(created) - 1)), int(0.9 * (len(created) - 1))
        if created[hi] > created[lo]:
            out["created_steady_per_s"] = (hi - lo) / (created[hi] - created[lo])
    return out


async def run_service(args: argparse.Namespace, core: int) -> dict[str, Any]:
    data = C.work_dir(args.data_dir, "convctl-bench-routing-")
    seed = [{"id": agent_id(0), "name": "Agent 0", "capacity": args.capacity}]
    env = C.bench_env(
        CONVCTL_AGENTS=json.dumps(seed),
        CONVCTL_TIMEOUTS__CUSTOMER_GRACE=TEN_DAYS,
        CONVCTL_TIMEOUTS__IDLE_REMINDER=TEN_DAYS,
        CONVCTL_TIMEOUTS__OFFER=str(args.offer_timeout),
    )
    service = PinnedService(data, core, env=env)
    _STARTED.append(service)
    out: dict[str, Any] = {"data_dir": str(data)}
    service.start()
    tally = Tally()
    desks: list[Desk] = []
    try:
        out["ready_s"] = await service.wait_ready()
        t = time.monotonic()
        tokens = await create_agents(service.base_url, args.agents, args.capacity)
        out["create_agents_s"] = time.monotonic() - t
        t = time.monotonic()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            desks = await connect_desks(http, service.base_url, tokens, tally)
            out["connect_desks_s"] = time.monotonic() - t
            out["rss_mb_desks_connected"] = C.rss_kb(service.pid) / 1024
            print(f"  {len(desks)} desks connected", file=sys.stderr, flush=True)

            if args.latency_conversations:
                customers: list[Customer] = []

                async def queue_customer(
                    i: int, session: aiohttp.ClientSession
                ) -> tuple[str | None, float]:
                    c = Customer(session, service.base_url, f"v_lat_{i}_{secrets.token_hex(3)}")
                    customers.append(c)
                    await c.start()
                    await asyncio.wait_for(c.acked.wait(), FRAME_TIMEOUT)
                    return c.conversation_id, c.sent_at

                lat = await latency_phase(http, desks, tally, args, queue_customer)
                await asyncio.gather(*(c.close() for c in customers), return_exceptions=True)
                await C.wait_quiet(service, timeout=args.drain_timeout, stable=2, interval=0.2)
                queued, offered = db_times(service.db_path)
                lat.update(service_latencies(lat, queued, offered))
                out["latency"] = lat
                print("  latency phase done", file=sys.stderr, flush=True)

            tally.phase = "fill"
            await set_presence(desks, "away", args.drain_timeout)
            cpu0 = C.cpu_seconds(service.pid)
            out["fill"] = await fill_queue(
                service.base_url, args.conversations, args.fill_concurrency, "fill"
            )
            out["fill"]["quiet_after_s"] = await C.wait_quiet(
                service, timeout=args.drain_timeout, stable=2, interval=0.2
            )
            out["fill"]["server_cpu_s"] = C.cpu_seconds(service.pid) - cpu0
            length = await wait_queue_length(service.base_url, out["fill"]["queued"], 30.0)
            out["fill"]["queue_length"] = length
            out["rss_mb_queue_full"] = C.rss_kb(service.pid) / 1024
            print(f"  {length:,.0f} conversations queued", file=sys.stderr, flush=True)

            drain = await drain_phase(desks, tally, int(length), service.pid, args)
            if "t0" in drain:
                drain.update(drain_db(service.db_path, drain, tally.offers.get("drain", [])))
            out["drain"] = drain
            out["desk_errors"] = dict(tally.errors)
            out["offer_closed_frames"] = tally.offer_closed
            out["other_desk_frames"] = tally.other_frames
            out["log_levels"] = C.count_log_levels(service)
        finally:
            # Stop the service first: closing 1,000 desks first would make it decide an
            # agent.disconnected for every assigned conversation.
            service.terminate()
            await close_desks(desks)
            await http.close()
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()
    return out


async def run_baseline(
    args: argparse.Namespace, core: int, expected: int, rate_conversations: int
) -> dict[str, Any]:
    server = C.BaselineProcess(
        core,
        lambda port: [__file__, "--desk-server", str(port), str(args.capacity)],
        ("GET", "/bench/health"),
    )
    _STARTED.append(server)
    server.start()
    out: dict[str, Any] = {}
    tally = Tally()
    desks: list[Desk] = []
    try:
        await server.wait_ready()
        tokens = {agent_id(i): agent_id(i) for i in range(args.agents)}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            desks = await connect_desks(http, server.base_url, tokens, tally)
            try:
                if rate_conversations:

                    async def queue_post(
                        i: int, session: aiohttp.ClientSession
                    ) -> tuple[str | None, float]:
                        cid = f"lat_{i}"
                        at = time.time()
                        async with session.post(
                            server.base_url + "/bench/queue", json={"conversation_id": cid}
                        ) as r:
                            await r.read()
                            return (cid if r.status == 200 else None), at

                    lat = await latency_phase(http, desks, tally, args, queue_post)
                    lat["queued_to_offer_received"] = _ms(
                        [t - lat["sent"][cid] for cid, t in lat["received"].items()]
                    )
                    out["latency"] = lat
                tally.phase = "fill"
                await set_presence(desks, "away", args.drain_timeout)
                await admin_post(
                    http, server.base_url + "/bench/fill", {"count": expected, "prefix": "cv_"}
                )
                out["drain"] = await drain_phase(desks, tally, expected, server.pid, args)
                out["desk_errors"] = dict(tally.errors)
            finally:
                await close_desks(desks)
    finally:
        server.stop()
    return out


def _drop_raw(phase: dict[str, Any]) -> None:
    for key in ("sent", "received"):
        phase.pop(key, None)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.capacity is None:
        slots = args.conversations + args.latency_conversations
        args.capacity = min(100, math.ceil(slots / args.agents) + 1)
    if args.agents * args.capacity < args.conversations + args.latency_conversations:
        raise SystemExit("agents x capacity must hold every conversation (capacity max 100)")
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    out: dict[str, Any] = {
        "server_core": core,
        "loadgen_cores": sorted(others),
        "agents": args.agents,
        "capacity": args.capacity,
        "conversations": args.conversations,
        "latency_conversations": args.latency_conversations,
        "latency_rate": args.latency_rate,
        "fill_concurrency": args.fill_concurrency,
        "loadavg_start": os.getloadavg(),
    }
    out["service"] = await run_service(args, core)
    queued = int(out["service"]["fill"]["queue_length"])
    out["baseline"] = await run_baseline(args, core, queued, args.latency_conversations)
    out["loadavg_end"] = os.getloadavg()
    for side in ("service", "baseline"):
        if "latency" in out[side]:
            _drop_raw(out[side]["latency"])
    s, b = out["service"]["drain"], out["baseline"]["drain"]
    if s.get("offers_per_s") and b.get("offers_per_s"):
        out["ratio_pct"] = 100.0 * s["offers_per_s"] / b["offers_per_s"]
    if s.get("steady_per_s") and b.get("steady_per_s"):
        out["steady_ratio_pct"] = 100.0 * s["steady_per_s"] / b["steady_per_s"]
    return out


def report(out: dict[str, Any]) -> None:
    s, b = out["service"], out["baseline"]
    print(
        f"server core {out['server_core']}, load generator cores {out['loadgen_cores']}; "
        f"{out['agents']:,} agents (capacity {out['capacity']}), {out['conversations']:,} "
        f"queued conversations; data in {s['data_dir']}"
    )
    print(
        f"load average at start {', '.join(f'{x:.2f}' for x in out['loadavg_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in out['loadavg_end'])}"
    )
    C.print_table(
        "set-up (service)",
        [
            ("ready s", s["ready_s"]),
            ("create agents + tokens s", s["create_agents_s"]),
            ("connect desks s", s["connect_desks_s"]),
            ("RSS MB, desks connected", s["rss_mb_desks_connected"]),
            ("RSS MB, queue full", s.get("rss_mb_queue_full")),
        ],
        2,
    )
    if "latency" in s:
        sl, bl = s["latency"], b.get("latency", {})
        print(
            f"\nqueued -> offer at an idle agent: {sl['conversations']} conversations at "
            f"{fmt(sl['rate'])}/s, {out['agents']:,} agents available"
        )
        print(f"{'':<44}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        rows = [
            ("convctl: queued -> offer received", sl["queued_to_offer_received"]),
            ("  queued -> offer row created (router)", sl["queued_to_offer_created"]),
            ("  offer created -> received (push)", sl["offer_created_to_received"]),
            ("  customer 'agent' sent -> offer received", sl["message_sent_to_offer_received"]),
        ]
        if "queued_to_offer_received" in bl:
            rows.append(("baseline: POST queue -> offer received", bl["queued_to_offer_received"]))
        for label, d in rows:
            print(
                f"{label:<44}{fmt(d['p50_ms'], 2):>10}{fmt(d['p99_ms'], 2):>10}"
                f"{fmt(d['max_ms'], 2):>10}"
            )
        print(
            f"offers received {sl['offers']}/{sl['conversations']} (errors {sl['errors']}); "
            f"baseline {bl.get('offers', '-')}/{bl.get('conversations', '-')}"
        )
    f = s["fill"]
    print(
        f"\nfill: {f['queued']:,} queued in {fmt(f['seconds'])} s = {fmt(f['per_s'])}/s "
        f"with {out['agents']:,} agents away (service CPU {fmt(f['server_cpu_s'])} s, "
        f"quiet {fmt(f['quiet_after_s'])} s later); errors {f['errors'] or 'none'}; "
        f"queue length {f['queue_length']:,.0f}"
    )
    print(
        f"fill rate: first tenth {fmt(f['first_tenth_per_s'])}/s, 10th-90th percentile "
        f"{fmt(f['steady_per_s'])}/s, last tenth {fmt(f['last_tenth_per_s'])}/s"
    )
    sd, bd = s["drain"], b["drain"]
    print(f"\nbacklog drain: all desks available at once{'':<8}{'convctl':>12}{'baseline':>12}")
    for key, label, digits in (
        ("offers", "offers received", 0),
        ("accepted", "accepts acked", 0),
        ("offers_per_s", "offers/s (all, from t0)", 1),
        ("steady_per_s", "offers/s (10th-90th percentile)", 1),
        ("first_tenth_per_s", "offers/s, first tenth (from t0)", 1),
        ("last_tenth_per_s", "offers/s, last tenth", 1),
        ("created_per_s", "offer rows created/s (db, from t0)", 1),
        ("accepts_per_s", "accepts acked/s", 1),
        ("first_offer_s", "t0 -> first offer s", 3),
        ("last_offer_s", "t0 -> last offer s", 2),
        ("presence_acked_s", "t0 -> all presence acks s", 2),
        ("measured_s", "t0 -> every offer in and acked s", 2),
        ("server_cpu_pct", "server CPU % of that", 1),
        ("loadgen_cpu_pct", "load generator CPU % of that", 1),
        ("others_cpu_s", "rest of the machine CPU s", 2),
    ):
        print(f"{label:<52}{fmt(sd.get(key), digits):>12}{fmt(bd.get(key), digits):>12}")
    lag = sd.get("offer_created_to_received", {})
    print(
        f"{'offer created -> received p50 / p99 ms':<52}{fmt(lag.get('p50_ms'), 2):>12}"
        f"{fmt(lag.get('p99_ms'), 2):>12}"
    )
    print(
        f"{'ratio convctl / baseline offers/s':<52}{fmt(out.get('ratio_pct'))} %   "
        f"(steady: {fmt(out.get('steady_ratio_pct'))} %)"
    )
    timeline = sd.get("offers_per_second_timeline", [])
    if timeline:
        print(
            f"convctl offers per second since t0: {timeline[:30]}"
            + (" ..." if len(timeline) > 30 else "")
        )
    if not sd.get("complete"):
        print("warning: the service did not make every offer before --drain-timeout")
    if sd.get("loadgen_cpu_pct", 0) > 80:
        print("warning: the load generator was near a full core during the drain")
    if bd.get("loadgen_cpu_pct", 0) > 80:
        print(
            "warning: the load generator was near a full core during the baseline drain: "
            "the baseline is under-measured, the ratio flattered"
        )
    if sd.get("others_cpu_s", 0) > 0.2 * sd.get("measured_s", 0):
        print(
            f"warning: other processes used {sd['others_cpu_s']:.1f} CPU s during the "
            f"{sd['measured_s']:.0f} s drain: the machine was not quiet"
        )
    print(
        f"desk error frames {s['desk_errors'] or 'none'}, offer_closed {s['offer_closed_frames']},"
        f" other desk frames {s['other_desk_frames']:,}"
    )
    problems = {k: v for k, v in s["log_levels"].items() if not k.startswith(("info:", "debug:"))}
    print(f"service log (non-info lines by level:event): {problems or 'none'}")


def _stop_all() -> None:
    while _STARTED:
        proc = _STARTED.pop()
        try:
            if isinstance(proc, C.BaselineProcess):
                proc.stop()
            else:
                proc.terminate()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop {proc!r}: {exc}", file=sys.stderr)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--desk-server":
        desk_server_main(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", "-n", type=int, default=1000, help="agents with a desk")
    parser.add_argument(
        "--conversations",
        "-m",
        type=int,
        default=2000,
        help="queued conversations (backlog; issue 8 asks for 10000: ~8 min here)",
    )
    parser.add_argument(
        "--capacity", type=int, default=None, help="per agent (default: all conversations fit)"
    )
    parser.add_argument(
        "--latency-conversations",
        type=int,
        default=200,
        help="conversations queued one by one for the latency phase (0: skip it)",
    )
    parser.add_argument(
        "--latency-rate", type=float, default=20.0, help="latency phase: conversations per s"
    )
    parser.add_argument(
        "--fill-concurrency", type=int, default=64, help="customers queueing at a time"
    )
    parser.add_argument(
        "--offer-timeout", type=float, default=600.0, help="timeouts.offer for the run (s)"
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        C.run_service_bench(
            parser,
            main_async,
            report,
            core_help="core for the service and the baseline",
            drain_timeout=300.0,
            drain_help="max seconds for a phase (presence acks, the drain, quiet)",
        )
    finally:
        _stop_all()


if __name__ == "__main__":
    main()
