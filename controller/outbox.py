"""The outbox dispatcher: delivers committed side effects, at least once, in order.

Rows are claimed from the store, delivered by destination (a channel, a bot, the agent desk)
and marked done; a failure known to be retryable is retried with exponential backoff and
jitter, up to a limit, then the row becomes a dead letter. Rows of one conversation and
destination never overtake each other; a slow or failing destination never blocks others.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog

from controller.clock import Clock, sleep_until_woken
from controller.errors import ConvctlError, StoreUnavailable
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


class StatusConfirmations(Protocol):
    """What a destination whose provider reports delivery statuses naming our sends offers
    for rows whose fate is unknown (see ``Dispatcher.confirm_by_status``)."""

    def hold(self, row: OutboxRow) -> float | None:
        """Seconds to wait for the status (None: send it again at once; 0: a status already
        came and the send will know)."""

    async def seen(self, row: OutboxRow) -> bool:
        """Whether a status naming the row's send was already stored (the provider has it)."""


UNSURE_CLAIMED = 1  # claimed, maybe in flight, when its process died
UNSURE_HELD = 2  # waiting for a delivery status, or for its hold to pass


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
        self._stopping = False  # bookkeeping stops waiting for the database
        self._claiming = False
        self._rng = random.Random()
        self._confirmations: dict[str, StatusConfirmations] = {}
        # held rows by (destination, idempotency key): what a delivery status can confirm
        self._unconfirmed: dict[tuple[str, str], int] = {}
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

    def confirm_by_status(self, prefix: str, confirmations: StatusConfirmations) -> None:
        """Rows of ``prefix`` whose fate is unknown (claimed when the process died, or a
        send that failed after the provider may have taken it) are not sent again at once:
        one whose status was already stored is done; the others wait ``hold(row)`` seconds
        for the provider's delivery status, which ``confirm`` turns into done. Only a row
        no status confirmed in time goes out again."""
        self._confirmations[prefix] = confirmations

    def holds(self, destination: str, key: str) -> bool:
        """Whether ``key`` (a row's idempotency key, or ``KEY:i`` for a part of the message)
        names a row held for its delivery status."""
        if (destination, key) in self._unconfirmed:
            return True
        row_key, _, part = key.rpartition(":")
        return part.isdigit() and (destination, row_key) in self._unconfirmed

    async def confirm(self, destination: str, idempotency_key: str) -> OutboxRow | None:
        """The provider has the message sent under ``idempotency_key``: if its row waits for
        that news, it is done (returned); the lane behind it moves on."""
        row_id = self._unconfirmed.pop((destination, idempotency_key), None)
        if row_id is None:
            return None
        row = await self._store.outbox_confirm(row_id)
        if row is not None:
            self.delivered += 1
            self._metrics.outbox_confirmed.labels(destination.split(":", 1)[0]).inc()
            log.info("outbox_confirmed_by_status", destination=destination, row_id=row_id)
            self._wake.set()
        return row

    async def _stored_status(self, row: OutboxRow) -> bool:
        """Whether a stored delivery status shows the provider has the row's send (it
        reached the store while the row was in flight or held, maybe through another
        process); if so the row is done."""
        confirmations = self._confirmations.get(row.destination.split(":", 1)[0])
        if confirmations is None or not await confirmations.seen(row):
            return False
        await self._store.outbox_done(row.id)
        self._metrics.outbox_confirmed.labels(row.destination.split(":", 1)[0]).inc()
        log.info("outbox_confirmed_by_stored_status", destination=row.destination)
        return True

    async def _settle_unsure(self, row: OutboxRow, error: str | None = None) -> bool | None:
        """A row the provider may already have: True if a stored status shows it does (the
        row is done), False if it is held for its status, None if it is to be sent as
        usual (its destination cannot confirm, or a status already reached the sender)."""
        confirmations = self._confirmations.get(row.destination.split(":", 1)[0])
        if confirmations is None:
            return None
        if await self._stored_status(row):
            return True
        hold = confirmations.hold(row)
        if hold is None or hold <= 0:
            return None
        until = self._clock.now() + timedelta(seconds=hold)
        await self._store.outbox_hold(row.id, until, error)
        self._unconfirmed[(row.destination, row.idempotency_key)] = row.id
        self._metrics.outbox_held.labels(row.destination.split(":", 1)[0]).inc()
        log.warning(
            "outbox_held_for_status",
            destination=row.destination,
            row_id=row.id,
            hold=hold,
            error=error,
        )
        return False

    def _policy(self, prefix: str, destination: str) -> RetryPolicy:
        lookup = self._policies.get(prefix)
        found = lookup(destination) if lookup is not None else None
        return found or RetryPolicy(self._max_attempts, self._backoff_base, self._backoff_max)

    def wake(self, *_: object) -> None:
        self._wake.set()

    def after_commit(self, record: DecisionRecord, committed: Committed) -> None:
        self.take(committed.outbox)
        if len(committed.outbox) < len(record.outbox):
            # Some rows stayed in the store, behind older rows of their lane (PostgreSQL):
            # the poller delivers them in order.
            self._wake.set()

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
        await self._book(functools.partial(self._store.outbox_release, ids))
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

    async def start(self, *, shared: bool = False) -> None:
        """``shared``: other processes deliver from the same store (PostgreSQL); their lanes
        are theirs, and the store already keeps a lane's new rows behind its older ones."""
        # Lanes with rows left by a previous process are served from the store first.
        if not shared:
            self._blocked.update(await self._store.outbox_pending_lanes())
        for row in await self._store.outbox_held():
            self._unconfirmed[(row.destination, row.idempotency_key)] = row.id
        self._task = asyncio.create_task(self._loop(), name="outbox")

    async def stop(self) -> None:
        self._stopping = True
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

    async def _book(self, write: Callable[[], Awaitable[None]]) -> None:
        """Record what became of a claimed row, waiting for the database if it is away: the
        outcome is known only here, and a row left claimed would stay so (and block its lane)
        while this process lives."""
        while True:
            try:
                return await write()
            except StoreUnavailable:
                if self._stopping:  # the row stays claimed; the store's close releases it
                    raise
                log.warning("outbox_bookkeeping_waits_for_database")
                await asyncio.sleep(0.5)  # real time: the database, not the service clock

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
        from_store = False
        try:
            while lane:
                row, stored = lane.popleft()
                from_store = from_store or stored
                if not await self._deliver(row):
                    # The lane waits for the failed row's retry; rows behind it go back to
                    # the store, to be delivered after it.
                    self._blocked.add(key)
                    rest = [r.id for r, _ in lane]
                    lane.clear()
                    await self._book(functools.partial(self._store.outbox_release, rest))
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
            if key in self._blocked or from_store:
                # stored rows that waited behind this lane may be due now (a claim takes
                # only the head row of each lane, so the next one is the poller's)
                self._wake.set()

    def _handler(self, destination: str) -> tuple[str, Handler | None]:
        prefix = destination.split(":", 1)[0]
        return prefix, self._handlers.get(prefix)

    async def _deliver(self, row: OutboxRow) -> bool:
        prefix, handler = self._handler(row.destination)
        structlog.contextvars.bind_contextvars(conversation_id=row.conversation_id)
        try:
            if row.unsure == UNSURE_CLAIMED:
                settled = await self._settle_unsure(row)
                if settled is not None:
                    # done (the lane moves on), or held (the lane waits, as behind a retry)
                    self.delivered += settled
                    return settled
            if row.unsure == UNSURE_HELD:
                self._unconfirmed.pop((row.destination, row.idempotency_key), None)
                if await self._stored_status(row):
                    self.delivered += 1
                    return True
                # no status confirmed it in time: the provider most likely never had it
                self._metrics.outbox_unconfirmed_resent.labels(prefix).inc()
                log.warning("outbox_unconfirmed_resent", destination=row.destination)
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
            if retryable and attempts < policy.max_attempts and getattr(exc, "ambiguous", False):
                # the provider may have it: look for its status first
                settled = await self._settle_unsure(row, error)
                if settled is not None:
                    self.delivered += settled
                    return settled
            if retryable and attempts < policy.max_attempts:
                delay = min(policy.backoff_max, policy.backoff_base * 2 ** (attempts - 1))
                delay *= 0.5 + self._rng.random() / 2
                asked = getattr(exc, "retry_after", None)
                if isinstance(asked, (int, float)) and asked > delay:
                    delay = float(asked)
                at = self._clock.now() + timedelta(seconds=delay)
                await self._book(lambda: self._store.outbox_retry(row.id, at, error))
                self._metrics.outbox_retries.labels(prefix).inc()
                log.warning(
                    "outbox_retry",
                    destination=row.destination,
                    attempts=attempts,
                    error=error,
                    retry_in=round(delay, 3),
                )
            else:
                await self._book(lambda: self._store.outbox_dead(row.id, error))
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
        await self._book(lambda: self._store.outbox_done(row.id))
        self.delivered += 1
        self._metrics.outbox_sent.labels(prefix).inc()
        return True
