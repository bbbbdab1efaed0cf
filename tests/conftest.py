from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.testing import Service, test_settings

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


@pytest.fixture
async def service(make_service: Callable[..., Any], clock: ManualClock) -> Service:
    svc: Service = await make_service(clock=clock)
    return svc


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (browser tests screenshot failures)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
