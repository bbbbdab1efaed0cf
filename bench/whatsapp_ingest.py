#!/usr/bin/env python3
"""Signed WhatsApp webhook ingest of convctl, as a ratio against a bare aiohttp endpoint.

What it measures
----------------
For batches of 1 and of 20 messages per POST (``--batches``): K concurrent senders
(``--clients``) play Meta, each POSTing signed ``whatsapp_business_account`` deliveries one
after the other (the next as soon as the previous one's 200 arrived), every message a new
``wamid`` from a pool of customers (``--customers``). A delivery counts when its 200 arrived;
convctl answers only after the delivery's events are committed in the inbox (signature check
over the raw body, parse, map, one inbox submit). Deliveries answered during ``--seconds``
(after ``--warmup`` seconds) give deliveries/s and messages/s.

The **baseline** is a bare aiohttp server written here (run in a subprocess) that reads the
raw body, checks ``X-Hub-Signature-256`` (HMAC-SHA256, constant-time compare) and answers
``{"ok": true}``: no parsing, no storage, no rules. The ratio convctl/baseline (messages/s)
per batch size is the number to watch.

What convctl does besides (on the same core, counted in its CPU): the default rules decide
each message, the demo bot answers and the answers go out to a fake Graph API (in this
process, on the load generator's cores); read receipts are sent (``mark_read`` default on).
Between batch sizes the service is given up to ``--drain-timeout`` seconds to finish its
backlog, so one phase's decisions do not run inside the next phase's window.

How
---
The service (``python -m controller.cli serve``) and the baseline are each pinned to the same
single core with ``taskset -c N`` (``--core``, default: the last core); this process pins
itself to the other cores. CPU seconds of the server and of this process over the window are
printed, so a saturated load generator (which would flatter the ratio) shows.

Nothing here passes or fails on wall-clock time: it prints numbers. Run it by hand:

    python bench/whatsapp_ingest.py --clients 16 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from controller.testing_graph import FakeGraph, change, envelope, signature

PHONE_NUMBER_ID = "106540352242922"
APP_SECRET = "bench-app-secret-" + "7f3a9c"  # not a placeholder: the service refuses those


# the baseline ---------------------------------------------------------------------------------
def baseline_main(port: int, app_secret: str) -> None:
    """A bare aiohttp endpoint: raw body, HMAC-SHA256 check, 200."""
    from aiohttp import web

    key = app_secret.encode()

    async def webhook(request: web.Request) -> web.Response:
        raw = await request.read()
        scheme, _, given = request.headers.get("X-Hub-Signature-256", "").partition("=")
        expected = hmac.new(key, raw, hashlib.sha256).hexdigest()
        if scheme != "sha256" or not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response({"error": "bad_signature"}, status=403)
        return web.json_response({"ok": True})

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/webhooks/whatsapp", webhook)
    app.router.add_get("/readyz", ready)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def baseline_server(core: int) -> C.BaselineProcess:
    """The signature-only aiohttp baseline, pinned to ``core``."""
    return C.BaselineProcess(
        core, lambda port: [__file__, "--baseline", str(port), APP_SECRET], ("GET", "/readyz")
    )


# the load generator ---------------------------------------------------------------------------
class Bodies:
    """Signed delivery bodies with fresh ``wamid``s, customers taken round-robin."""

    def __init__(self, tag: str, customers: int) -> None:
        self.tag = tag
        self.ids = itertools.count(1)
        self.users = itertools.cycle([f"35191{i:07d}" for i in range(customers)])

    def next(self, batch: int) -> tuple[bytes, dict[str, str]]:
        now = str(int(time.time()))
        messages = []
        for _ in range(batch):
            n = next(self.ids)
            messages.append(
                {
                    "from": next(self.users),
                    "id": f"wamid.{self.tag}.{n:09d}",
                    "timestamp": now,
                    "type": "text",
                    "text": {"body": f"hello {n}"},
                }
            )
        body = json.dumps(envelope([change(PHONE_NUMBER_ID, messages=messages)])).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signature(body, APP_SECRET),
        }
        return body, headers


async def closed_loop(
    url: str, pid: int, batch: int, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    """K senders, one delivery in flight each, for warmup + seconds."""
    bodies = Bodies(tag, args.customers)
    window: dict[str, float] = {}
    done = 0
    errors: dict[int, int] = {}
    latencies: list[float] = []
    stop_at = time.monotonic() + args.warmup + args.seconds
    connector = aiohttp.TCPConnector(limit=args.clients * 2)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def sender() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                body, headers = bodies.next(batch)
                started = time.monotonic()
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                finished = time.monotonic()
                if "start" in window and finished <= window["end"]:
                    if status == 200:
                        done += 1
                        latencies.append((finished - started) * 1000)
                    else:
                        errors[status] = errors.get(status, 0) + 1

        async def clock() -> None:
            await asyncio.sleep(args.warmup)
            window.update(
                start=time.monotonic(),
                end=time.monotonic() + args.seconds,
                server_cpu=C.cpu_seconds(pid),
                self_cpu=time.process_time(),
            )
            await asyncio.sleep(args.seconds)
            window.update(
                server_cpu_end=C.cpu_seconds(pid),
                self_cpu_end=time.process_time(),
            )

        await asyncio.gather(clock(), *(sender() for _ in range(args.clients)))
    seconds = args.seconds
    return {
        "batch": batch,
        "deliveries": done,
        "deliveries_per_s": done / seconds,
        "msgs_per_s": done * batch / seconds,
        "errors": errors,
        "p50_ms": C.percentile(latencies, 50),
        "p99_ms": C.percentile(latencies, 99),
        "server_cpu_pct": 100 * (window["server_cpu_end"] - window["server_cpu"]) / seconds,
        "loadgen_cpu_pct": 100 * (window["self_cpu_end"] - window["self_cpu"]) / seconds,
    }


def service_env(graph: FakeGraph) -> dict[str, str]:
    connectors = [
        {
            "name": "whatsapp",
            "type": "whatsapp",
            "settings": {
                "graph_base_url": graph.base_url,
                "graph_api_version": graph.version,
                "app_secret": APP_SECRET,
                "verify_token": "bench-verify-" + secrets.token_hex(4),
                "endpoints": [
                    {"phone_number_id": PHONE_NUMBER_ID, "access_token": "bench-token-2f9d71"}
                ],
                "max_body_bytes": 4 * 1024 * 1024,
            },
        },
        {"name": "demo", "type": "demo_bot"},
    ]
    return {"CONVCTL_CONNECTORS": json.dumps(connectors)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    out: dict[str, Any] = {
        "server_core": core,
        "loadgen_cores": sorted(others),
        "clients": args.clients,
        "seconds": args.seconds,
        "batches": args.batches,
    }
    graph = await FakeGraph().start()
    data = C.work_dir(args.data_dir, "convctl-bench-whatsapp-")
    service = C.PinnedService(data, core, env=service_env(graph))
    service.start()
    url = service.base_url + "/webhooks/whatsapp"
    try:
        out["service_ready_s"] = await service.wait_ready()
        out["service"] = {}
        for batch in args.batches:
            result = await closed_loop(url, service.pid, batch, f"S{batch}", args)
            try:
                result["drain_s"] = await C.wait_quiet(service, timeout=args.drain_timeout)
            except TimeoutError as exc:
                result["drain_s"] = None
                result["drain_note"] = str(exc)
            out["service"][batch] = result
        out["service_log"] = C.count_log_levels(service)
        out["graph_sends"] = len(graph.sent())
        out["graph_reads"] = len(graph.reads())
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()
        await graph.stop()
    out["data_dir"] = str(data)

    baseline = baseline_server(core)
    baseline.start()
    try:
        await baseline.wait_ready()
        out["baseline"] = {}
        for batch in args.batches:
            burl = baseline.base_url + "/webhooks/whatsapp"
            out["baseline"][batch] = await closed_loop(burl, baseline.pid, batch, f"B{batch}", args)
    finally:
        baseline.stop()

    out["ratio_pct"] = {}
    for batch in args.batches:
        s, b = out["service"][batch]["msgs_per_s"], out["baseline"][batch]["msgs_per_s"]
        out["ratio_pct"][batch] = 100.0 * s / b if b else None
    return out


def report(out: dict[str, Any]) -> None:
    fmt = C.fmt
    print(
        f"server core {out['server_core']}, load generator cores {out['loadgen_cores']}, "
        f"{out['clients']} senders, {out['seconds']} s window; data in {out['data_dir']}"
    )
    for batch in out["batches"]:
        s, b = out["service"][batch], out["baseline"][batch]
        print(f"\nbatch of {batch} message(s) per POST     convctl      baseline")
        for key, label in (
            ("deliveries_per_s", "deliveries/s (200)"),
            ("msgs_per_s", "messages/s"),
            ("p50_ms", "POST->200 p50 ms"),
            ("p99_ms", "POST->200 p99 ms"),
            ("server_cpu_pct", "server CPU %"),
            ("loadgen_cpu_pct", "load gen CPU %"),
        ):
            print(f"{label:<32}{fmt(s.get(key), 2):>10}  {fmt(b.get(key), 2):>12}")
        print(
            f"{'non-200 answers':<32}{s['errors'] or 'none'!s:>10}  {b['errors'] or 'none'!s:>12}"
        )
        print(f"{'ratio convctl/baseline':<32}{fmt(out['ratio_pct'][batch])} %")
        print(f"{'service backlog drained in s':<32}{fmt(s.get('drain_s'))}")
    print(
        f"\nfake Graph: {out['graph_sends']} bot answers sent, {out['graph_reads']} read receipts"
    )
    problems = {
        k: v for k, v in out["service_log"].items() if not k.startswith(("info:", "debug:"))
    }
    print(f"service log (non-info lines by level:event): {problems or 'none'}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--baseline":
        baseline_main(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-k", type=int, default=16, help="concurrent senders (K)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 20], help="messages per POST")
    parser.add_argument("--customers", type=int, default=200, help="distinct senders (wa_id)")
    C.run_service_bench(
        parser,
        main_async,
        report,
        core_help="core for server and baseline",
        drain_timeout=120.0,
        drain_help="max seconds to wait for the service's backlog between phases",
    )


if __name__ == "__main__":
    main()
