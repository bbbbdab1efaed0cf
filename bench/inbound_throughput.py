#!/usr/bin/env python3
"""Inbound web chat throughput and latency of convctl, as a ratio against a bare server.

What it measures
----------------
1. **Peak rate** (closed loop): K web chat visitors (``--clients``), each its own session
   token, WebSocket and conversation, each sending ``{"type": "message", "client_id", "text"}``
   frames one after the other (the next one as soon as the previous one's ``ack`` arrived).
   A message counts as done when its ack arrived; the ack is sent only after the event is
   committed in the inbox, and each message then runs inbox → decision → outbox (ask the demo
   bot) → bot reply event → decision → outbox → pushed to the socket. Messages acked during
   ``--seconds`` (after ``--warmup`` seconds) give msgs/s. The bot replies that arrived are
   counted too (after the run the sockets stay open until the service is quiet).
2. The same load against a **baseline**: a bare aiohttp server written here (run in a
   subprocess) that speaks the same protocol — ``POST /webchat/session`` → token, a ``history``
   frame on connect, and for each message frame an ``ack`` plus an echoed
   ``{"type": "message", "from": "bot"}`` frame — with no storage and no rules.
   The ratio service/baseline is the number to watch (aim: ≥ 30 %).
3. **Latency at half the peak** (open loop): messages are sent on a fixed schedule at
   ``--load-fraction`` (default 0.5) x the service's measured peak rate, spread round-robin
   over the K sockets, not waiting for acks. Send → ack latency is measured from the scheduled
   send time (no coordinated omission). Afterwards the SQLite file is read:
   ``outbox.created_at - events.accepted_at`` (accept → outbox row), ``outbox.done_at -
   events.accepted_at`` (accept → bot asked), and accept of the customer message → the bot's
   reply pushed to the socket (the ``channel:`` outbox row of the ``bot.message`` event whose
   ``reply_to_seq`` is the customer message). The baseline runs the same schedule (same
   absolute rate) for a send → ack comparison.

How
---
The service (``python -m controller.cli serve``, via ``controller.testing.ServiceProcess``) and
the baseline server are each pinned to the same single core with ``taskset -c N`` (``--core``,
default: the last core); this process, the load generator, pins itself to the other cores.
CPU seconds of the server and of the load generator over the measured window are printed, so
a saturated load generator (which would flatter the ratio) shows. The web chat rate limits
are raised for the run (``CONVCTL_CONNECTORS``); everything else is the default settings,
including the default rules and the demo bot.

Nothing here passes or fails on wall-clock time: it prints numbers. Run it by hand:

    python bench/inbound_throughput.py --clients 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from _common import PinnedService, fmt, percentile

TEXT = "what are your opening hours?"  # the demo bot answers "hours" (no handoff, no end)


# the baseline server ------------------------------------------------------------------------
def echo_server_main(port: int) -> None:
    """A bare aiohttp web chat look-alike: session, history frame, ack + echo per message."""
    from aiohttp import WSMsgType, web

    async def session(request: web.Request) -> web.Response:
        visitor = "v_" + secrets.token_urlsafe(16)
        return web.json_response({"visitor_id": visitor, "token": f"{visitor}.x"})

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        visitor = request.query.get("token", "").rpartition(".")[0]
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        conversation = "cv_" + secrets.token_hex(8)
        await ws.send_json(
            {
                "type": "history",
                "visitor_id": visitor,
                "conversation_id": None,
                "open": False,
                "messages": [],
            }
        )
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if not isinstance(frame, dict) or frame.get("type") != "message":
                await ws.send_json({"type": "error", "client_id": None, "code": "bad_frame"})
                continue
            await ws.send_json(
                {
                    "type": "ack",
                    "client_id": frame.get("client_id"),
                    "event_id": "ev_" + secrets.token_hex(8),
                    "conversation_id": conversation,
                    "duplicate": False,
                }
            )
            await ws.send_json(
                {
                    "type": "message",
                    "conversation_id": conversation,
                    "id": "m_" + secrets.token_hex(8),
                    "from": "bot",
                    "sender_id": "echo",
                    "text": frame.get("text", ""),
                }
            )
        return ws

    app = web.Application()
    app.router.add_post("/webchat/session", session)
    app.router.add_get("/webchat/ws", ws_handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def echo_server(core: int) -> C.BaselineProcess:
    """The bare aiohttp echo baseline, pinned to ``core``."""
    return C.BaselineProcess(
        core, lambda port: [__file__, "--echo-server", str(port)], ("POST", "/webchat/session")
    )


# the load generator -------------------------------------------------------------------------
class Visitor:
    """One web chat visitor: a socket, a reader task, futures for outstanding acks."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, name: str) -> None:
        self.http = http
        self.base_url = base_url
        self.name = name
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pending: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.bot_replies = 0
        self.errors: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._history = asyncio.get_running_loop().create_future()
        self.counter = itertools.count()

    async def connect(self) -> None:
        async with self.http.post(self.base_url + "/webchat/session") as r:
            if r.status != 200:
                raise RuntimeError(f"session: {r.status} {await r.text()}")
            token = (await r.json())["token"]
        self.ws = await self.http.ws_connect(
            f"{self.base_url}/webchat/ws?token={token}&connection={secrets.token_hex(6)}",
            heartbeat=None,
            autoping=True,
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._history, 30)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.perf_counter()
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind in ("ack", "error"):
                if kind == "error":
                    code = str(frame.get("code"))
                    self.errors[code] = self.errors.get(code, 0) + 1
                fut = self.pending.pop(frame.get("client_id"), None)
                if fut is not None and not fut.done():
                    fut.set_result((now, frame))
            elif kind == "message" and frame.get("from") == "bot":
                self.bot_replies += 1
            elif kind == "history" and not self._history.done():
                self._history.set_result(frame)

    async def send(self, client_id: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        assert self.ws is not None
        fut: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[client_id] = fut
        await self.ws.send_str(
            json.dumps({"type": "message", "client_id": client_id, "text": TEXT})
        )
        return fut

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def connect_all(http: aiohttp.ClientSession, base_url: str, k: int) -> list[Visitor]:
    visitors = [Visitor(http, base_url, f"c{i}") for i in range(k)]
    sem = asyncio.Semaphore(64)

    async def one(v: Visitor) -> None:
        async with sem:
            await v.connect()

    await asyncio.gather(*(one(v) for v in visitors))
    return visitors


async def closed_loop(
    visitors: list[Visitor], server_pid: int, warmup: float, seconds: float, tag: str
) -> dict[str, Any]:
    """Each visitor sends, waits for the ack, sends again. Counts acks inside the window."""
    loop_start = time.perf_counter()
    window_start = loop_start + warmup
    window_end = window_start + seconds
    counted = [0]
    errors = [0]
    sent = [0]
    acked_total = [0]
    marks: dict[str, float] = {}

    async def run(v: Visitor) -> None:
        while True:
            now = time.perf_counter()
            if now >= window_end:
                return
            cid = f"{tag}-{v.name}-{next(v.counter)}"
            fut = await v.send(cid)
            sent[0] += 1
            t_ack, frame = await asyncio.wait_for(fut, 60)
            if frame.get("type") != "ack":
                errors[0] += 1
                continue
            acked_total[0] += 1
            if window_start <= t_ack < window_end:
                counted[0] += 1

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        marks["srv0"], marks["me0"] = C.cpu_seconds(server_pid), C.self_cpu()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        marks["srv1"], marks["me1"] = C.cpu_seconds(server_pid), C.self_cpu()

    await asyncio.gather(sample_cpu(), *(run(v) for v in visitors))
    return {
        "clients": len(visitors),
        "window_seconds": seconds,
        "acked_in_window": counted[0],
        "msgs_per_s": counted[0] / seconds,
        "sent": sent[0],
        "acked": acked_total[0],
        "error_frames": errors[0],
        "server_cpu_pct": 100.0 * (marks["srv1"] - marks["srv0"]) / seconds,
        "loadgen_cpu_pct": 100.0 * (marks["me1"] - marks["me0"]) / seconds,
    }


async def open_loop(
    visitors: list[Visitor], rate: float, seconds: float, tag: str
) -> dict[str, Any]:
    """Send at a fixed rate (round-robin over the sockets); latency from the scheduled time."""
    n = max(1, int(rate * seconds))
    interval = 1.0 / rate
    start = time.perf_counter() + 0.2
    waits: list[asyncio.Task[None]] = []
    latencies: list[float] = []
    send_lag: list[float] = []
    errors = [0]

    async def collect(fut: asyncio.Future[tuple[float, dict[str, Any]]], scheduled: float) -> None:
        t_ack, frame = await asyncio.wait_for(fut, 120)
        if frame.get("type") == "ack":
            latencies.append(t_ack - scheduled)
        else:
            errors[0] += 1

    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        v = visitors[i % len(visitors)]
        send_lag.append(time.perf_counter() - scheduled)
        fut = await v.send(f"{tag}-{v.name}-{next(v.counter)}")
        waits.append(asyncio.create_task(collect(fut, scheduled)))
    elapsed_send = time.perf_counter() - start
    await asyncio.gather(*waits)
    ms = [x * 1000 for x in latencies]
    return {
        "target_rate": rate,
        "achieved_send_rate": n / elapsed_send if elapsed_send > 0 else None,
        "messages": n,
        "acked": len(latencies),
        "error_frames": errors[0],
        "ack_p50_ms": percentile(ms, 50),
        "ack_p99_ms": percentile(ms, 99),
        "ack_max_ms": max(ms) if ms else None,
        "send_lag_p99_ms": percentile([x * 1000 for x in send_lag], 99),
    }


def db_latencies(db: Path, tag: str) -> dict[str, Any]:
    """Accept → outbox row, accept → bot asked, accept → bot reply pushed, from the db."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        like = f"{tag}-%"
        rows = conn.execute(
            "SELECT o.created_at - e.accepted_at, o.done_at - e.accepted_at FROM events e "
            "JOIN outbox o ON o.event_id = e.id WHERE e.type = 'customer.message' "
            "AND json_extract(e.data, '$.client_id') LIKE ?",
            (like,),
        ).fetchall()
        created = [r[0] * 1000 for r in rows]
        done = [r[1] * 1000 for r in rows if r[1] is not None]
        replies = conn.execute(
            "SELECT o.done_at - c.accepted_at, o.created_at - c.accepted_at FROM events c "
            "JOIN events b ON b.conversation_id = c.conversation_id AND b.type = 'bot.message' "
            "AND json_extract(b.data, '$.reply_to_seq') = c.seq "
            "JOIN outbox o ON o.event_id = b.id AND o.destination LIKE 'channel:%' "
            "WHERE c.type = 'customer.message' AND json_extract(c.data, '$.client_id') LIKE ?",
            (like,),
        ).fetchall()
        pushed = [r[0] * 1000 for r in replies if r[0] is not None]
        reply_row = [r[1] * 1000 for r in replies]
        messages = conn.execute(
            "SELECT COUNT(*) FROM events WHERE type = 'customer.message' "
            "AND json_extract(data, '$.client_id') LIKE ?",
            (like,),
        ).fetchone()[0]
        statuses = dict(
            conn.execute("SELECT status, COUNT(*) FROM events GROUP BY status").fetchall()
        )
        outbox = dict(
            conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()
        )
    finally:
        conn.close()
    return {
        "customer_messages": messages,
        "outbox_rows": len(rows),
        "accept_to_outbox_row_p50_ms": percentile(created, 50),
        "accept_to_outbox_row_p99_ms": percentile(created, 99),
        "accept_to_bot_asked_p50_ms": percentile(done, 50),
        "accept_to_bot_asked_p99_ms": percentile(done, 99),
        "bot_replies_in_db": len(replies),
        "accept_to_reply_row_p50_ms": percentile(reply_row, 50),
        "accept_to_reply_row_p99_ms": percentile(reply_row, 99),
        "accept_to_reply_pushed_p50_ms": percentile(pushed, 50),
        "accept_to_reply_pushed_p99_ms": percentile(pushed, 99),
        "event_status": statuses,
        "outbox_status": outbox,
    }


async def wait_replies(visitors: list[Visitor], expected: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = sum(v.bot_replies for v in visitors)
        if got >= expected:
            return got
        await asyncio.sleep(0.2)
    return sum(v.bot_replies for v in visitors)


# the run ------------------------------------------------------------------------------------
async def run_target(
    name: str,
    base_url: str,
    pid: int,
    args: argparse.Namespace,
    rate: float | None,
    service: PinnedService | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"target": name}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        visitors = await connect_all(http, base_url, args.clients)
        rss0 = C.rss_kb(pid)
        peak = await closed_loop(visitors, pid, args.warmup, args.seconds, "peak")
        result["peak"] = peak
        if service is not None:
            await C.wait_quiet(service, timeout=args.drain_timeout)
        acked = peak["acked"]
        replies = await wait_replies(visitors, acked, 5.0 if service is None else 30.0)
        result["peak"]["bot_replies"] = replies
        lat_rate = rate if rate is not None else peak["msgs_per_s"] * args.load_fraction
        latency = await open_loop(visitors, lat_rate, args.latency_seconds, "lat")
        result["latency"] = latency
        if service is not None:
            await C.wait_quiet(service, timeout=args.drain_timeout)
            expected = acked + latency["acked"]
            result["latency"]["bot_replies_total"] = await wait_replies(visitors, expected, 30.0)
        result["errors_by_code"] = _merge(v.errors for v in visitors)
        result["rss_mb_after"] = C.rss_kb(pid) / 1024
        result["rss_mb_before"] = rss0 / 1024
        for v in visitors:
            await v.close()
    return result


async def scrape_metrics(base_url: str) -> dict[str, float]:
    """A few totals from /metrics (decisions, decision time, deliveries, accepted events)."""
    wanted = (
        "convctl_decisions_total",
        "convctl_decision_seconds_sum",
        "convctl_decision_seconds_count",
        "convctl_outbox_delivered_total",
        "convctl_events_accepted_total",
    )
    totals: dict[str, float] = {}
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    count = totals.get("convctl_decision_seconds_count")
    if count:
        totals["decision_mean_ms"] = 1000 * totals["convctl_decision_seconds_sum"] / count
    return totals


def _merge(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    out: dict[str, Any] = {
        "server_core": core,
        "loadgen_cores": sorted(others),
        "clients": args.clients,
        "seconds": args.seconds,
    }

    data = C.work_dir(args.data_dir, "convctl-bench-inbound-")
    service = C.PinnedService(data, core, env=C.bench_env())
    service.start()
    try:
        out["service_ready_s"] = await service.wait_ready()
        svc = await run_target("convctl", service.base_url, service.pid, args, None, service)
        svc["db"] = db_latencies(service.db_path, "lat")
        svc["log_levels"] = C.count_log_levels(service)
        svc["metrics"] = await scrape_metrics(service.base_url)
        out["service"] = svc
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()
    out["data_dir"] = str(data)

    echo = echo_server(core)
    echo.start()
    try:
        await echo.wait_ready()
        rate = out["service"]["latency"]["target_rate"]
        out["baseline"] = await run_target("echo", echo.base_url, echo.pid, args, rate, None)
    finally:
        echo.stop()

    s, b = out["service"]["peak"]["msgs_per_s"], out["baseline"]["peak"]["msgs_per_s"]
    out["ratio_pct"] = 100.0 * s / b if b else None
    return out


def report(out: dict[str, Any]) -> None:
    s, b = out["service"], out["baseline"]
    sp, bp = s["peak"], b["peak"]
    print(
        f"server core {out['server_core']}, load generator cores {out['loadgen_cores']}, "
        f"{out['clients']} clients, {out['seconds']} s window; data in {out['data_dir']}"
    )
    print("\npeak (closed loop)             convctl      baseline")
    for key, label in (
        ("msgs_per_s", "msgs/s (acked)"),
        ("acked", "acked total"),
        ("bot_replies", "bot replies received"),
        ("error_frames", "error frames"),
        ("server_cpu_pct", "server CPU %"),
        ("loadgen_cpu_pct", "load gen CPU %"),
    ):
        print(f"{label:<28}{fmt(sp.get(key)):>10}  {fmt(bp.get(key)):>12}")
    print(f"{'ratio convctl/baseline':<28}{fmt(out['ratio_pct'])} %   (aim >= 30 %)")
    sl, bl = s["latency"], b["latency"]
    print(
        f"\nopen loop at {fmt(sl['target_rate'])} msgs/s "
        f"({fmt(sl['messages'])} messages)   convctl      baseline"
    )
    for key, label in (
        ("achieved_send_rate", "achieved send rate"),
        ("acked", "acked"),
        ("ack_p50_ms", "send->ack p50 ms"),
        ("ack_p99_ms", "send->ack p99 ms"),
        ("ack_max_ms", "send->ack max ms"),
        ("bot_replies_total", "bot replies (all)"),
    ):
        print(f"{label:<28}{fmt(sl.get(key), 2):>10}  {fmt(bl.get(key), 2):>12}")
    d = s["db"]
    rows = [
        ("customer messages (latency phase)", d["customer_messages"]),
        ("accept -> outbox row created p50 ms", d["accept_to_outbox_row_p50_ms"]),
        ("accept -> outbox row created p99 ms", d["accept_to_outbox_row_p99_ms"]),
        ("accept -> bot asked (row done) p50 ms", d["accept_to_bot_asked_p50_ms"]),
        ("accept -> bot asked (row done) p99 ms", d["accept_to_bot_asked_p99_ms"]),
        ("accept -> bot reply pushed p50 ms", d["accept_to_reply_pushed_p50_ms"]),
        ("accept -> bot reply pushed p99 ms", d["accept_to_reply_pushed_p99_ms"]),
    ]
    C.print_table("from the SQLite file (service, latency phase)", rows, 2)
    print(f"event status {d['event_status']}, outbox status {d['outbox_status']}")
    m = s.get("metrics", {})
    print(
        f"service totals: {fmt(m.get('convctl_decisions_total'))} decisions "
        f"(mean {fmt(m.get('decision_mean_ms'), 2)} ms load->commit), "
        f"{fmt(m.get('convctl_outbox_delivered_total'))} outbox deliveries, "
        f"{fmt(m.get('convctl_events_accepted_total'))} events accepted"
    )
    problems = {k: v for k, v in s["log_levels"].items() if not k.startswith(("info:", "debug:"))}
    print(f"service log (non-info lines by level:event): {problems or 'none'}")
    if s.get("errors_by_code"):
        print(f"error frames by code: {s['errors_by_code']}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        echo_server_main(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-k", type=int, default=16, help="concurrent visitors (K)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (closed loop)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="open-loop phase length"
    )
    parser.add_argument(
        "--load-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a fraction of the service's peak",
    )
    C.run_service_bench(
        parser,
        main_async,
        report,
        core_help="core for server and baseline",
        drain_timeout=300.0,
        drain_help="max seconds to wait for the service to finish its backlog",
    )


if __name__ == "__main__":
    main()
