"""The inbox: every event enters here, is stored once, and only then acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import structlog

from controller.clock import Clock
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.store.base import Accepted, CustomerChange, NewOutbox, Notify, Store

log = structlog.get_logger(__name__)


class Inbox:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notify: Callable[[Iterable[str]], None],
        *,
        first_contact_notices: Callable[[], Notify | None] | None = None,
        notices_written: Callable[[], None] | None = None,
    ) -> None:
        """``first_contact_notices`` says who hears ``profile.created`` for the anonymous
        customer a first contact makes (None: nobody, nothing extra is done);
        ``notices_written`` wakes their deliverer after a commit that wrote some."""
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notify = notify
        self._first_contact_notices = first_contact_notices
        self._notices_written = notices_written

    async def submit(self, events: Sequence[NewEvent]) -> list[Accepted]:
        """Store events (one transaction), then wake their conversations' workers.

        Returns after the commit: the caller may acknowledge. A redelivered event (same
        source and dedupe key) is reported as a duplicate and changes nothing.
        """
        notices = self._notices_for(events)
        created: list[str] = []  # customers announced (filled inside the store's transaction)
        if notices is None:
            accepted = await self._store.accept(events, self._clock.now())
        else:

            def announce(change: CustomerChange) -> Sequence[NewOutbox]:
                created.append(change.customer_id)
                return notices(change)

            accepted = await self._store.accept(events, self._clock.now(), notify=announce)
        if created and self._notices_written is not None:
            self._notices_written()
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

    def _notices_for(self, events: Sequence[NewEvent]) -> Notify | None:
        """Only an event without a conversation can be a first contact; only then is the
        subscriber index asked."""
        if self._first_contact_notices is None:
            return None
        if all(ev.conversation_id is not None for ev in events):
            return None
        return self._first_contact_notices()
