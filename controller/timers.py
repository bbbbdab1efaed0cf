"""Persisted timers: rows in the store, a heap in memory, one task that fires them when due.

Firing a timer is one transaction that deletes the row and stores a ``timer.fired`` event
(dedupe key: conversation, name, generation), so a crash between the two cannot lose or
double a firing. At start, every stored timer is loaded; overdue ones fire at once.

Several processes (PostgreSQL): nothing is loaded at start. The heap holds the timers this
process's decisions set; every ``poll`` seconds the process also claims due timers nobody has
claimed (``FOR UPDATE SKIP LOCKED``, the claimer recorded) and fires them: timers of
conversations taken over from a dead process, or set before this process started. The poll
looks ``poll`` seconds back, so an owner's heap fires its own timers first; of two firings of
one timer, the store lets one through.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

import structlog

from controller.clock import Clock, sleep_until_woken
from controller.metrics import Metrics
from controller.store.base import Committed, DecisionRecord, Store, TimerRow

log = structlog.get_logger(__name__)

# (now, limit) -> due timers, now claimed by this process (``PostgresStore.claim_timers``)
ClaimTimers = Callable[[datetime, int], Awaitable[list[TimerRow]]]
_CLAIM_BATCH = 200


# Stale heap entries allowed beyond twice the pending timers before the heap is rebuilt.
COMPACT_SLACK = 1024


class Timers:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notify: Callable[[Iterable[str]], None],
        *,
        claim: ClaimTimers | None = None,
        poll: float = 1.0,
    ) -> None:
        self._store = store
        self._claim = claim
        self._poll = timedelta(seconds=poll)
        self._clock = clock
        self._metrics = metrics
        self._notify = notify
        self._heap: list[tuple[float, str, str, int]] = []
        # (conversation, name) -> generation currently wanted; heap entries of other
        # generations are skipped when popped (lazy deletion).
        self._current: dict[tuple[str, str], int] = {}
        self._names: dict[str, set[str]] = {}  # conversation -> names in _current
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        if self._claim is not None:  # several processes: the poll finds them when due
            self._task = asyncio.create_task(self._loop(), name="timers")
            return 0
        rows = await self._store.timers()
        for row in rows:
            self._push(row)
        self._task = asyncio.create_task(self._loop(), name="timers")
        return len(rows)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Look for due timers now (claims of a dead process were released)."""
        self._wake.set()

    def after_commit(self, record: DecisionRecord, committed: Committed) -> None:
        cid = record.after.id
        for op in record.timers:
            if op.due_at is None:
                self._forget(cid, op.name)
            else:
                self._push(TimerRow(cid, op.name, op.generation, op.due_at))
        if record.after.state == "closed":  # closing cancels every timer of the conversation
            for name in list(self._names.get(cid, ())):
                self._forget(cid, name)
        self._metrics.timers_pending.set(len(self._current))

    def _forget(self, cid: str, name: str) -> None:
        self._current.pop((cid, name), None)
        names = self._names.get(cid)
        if names is not None:
            names.discard(name)
            if not names:
                del self._names[cid]

    def _push(self, row: TimerRow) -> None:
        self._current[(row.conversation_id, row.name)] = row.generation
        self._names.setdefault(row.conversation_id, set()).add(row.name)
        heapq.heappush(
            self._heap, (row.due_at.timestamp(), row.conversation_id, row.name, row.generation)
        )
        if len(self._heap) > 2 * len(self._current) + COMPACT_SLACK:
            self._compact()
        self._wake.set()

    def _compact(self) -> None:
        """Drop the heap's entries of timers restarted or cancelled since. They are skipped
        lazily when due, but a timer restarted on every message (an idle timeout of hours)
        would otherwise leave one entry per message until its old due time: memory that
        grows with the message rate, not with the timers pending."""
        self._heap = [e for e in self._heap if self._current.get((e[1], e[2])) == e[3]]
        heapq.heapify(self._heap)

    async def _loop(self) -> None:
        while True:
            try:
                await self._fire_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer_loop_failed")
                await self._clock.sleep(1.0)

    async def _fire_due(self) -> None:
        self._wake.clear()
        now = self._clock.now()
        while self._heap and self._heap[0][0] <= now.timestamp():
            _due, cid, name, generation = heapq.heappop(self._heap)
            if self._current.get((cid, name)) != generation:
                continue
            row = TimerRow(cid, name, generation, now)
            accepted = await self._store.fire_timer(row, now)
            if self._current.get((cid, name)) == generation:
                self._forget(cid, name)
            if accepted is not None:
                self._metrics.timers_fired.inc()
                self._notify([accepted.conversation_id])
        if self._claim is not None:
            await self._fire_claimed(now)
        self._metrics.timers_pending.set(len(self._current))
        deadline = (
            datetime.fromtimestamp(self._heap[0][0], UTC)
            if self._heap
            else now + timedelta(hours=1)
        )
        if self._claim is not None:
            deadline = min(deadline, now + self._poll)
        await sleep_until_woken(self._clock, deadline, self._wake)

    async def _fire_claimed(self, now: datetime) -> None:
        assert self._claim is not None
        while True:
            rows = await self._claim(now - self._poll, _CLAIM_BATCH)
            for row in rows:
                accepted = await self._store.fire_timer(row, now)
                if accepted is not None:
                    self._metrics.timers_fired.inc()
                    self._notify([accepted.conversation_id])
            if len(rows) < _CLAIM_BATCH:
                return
