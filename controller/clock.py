"""Clocks: the real one and a manual one for tests. Everything time-dependent takes a Clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, when: datetime) -> None:
        """Return once ``now() >= when`` (a deadline, so a late caller never oversleeps)."""


class SystemClock:
    """Wall-clock time in UTC; sleeping is asyncio's."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(max(0.0, (when - self.now()).total_seconds()))


class ManualClock:
    """A clock that moves only when a test calls ``advance``; sleepers wake when due."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
        self._changed = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + timedelta(seconds=max(0.0, seconds)))

    async def sleep_until(self, when: datetime) -> None:
        while self._now < when:
            self._changed.clear()
            await self._changed.wait()

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._changed.set()


async def sleep_until_woken(clock: Clock, deadline: datetime, wake: asyncio.Event) -> None:
    """Return at ``deadline`` or as soon as ``wake`` is set, whichever comes first."""
    sleeper = asyncio.ensure_future(clock.sleep_until(deadline))
    waker = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waker.cancel()
