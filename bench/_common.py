"""Shared helpers of the benchmark scripts (not a test module; nothing here asserts timings).

- core pinning: the server under test and its baseline run on the same single core
  (``taskset -c N``), the load generator (this process) on the other cores;
- ``PinnedService``: ``convctl serve`` in a subprocess (``controller.testing.ServiceProcess``)
  started under ``taskset``;
- RSS of a process from ``/proc/PID/status`` (no psutil needed);
- waiting until the service is quiet (``/readyz`` is 200, no pending event, no due outbox row);
- percentiles and a small table / JSON printer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.testing import ServiceProcess, free_port  # noqa: E402

SESSION_SECRET = "proc-session-secret"  # what ServiceProcess sets


# cores --------------------------------------------------------------------------------------
def choose_cores(server_core: int | None) -> tuple[int, set[int]]:
    """(core for the server and its baseline, cores for the load generator)."""
    available = sorted(os.sched_getaffinity(0))
    server = available[-1] if server_core is None else server_core
    if server not in available:
        raise SystemExit(f"core {server} is not available (have {available})")
    others = {c for c in available if c != server}
    if not others:
        print("warning: one core only; load generator shares the server's core", file=sys.stderr)
        others = {server}
    return server, others


def pin_self(cores: set[int]) -> None:
    os.sched_setaffinity(0, cores)


def taskset() -> str:
    path = shutil.which("taskset")
    if path is None:
        raise SystemExit("taskset (util-linux) is needed to pin the processes to one core")
    return path


def pinned_command(core: int, argv: Sequence[str]) -> list[str]:
    return [taskset(), "-c", str(core), *argv]


# the service --------------------------------------------------------------------------------
def bench_env(**extra: str) -> dict[str, str]:
    """Settings for a benchmark service: web chat rate limits out of the way (one load
    generator IP opens many sessions, and each visitor sends far more than a person would)."""
    connectors = [
        {
            "name": "webchat",
            "type": "webchat",
            "settings": {
                "messages_per_window": 1_000_000_000,
                "sessions_per_ip_per_minute": 1_000_000_000,
            },
        },
        {"name": "demo", "type": "demo_bot"},
    ]
    return {"CONVCTL_CONNECTORS": json.dumps(connectors), **extra}


class PinnedService(ServiceProcess):
    """``python -m controller.cli serve`` under ``taskset -c core``.

    ``taskset`` execs Python, so ``proc.pid`` is the service's pid.
    """

    def __init__(self, data_dir: Path, core: int, env: dict[str, str] | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(data_dir, env=env)
        self.core = core

    def start(self) -> None:
        import subprocess

        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            pinned_command(self.core, [sys.executable, "-m", "controller.cli", "serve"]),
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=str(ROOT),
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def db_path(self) -> Path:
        return self.data_dir / "convctl.db"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def db_counts(db: Path) -> dict[str, int]:
    """Work still to do, read from the service's SQLite file (read-only, WAL)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        pending_events = conn.execute(
            "SELECT COUNT(*) FROM events WHERE status = 'pending'"
        ).fetchone()[0]
        pending_outbox = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?",
            (time.time(),),
        ).fetchone()[0]
        return {"pending_events": pending_events, "due_outbox": pending_outbox}
    finally:
        conn.close()


async def wait_quiet(
    service: PinnedService, *, timeout: float = 600.0, stable: int = 3, interval: float = 0.5
) -> float:
    """Wait until /readyz is 200 and the db shows no pending event and no due outbox row,
    ``stable`` polls in a row. Returns the seconds waited; raises with the counts on timeout."""
    started = time.monotonic()
    quiet = 0
    counts: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        while True:
            if not service.alive():
                raise RuntimeError("service exited:\n" + service.log_tail())
            ready = False
            try:
                async with http.get(service.base_url + "/readyz") as r:
                    ready = r.status == 200
            except aiohttp.ClientError:
                pass
            counts = db_counts(service.db_path) if service.db_path.exists() else {}
            if ready and counts and not any(counts.values()):
                quiet += 1
                if quiet >= stable:
                    return time.monotonic() - started
            else:
                quiet = 0
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"service not quiet after {timeout:.0f}s: {counts}")
            await asyncio.sleep(interval)


def log_problems(service: PinnedService, limit: int = 10) -> list[str]:
    """Error and warning lines of the service log (JSON lines from structlog)."""
    found: list[str] = []
    try:
        text = service.log_path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        low = line.lower()
        if (
            '"level": "error"' in low
            or '"level":"error"' in low
            or "traceback" in low
            or ('"level": "warning"' in low or '"level":"warning"' in low)
        ):
            found.append(line[:400])
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


def count_log_levels(service: PinnedService) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        text = service.log_path.read_text(errors="replace")
    except OSError:
        return counts
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            counts["non_json"] = counts.get("non_json", 0) + 1
            continue
        key = f"{rec.get('level', '?')}:{rec.get('event', '?')}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# numbers ------------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, rows: Sequence[tuple[str, Any]], digits: int = 1) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 20))
    for name, value in rows:
        print(f"{name:<{width}}  {fmt(value, digits):>16}")


def emit_json(result: dict[str, Any]) -> None:
    print(json.dumps(result, indent=2, sort_keys=True, default=str))


def work_dir(keep: str | None, prefix: str) -> Path:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=prefix))


class BaselineProcess:
    """A baseline server in a subprocess pinned to ``core``, ready when ``probe`` answers 200.

    ``argv(port)`` gives the script and its arguments (the interpreter is added); ``probe`` is
    the (method, path) that answers once the server listens.
    """

    def __init__(self, core: int, argv: Callable[[int], list[str]], probe: tuple[str, str]) -> None:
        self.core = core
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._argv = argv
        self._probe = probe
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, *self._argv(self.port)]
        self.proc = subprocess.Popen(pinned_command(self.core, argv))

    async def wait_ready(self, timeout: float = 30.0) -> float:
        """Seconds until the probe answered 200."""
        started = time.monotonic()
        method, path = self._probe
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError("baseline server exited")
                try:
                    async with http.request(method, self.base_url + path) as r:
                        if r.status == 200:
                            return time.monotonic() - started
                except aiohttp.ClientError:
                    pass
                if time.monotonic() - started > timeout:
                    raise RuntimeError("baseline server did not start")
                await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def run_service_bench(
    parser: argparse.ArgumentParser,
    main_async: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    report: Callable[[dict[str, Any]], None],
    *,
    core_help: str,
    drain_timeout: float,
    drain_help: str,
) -> None:
    """Add the options every service benchmark shares, run it, print the table or JSON."""
    parser.add_argument("--core", type=int, default=None, help=core_help)
    parser.add_argument("--drain-timeout", type=float, default=drain_timeout, help=drain_help)
    parser.add_argument("--data-dir", help="keep the service's data here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    if args.json:
        emit_json(out)
    else:
        report(out)


# load generators --------------------------------------------------------------------------------
def self_cpu() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class Visitor:
    """One web chat visitor with at most one message out: ``ask`` returns the frame that
    answered it (the bot's message; or a message of another sender, or an error frame)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        name: str,
        *,
        text: str,
        reply_timeout: float,
    ) -> None:
        self.http = http
        self.text = text
        self.reply_timeout = reply_timeout
        self.base_url = base_url
        self.name = name
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.acks = 0
        self.counter = itertools.count()
        self._waiting: asyncio.Future[dict[str, Any]] | None = None
        self._history: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        async with self.http.post(self.base_url + "/webchat/session") as r:
            if r.status != 200:
                raise RuntimeError(f"session: {r.status} {await r.text()}")
            token = (await r.json())["token"]
        self.ws = await self.http.ws_connect(
            f"{self.base_url}/webchat/ws?token={token}&connection={secrets.token_hex(6)}",
            heartbeat=None,
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._history, 30)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "ack":
                self.acks += 1
            elif kind == "history" and not self._history.done():
                self._history.set_result(None)
            elif (kind == "error" or (kind == "message" and frame.get("from") != "customer")) and (
                self._waiting is not None and not self._waiting.done()
            ):
                self._waiting.set_result(frame)

    async def ask(self) -> bool:
        """Send one message, wait for what answers it; True if the bot did."""
        assert self.ws is not None
        self._waiting = asyncio.get_running_loop().create_future()
        cid = f"{self.name}-{next(self.counter)}"
        await self.ws.send_str(json.dumps({"type": "message", "client_id": cid, "text": self.text}))
        try:
            frame = await asyncio.wait_for(self._waiting, self.reply_timeout)
        except TimeoutError:
            raise RuntimeError(
                f"visitor {self.name}: no reply in {self.reply_timeout:.0f} s"
            ) from None
        return frame.get("type") == "message" and frame.get("from") == "bot"

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def connect_all(
    http: aiohttp.ClientSession, base_url: str, k: int, *, text: str, reply_timeout: float
) -> list[Visitor]:
    """``k`` visitors with their sessions and sockets open, each asking with ``text``."""
    visitors = [
        Visitor(http, base_url, f"c{i}", text=text, reply_timeout=reply_timeout) for i in range(k)
    ]
    sem = asyncio.Semaphore(64)

    async def one(v: Visitor) -> None:
        async with sem:
            await v.connect()

    await asyncio.gather(*(one(v) for v in visitors))
    return visitors


async def close_all(visitors: list[Visitor], timeout: float = 3.0) -> None:
    """Close the sockets together; a service that is gone (Ctrl-C reaches it too) does not
    answer the close, so give up after ``timeout`` (leaving the session drops them)."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(v.close() for v in visitors), return_exceptions=True)
    except TimeoutError:
        print(f"web chat sockets not closed after {timeout:.0f} s; dropped", file=sys.stderr)
