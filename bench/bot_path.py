#!/usr/bin/env python3
"""Overhead of the bot path: customer message → bot (a fake Rasa answering at once) → reply
pushed to the customer, as a ratio to calling the same fake directly with aiohttp.

What it measures
----------------
A. **Service path** (closed loop): K web chat visitors (``--clients``), each its own session
   token, WebSocket and conversation, send ``{"type": "message", "client_id", "text"}`` and
   wait for the bot's reply frame (``{"type": "message", "from": "bot"}``) before sending the
   next one. Each message runs inbox → decision (default rules: a new conversation invites
   bot ``demo``) → outbox → the Rasa connector (``connectors/rasa.py``, REST channel, ``POST
   /webhooks/rest/webhook``) → ``bot.message`` event → decision → outbox → pushed to the
   socket. Replies received during ``--seconds`` (after ``--warmup`` seconds) give replies/s;
   send → reply latency p50/p99 over the same replies.
B. **Baseline** (closed loop, same run, same fake process): K aiohttp clients POST the
   request the connector sends (``{"sender", "message", "metadata"}``) to the fake's
   ``/webhooks/rest/webhook`` one after the other and read the JSON answer: requests/s,
   p50/p99.
Printed: both, the ratio A/B of the throughputs, the latency the service adds (A - B at
p50 and p99), and the CPU seconds over each window of the service, the fake and this process
(the load generator), and what the rest of the machine used meanwhile (a disturbed run
shows). Warnings when a helper was near a full core: a busy fake during A slows the service
path, a busy load generator during B under-measures the baseline (flatters the ratio).
Then the same with one client (``--single-seconds``, 0: skip): the latency of one message
at a time, without queueing.

How
---
The fake is ``controller.testing_rasa.FakeRasa`` (the fake the tests use; every answer is
scripted, nothing is computed) run by this file in its own process (``--fake-rasa``: it
prints its URL and serves until its stdin closes, so it never outlives this script). Its
request log is emptied every second so its memory stays flat; recording is still paid.

Cores: the service runs under ``taskset -c N`` (``--core``, default: the last core). During
A the fake gets a core of its own when there are three or more (``--fake-core``), otherwise
it shares the load generator's cores (its CPU seconds show whether it kept up: the fake must
not be the bottleneck, its CPU % of the window should stay well below 100). For B the
service is stopped and the fake is moved to core N, so the baseline server has the same
single core as the service had (as in the other benchmarks). This process, the load
generator, pins itself to the remaining cores. The web chat rate limits are raised
(``bench_env``); the ``demo`` bot is the Rasa connector (``mode: rest``) instead of the
scripted demo bot; everything else is the default settings and rules. The service and the
fake are stopped on any exit of this script (error, Ctrl-C, SIGTERM).

Nothing here passes or fails on wall-clock time: it prints numbers. Run it by hand:

    python bench/bot_path.py --clients 16 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from _common import PinnedService, fmt, percentile

TEXT = "what are your opening hours?"
ANSWER = "We are open from 9 to 17, Monday to Friday."
REPLY_TIMEOUT = 30.0  # one reply not there after this long: the run stops with the log tail

# Everything started here, stopped on any exit (exception, Ctrl-C, SIGTERM).
_STARTED: list[Any] = []


# the fake Rasa, in its own process -----------------------------------------------------------
def fake_rasa_main() -> None:
    """Serve ``FakeRasa`` on an ephemeral port, print its URL, stop when stdin closes."""
    from controller.testing_rasa import FakeRasa

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing stdin

    async def run() -> None:
        fake = FakeRasa()
        fake.script(TEXT, {"text": ANSWER})
        await fake.start()
        print(fake.base_url, flush=True)

        async def forget() -> None:
            while True:
                await asyncio.sleep(1.0)
                fake.requests.clear()

        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        forgetting = asyncio.create_task(forget())
        try:
            await stdin.read()  # until EOF: the parent closed the pipe or is gone
        finally:
            forgetting.cancel()
            await fake.stop()

    asyncio.run(run())


class FakeRasaProcess:
    """``bot_path.py --fake-rasa`` under ``taskset -c cores``; ``taskset`` execs Python, so
    ``proc.pid`` is the fake's pid."""

    def __init__(self, cores: set[int]) -> None:
        self.cores = cores
        self.base_url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [C.taskset(), "-c", ",".join(map(str, sorted(self.cores)))]
        argv += [sys.executable, __file__, "--fake-rasa"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line.startswith(b"http://"):
            raise RuntimeError(f"fake Rasa did not start (exit code {self.proc.poll()})")
        self.base_url = line.decode().strip()
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.base_url + "/webhooks/rest/") as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"fake Rasa health check: HTTP {r.status}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pin(self, cores: set[int]) -> None:
        """Move every thread of the fake to ``cores``."""
        for task in os.listdir(f"/proc/{self.pid}/task"):
            os.sched_setaffinity(int(task), cores)
        self.cores = cores

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


def rasa_env(fake_url: str) -> dict[str, str]:
    """``bench_env`` with the ``demo`` bot being the Rasa connector on the fake."""
    env = C.bench_env()
    connectors = [c for c in json.loads(env["CONVCTL_CONNECTORS"]) if c["name"] != "demo"]
    connectors.append(
        {"name": "demo", "type": "rasa", "settings": {"base_url": fake_url, "mode": "rest"}}
    )
    env["CONVCTL_CONNECTORS"] = json.dumps(connectors)
    return env


# A: web chat visitors through the service ----------------------------------------------------
# B: straight to the fake ---------------------------------------------------------------------
def direct_caller(http: aiohttp.ClientSession, url: str, i: int) -> Callable[[], Awaitable[bool]]:
    """One client POSTing what the connector POSTs; True when the answer is the bot's."""
    body = {
        "sender": f"cv_bench_{i}",
        "message": TEXT,
        "metadata": {
            "channel": "webchat",
            "language": "en",
            "customer_id": f"cu_bench_{i}",
            "attributes": {},
        },
    }

    async def call() -> bool:
        async with http.post(url, json=body) as r:
            if r.status != 200:
                await r.read()
                return False
            data = await r.json()
        return isinstance(data, list) and bool(data) and data[0].get("text") == ANSWER

    return call


# the closed loop (both targets) --------------------------------------------------------------


async def closed_loop(
    calls: list[Callable[[], Awaitable[bool]]],
    pids: dict[str, int],
    warmup: float,
    seconds: float,
) -> dict[str, Any]:
    """Each worker calls, waits, calls again. Counts the answers that arrived inside the
    window and their latencies; CPU seconds of ``pids`` and of this process over it."""
    window_start = time.perf_counter() + warmup
    window_end = window_start + seconds
    latencies: list[float] = []
    done = [0, 0]  # all answers, failed answers (inside the window)
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}

    def sample(into: dict[str, float]) -> None:
        into.update({name: C.cpu_seconds(pid) for name, pid in pids.items()})
        into["loadgen"] = C.self_cpu()
        into["machine"] = C.machine_busy_seconds()

    async def run(call: Callable[[], Awaitable[bool]]) -> None:
        while time.perf_counter() < window_end:
            t0 = time.perf_counter()
            ok = await call()
            t1 = time.perf_counter()
            done[0] += 1
            if window_start <= t1 < window_end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    done[1] += 1

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        sample(cpu0)
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        sample(cpu1)

    await asyncio.gather(sample_cpu(), *(run(c) for c in calls))
    ms = [x * 1000 for x in latencies]
    out: dict[str, Any] = {
        "clients": len(calls),
        "window_seconds": seconds,
        "answers_in_window": len(ms),
        "per_s": len(ms) / seconds,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
        "failed_in_window": done[1],
        "answers_total": done[0],
    }
    ours = 0.0
    for name in cpu1:
        if name == "machine":
            continue
        used = cpu1[name] - cpu0[name]
        ours += used
        out[f"{name}_cpu_s"] = used
        out[f"{name}_cpu_pct"] = 100.0 * used / seconds
    # CPU used by every other process (and by the kernel outside ours: part of the loopback
    # networking lands here) during the window: a large share means the run was disturbed.
    out["others_cpu_s"] = max(0.0, cpu1["machine"] - cpu0["machine"] - ours)
    return out


# the run ---------------------------------------------------------------------------------------
def choose_fake_cores(
    server: int, loadgen: set[int], fake_core: int | None
) -> tuple[set[int], set[int]]:
    """(cores of the fake during A, cores of the load generator)."""
    if fake_core is not None:
        if fake_core == server or fake_core not in os.sched_getaffinity(0):
            raise SystemExit(f"--fake-core {fake_core}: not available or the server's core")
        rest = loadgen - {fake_core}
        return {fake_core}, rest or loadgen
    if len(loadgen) >= 2:
        own = max(loadgen)
        return {own}, loadgen - {own}
    return set(loadgen), loadgen


async def run_service(
    service: PinnedService, fake: FakeRasaProcess, args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pids = {"service": service.pid, "fake": fake.pid}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        visitors = await C.connect_all(
            http, service.base_url, args.clients, text=TEXT, reply_timeout=REPLY_TIMEOUT
        )
        try:
            calls: list[Callable[[], Awaitable[bool]]] = [v.ask for v in visitors]
            out["peak"] = await closed_loop(calls, pids, args.warmup, args.seconds)
            if args.single_seconds > 0:
                await C.wait_quiet(service, timeout=args.drain_timeout, stable=2, interval=0.2)
                warm = min(args.warmup, 1.0)
                out["single"] = await closed_loop(
                    [visitors[0].ask], pids, warm, args.single_seconds
                )
            await C.wait_quiet(service, timeout=args.drain_timeout, stable=2, interval=0.2)
            out["acks"] = sum(v.acks for v in visitors)
        finally:
            await C.close_all(visitors)
    return out


async def run_direct(fake: FakeRasaProcess, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pids = {"fake": fake.pid}
    url = fake.base_url + "/webhooks/rest/webhook"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        calls = [direct_caller(http, url, i) for i in range(args.clients)]
        out["peak"] = await closed_loop(calls, pids, args.warmup, args.seconds)
        if args.single_seconds > 0:
            warm = min(args.warmup, 1.0)
            out["single"] = await closed_loop(calls[:1], pids, warm, args.single_seconds)
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    def diff(key: str) -> float | None:
        return a[key] - b[key] if a[key] is not None and b[key] is not None else None

    return {
        "throughput_ratio_pct": 100.0 * a["per_s"] / b["per_s"] if b["per_s"] else None,
        "added_p50_ms": diff("p50_ms"),
        "added_p99_ms": diff("p99_ms"),
        "latency_ratio_p50": a["p50_ms"] / b["p50_ms"] if a["p50_ms"] and b["p50_ms"] else None,
        "service_cpu_ms_per_reply": (
            1000 * a["service_cpu_s"] / a["answers_in_window"] if a["answers_in_window"] else None
        ),
        "fake_cpu_ms_per_request_in_a": (
            1000 * a["fake_cpu_s"] / a["answers_in_window"] if a["answers_in_window"] else None
        ),
        "fake_cpu_ms_per_request_in_b": (
            1000 * b["fake_cpu_s"] / b["answers_in_window"] if b["answers_in_window"] else None
        ),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    fake_cores, loadgen = choose_fake_cores(core, others, args.fake_core)
    C.pin_self(loadgen)
    out: dict[str, Any] = {
        "server_core": core,
        "fake_cores_service_phase": sorted(fake_cores),
        "fake_shares_loadgen_cores": bool(fake_cores & loadgen),
        "loadgen_cores": sorted(loadgen),
        "clients": args.clients,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "single_seconds": args.single_seconds,
    }

    fake = FakeRasaProcess(fake_cores)
    _STARTED.append(fake)
    fake.start()
    try:
        await fake.wait_ready()
        out["fake_url"] = fake.base_url

        data = C.work_dir(args.data_dir, "convctl-bench-botpath-")
        out["data_dir"] = str(data)
        service = PinnedService(data, core, env=rasa_env(fake.base_url))
        _STARTED.append(service)
        service.start()
        try:
            out["service_ready_s"] = await service.wait_ready()
            out["service"] = await run_service(service, fake, args)
            out["service"]["log_levels"] = C.count_log_levels(service)
        except BaseException:
            print("service log tail:\n" + service.log_tail(), file=sys.stderr)
            raise
        finally:
            service.terminate()

        fake.pin({core})  # the baseline server gets the core the service had
        out["direct"] = await run_direct(fake, args)
    finally:
        fake.terminate()

    out["peak"] = _compare(out["service"]["peak"], out["direct"]["peak"])
    if args.single_seconds > 0:
        out["single"] = _compare(out["service"]["single"], out["direct"]["single"])
    out["warnings"] = saturation_warnings(out)
    return out


def saturation_warnings(out: dict[str, Any], busy: float = 80.0) -> list[str]:
    """A helper process near a full core means the other side was measured short: a busy
    fake during A slows the service path, a busy load generator during B under-measures the
    baseline (which flatters the ratio). The load generator is one thread: % of one core."""
    found: list[str] = []
    for phase in ("peak", "single"):
        if phase not in out["service"]:
            continue
        a, b = out["service"][phase], out["direct"][phase]
        fake = a["fake_cpu_pct"]
        if out["fake_shares_loadgen_cores"] and len(out["loadgen_cores"]) == 1:
            fake += a["loadgen_cpu_pct"]  # one core for both
        if fake > busy:
            found.append(f"{phase}: the fake Rasa's core was {fake:.0f} % busy during A")
        if a["loadgen_cpu_pct"] > busy:
            found.append(f"{phase}: the load generator was {a['loadgen_cpu_pct']:.0f} % busy in A")
        for side, r in (("A", a), ("B", b)):
            if r["others_cpu_s"] > 0.2 * r["window_seconds"]:
                found.append(
                    f"{phase}: other processes used {r['others_cpu_s']:.1f} CPU s during "
                    f"{side}'s {r['window_seconds']:.0f} s window: the machine was not quiet"
                )
        if b["loadgen_cpu_pct"] > busy:
            found.append(
                f"{phase}: the load generator was {b['loadgen_cpu_pct']:.0f} % busy in B: "
                "the baseline is under-measured, the ratio flattered"
            )
    return found


def report(out: dict[str, Any]) -> None:
    shared = " (shared with the load generator)" if out["fake_shares_loadgen_cores"] else ""
    print(
        f"service core {out['server_core']}, fake Rasa cores {out['fake_cores_service_phase']}"
        f"{shared} during A and core {out['server_core']} during B, load generator cores "
        f"{out['loadgen_cores']}; data in {out['data_dir']}"
    )
    phases = [("peak", f"{out['clients']} clients, closed loop, {fmt(out['seconds'])} s window")]
    if "single" in out:
        phases.append(("single", f"1 client, {fmt(out['single_seconds'])} s window"))
    for phase, title in phases:
        a, b, cmp = out["service"][phase], out["direct"][phase], out[phase]
        print(f"\n{title:<36}{'A: service':>12}  {'B: direct':>12}")
        for key, label, digits in (
            ("per_s", "answers/s", 1),
            ("answers_in_window", "answers in window", 0),
            ("p50_ms", "latency p50 ms", 2),
            ("p99_ms", "latency p99 ms", 2),
            ("max_ms", "latency max ms", 2),
            ("failed_in_window", "not the bot's answer", 0),
            ("service_cpu_s", "service CPU s", 2),
            ("service_cpu_pct", "service CPU % of window", 1),
            ("fake_cpu_s", "fake Rasa CPU s", 2),
            ("fake_cpu_pct", "fake Rasa CPU % of window", 1),
            ("loadgen_cpu_s", "load generator CPU s", 2),
            ("loadgen_cpu_pct", "load generator CPU % of window", 1),
            ("others_cpu_s", "rest of the machine CPU s", 2),
        ):
            print(f"{label:<36}{fmt(a.get(key), digits):>12}  {fmt(b.get(key), digits):>12}")
        print(f"{'throughput A/B %':<36}{fmt(cmp['throughput_ratio_pct']):>12}")
        print(
            f"{'latency added p50 / p99 ms':<36}{fmt(cmp['added_p50_ms'], 2):>12}  "
            f"{fmt(cmp['added_p99_ms'], 2):>12}"
        )
        print(f"{'service CPU ms per reply':<36}{fmt(cmp['service_cpu_ms_per_reply'], 3):>12}")
        print(
            f"{'fake CPU ms per request (A, B)':<36}"
            f"{fmt(cmp['fake_cpu_ms_per_request_in_a'], 3):>12}  "
            f"{fmt(cmp['fake_cpu_ms_per_request_in_b'], 3):>12}"
        )
    for warning in out["warnings"]:
        print(f"warning: {warning}")
    problems = {
        k: v
        for k, v in out["service"]["log_levels"].items()
        if not k.startswith(("info:", "debug:"))
    }
    print(f"\nservice log (non-info lines by level:event): {problems or 'none'}")


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
    if len(sys.argv) == 2 and sys.argv[1] == "--fake-rasa":
        fake_rasa_main()
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-k", type=int, default=16, help="concurrent clients (K)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window (each side)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument(
        "--single-seconds",
        type=float,
        default=3.0,
        help="window of the one-client latency comparison (0: skip it)",
    )
    parser.add_argument(
        "--fake-core",
        type=int,
        default=None,
        help="core of the fake Rasa during A (default: its own core if there are >= 3)",
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        C.run_service_bench(
            parser,
            main_async,
            report,
            core_help="core for the service, and for the fake during the baseline",
            drain_timeout=60.0,
            drain_help="max seconds to wait for the service to finish its backlog",
        )
    finally:
        _stop_all()


if __name__ == "__main__":
    main()
