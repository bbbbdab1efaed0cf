#!/usr/bin/env python3
"""Several ``convctl serve`` processes on one PostgreSQL database: throughput and takeover.

Throughput
----------
K web chat visitors (``--clients``), spread round robin over the processes, each asking the
demo bot one message after the other (closed loop: the next message once the bot's answer
arrived). Bot answers per second over ``--seconds`` after ``--warmup``, for:
one process on SQLite (the baseline), then 1, 2 and 3 processes (``--processes``) on
PostgreSQL (``CONVCTL_TEST_DATABASE_URL`` or ``--database-url``; a fresh schema each run,
dropped afterwards). Ratios are against the SQLite run of the same invocation. Server
processes are pinned round robin to ``--cores`` (default: every core but the first, or the
only one); PostgreSQL itself is not pinned. On a machine with fewer cores than processes this
measures the cost of coordination, not scale-out.

Takeover after SIGKILL
----------------------
Process A runs alone while ``--conversations`` (N) web chat conversations are opened through
the store (one customer message each) and decided: A holds all N leases. Process B starts;
A is killed with SIGKILL, and one more customer message is stored in each of ``--sample``
of A's conversations. Printed: seconds from the kill until B holds every lease of A (and A's
row is gone), and until every sampled message is decided — against the heartbeat timeout
(``--heartbeat-timeout``, interval ``--heartbeat-interval``), the bound it should stay near.

It prints numbers; it never passes or fails.

    python bench/multiprocess.py --clients 24 --seconds 10 --conversations 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    PinnedService,
    Visitor,
    bench_env,
    close_all,
    connect_all,
    emit_json,
    fmt,
    print_table,
    work_dir,
)

from controller.models import NewEvent
from controller.store.postgres import PostgresStore


def _cores(arg: str | None) -> list[int]:
    if arg:
        return [int(c) for c in arg.split(",")]
    available = sorted(os.sched_getaffinity(0))
    return available[1:] or available


async def _ready_json(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(base_url + "/readyz") as r:
        data: dict[str, Any] = await r.json()
        return data


def _services(
    root: Path, n: int, cores: list[int], env: dict[str, str], tag: str
) -> list[PinnedService]:
    return [PinnedService(root / f"{tag}{i}", cores[i % len(cores)], env=env) for i in range(n)]


async def _throughput(
    services: list[PinnedService], clients: int, warmup: float, seconds: float
) -> dict[str, Any]:
    for svc in services:
        svc.start()
    try:
        for svc in services:
            await svc.wait_ready()
        async with aiohttp.ClientSession() as http:
            visitors: list[Visitor] = []
            for i, svc in enumerate(services):
                share = clients // len(services) + (i < clients % len(services))
                visitors += await connect_all(
                    http, svc.base_url, share, text="hours", reply_timeout=60
                )
            answered = 0
            counting = False
            stop = asyncio.Event()

            async def loop(v: Visitor) -> None:
                nonlocal answered
                while not stop.is_set():
                    if await v.ask() and counting:
                        answered += 1

            tasks = [asyncio.create_task(loop(v)) for v in visitors]
            await asyncio.sleep(warmup)
            counting = True
            started = time.monotonic()
            await asyncio.sleep(seconds)
            counting = False
            elapsed = time.monotonic() - started
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(visitors)
        return {"answers_per_s": answered / elapsed, "answers": answered}
    finally:
        for svc in services:
            svc.terminate()


async def _count(store: PostgresStore, sql: str, *args: Any) -> int:
    async def run(conn: Any) -> int:
        return int(await conn.fetchval(sql, *args))

    return await store._read(run)


async def _wait_count(store: PostgresStore, sql: str, want: int, timeout: float) -> float:
    started = time.monotonic()
    while await _count(store, sql) != want:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out waiting for: {sql}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _takeover(
    root: Path, url: str, cores: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    schema = f"convctl_b_{secrets.token_hex(6)}"
    env = bench_env(
        CONVCTL_DATABASE_URL=url,
        CONVCTL_DATABASE_SCHEMA=schema,
        CONVCTL_CLUSTER_HEARTBEAT_INTERVAL=str(args.heartbeat_interval),
        CONVCTL_CLUSTER_HEARTBEAT_TIMEOUT=str(args.heartbeat_timeout),
        CONVCTL_TIMEOUTS__IDLE_REMINDER="86400",
    )
    a, b = _services(root, 2, cores, env, "takeover-")
    store = PostgresStore(url, schema=schema, min_size=1, max_size=4)
    a.start()
    try:
        await a.wait_ready()
        owner = (await _ready_json(a.base_url))["process_id"]
        await store.open()
        visitors = [f"bench-{i}" for i in range(args.conversations)]
        for i in range(0, len(visitors), 500):
            await store.accept([_message(v, "hi") for v in visitors[i : i + 500]], _now())
        await _wait_count(
            store, "SELECT COUNT(*) FROM events WHERE status = 'pending'", 0, args.drain_timeout
        )
        leases = await _count(
            store, f"SELECT COUNT(*) FROM conversation_leases WHERE owner = '{owner}'"
        )
        b.start()
        await b.wait_ready()
        a.kill()
        killed = time.monotonic()
        sample = visitors[: args.sample]
        await store.accept([_message(v, "hours") for v in sample], _now())
        await _wait_count(
            store,
            f"SELECT (SELECT COUNT(*) FROM processes WHERE id = '{owner}') "
            f"+ (SELECT COUNT(*) FROM conversation_leases WHERE owner = '{owner}')",
            0,
            args.drain_timeout,
        )
        moved = time.monotonic() - killed
        await _wait_count(
            store, "SELECT COUNT(*) FROM events WHERE status = 'pending'", 0, args.drain_timeout
        )
        decided = time.monotonic() - killed
        return {
            "conversations": args.conversations,
            "leases_of_killed": leases,
            "leases_moved_s": moved,
            "sample_decided_s": decided,
            "heartbeat_timeout_s": args.heartbeat_timeout,
        }
    finally:
        a.terminate()
        b.terminate()
        await store.close()
        await _drop(url, schema)


async def _drop(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _message(visitor: str, text: str) -> NewEvent:
    return NewEvent(
        type="customer.message",
        source="webchat:webchat",
        dedupe_key=f"{visitor}:{secrets.token_hex(6)}",
        channel="webchat",
        instance="webchat",
        endpoint="web",
        identity=visitor,
        data={"text": text, "client_id": secrets.token_hex(6)},
    )


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = args.database_url or os.environ.get("CONVCTL_TEST_DATABASE_URL", "")
    if not url:
        raise SystemExit("set CONVCTL_TEST_DATABASE_URL or --database-url (PostgreSQL)")
    cores = _cores(args.cores)
    root = work_dir(args.data_dir, "convctl-bench-multiprocess-")
    runs: dict[str, Any] = {}
    sqlite = _services(root, 1, cores, bench_env(), "sqlite-")
    runs["sqlite_1"] = await _throughput(sqlite, args.clients, args.warmup, args.seconds)
    for n in range(1, args.processes + 1):
        schema = f"convctl_b_{secrets.token_hex(6)}"
        env = bench_env(
            CONVCTL_DATABASE_URL=url,
            CONVCTL_DATABASE_SCHEMA=schema,
            CONVCTL_CLUSTER_HEARTBEAT_INTERVAL=str(args.heartbeat_interval),
            CONVCTL_CLUSTER_HEARTBEAT_TIMEOUT=str(args.heartbeat_timeout),
        )
        try:
            services = _services(root, n, cores, env, f"pg{n}-")
            runs[f"postgres_{n}"] = await _throughput(
                services, args.clients, args.warmup, args.seconds
            )
        finally:
            await _drop(url, schema)
    base = runs["sqlite_1"]["answers_per_s"] or 1.0
    for run in runs.values():
        run["ratio_to_sqlite"] = run["answers_per_s"] / base
    takeover = await _takeover(root, url, cores, args) if args.conversations else None
    return {"cores": cores, "clients": args.clients, "throughput": runs, "takeover": takeover}


def report(out: dict[str, Any]) -> None:
    rows = [
        (
            f"{name} (bot answers/s, ratio to SQLite)",
            f"{fmt(r['answers_per_s'])}  x{r['ratio_to_sqlite']:.2f}",
        )
        for name, r in out["throughput"].items()
    ]
    print_table(f"throughput, {out['clients']} clients, server cores {out['cores']}", rows)
    t = out["takeover"]
    if t:
        print_table(
            f"takeover after SIGKILL of a process holding {t['leases_of_killed']} leases",
            [
                ("leases moved, killed process gone (s)", fmt(t["leases_moved_s"], 2)),
                ("sampled new messages decided (s)", fmt(t["sample_decided_s"], 2)),
                ("heartbeat timeout (s)", t["heartbeat_timeout_s"]),
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=10000, help="0: no takeover run")
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--drain-timeout", type=float, default=900.0)
    parser.add_argument("--cores", help="comma-separated cores for the server processes")
    parser.add_argument("--database-url")
    parser.add_argument("--data-dir", help="keep the services' folders here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    if args.json:
        emit_json(out)
    else:
        report(out)


if __name__ == "__main__":
    main()
