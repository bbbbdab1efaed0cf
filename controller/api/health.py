"""Liveness, readiness and Prometheus metrics.

``/healthz`` says the process answers. ``/readyz`` says it can do its work: recovery is done
and the database answers a small query within ``READY_DB_TIMEOUT`` seconds; a load balancer
stops sending traffic to a process whose database is gone, and sends it again once it is back.
A stopping process (SIGTERM) is not ready from the first step of its shutdown on
(``stopping``), while it finishes its decisions and hands its conversations over.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.keys import CLUSTER, METRICS, READY, STORE

log = structlog.get_logger(__name__)

READY_DB_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY]
    if not state.get("ready"):
        status = "stopping" if state.get("stopping") else "starting"
        return web.json_response({"status": status}, status=503)
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT):
            await request.app[STORE].outbox_next_due()  # one indexed read
    except Exception as exc:  # any failure of the database means "not ready"
        log.warning("readiness_database_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return web.json_response({"status": "database_unavailable"}, status=503)
    answer = {"status": "ready", **{k: v for k, v in state.items() if k != "ready"}}
    cluster = request.app[CLUSTER]
    if cluster is not None:  # several processes: agents' desks belong on the router's
        answer["runs_router"] = cluster.leader
    return web.json_response(answer)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def routes() -> list[web.RouteDef]:
    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
