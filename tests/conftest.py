from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.errors import ConvctlError
from controller.testing import Service, drop_postgres_test_schemas, test_settings

os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/convctl-hypothesis")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Service] = []

    async def make(clock: ManualClock | None = None, **overrides: Any) -> Service:
        svc = Service(test_settings(tmp_path, **overrides), clock=clock)
        await svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in reversed(started):
        await svc.stop()
    # CONVCTL_TEST_STORE=postgres: the services' schema goes with the test
    schemas = {svc.settings.database_schema for svc in started if svc.settings.database_schema}
    await drop_postgres_test_schemas(schemas)


@pytest.fixture
async def service(make_service: Callable[..., Any], clock: ManualClock) -> Service:
    svc: Service = await make_service(clock=clock)
    return svc


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop the PostgreSQL schemas of test services started outside ``make_service``."""
    if os.environ.get("CONVCTL_TEST_STORE") == "postgres":
        try:
            asyncio.run(drop_postgres_test_schemas())
        except (OSError, ConvctlError) as exc:
            print(f"could not drop the test schemas: {exc!r}", file=sys.stderr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (browser tests screenshot failures)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
