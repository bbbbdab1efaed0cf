#!/usr/bin/env python3
"""Customer API: bulk upsert throughput, and lookup-by-identity latency at a million profiles.

What it measures
----------------
A. **Bulk upsert** through the running service: ``--profiles`` NDJSON lines (default
   100,000: external id, name, email, E.164 phone, two custom fields) streamed in one
   ``POST /api/v1/customers/bulk``; profiles/s from the first byte sent to the report
   received (every line is validated, normalized, upserted in batches of 500 with a savepoint
   per line, its identities written). Then the same file again (every line ``unchanged``).
   **Baseline**, same run, same core: plain ``sqlite3`` ``executemany`` inserts of the same
   rows (profile columns, the unique external-id index, the email/phone/external identity
   rows) into a fresh WAL database with ``synchronous=NORMAL``, 500 rows per transaction.
   Ratio = service profiles/s / baseline rows/s. With ``--apps N`` (default 0), N apps are
   subscribed to ``profile.created``/``profile.updated`` first (a receiver in this process
   answers 200): every line also writes N outbox rows in its transaction, and the time until
   the receiver has every notification is printed too (deliveries/s).
B. **Lookup by identity** at ``--lookup-profiles`` profiles (default 1,000,000) on SQLite:
   the service's database is filled directly with ``sqlite3`` (profiles and their email and
   external-id identities, as the store writes them), then ``--lookups`` (default 2,000)
   ``GET /api/v1/customers/lookup?identity=email:…`` of random existing profiles, one after
   the other, latency per request (p50/p99). **Baseline**, same run, same core: the plain
   indexed query ``SELECT c.* FROM identities i JOIN customers c …`` for the same identities
   with ``sqlite3``; also the store's own ``SqliteStore.lookup_customer`` (no HTTP). Ratios =
   service p50/p99 ÷ plain p50/p99.

How
---
The service runs under ``taskset -c N`` (``--core``, default: the last core); the baselines
run in a subprocess of this file on the same core; the load generator (this process) pins
itself to the other cores. Nothing passes or fails on time: it prints numbers.

    python bench/customers.py                                   # full size
    python bench/customers.py --profiles 20000 --lookup-profiles 200000 --lookups 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from _common import PinnedService, percentile

ADMIN = {"Authorization": "Bearer proc-admin-token"}  # what ServiceProcess sets
BATCH = 500  # rows per transaction in the insert baseline (the service's bulk batch)


# data ---------------------------------------------------------------------------------------
def profile_line(i: int) -> dict[str, Any]:
    return {
        "external_id": f"crm-{i}",
        "name": f"Person {i}",
        "email": f"person{i}@example.com",
        "phone": f"+49151{i:08d}",
        "custom": {"tier": ("gold", "silver", "bronze")[i % 3], "orders": i % 50},
    }


def ndjson(count: int, chunk: int = 2000) -> Iterator[bytes]:
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        yield "".join(json.dumps(profile_line(i)) + "\n" for i in range(start, stop)).encode()


async def body(count: int) -> AsyncIterator[bytes]:
    for part in ndjson(count):
        yield part
        await asyncio.sleep(0)


# A: bulk upsert -----------------------------------------------------------------------------
class Receiver:
    """Subscribed apps' webhook: answers 200 and counts (no signature check: not measured)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.expected = 0
        self.all_arrived = asyncio.Event()
        self.runner: Any = None
        self.url = ""

    async def start(self) -> None:
        from aiohttp import web

        async def hook(request: web.Request) -> web.Response:
            await request.read()
            self.count += 1
            self.last = time.perf_counter()
            if self.count >= self.expected:
                self.all_arrived.set()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def subscribe_apps(service: PinnedService, receiver: Receiver, count: int) -> None:
    async with aiohttp.ClientSession() as http:
        for n in range(count):
            body = {
                "name": f"crm-{n}",
                "scopes": ["events:subscribe", "customers:read"],
                "webhook_url": receiver.url,
            }
            async with http.post(service.base_url + "/api/v1/apps", json=body, headers=ADMIN) as r:
                app = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"app: {r.status} {app}")
            async with http.post(
                service.base_url + "/api/v1/apps/me/subscriptions",
                json={"event_types": ["profile.created", "profile.updated"]},
                headers={"Authorization": f"Bearer {app['token']}"},
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"subscription: {r.status} {await r.text()}")


async def bulk_once(
    service: PinnedService, count: int
) -> tuple[float, float, float, dict[str, Any]]:
    """(start, seconds, service CPU seconds, report) of one bulk upsert of ``count`` lines."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=3600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        cpu0, t0 = C.cpu_seconds(service.pid), time.perf_counter()
        async with http.post(
            service.base_url + "/api/v1/customers/bulk",
            data=body(count),
            headers={**ADMIN, "Content-Type": "application/x-ndjson"},
        ) as r:
            report = await r.json()
            if r.status != 200:
                raise RuntimeError(f"bulk answered {r.status}: {report}")
        return t0, time.perf_counter() - t0, C.cpu_seconds(service.pid) - cpu0, report


def baseline_insert(path: Path, count: int) -> dict[str, Any]:
    """Plain executemany inserts of the same rows (run pinned, in a subprocess)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(
        "CREATE TABLE customers (id TEXT PRIMARY KEY, identity_key TEXT NOT NULL UNIQUE, "
        "created_at REAL NOT NULL, name TEXT, email TEXT, phone TEXT, language TEXT, "
        "external_id TEXT, custom TEXT NOT NULL DEFAULT '{}', known INTEGER NOT NULL, "
        "version INTEGER NOT NULL DEFAULT 1, updated_at REAL);"
        "CREATE UNIQUE INDEX customers_external_id ON customers(external_id);"
        "CREATE INDEX customers_email ON customers(email);"
        "CREATE INDEX customers_phone ON customers(phone);"
        "CREATE INDEX customers_name ON customers(name);"
        "CREATE TABLE identities (kind TEXT NOT NULL, value TEXT NOT NULL, "
        "customer_id TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (kind, value));"
        "CREATE INDEX identities_customer ON identities(customer_id);"
    )
    now = time.time()
    customers, identities = [], []
    for i in range(count):
        line = profile_line(i)
        cid = f"cu_{i:028x}"
        customers.append(
            (
                cid,
                f"customer:{cid}",
                now,
                line["name"],
                line["email"],
                line["phone"],
                line["external_id"],
                json.dumps(line["custom"]),
                now,
            )
        )
        identities.append(
            [
                ("email", line["email"], cid, now),
                ("phone", line["phone"], cid, now),
                ("external", line["external_id"], cid, now),
            ]
        )
    t0 = time.perf_counter()
    for start in range(0, count, BATCH):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO customers (id, identity_key, created_at, name, email, phone, "
            "external_id, custom, known, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            customers[start : start + BATCH],
        )
        conn.executemany(
            "INSERT INTO identities VALUES (?, ?, ?, ?)",
            [row for rows in identities[start : start + BATCH] for row in rows],
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    conn.close()
    return {"seconds": seconds, "rows_per_s": count / seconds}


# B: lookup ----------------------------------------------------------------------------------
def fill(db: Path, count: int) -> float:
    """Profiles with email and external-id identities, written straight into the service's
    (migrated, stopped) database; returns the seconds it took."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    now = time.time()
    t0 = time.perf_counter()
    for start in range(0, count, 50_000):
        rows, idents = [], []
        for i in range(start, min(count, start + 50_000)):
            cid = f"cu_{i:028x}"
            email, ext = f"person{i}@example.com", f"crm-{i}"
            rows.append((cid, f"customer:{cid}", now, f"Person {i}", email, ext, now))
            idents += [("email", email, cid, now), ("external", ext, cid, now)]
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO customers (id, identity_key, created_at, name, email, external_id, "
            "known, custom, version, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, '{}', 1, ?)",
            rows,
        )
        conn.executemany("INSERT INTO identities VALUES (?, ?, ?, ?)", idents)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


def targets(count: int, lookups: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"person{rng.randrange(count)}@example.com" for _ in range(lookups)]


def baseline_lookup(db: Path, count: int, lookups: int, seed: int) -> dict[str, Any]:
    """Plain indexed lookups, and the store's lookup_customer (run pinned, in a subprocess)."""
    wanted = targets(count, lookups, seed)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    plain = []
    for email in wanted:
        t0 = time.perf_counter()
        row = conn.execute(
            "SELECT c.* FROM identities i JOIN customers c ON c.id = i.customer_id "
            "WHERE i.kind = 'email' AND i.value = ?",
            (email,),
        ).fetchone()
        plain.append(time.perf_counter() - t0)
        assert row is not None
    conn.close()

    async def store_lookups() -> list[float]:
        from controller.store.base import Identity
        from controller.store.sqlite import SqliteStore

        store = SqliteStore(db)
        await store.open()
        took = []
        try:
            for email in wanted:
                t0 = time.perf_counter()
                record = await store.lookup_customer(Identity("email", email))
                took.append(time.perf_counter() - t0)
                assert record is not None
        finally:
            await store.close()
        return took

    store = asyncio.run(store_lookups())
    return {"plain": plain, "store": store}


async def service_lookups(service: PinnedService, wanted: list[str]) -> list[float]:
    took = []
    async with aiohttp.ClientSession() as http:
        for email in wanted[:50]:  # warm the connection and the page cache a little
            async with http.get(
                service.base_url + "/api/v1/customers/lookup",
                params={"identity": f"email:{email}"},
                headers=ADMIN,
            ) as r:
                await r.read()
        for email in wanted:
            t0 = time.perf_counter()
            async with http.get(
                service.base_url + "/api/v1/customers/lookup",
                params={"identity": f"email:{email}"},
                headers=ADMIN,
            ) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"lookup of {email} answered {r.status}")
            took.append(time.perf_counter() - t0)
    return took


# running ------------------------------------------------------------------------------------
def pinned_self(core: int, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        C.pinned_command(core, [sys.executable, str(Path(__file__).resolve()), *args]),
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def us(values: list[float], p: float) -> float | None:
    found = percentile(values, p)
    return None if found is None else found * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    root = C.work_dir(args.data_dir, "convctl-bench-customers-")
    print(f"data in {root}", file=sys.stderr)
    out: dict[str, Any] = {"core": core, "profiles": args.profiles}

    if args.profiles:
        service = PinnedService(root / "bulk", core, env=C.bench_env())
        receiver = Receiver()
        delivered_s: float | None = None
        service.start()
        try:
            await service.wait_ready()
            if args.apps:
                receiver.expected = args.profiles * args.apps
                await receiver.start()
                await subscribe_apps(service, receiver, args.apps)
            started, seconds, cpu, report = await bulk_once(service, args.profiles)
            assert report["created"] == args.profiles, report
            if args.apps:
                try:
                    await asyncio.wait_for(receiver.all_arrived.wait(), args.drain_timeout)
                except TimeoutError:
                    raise RuntimeError(
                        f"{receiver.count} of {receiver.expected} notifications arrived"
                    ) from None
                delivered_s = receiver.last - started
            _, again, _, report2 = await bulk_once(service, args.profiles)
            assert report2["unchanged"] == args.profiles, report2
        finally:
            service.terminate()
            await receiver.stop()
        base = pinned_self(core, "--baseline-insert", str(root / "baseline.db"), str(args.profiles))
        out["bulk"] = {
            "seconds": seconds,
            "profiles_per_s": args.profiles / seconds,
            "service_cpu_ms_per_profile": cpu * 1000 / args.profiles,
            "same_file_again_lines_per_s": args.profiles / again,
            "baseline_rows_per_s": base["rows_per_s"],
            "ratio": (args.profiles / seconds) / base["rows_per_s"],
            "apps": args.apps,
            "notifications_per_s": (
                None if delivered_s is None else args.profiles * args.apps / delivered_s
            ),
        }

    if args.lookup_profiles and args.lookups:
        service = PinnedService(root / "lookup", core, env=C.bench_env())
        service.start()
        await service.wait_ready()  # migrates the empty database
        service.terminate()
        filled = fill(service.db_path, args.lookup_profiles)
        base = pinned_self(
            core,
            "--baseline-lookup",
            str(service.db_path),
            str(args.lookup_profiles),
            str(args.lookups),
            str(args.seed),
        )
        service.start()
        try:
            await service.wait_ready(timeout=300)
            took = await service_lookups(
                service, targets(args.lookup_profiles, args.lookups, args.seed)
            )
        finally:
            service.terminate()
        out["lookup"] = {
            "profiles": args.lookup_profiles,
            "lookups": args.lookups,
            "fill_seconds": filled,
            "service_p50_us": us(took, 50),
            "service_p99_us": us(took, 99),
            "store_p50_us": us(base["store"], 50),
            "store_p99_us": us(base["store"], 99),
            "plain_p50_us": us(base["plain"], 50),
            "plain_p99_us": us(base["plain"], 99),
        }
        lk = out["lookup"]
        lk["ratio_p50"] = lk["service_p50_us"] / lk["plain_p50_us"]
        lk["ratio_p99"] = lk["service_p99_us"] / lk["plain_p99_us"]
        lk["store_ratio_p50"] = lk["store_p50_us"] / lk["plain_p50_us"]
    return out


def report(out: dict[str, Any]) -> None:
    if "bulk" in out:
        b = out["bulk"]
        rows = [
            ("service profiles/s", b["profiles_per_s"]),
            ("baseline executemany rows/s", b["baseline_rows_per_s"]),
            ("ratio service / baseline", b["ratio"]),
            ("service CPU ms per profile", b["service_cpu_ms_per_profile"]),
            ("same file again, lines/s (unchanged)", b["same_file_again_lines_per_s"]),
        ]
        if b["apps"]:
            rows.append((f"notifications/s to {b['apps']} app(s)", b["notifications_per_s"]))
        C.print_table(
            f"bulk upsert of {out['profiles']:,} profiles (POST /api/v1/customers/bulk, NDJSON)",
            rows,
            digits=3,
        )
    if "lookup" in out:
        lk = out["lookup"]
        C.print_table(
            f"lookup by identity at {lk['profiles']:,} profiles, {lk['lookups']:,} lookups (µs)",
            [
                ("service HTTP p50", lk["service_p50_us"]),
                ("service HTTP p99", lk["service_p99_us"]),
                ("store lookup_customer p50", lk["store_p50_us"]),
                ("store lookup_customer p99", lk["store_p99_us"]),
                ("plain sqlite3 p50", lk["plain_p50_us"]),
                ("plain sqlite3 p99", lk["plain_p99_us"]),
                ("ratio service / plain p50", lk["ratio_p50"]),
                ("ratio service / plain p99", lk["ratio_p99"]),
                ("ratio store / plain p50", lk["store_ratio_p50"]),
                ("fill seconds (direct sqlite3)", lk["fill_seconds"]),
            ],
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-insert":
        print(json.dumps(baseline_insert(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-lookup":
        db, count, lookups, seed = sys.argv[2:6]
        print(json.dumps(baseline_lookup(Path(db), int(count), int(lookups), int(seed))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=100_000, help="bulk upsert lines (0 skips)")
    parser.add_argument(
        "--lookup-profiles", type=int, default=1_000_000, help="profiles in the lookup database"
    )
    parser.add_argument("--lookups", type=int, default=2000, help="lookups measured (0 skips)")
    parser.add_argument("--apps", type=int, default=0, help="apps subscribed to the changes")
    parser.add_argument(
        "--drain-timeout", type=float, default=1200, help="seconds to wait for notifications"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--core", type=int, default=None, help="core of the service and baselines")
    parser.add_argument("--data-dir", help="keep the data here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    if args.json:
        C.emit_json(out)
    else:
        report(out)


if __name__ == "__main__":
    main()
