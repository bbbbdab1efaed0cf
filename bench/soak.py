#!/usr/bin/env python3
"""Soak: a steady web chat and bot load for a long time; memory, files and queues stay flat.

One ``convctl serve`` (SQLite by default; ``--database-url`` for PostgreSQL, in a fresh schema
dropped afterwards) pinned to one core. ``--visitors`` (K) web chat visitors are connected at
any time; each asks the demo bot ``--messages`` questions at a steady pace (together about
``--rate`` messages per second), waits for each answer, then leaves and a new visitor takes
its place. A visitor that left is closed by the service after ``--grace`` seconds (the
customer grace timer), so conversations open, fire timers and close all along the run.

Every ``--sample`` seconds (10) it reads the service's RSS (``/proc/PID/status``), its open
file descriptors (``/proc/PID/fd``), and the queues: undecided events, pending outbox rows,
stored timers and open conversations (from the database), with the open sockets and (on
PostgreSQL) the connection pool in use (from ``/metrics``). It prints one row per sample and
a verdict per series comparing the mean of the first quarter of the samples after
``--warmup`` with the mean of the last quarter (the ratio, the baseline being the same run's
first quarter) and the least-squares slope per hour: **flat** when the last quarter stays
within the tolerance of the first, **growing** otherwise.

It prints numbers; it never passes or fails (exit status 0 unless the service died).

    python bench/soak.py                      # 60 minutes on SQLite
    python bench/soak.py --minutes 3 --rate 20
    python bench/soak.py --minutes 30 --database-url postgresql://u:p@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    PinnedService,
    Visitor,
    bench_env,
    choose_cores,
    emit_json,
    fmt,
    pin_self,
    rss_kb,
    work_dir,
)

# Series judged by the verdict: (key, label, tolerance as a fraction, absolute tolerance).
SERIES = (
    ("rss_mb", "RSS (MB)", 0.10, 5.0),
    ("fds", "open file descriptors", 0.10, 5.0),
    ("pending_events", "undecided events", 0.50, 20.0),
    ("pending_outbox", "pending outbox rows", 0.50, 20.0),
    ("timers", "stored timers", 0.25, 10.0),
    ("open_conversations", "open conversations", 0.25, 10.0),
)
QUEUES = (
    ("pending_events", "SELECT COUNT(*) FROM events WHERE status = 'pending'"),
    ("pending_outbox", "SELECT COUNT(*) FROM outbox WHERE status = 'pending'"),
    ("timers", "SELECT COUNT(*) FROM timers"),
    ("open_conversations", "SELECT COUNT(*) FROM conversations WHERE NOT closed"),
)


# the service's numbers ------------------------------------------------------------------------
def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Queues:
    """Queue depths read from the service's database (SQLite file read-only, or PostgreSQL)."""

    def __init__(self, sqlite_path: Path | None, url: str | None, schema: str | None) -> None:
        self._path, self._url, self._schema = sqlite_path, url, schema
        self._pg: Any = None

    async def read(self) -> dict[str, int]:
        if self._url is None:
            assert self._path is not None
            return await asyncio.to_thread(self._read_sqlite)
        if self._pg is None:
            import asyncpg

            self._pg = await asyncpg.connect(
                self._url, server_settings={"search_path": str(self._schema)}
            )
        return {key: int(await self._pg.fetchval(sql)) for key, sql in QUEUES}

    def _read_sqlite(self) -> dict[str, int]:
        conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=30)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            return {key: int(conn.execute(sql).fetchone()[0]) for key, sql in QUEUES}
        finally:
            conn.close()

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()


async def scrape(http: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """Unlabelled samples of /metrics plus the sums of the labelled ones (by name)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(base_url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


# the load -------------------------------------------------------------------------------------
class Load:
    """K visitor slots; each visitor asks ``messages`` questions ``K / rate`` seconds apart
    (the next one after the answer at the earliest), then leaves and a new one comes."""

    def __init__(
        self, base_url: str, visitors: int, rate: float, messages: int, reply_timeout: float
    ) -> None:
        self.base_url = base_url
        self.k = visitors
        self.gap = visitors / rate
        self.messages = messages
        self.reply_timeout = reply_timeout
        self.sent = 0
        self.answered = 0
        self.visitors_done = 0
        self.other: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, http: aiohttp.ClientSession) -> None:
        self._tasks = [
            asyncio.create_task(self._slot(http, n), name=f"slot-{n}") for n in range(self.k)
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _slot(self, http: aiohttp.ClientSession, n: int) -> None:
        await asyncio.sleep(self.gap * n / self.k)  # slots start spread over one gap
        generation = 0
        while not self._stop.is_set():
            name = f"s{n}g{generation}-{secrets.token_hex(3)}"
            generation += 1
            visitor = Visitor(
                http, self.base_url, name, text="hi", reply_timeout=self.reply_timeout
            )
            try:
                await visitor.connect()
                due = time.monotonic()
                for _ in range(self.messages):
                    if self._stop.is_set():
                        break
                    self.sent += 1
                    if await visitor.ask():
                        self.answered += 1
                    else:  # answered by something else than the bot: say what
                        frame = visitor._waiting.result() if visitor._waiting else {}
                        what = f"{frame.get('type')} from {frame.get('from')}: "
                        self.other[what + str(frame.get("text", frame.get("code")))[:60]] += 1
                    due += self.gap
                    await self._pause(due - time.monotonic())
                self.visitors_done += 1
            except (aiohttp.ClientError, RuntimeError, OSError, TimeoutError) as exc:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
                await self._pause(1.0)
            finally:
                try:
                    async with asyncio.timeout(5):
                        await visitor.close()
                except TimeoutError:
                    pass

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._stop.wait()
            except TimeoutError:
                pass


# the verdict ----------------------------------------------------------------------------------
def slope_per_hour(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts`` (seconds), per hour."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var * 3600.0


def verdict(samples: list[dict[str, Any]], warmup: float) -> list[dict[str, Any]]:
    steady = [s for s in samples if s["t"] >= warmup] or samples
    q = max(1, len(steady) // 4)
    first, last = steady[:q], steady[-q:]
    out = []
    for key, label, rel, absolute in SERIES:
        if any(s.get(key) is None for s in steady):
            continue
        a = sum(s[key] for s in first) / len(first)
        b = sum(s[key] for s in last) / len(last)
        slope = slope_per_hour([s["t"] for s in steady], [s[key] for s in steady])
        flat = b <= a * (1 + rel) + absolute
        out.append(
            {
                "series": key,
                "label": label,
                "first_quarter": a,
                "last_quarter": b,
                "ratio": (b / a) if a else None,
                "slope_per_hour": slope,
                "verdict": "flat" if flat else "growing",
                "tolerance": f"+{rel:.0%} +{absolute:g}",
            }
        )
    return out


# the run --------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_core, load_cores = choose_cores(args.core)
    pin_self(load_cores)
    root = work_dir(args.data_dir, "convctl-soak-")
    env = bench_env(
        CONVCTL_TIMEOUTS__CUSTOMER_GRACE=str(args.grace),
        CONVCTL_TIMEOUTS__IDLE_REMINDER="3600",
        CONVCTL_TIMEOUTS__IDLE_CLOSE="7200",
    )
    schema = None
    if args.database_url:
        schema = f"convctl_soak_{secrets.token_hex(6)}"
        env.update(CONVCTL_DATABASE_URL=args.database_url, CONVCTL_DATABASE_SCHEMA=schema)
    service = PinnedService(root / "service", server_core, env=env)
    queues = Queues(service.db_path, args.database_url, schema)
    samples: list[dict[str, Any]] = []
    duration = args.minutes * 60.0
    print(
        f"soak: {args.minutes:g} min, {args.visitors} visitors, ~{args.rate:g} msg/s, "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}, data in {root}",
        file=sys.stderr,
    )
    service.start()
    load: Load | None = None
    try:
        await service.wait_ready()
        async with aiohttp.ClientSession() as http:
            load = Load(service.base_url, args.visitors, args.rate, args.messages, args.timeout)
            started = time.monotonic()
            load.start(http)
            sent = answered = 0
            decided = 0.0
            next_at = started
            while True:
                now = time.monotonic()
                if not service.alive():
                    raise RuntimeError("service exited:\n" + service.log_tail())
                metrics = await scrape(http, service.base_url)
                row: dict[str, Any] = {
                    "t": round(now - started, 1),
                    "sent": load.sent - sent,
                    "answered": load.answered - answered,
                    "decided": metrics.get("convctl_decisions_total", 0.0) - decided,
                    "rss_mb": rss_kb(service.pid) / 1024.0,
                    "fds": open_fds(service.pid),
                    **await queues.read(),
                    "sockets": metrics.get("convctl_websockets"),
                    "pool_in_use": metrics.get("convctl_db_pool_in_use"),
                }
                sent, answered = load.sent, load.answered
                decided = metrics.get("convctl_decisions_total", 0.0)
                samples.append(row)
                if not args.json:
                    print_row(row, header=len(samples) == 1)
                if now - started >= duration:
                    break
                next_at += args.sample
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await load.stop()
    finally:
        if load is not None:
            await load.stop()
        await queues.close()
        service.terminate()
        if schema is not None:
            await _drop(args.database_url, schema)
    assert load is not None
    return {
        "minutes": args.minutes,
        "store": "postgresql" if args.database_url else "sqlite",
        "visitors": args.visitors,
        "rate": args.rate,
        "messages_sent": load.sent,
        "answers": load.answered,
        "visitors_done": load.visitors_done,
        "other_answers": dict(load.other.most_common(5)),
        "errors": len(load.errors),
        "first_errors": load.errors[:5],
        "samples": samples,
        "verdict": verdict(samples, args.warmup),
        "data_dir": str(root),
    }


async def _drop(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


COLUMNS = (
    ("t", "t (s)"),
    ("sent", "sent"),
    ("answered", "answered"),
    ("decided", "decided"),
    ("rss_mb", "RSS MB"),
    ("fds", "fds"),
    ("pending_events", "events pend"),
    ("pending_outbox", "outbox pend"),
    ("timers", "timers"),
    ("open_conversations", "open conv"),
    ("sockets", "sockets"),
    ("pool_in_use", "pool busy"),
)


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print("  ".join(f"{title:>11}" for _, title in COLUMNS))
    print("  ".join(f"{fmt(row.get(key)):>11}" for key, _ in COLUMNS), flush=True)


def report(out: dict[str, Any]) -> None:
    print(
        f"\n{out['store']}, {out['minutes']:g} min: {out['messages_sent']:,} messages sent, "
        f"{out['answers']:,} answered by the bot, {out['visitors_done']:,} visitors came and "
        f"went, {out['errors']} client errors"
    )
    for error in out["first_errors"]:
        print(f"  {error}")
    for what, n in out["other_answers"].items():
        print(f"  answered not by the bot ({n:,}): {what}")
    print("\nfirst quarter vs last quarter (after the warm-up):")
    print(
        f"{'series':<22}{'first':>10}{'last':>10}{'ratio':>8}{'slope/h':>11}"
        f"{'tolerance':>13}  verdict"
    )
    for v in out["verdict"]:
        print(
            f"{v['label']:<22}{fmt(v['first_quarter']):>10}{fmt(v['last_quarter']):>10}"
            f"{fmt(v['ratio'], 2):>8}{fmt(v['slope_per_hour']):>11}{v['tolerance']:>13}  "
            f"{v['verdict']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long (default 60)")
    parser.add_argument("--visitors", type=int, default=20, help="visitors connected at once")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second in all")
    parser.add_argument("--messages", type=int, default=10, help="questions per visitor")
    parser.add_argument("--grace", type=float, default=20.0, help="customer grace (s)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the verdict (default: a tenth of the run, 60 to 300)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="bot answer wait (s)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL instead of SQLite")
    parser.add_argument("--core", type=int, default=None, help="core of the service")
    parser.add_argument("--data-dir", help="keep the service's data here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.warmup is None:  # conversations reach their steady number after a grace or so
        args.warmup = min(300.0, max(60.0, args.minutes * 6.0))
    out = asyncio.run(run(args))
    if args.json:
        emit_json(out)
    else:
        report(out)


if __name__ == "__main__":
    main()
