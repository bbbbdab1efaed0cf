"""The outbox dispatcher: delivers committed side effects, at least once, in order.

Rows are claimed from the store, delivered by destination (a channel, a bot, the agent desk)
and marked done; a failure known to be retryable is retried with exponential backoff and
jitter, up to a limit, then the row becomes a dead letter. Rows of one conversation and
destination never overtake each other; a slow or failing destination never blocks others.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog

from controller.clock import Clock, sleep_until_woken
from controller.errors import ConvctlError
from controller.metrics import Metrics
from controller.store.base import Committed, DecisionRecord, OutboxRow, Store

log = structlog.get_logger(__name__)


class DeliveryFailed(ConvctlError):
    """A delivery failed; ``retryable`` says whether trying again can help."""

    code = "delivery_failed"

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        # The receiver asked for this pause (HTTP Retry-After), in seconds: the next try
        # waits at least this long.
        self.retry_after: float | None = None


Handler = Callable[[OutboxRow], Awaitable[None]]
DeadHandler = Callable[[OutboxRow, str], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, deliveries to one destination are tried."""

    max_attempts: int
    backoff_base: float
    backoff_max: float


PolicyLookup = Callable[[str], "RetryPolicy | None"]


class Dispatcher:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        *,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        batch: int = 200,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._batch = batch
        self._handlers: dict[str, Handler] = {}
        self._on_dead: dict[str, DeadHandler] = {}
        self._policies: dict[str, PolicyLookup] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lanes: dict[tuple[str, str], deque[tuple[OutboxRow, bool]]] = {}
        self._lane_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._chores: set[asyncio.Future[None]] = set()
        self._claiming = False
        self._rng = random.Random()
        self.delivered = 0

    def register(
        self,
        prefix: str,
        handler: Handler,
        on_dead: DeadHandler | None = None,
        policy: PolicyLookup | None = None,
    ) -> None:
        """Deliver rows whose destination is ``prefix`` or starts with ``prefix:``.

        ``policy`` gives a destination its own attempts and backoff (bots answer within
        seconds or not at all); the dispatcher's defaults apply where it gives None.
        """
        self._handlers[prefix] = handler
        if on_dead is not None:
            self._on_dead[prefix] = on_dead
        if policy is not None:
            self._policies[prefix] = policy

    def _policy(self, prefix: str, destination: str) -> RetryPolicy:
        lookup = self._policies.get(prefix)
        found = lookup(destination) if lookup is not None else None
        return found or RetryPolicy(self._max_attempts, self._backoff_base, self._backoff_max)

    def wake(self, *_: object) -> None:
        self._wake.set()

    def after_commit(self, record: DecisionRecord, committed: Committed) -> None:
        self.take(committed.outbox)

    def take(self, rows: list[OutboxRow]) -> None:
        """Deliver rows just committed (and claimed in the same transaction) without polling.

        A lane that is waiting for a retry, or still has older rows in the store, does not
        take them: they are released to the store and delivered after the older ones.
        """
        held = []
        for row in rows:
            key = (row.conversation_id, row.destination)
            if key in self._blocked:
                held.append(row.id)
            else:
                self._enqueue(key, row)
        if held:
            self._background(self._release(held))

    async def _release(self, ids: list[int]) -> None:
        """Hand rows back to the store and wake the poller: they are due now, and it may be
        asleep until a later deadline computed before they existed."""
        await self._store.outbox_release(ids)
        self._wake.set()

    async def wait_quiet(self) -> bool:
        """Wait for deliveries in flight; True if nothing is left that is due now."""
        while self._claiming or self._lane_tasks or self._chores:
            pending = [*self._lane_tasks.values(), *self._chores]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # a claim is on its way to the store and back
        due = await self._store.outbox_next_due()
        if due is not None and due <= self._clock.now():
            self._wake.set()
            await asyncio.sleep(0)
            return False
        return not self._lane_tasks

    async def start(self) -> None:
        # Lanes with rows left by a previous process are served from the store first.
        self._blocked.update(await self._store.outbox_pending_lanes())
        self._task = asyncio.create_task(self._loop(), name="outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        pending = [*self._lane_tasks.values(), *self._chores]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self) -> None:
        """Poll the store for rows the fast path did not take: retries and recovered rows."""
        while True:
            try:
                self._wake.clear()
                self._claiming = True
                try:
                    rows = await self._store.claim_outbox(self._clock.now(), self._batch)
                    for row in rows:
                        self._enqueue((row.conversation_id, row.destination), row, stored=True)
                finally:
                    self._claiming = False
                if len(rows) == self._batch:
                    continue  # more may be due right now
                await self._sleep_until_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox_loop_failed")
                await self._clock.sleep(1.0)

    async def _sleep_until_due(self) -> None:
        due = await self._store.outbox_next_due()
        deadline = due if due is not None else self._clock.now() + timedelta(minutes=1)
        if deadline <= self._clock.now():
            return
        await sleep_until_woken(self._clock, deadline, self._wake)

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _enqueue(self, key: tuple[str, str], row: OutboxRow, *, stored: bool = False) -> None:
        # One task per lane (conversation, destination) keeps its order; lanes run in parallel.
        self._lanes.setdefault(key, deque()).append((row, stored))
        if key not in self._lane_tasks:
            self._lane_tasks[key] = asyncio.create_task(self._run_lane(key))

    async def _run_lane(self, key: tuple[str, str]) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                row, stored = lane.popleft()
                if not await self._deliver(row):
                    # The lane waits for the failed row's retry; rows behind it go back to
                    # the store, to be delivered after it.
                    self._blocked.add(key)
                    rest = [r.id for r, _ in lane]
                    lane.clear()
                    await self._store.outbox_release(rest)
                    self._wake.set()  # the released rows are the poller's now
                elif (
                    stored
                    and key in self._blocked
                    and not lane
                    and not await self._store.outbox_lane_pending(*key)
                ):
                    self._blocked.discard(key)  # caught up: new rows may take the fast path
        finally:
            del self._lane_tasks[key]
            if not lane:
                self._lanes.pop(key, None)
            if key in self._blocked:
                self._wake.set()  # stored rows that waited behind this lane may be due now

    def _handler(self, destination: str) -> tuple[str, Handler | None]:
        prefix = destination.split(":", 1)[0]
        return prefix, self._handlers.get(prefix)

    async def _deliver(self, row: OutboxRow) -> bool:
        prefix, handler = self._handler(row.destination)
        structlog.contextvars.bind_contextvars(conversation_id=row.conversation_id)
        try:
            if handler is None:
                raise DeliveryFailed(f"no connector for {row.destination!r}", retryable=False)
            await handler(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = getattr(exc, "retryable", isinstance(exc, (OSError, TimeoutError)))
            error = f"{type(exc).__name__}: {exc}"
            attempts = row.attempts + 1
            policy = self._policy(prefix, row.destination)
            if retryable and attempts < policy.max_attempts:
                delay = min(policy.backoff_max, policy.backoff_base * 2 ** (attempts - 1))
                delay *= 0.5 + self._rng.random() / 2
                asked = getattr(exc, "retry_after", None)
                if isinstance(asked, (int, float)) and asked > delay:
                    delay = float(asked)
                at = self._clock.now() + timedelta(seconds=delay)
                await self._store.outbox_retry(row.id, at, error)
                self._metrics.outbox_retries.labels(prefix).inc()
                log.warning(
                    "outbox_retry",
                    destination=row.destination,
                    attempts=attempts,
                    error=error,
                    retry_in=round(delay, 3),
                )
            else:
                await self._store.outbox_dead(row.id, error)
                self._metrics.outbox_dead.labels(prefix).inc()
                log.error(
                    "outbox_dead", destination=row.destination, attempts=attempts, error=error
                )
                on_dead = self._on_dead.get(prefix)
                if on_dead is not None:
                    await on_dead(row, error)
            return False
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id")
        await self._store.outbox_done(row.id)
        self.delivered += 1
        self._metrics.outbox_sent.labels(prefix).inc()
        return True
