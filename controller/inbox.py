"""The inbox: every event enters here, is stored once, and only then acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import structlog

from controller.clock import Clock
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.store.base import Accepted, Store

log = structlog.get_logger(__name__)


class Inbox:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notify: Callable[[Iterable[str]], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notify = notify

    async def submit(self, events: Sequence[NewEvent]) -> list[Accepted]:
        """Store events (one transaction), then wake their conversations' workers.

        Returns after the commit: the caller may acknowledge. A redelivered event (same
        source and dedupe key) is reported as a duplicate and changes nothing.
        """
        accepted = await self._store.accept(events, self._clock.now())
        fresh = []
        for ev, result in zip(events, accepted, strict=True):
            if result.duplicate:
                self._metrics.events_duplicate.labels(ev.source).inc()
                log.info("event_duplicate", source=ev.source, event_id=result.event_id)
            else:
                self._metrics.events_accepted.labels(ev.type).inc()
                fresh.append(result.conversation_id)
        if fresh:
            self._notify(fresh)
        return accepted
