#!/usr/bin/env python3
"""Webhook fan-out to subscribed apps: deliveries per second, and what the subscribers cost
the conversations' own processing (web chat load with and without them, same run).

What it measures
----------------
The same load twice, each time on a fresh service (same settings, empty database):

A. **Without subscribers**: K web chat visitors (``--clients``, default 16), each its own
   session and conversation, send ``{"type": "message", "client_id", "text"}`` and wait for
   the demo bot's reply frame (``"from": "bot"``) before sending the next (closed loop).
   Each message runs inbox → decision → outbox (ask the demo bot) → ``bot.message`` →
   decision → outbox → pushed to the socket. Replies per second over ``--seconds`` after
   ``--warmup``; send → reply p50/p99.
B. **With subscribers**: ``--apps`` apps (default 10) are registered with the admin token
   (``POST /api/v1/apps``, scope ``events:subscribe``, a webhook URL on the receiver) and
   each subscribes with its own token (``POST /api/v1/apps/me/subscriptions``) to
   ``--event-types`` (default ``customer.message,bot.message,conversation.created``: two
   events per message, so 20 signed POSTs per message with 10 apps). Then the same load.
   Also: deliveries received per second in the window (at the receiver), event accepted →
   delivery received p50/p99 (the body's ``event.accepted_at`` against the receiver's clock;
   same machine), deliveries still owed when the window closed and how long the service took
   to deliver them (until no due outbox row is left), and the totals (receiver vs db).

Printed: A and B side by side, the ratio B/A of replies per second, the latency the
subscribers add (B - A at p50 and p99), service CPU ms per message in A and in B; then the
same with one client (``--single-seconds``, 0 skips it): the added latency without queueing.

The receiver
------------
A bare aiohttp server run by this file in its own process (``--receiver``: prints its URL,
stops when its stdin closes, so it never outlives this script): ``POST /hook/{n}`` answers
200 at once after checking the signature with ``controller.signing.verify`` (HMAC-SHA256
over the raw body with the app's webhook secret, handed to it after registration; a bad one
is counted, and answered 200 anyway so nothing is retried; ``--no-verify`` skips the check)
and records the arrival time and the event's age. ``GET /bench/stats?t0=&t1=`` answers the
counts and latency percentiles of a window.

How
---
The service (``_common.PinnedService``) runs under ``taskset -c N`` (``--core``, default: the
last core). The receiver gets a core of its own when there are three or more
(``--receiver-core``), otherwise it shares the load generator's cores (this process pins
itself to the cores other than N); their CPU seconds over each window are printed, and a
warning when they were near a full core (a receiver that cannot keep up holds deliveries
back, which is not the service's doing). The web chat rate limits are raised
(``bench_env``); everything else is the default settings, rules and demo bot. Every process
started here is stopped on any exit (error, Ctrl-C, SIGTERM).

Nothing here passes or fails on wall-clock time: it prints numbers. Run it by hand:

    python bench/app_fanout.py --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from _common import PinnedService, fmt, percentile

ADMIN_TOKEN = "proc-admin-token"  # what ServiceProcess sets
TEXT = "what are your opening hours?"  # the demo bot answers "hours": no handoff, no end
REPLY_TIMEOUT = 60.0
DEFAULT_TYPES = "customer.message,bot.message,conversation.created"

# Everything started here, stopped on any exit (exception, Ctrl-C, SIGTERM).
_STARTED: list[Any] = []


# the receiver, in its own process ------------------------------------------------------------
def receiver_main(verify: bool) -> None:
    """Answer every webhook 200 at once; count, check signatures, record arrival and age."""
    from aiohttp import web

    from controller.signing import SignatureError
    from controller.signing import verify as check

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing stdin
    app_secrets: dict[str, str] = {}
    arrivals: list[float] = []
    ages: list[float] = []
    per_hook: dict[str, int] = {}
    bad: dict[str, int] = {}
    delivery_ids: set[str] = set()
    repeats = [0]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        n = request.match_info["n"]
        if verify:
            try:
                check(app_secrets.get(n, ""), body, request.headers, now=now)
            except SignatureError as exc:
                bad[exc.code] = bad.get(exc.code, 0) + 1
        delivery = request.headers.get("Convctl-Delivery-Id", "")
        if delivery in delivery_ids:
            repeats[0] += 1
        delivery_ids.add(delivery)
        accepted_at = json.loads(body)["event"]["accepted_at"]
        arrivals.append(now)
        ages.append(now - _timestamp(accepted_at))
        per_hook[n] = per_hook.get(n, 0) + 1
        return web.Response(status=200)

    async def set_secrets(request: web.Request) -> web.Response:
        app_secrets.update(await request.json())
        return web.json_response({"apps": len(app_secrets)})

    async def stats(request: web.Request) -> web.Response:
        t0 = float(request.query.get("t0", "0"))
        t1 = float(request.query.get("t1", "1e18"))
        window = [1000 * age for at, age in zip(arrivals, ages, strict=True) if t0 <= at < t1]
        return web.json_response(
            {
                "total": len(arrivals),
                "in_window": len(window),
                "age_p50_ms": percentile(window, 50),
                "age_p99_ms": percentile(window, 99),
                "age_max_ms": max(window) if window else None,
                "per_hook": per_hook,
                "bad_signatures": bad,
                "repeated_delivery_ids": repeats[0],
            }
        )

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/hook/{n}", hook)
        app.router.add_post("/bench/secrets", set_secrets)
        app.router.add_get("/bench/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"http://127.0.0.1:{port}", flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        try:
            await stdin.read()  # until EOF: the parent closed the pipe or is gone
        finally:
            await runner.cleanup()

    asyncio.run(run())


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


class ReceiverProcess:
    """``app_fanout.py --receiver`` under ``taskset -c cores``; ``taskset`` execs Python, so
    ``proc.pid`` is the receiver's pid."""

    def __init__(self, cores: set[int], verify: bool) -> None:
        self.cores = cores
        self.verify = verify
        self.base_url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [C.taskset(), "-c", ",".join(map(str, sorted(self.cores)))]
        argv += [sys.executable, __file__, "--receiver" if self.verify else "--receiver-no-verify"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line.startswith(b"http://"):
            raise RuntimeError(f"receiver did not start (exit code {self.proc.poll()})")
        self.base_url = line.decode().strip()

    async def stats(self, t0: float = 0.0, t1: float = 1e18) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.base_url + "/bench/stats", params={"t0": t0, "t1": t1}) as r,
        ):
            result: dict[str, Any] = await r.json()
            return result

    async def set_secrets(self, by_hook: dict[str, str]) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.base_url + "/bench/secrets", json=by_hook) as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"receiver secrets: HTTP {r.status}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# the apps ------------------------------------------------------------------------------------
async def register_apps(
    base_url: str, receiver: ReceiverProcess, n: int, event_types: list[str]
) -> list[str]:
    """``n`` apps with webhooks on the receiver, each subscribed with its own token."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    by_hook: dict[str, str] = {}
    ids: list[str] = []
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            body = {
                "name": f"bench-app-{i}",
                "scopes": ["events:subscribe"],
                "webhook_url": f"{receiver.base_url}/hook/{i}",
            }
            async with http.post(base_url + "/api/v1/apps", json=body, headers=admin) as r:
                if r.status != 201:
                    raise RuntimeError(f"register app: {r.status} {await r.text()}")
                created = await r.json()
            by_hook[str(i)] = created["webhook_secret"]
            ids.append(created["id"])
            own = {"Authorization": f"Bearer {created['token']}"}
            async with http.post(
                base_url + "/api/v1/apps/me/subscriptions",
                json={"event_types": event_types},
                headers=own,
            ) as r:
                if r.status != 201:
                    raise RuntimeError(f"subscribe: {r.status} {await r.text()}")
    await receiver.set_secrets(by_hook)
    return ids


def app_outbox(db: Path) -> dict[str, int]:
    """App delivery rows by status, from the service's SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        rows = conn.execute(
            "SELECT status, COUNT(*) FROM outbox WHERE destination LIKE 'app:%' GROUP BY status"
        ).fetchall()
    finally:
        conn.close()
    return {str(status): int(count) for status, count in rows}


# the visitors ---------------------------------------------------------------------------------
# the closed loop ------------------------------------------------------------------------------


async def closed_loop(
    visitors: list[C.Visitor], pids: dict[str, int], warmup: float, seconds: float
) -> dict[str, Any]:
    """Each visitor asks, waits for the reply, asks again. Replies inside the window and their
    latencies; CPU seconds of ``pids``, of this process and of the rest of the machine."""
    window_start = time.perf_counter() + warmup
    window_end = window_start + seconds
    latencies: list[float] = []
    not_bot = [0]
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    wall: dict[str, float] = {}

    def sample(into: dict[str, float]) -> None:
        into.update({name: C.cpu_seconds(pid) for name, pid in pids.items()})
        into["loadgen"] = C.self_cpu()
        into["machine"] = C.machine_busy_seconds()

    async def run(v: C.Visitor) -> None:
        while time.perf_counter() < window_end:
            t0 = time.perf_counter()
            ok = await v.ask()
            t1 = time.perf_counter()
            if window_start <= t1 < window_end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    not_bot[0] += 1

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        sample(cpu0)
        wall["t0"] = time.time()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        sample(cpu1)
        wall["t1"] = time.time()

    await asyncio.gather(sample_cpu(), *(run(v) for v in visitors))
    ms = [x * 1000 for x in latencies]
    out: dict[str, Any] = {
        "clients": len(visitors),
        "window_seconds": seconds,
        "window_wall": (wall["t0"], wall["t1"]),
        "replies_in_window": len(ms),
        "per_s": len(ms) / seconds,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
        "not_the_bot": not_bot[0],
    }
    ours = 0.0
    for name in cpu1:
        if name == "machine":
            continue
        used = cpu1[name] - cpu0[name]
        ours += used
        out[f"{name}_cpu_s"] = used
        out[f"{name}_cpu_pct"] = 100.0 * used / seconds
    out["others_cpu_s"] = max(0.0, cpu1["machine"] - cpu0["machine"] - ours)
    return out


# the phases -----------------------------------------------------------------------------------
async def run_phase(
    name: str, args: argparse.Namespace, core: int, receiver: ReceiverProcess
) -> dict[str, Any]:
    """One fresh service; ``name`` "B" registers and subscribes the apps first."""
    data = C.work_dir(f"{args.data_dir}/{name}" if args.data_dir else None, "convctl-bench-apps-")
    service = PinnedService(data, core, env=C.bench_env())
    _STARTED.append(service)
    out: dict[str, Any] = {"data_dir": str(data)}
    service.start()
    pids = {"service": service.pid, "receiver": receiver.pid}
    try:
        out["ready_s"] = await service.wait_ready()
        if name == "B":
            out["app_ids"] = await register_apps(
                service.base_url, receiver, args.apps, args.event_types
            )
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            visitors = await C.connect_all(
                http, service.base_url, args.clients, text=TEXT, reply_timeout=REPLY_TIMEOUT
            )
            try:
                before = await receiver.stats()
                peak = await closed_loop(visitors, pids, args.warmup, args.seconds)
                t0, t1 = peak["window_wall"]
                if name == "B":
                    peak["owed_at_window_end"] = app_outbox(service.db_path).get("pending", 0)
                peak["drain_s"] = await C.wait_quiet(
                    service, timeout=args.drain_timeout, stable=2, interval=0.2
                )
                if name == "B":
                    peak["receiver"] = await receiver.stats(t0, t1)
                out["peak"] = peak
                if args.single_seconds > 0:
                    single = await closed_loop(
                        visitors[:1], pids, min(args.warmup, 1.0), args.single_seconds
                    )
                    single["drain_s"] = await C.wait_quiet(
                        service, timeout=args.drain_timeout, stable=2, interval=0.2
                    )
                    if name == "B":
                        single["receiver"] = await receiver.stats(*single["window_wall"])
                    out["single"] = single
            finally:
                await C.close_all(visitors)
        await C.wait_quiet(service, timeout=args.drain_timeout, stable=2, interval=0.2)
        after = await receiver.stats()
        out["received_total"] = after["total"] - before["total"]
        out["app_outbox"] = app_outbox(service.db_path)
        out["receiver_bad_signatures"] = after["bad_signatures"]
        out["receiver_repeated_ids"] = after["repeated_delivery_ids"]
        out["log_levels"] = C.count_log_levels(service)
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()
    return out


def choose_receiver_cores(
    server: int, loadgen: set[int], receiver_core: int | None
) -> tuple[set[int], set[int]]:
    """(cores of the receiver, cores of the load generator)."""
    if receiver_core is not None:
        if receiver_core == server or receiver_core not in os.sched_getaffinity(0):
            raise SystemExit(f"--receiver-core {receiver_core}: not available or the server's")
        rest = loadgen - {receiver_core}
        return {receiver_core}, rest or loadgen
    if len(loadgen) >= 2:
        own = max(loadgen)
        return {own}, loadgen - {own}
    return set(loadgen), loadgen


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    def diff(key: str) -> float | None:
        return b[key] - a[key] if a[key] is not None and b[key] is not None else None

    def per_message(r: dict[str, Any]) -> float | None:
        n = r["replies_in_window"]
        return 1000 * r["service_cpu_s"] / n if n else None

    out: dict[str, Any] = {
        "throughput_ratio_pct": 100.0 * b["per_s"] / a["per_s"] if a["per_s"] else None,
        "added_p50_ms": diff("p50_ms"),
        "added_p99_ms": diff("p99_ms"),
        "service_cpu_ms_per_message_a": per_message(a),
        "service_cpu_ms_per_message_b": per_message(b),
    }
    received = b.get("receiver", {}).get("in_window")
    if received is not None:
        out["deliveries_per_s"] = received / b["window_seconds"]
        out["deliveries_per_message"] = (
            received / b["replies_in_window"] if b["replies_in_window"] else None
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    args.event_types = [t.strip() for t in args.event_types.split(",") if t.strip()]
    core, others = C.choose_cores(args.core)
    receiver_cores, loadgen = choose_receiver_cores(core, others, args.receiver_core)
    C.pin_self(loadgen)
    out: dict[str, Any] = {
        "server_core": core,
        "receiver_cores": sorted(receiver_cores),
        "receiver_shares_loadgen_cores": bool(receiver_cores & loadgen),
        "loadgen_cores": sorted(loadgen),
        "clients": args.clients,
        "apps": args.apps,
        "event_types": args.event_types,
        "verify": args.verify,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "single_seconds": args.single_seconds,
        "loadavg_start": os.getloadavg(),
    }
    receiver = ReceiverProcess(receiver_cores, args.verify)
    _STARTED.append(receiver)
    receiver.start()
    try:
        await receiver.wait_ready()
        out["A"] = await run_phase("A", args, core, receiver)
        out["B"] = await run_phase("B", args, core, receiver)
    finally:
        receiver.terminate()
    out["loadavg_end"] = os.getloadavg()
    out["peak"] = compare(out["A"]["peak"], out["B"]["peak"])
    if args.single_seconds > 0:
        out["single"] = compare(out["A"]["single"], out["B"]["single"])
    out["warnings"] = warnings(out)
    return out


def warnings(out: dict[str, Any], busy: float = 80.0) -> list[str]:
    found: list[str] = []
    for phase in ("peak", "single"):
        if phase not in out:
            continue
        for side in ("A", "B"):
            r = out[side][phase]
            helper = r["receiver_cpu_pct"]
            if out["receiver_shares_loadgen_cores"] and len(out["loadgen_cores"]) == 1:
                helper += r["loadgen_cpu_pct"]  # one core for both
            if helper > busy:
                found.append(
                    f"{phase} {side}: the receiver's (and load generator's) core was "
                    f"{helper:.0f} % busy: deliveries and replies may be held back by them"
                )
            if r["others_cpu_s"] > 0.2 * r["window_seconds"]:
                found.append(
                    f"{phase} {side}: other processes used {r['others_cpu_s']:.1f} CPU s during "
                    f"the {r['window_seconds']:.0f} s window: the machine was not quiet"
                )
    bad = out["B"]["receiver_bad_signatures"]
    if bad:
        found.append(f"the receiver refused signatures: {bad}")
    return found


def report(out: dict[str, Any]) -> None:
    shared = " (shared with the load generator)" if out["receiver_shares_loadgen_cores"] else ""
    print(
        f"service core {out['server_core']}, receiver cores {out['receiver_cores']}{shared}, "
        f"load generator cores {out['loadgen_cores']}; {out['apps']} apps subscribed in B to "
        f"{', '.join(out['event_types'])}; signatures "
        f"{'verified' if out['verify'] else 'not verified'}"
    )
    print(
        f"load average at start {', '.join(f'{x:.2f}' for x in out['loadavg_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in out['loadavg_end'])}; data in "
        f"{out['A']['data_dir']} and {out['B']['data_dir']}"
    )
    phases = [("peak", f"{out['clients']} clients, closed loop, {fmt(out['seconds'])} s")]
    if "single" in out:
        phases.append(("single", f"1 client, {fmt(out['single_seconds'])} s window"))
    for phase, title in phases:
        a, b, cmp = out["A"][phase], out["B"][phase], out[phase]
        print(f"\n{title:<40}{'A: no apps':>12}  {'B: apps':>12}")
        for key, label, digits in (
            ("per_s", "replies/s (messages done)", 1),
            ("replies_in_window", "replies in window", 0),
            ("p50_ms", "send -> reply p50 ms", 2),
            ("p99_ms", "send -> reply p99 ms", 2),
            ("max_ms", "send -> reply max ms", 2),
            ("not_the_bot", "answered by someone else", 0),
            ("service_cpu_pct", "service CPU % of window", 1),
            ("receiver_cpu_pct", "receiver CPU % of window", 1),
            ("loadgen_cpu_pct", "load generator CPU % of window", 1),
            ("others_cpu_s", "rest of the machine CPU s", 2),
            ("owed_at_window_end", "deliveries owed at window end", 0),
            ("drain_s", "quiet after the window s", 2),
        ):
            print(f"{label:<40}{fmt(a.get(key), digits):>12}  {fmt(b.get(key), digits):>12}")
        rb = b.get("receiver", {})
        print(f"{'deliveries received in window':<40}{'':>12}  {fmt(rb.get('in_window')):>12}")
        print(f"{'deliveries/s':<40}{'':>12}  {fmt(cmp.get('deliveries_per_s')):>12}")
        print(
            f"{'deliveries per message':<40}{'':>12}  {fmt(cmp.get('deliveries_per_message')):>12}"
        )
        for key, label in (("age_p50_ms", "p50"), ("age_p99_ms", "p99")):
            print(
                f"{'event accepted -> delivered ' + label + ' ms':<40}{'':>12}  "
                f"{fmt(rb.get(key), 1):>12}"
            )
        print(f"{'throughput B/A %':<40}{fmt(cmp['throughput_ratio_pct']):>12}")
        print(
            f"{'latency added p50 / p99 ms':<40}{fmt(cmp['added_p50_ms'], 2):>12}  "
            f"{fmt(cmp['added_p99_ms'], 2):>12}"
        )
        print(
            f"{'service CPU ms per message (A, B)':<40}"
            f"{fmt(cmp['service_cpu_ms_per_message_a'], 3):>12}  "
            f"{fmt(cmp['service_cpu_ms_per_message_b'], 3):>12}"
        )
    b = out["B"]
    print(
        f"\nB totals: {b['received_total']:,} deliveries received, app outbox rows by status "
        f"{b['app_outbox']}, repeated delivery ids {b['receiver_repeated_ids']}, "
        f"bad signatures {b['receiver_bad_signatures'] or 'none'}"
    )
    for warning in out["warnings"]:
        print(f"warning: {warning}")
    for side in ("A", "B"):
        problems = {
            k: v
            for k, v in out[side]["log_levels"].items()
            if not k.startswith(("info:", "debug:")) and k != "non_json"
        }
        print(f"service log {side} (non-info lines by level:event): {problems or 'none'}")


def _stop_all() -> None:
    while _STARTED:
        proc = _STARTED.pop()
        try:
            proc.terminate()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop {proc!r}: {exc}", file=sys.stderr)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1] in ("--receiver", "--receiver-no-verify"):
        receiver_main(verify=sys.argv[1] == "--receiver")
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-k", type=int, default=16, help="concurrent visitors (K)")
    parser.add_argument("--apps", type=int, default=10, help="subscribed apps in B")
    parser.add_argument(
        "--event-types", default=DEFAULT_TYPES, help="comma-separated event types each app hears"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (each phase)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument(
        "--single-seconds",
        type=float,
        default=3.0,
        help="window of the one-client latency comparison (0: skip it)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="the receiver does not check signatures",
    )
    parser.add_argument(
        "--receiver-core",
        type=int,
        default=None,
        help="core of the receiver (default: its own core if there are >= 3)",
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        C.run_service_bench(
            parser,
            main_async,
            report,
            core_help="core for the service",
            drain_timeout=120.0,
            drain_help="max seconds to wait for the service to finish its backlog",
        )
    finally:
        _stop_all()


if __name__ == "__main__":
    main()
