"""Profile notifications survive SIGKILL: ``convctl serve`` is killed while API clients
create and change customers; after a restart every committed customer version has exactly
one notification (by delivery id) and no notification names a version that was never
committed. Size knob: CONVCTL_CRASH_CUSTOMERS (default 60). CONVCTL_TEST_STORE=postgres
runs the service on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.clock import SystemClock
from controller.testing import (
    ServiceProcess,
    drop_postgres_test_schemas,
    postgres_test_schema,
    postgres_test_url,
)
from tests.controller.test_app_webhooks import Receiver

CUSTOMERS = int(os.environ.get("CONVCTL_CRASH_CUSTOMERS", "60"))
CHANGES = 4  # PATCHes per customer after its creation
ADMIN = {"Authorization": "Bearer proc-admin-token"}


class Writer:
    """One CRM client: creates its customer, then changes it, retrying through restarts;
    records the versions the service acknowledged."""

    def __init__(self, n: int, progress: asyncio.Condition) -> None:
        self.n = n
        self.customer_id: str | None = None
        self.acked: list[int] = []
        self.progress = progress

    async def _ack(self, version: int) -> None:
        async with self.progress:
            self.acked.append(version)
            self.progress.notify_all()

    async def run(self, base: str, http: aiohttp.ClientSession) -> None:
        while len(self.acked) < 1 + CHANGES:
            try:
                await self._step(base, http)
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(0.05)

    async def _step(self, base: str, http: aiohttp.ClientSession) -> None:
        if self.customer_id is None:
            # the Idempotency-Key makes a retry after a kill the same creation
            headers = {**ADMIN, "Idempotency-Key": f"create-{self.n}"}
            body = {"name": f"Crash {self.n}", "external_id": f"crash-{self.n}"}
            async with http.post(f"{base}/api/v1/customers", json=body, headers=headers) as r:
                assert r.status == 201, await r.text()
                made = await r.json()
            self.customer_id = made["id"]
            await self._ack(made["version"])
            return
        path = f"{base}/api/v1/customers/{self.customer_id}"
        async with http.get(path, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
            current = await r.json()
        body = {"custom": {"step": len(self.acked)}}
        headers = {**ADMIN, "If-Match": f'"{current["version"]}"'}
        async with http.patch(path, json=body, headers=headers) as r:
            if r.status == 412:
                return  # a PATCH committed before a kill: read again
            assert r.status == 200, await r.text()
            await self._ack((await r.json())["version"])


async def _outbox_state(tmp_path: Path, schema: str | None) -> list[tuple[Any, ...]]:
    """The pending outbox rows as stored (to say why they are still pending)."""
    sql = (
        "SELECT id, conversation_id, claimed, attempts, next_attempt_at, last_error "
        "FROM outbox WHERE status = 'pending' ORDER BY id LIMIT 20"
    )
    if schema is None:
        with sqlite3.connect(tmp_path / "convctl.db") as conn:
            return list(conn.execute(sql).fetchall())
    import asyncpg

    conn = await asyncpg.connect(postgres_test_url())
    try:
        await conn.execute(f'SET search_path TO "{schema}"')
        return [
            tuple(r)
            for r in await conn.fetch(sql.replace("claimed,", "claimed, claimed_by, unsure,"))
        ]
    finally:
        await conn.close()


async def _ready(proc: ServiceProcess) -> None:
    proc.start()
    await proc.wait_ready()


@pytest.mark.timeout(300)
async def test_notifications_are_neither_lost_nor_invented_by_a_kill(tmp_path: Path) -> None:
    receiver = Receiver(SystemClock())  # type: ignore[arg-type]
    await receiver.start()
    env = {"CONVCTL_APPS__BACKOFF_BASE": "0.05", "CONVCTL_APPS__BACKOFF_MAX": "0.2"}
    schema = None
    if os.environ.get("CONVCTL_TEST_STORE") == "postgres":
        schema = postgres_test_schema(tmp_path)
        env |= {"CONVCTL_DATABASE_URL": postgres_test_url(), "CONVCTL_DATABASE_SCHEMA": schema}
    proc = ServiceProcess(tmp_path, env)
    await _ready(proc)
    try:
        async with aiohttp.ClientSession() as http:
            base = proc.base_url
            async with http.post(
                f"{base}/api/v1/apps",
                json={
                    "name": "crm",
                    "scopes": ["events:subscribe", "customers:read"],
                    "webhook_url": receiver.url,
                },
                headers=ADMIN,
            ) as r:
                app: dict[str, Any] = await r.json()
                assert r.status == 201, app
            receiver.secrets.append(app["webhook_secret"])
            token = {"Authorization": f"Bearer {app['token']}"}
            async with http.post(
                f"{base}/api/v1/apps/me/subscriptions",
                json={"event_types": ["profile.created", "profile.updated"]},
                headers=token,
            ) as r:
                assert r.status == 201, await r.text()

            progress = asyncio.Condition()
            writers = [Writer(n, progress) for n in range(CUSTOMERS)]
            work = asyncio.gather(*(w.run(base, http) for w in writers))
            total = CUSTOMERS * (1 + CHANGES)
            for kill in (1, 2):  # at a third and two thirds of the writes, deliveries in flight
                async with progress:
                    await progress.wait_for(
                        lambda k=kill: sum(len(w.acked) for w in writers) >= total * k // 3
                    )
                proc.kill()
                await _ready(proc)
            await asyncio.wait_for(work, 120)

            # every pending delivery done after the restart
            for _ in range(2400):  # a restarted process may first wait for leases
                async with http.get(
                    f"{base}/api/v1/apps/me/deliveries?status=pending&limit=5", headers=token
                ) as r:
                    pending = (await r.json())["deliveries"]
                if not pending:
                    break
                await asyncio.sleep(0.05)
            assert not pending, await _outbox_state(tmp_path, schema)
            async with http.get(
                f"{base}/api/v1/apps/me/deliveries?status=dead&limit=5", headers=token
            ) as r:
                dead = (await r.json())["deliveries"]
            assert not dead, dead
            async with http.get(f"{base}/api/v1/customers/export", headers=ADMIN) as r:
                assert r.status == 200
                stored = [json.loads(line) for line in (await r.text()).splitlines()]
    finally:
        proc.terminate()
        await receiver.stop()
        if schema is not None:
            await drop_postgres_test_schemas([schema])

    assert all(d.refused is None for d in receiver.deliveries)
    delivered: dict[str, set[int]] = defaultdict(set)
    for d in receiver.deliveries:
        delivered[d.body["customer_id"]].add(d.body["version"])
    versions = {c["id"]: c["version"] for c in stored}
    assert len(versions) == CUSTOMERS  # the idempotent creation made each customer once
    for writer in writers:
        assert writer.customer_id is not None
        # every acknowledged version was committed and announced
        assert set(writer.acked) <= delivered[writer.customer_id]
    for customer_id, last in versions.items():
        # one notification per committed version, none for a version never committed
        assert delivered[customer_id] == set(range(1, last + 1)), customer_id
    assert set(delivered) == set(versions)
