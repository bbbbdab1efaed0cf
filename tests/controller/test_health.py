"""Readiness follows the database."""

from __future__ import annotations

import pytest

from controller.testing import Service


async def _ready(service: Service) -> tuple[int, dict[str, object]]:
    assert service.http is not None
    async with service.http.get(service.base_url + "/readyz") as r:
        return r.status, await r.json()


async def test_readiness_follows_the_database(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = await _ready(service)
    assert status == 200 and body["status"] == "ready"

    async def broken() -> None:
        raise OSError("the database is gone")

    monkeypatch.setattr(service.store, "outbox_next_due", broken)
    status, body = await _ready(service)
    assert status == 503 and body == {"status": "database_unavailable"}
    monkeypatch.undo()
    status, _ = await _ready(service)
    assert status == 200
