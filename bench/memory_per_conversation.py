#!/usr/bin/env python3
"""Memory of the running service per open conversation, and per connected web chat socket.

What it measures
----------------
1. **KB per open conversation**: the RSS growth of one ``convctl serve`` process while it
   takes in N conversations (``--conversations``, default 100000) through its real path and
   keeps them open. "Open" means stored and active, not connected (DESIGN.md, Benchmarks).
   Each conversation is one web chat visitor that connects, sends one message, waits for the
   ack and the demo bot's reply, and disconnects. So each ends in state ``bot`` with two
   pending timers (``idle_reminder`` and ``customer_grace``; both are set to 10 days for the
   run so that nothing closes the conversations while they are counted) — what an open,
   quiet conversation looks like in the default rules.
   RSS (``VmRSS`` of ``/proc/PID/status``) is read after a warm-up of ``--warmup``
   conversations (so code paths, caches and the rulebook are already in memory) and again at
   the end, both times once the service is quiet: ``/readyz`` is 200 and the SQLite file has
   no pending event and no due outbox row, three polls in a row. The delta / N is the cost.
2. **KB per connected web chat socket**, reported separately: after step 1, ``--sockets``
   (default 1000) new visitors connect and stay connected (no message, so no conversation);
   RSS delta / sockets.

Visitors' session tokens are signed here with the service's session secret (the same HMAC
as ``POST /webchat/session``) so that the session endpoint's rate limit and cost stay out of
the numbers. The service is pinned to one core with ``taskset -c N`` (``--core``, default the
last core); the load generator (this process) runs on the other cores. As for the baseline
"same process and core count": the before/after RSS are of the same pinned process.

It prints numbers; it never passes or fails. Time: roughly N / 200 seconds on one core.

    python bench/memory_per_conversation.py --conversations 20000 --sockets 1000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
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

TEXT = "what are your opening hours?"
TEN_DAYS = str(10 * 24 * 3600)


def sign(visitor: str, instance: str = "webchat") -> str:
    mac = hmac.new(
        C.SESSION_SECRET.encode(), f"webchat:{instance}:{visitor}".encode(), hashlib.sha256
    ).hexdigest()
    return f"{visitor}.{mac}"


class Counts:
    def __init__(self) -> None:
        self.done = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def one_conversation(http: aiohttp.ClientSession, base: str, counts: Counts) -> None:
    """Connect, say one thing, wait for the ack and the bot's reply, disconnect."""
    visitor = "v_" + secrets.token_urlsafe(16)
    cid = secrets.token_hex(8)
    try:
        async with http.ws_connect(
            f"{base}/webchat/ws?token={sign(visitor)}&connection={secrets.token_hex(6)}"
        ) as ws:
            acked = replied = sent = False
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                kind = frame.get("type")
                if kind == "history" and not sent:
                    await ws.send_str(
                        json.dumps({"type": "message", "client_id": cid, "text": TEXT})
                    )
                    sent = True
                elif kind == "ack":
                    acked = True
                elif kind == "error":
                    counts.error(f"frame:{frame.get('code')}")
                    break
                elif kind == "message" and frame.get("from") == "bot":
                    replied = True
                if acked and replied:
                    break
            if acked and replied:
                counts.done += 1
            else:
                counts.error("closed_early")
    except (aiohttp.ClientError, OSError) as exc:
        counts.error(type(exc).__name__)


async def drive(base: str, n: int, concurrency: int, label: str) -> dict[str, Any]:
    counts = Counts()
    started = time.monotonic()
    queue = iter(range(n))
    last_print = [started]

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in queue:
            await asyncio.wait_for(one_conversation(http, base, counts), 300)
            now = time.monotonic()
            if now - last_print[0] > 15:
                last_print[0] = now
                print(
                    f"  {label}: {counts.done:,}/{n:,} conversations, "
                    f"{counts.done / (now - started):,.0f}/s",
                    file=sys.stderr,
                    flush=True,
                )

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "done": counts.done,
        "errors": counts.errors,
        "seconds": elapsed,
        "per_s": counts.done / elapsed if elapsed else None,
    }


def open_conversations(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        by_state = dict(
            conn.execute("SELECT state, COUNT(*) FROM conversations GROUP BY state").fetchall()
        )
        timers = conn.execute("SELECT COUNT(*) FROM timers").fetchone()[0]
    finally:
        conn.close()
    return {**{f"state_{k}": v for k, v in by_state.items()}, "timer_rows": timers}


async def hold_sockets(base: str, m: int, pid: int, settle: float) -> dict[str, Any]:
    """Open m sockets (new visitors, no messages), measure, close them."""
    connector = aiohttp.TCPConnector(limit=0)
    before = C.rss_kb(pid)
    async with aiohttp.ClientSession(connector=connector) as http:
        sem = asyncio.Semaphore(64)
        sockets: list[aiohttp.ClientWebSocketResponse] = []

        async def one() -> None:
            async with sem:
                visitor = "v_" + secrets.token_urlsafe(16)
                ws = await http.ws_connect(
                    f"{base}/webchat/ws?token={sign(visitor)}&connection={secrets.token_hex(6)}"
                )
                msg = await ws.receive(timeout=60)
                assert msg.type == aiohttp.WSMsgType.TEXT
                assert json.loads(msg.data)["type"] == "history"
                sockets.append(ws)

        await asyncio.gather(*(one() for _ in range(m)))
        await asyncio.sleep(settle)
        during = C.rss_kb(pid)
        for ws in sockets:
            await ws.close()
    await asyncio.sleep(settle)
    after = C.rss_kb(pid)
    return {
        "sockets": m,
        "rss_before_kb": before,
        "rss_connected_kb": during,
        "rss_after_close_kb": after,
        "kb_per_socket": (during - before) / m if m else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    data = C.work_dir(args.data_dir, "convctl-bench-memory-")
    env = C.bench_env(
        CONVCTL_TIMEOUTS__IDLE_REMINDER=TEN_DAYS,
        CONVCTL_TIMEOUTS__CUSTOMER_GRACE=TEN_DAYS,
    )
    service = C.PinnedService(data, core, env=env)
    service.start()
    out: dict[str, Any] = {
        "server_core": core,
        "loadgen_cores": sorted(others),
        "conversations": args.conversations,
        "data_dir": str(data),
    }
    try:
        out["ready_s"] = await service.wait_ready()
        out["rss_start_kb"] = C.rss_kb(service.pid)
        out["warmup"] = await drive(service.base_url, args.warmup, args.concurrency, "warm-up")
        await C.wait_quiet(service, timeout=args.drain_timeout)
        await asyncio.sleep(args.settle)
        rss0 = C.rss_kb(service.pid)
        out["rss_before_kb"] = rss0
        out["run"] = await drive(service.base_url, args.conversations, args.concurrency, "run")
        out["drain_s"] = await C.wait_quiet(service, timeout=args.drain_timeout)
        await asyncio.sleep(args.settle)
        rss1 = C.rss_kb(service.pid)
        out["rss_after_kb"] = rss1
        out["db"] = open_conversations(service.db_path)
        out["kb_per_conversation"] = (rss1 - rss0) / max(1, out["run"]["done"])
        if args.sockets:
            out["sockets"] = await hold_sockets(
                service.base_url, args.sockets, service.pid, args.settle
            )
        out["log_levels"] = C.count_log_levels(service)
        out["service_alive"] = service.alive()
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()
    return out


def report(out: dict[str, Any]) -> None:
    run = out["run"]
    print(
        f"server core {out['server_core']}, load generator cores {out['loadgen_cores']}; "
        f"data in {out['data_dir']}"
    )
    rows: list[tuple[str, Any]] = [
        ("RSS at ready (MB)", out["rss_start_kb"] / 1024),
        ("RSS after warm-up, quiet (MB)", out["rss_before_kb"] / 1024),
        ("conversations created", run["done"]),
        ("creation rate (conversations/s)", run["per_s"]),
        ("RSS after, quiet (MB)", out["rss_after_kb"] / 1024),
        ("KB per open conversation (aim <= 10)", out["kb_per_conversation"]),
    ]
    s = out.get("sockets")
    if s:
        rows += [
            ("connected sockets", s["sockets"]),
            ("KB per connected socket", s["kb_per_socket"]),
            ("RSS after closing them (MB)", s["rss_after_close_kb"] / 1024),
        ]
    C.print_table("memory of convctl serve", rows, 2)
    print(f"conversations in the db: {out['db']}")
    if run["errors"]:
        print(f"client errors: {run['errors']}")
    problems = {k: v for k, v in out["log_levels"].items() if not k.startswith(("info:", "debug:"))}
    print(f"service log (non-info lines by level:event): {problems or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", "-n", type=int, default=100_000)
    parser.add_argument("--sockets", type=int, default=1000, help="connected sockets (0: skip)")
    parser.add_argument("--warmup", type=int, default=500, help="conversations before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="visitors in flight")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each RSS read")
    C.run_service_bench(
        parser,
        main_async,
        report,
        core_help="core for the service",
        drain_timeout=1800.0,
        drain_help="max seconds to wait for the service to finish its backlog",
    )


if __name__ == "__main__":
    main()
