"""Conversation workers: each conversation's events are decided one at a time, in order.

A conversation with undecided events gets one task; the task loads the snapshot, decides
each pending event (rules, then the machine), commits the decision in one transaction and
moves on. Different conversations run in parallel, bounded by a semaphore. Nothing here keeps
a conversation in memory once its task has finished.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from controller.calendar import BusinessCalendar
from controller.clock import Clock
from controller.errors import Conflict
from controller.facts import build_facts
from controller.machine import MESSAGES_AFTER_CLOSE, Decider
from controller.metrics import Metrics
from controller.models import Conversation, Event
from controller.rulebook import Rulebook
from controller.store.base import Committed, DecisionRecord, NewOutbox, Store

log = structlog.get_logger(__name__)

AfterCommit = Callable[[DecisionRecord, Committed], None]
# Derived ``queue.*`` facts for a conversation at decide time (the router's ``queue_facts``).
QueueFacts = Callable[[Conversation], dict[str, Any] | None]
# Derived ``customer.*`` facts (known, language, profile), awaited before deciding.
CustomerFacts = Callable[[Conversation], Awaitable[dict[str, Any] | None]]
# Outbox rows for the apps subscribed to an event (the app registry's ``subscribers``).
Subscribers = Callable[[Event, Conversation], list[NewOutbox]]


class Leases(Protocol):
    """Several processes: who may decide a conversation (``controller.cluster.Cluster``)."""

    async def lease(self, conversation_id: str) -> int | None:
        """The fencing token to decide with; None when another process decides it."""

    def lost(self, conversation_id: str) -> None: ...

    async def release(self, conversation_id: str) -> None: ...


_BATCH = 100


class Workers:
    """Decides conversations' events: a bounded set of consumers takes conversations from a
    FIFO of those with new events; a conversation is never decided by two consumers at once."""

    def __init__(
        self,
        store: Store,
        rulebook: Callable[[], Rulebook],
        *,
        metrics: Metrics,
        clock: Clock,
        timezone: str,
        calendar: BusinessCalendar | None = None,
        concurrency: int,
        matcher: str,
        queue_facts: QueueFacts | None = None,
        customer_facts: CustomerFacts | None = None,
        subscribers: Subscribers | None = None,
        leases: Leases | None = None,
    ) -> None:
        self._store = store
        self._leases = leases
        self._subscribers = subscribers
        self._customer_facts = customer_facts
        self._queue_facts = queue_facts
        self._rulebook = rulebook
        self._metrics = metrics
        self._clock = clock
        self._tz = ZoneInfo(timezone)
        self._calendar = calendar
        self._decider = Decider()
        self._matcher = matcher
        self._concurrency = concurrency
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._has_work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._consumers: list[asyncio.Task[None]] = []
        self._after_commit: list[AfterCommit] = []
        self._recovering: set[str] = set()
        self.decided = 0

    def on_commit(self, hook: AfterCommit) -> None:
        self._after_commit.append(hook)

    def start(self) -> None:
        self._consumers = [
            asyncio.create_task(self._consume(), name=f"worker-{n}")
            for n in range(self._concurrency)
        ]

    def notify(self, conversation_ids: Iterable[str]) -> None:
        """New events are committed for these conversations: decide them soon."""
        for cid in conversation_ids:
            if cid in self._running:
                self._again.add(cid)
            elif cid not in self._queued:
                self._queued.add(cid)
                self._queue.append(cid)
        if self._queue:
            self._idle.clear()
            self._has_work.set()

    async def recover(self) -> int:
        """At start: pick up every conversation with undecided events.

        The first undecided event of each may have been in flight when the previous process
        died (possibly inside the native matcher), so it is decided by the reference
        evaluator; a crash on one event can never repeat at every start.
        """
        heads = await self._store.first_pending_events()
        self._recovering.update(event_id for _, event_id in heads)
        self.notify(cid for cid, _ in heads)
        return len(heads)

    def adopt(self, heads: list[tuple[str, str]]) -> None:
        """Several processes: conversations taken over from a process that died, with their
        first undecided event (decided by the reference evaluator, as in ``recover``)."""
        self._recovering.update(event_id for _, event_id in heads)
        self.notify(cid for cid, _ in heads)

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> None:
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers = []

    async def _consume(self) -> None:
        while True:
            while not self._queue:
                self._has_work.clear()
                if not self._running:
                    self._idle.set()
                await self._has_work.wait()
            cid = self._queue.popleft()
            self._queued.discard(cid)
            self._running.add(cid)
            try:
                more = await self._run(cid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker_failed", conversation_id=cid)
                more = False
            finally:
                self._running.discard(cid)
            if more or cid in self._again:
                self._again.discard(cid)
                self.notify([cid])  # to the back of the line: long backlogs share the workers

    async def _run(self, cid: str) -> bool:
        """Decide a batch of the conversation's events; True if more may be waiting."""
        lease: int | None = None
        if self._leases is not None:
            lease = await self._leases.lease(cid)
            if lease is None:
                return False  # another process decides it, and has been told
        conv, events = await self._store.load_for_decision(cid, limit=_BATCH)
        if conv is None:
            log.error("events_for_unknown_conversation", conversation_id=cid)
            return False
        for event in events:
            decided = await self._decide(conv, event, lease)
            if decided is None:
                return True
            conv = decided
        more = len(events) == _BATCH
        # Closed, and nothing new arrived meanwhile: the lease can go.
        if self._leases is not None and conv.state == "closed" and not (more or cid in self._again):
            await self._leases.release(cid)
        return more

    async def _decide(
        self, conv: Conversation, event: Event, lease: int | None = None
    ) -> Conversation | None:
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(conversation_id=conv.id, event_id=event.id)
        try:
            # Read before deciding, so the decision itself stays synchronous and pure.
            customer = await self._customer_facts(conv) if self._customer_facts else None
            record = self._make_record(conv, event, customer)
            # Deliveries to subscribed apps commit with the decision (no event is announced
            # that was not decided, none decided without its announcements).
            record.outbox.extend(self._announcements(conv, record))
            record.lease = lease
            try:
                committed = await self._store.commit_decision(record, self._clock.now())
            except Conflict as exc:
                log.warning("decision_conflict", reason=exc.message)
                if exc.code == "lease_lost" and self._leases is not None:
                    self._leases.lost(conv.id)  # the next run asks who holds it now
                return None
            self._recovering.discard(event.id)
            # Events the decision emitted (conversation.closed, agent.left...) are decided next.
            self.notify(a.conversation_id for a in committed.accepted if not a.duplicate)
            record.after.version = conv.version + 1
            self.decided += 1
            self._metrics.decisions.labels(record.outcome, record.matcher).inc()
            self._metrics.decision_seconds.observe(time.perf_counter() - started)
            for fired in record.fired:
                self._metrics.rules_fired.labels(fired["rule"]).inc()
            for refused in record.refused:
                self._metrics.actions_refused.labels(
                    str(refused["rule"]), str(refused["action"])
                ).inc()
            for hook in self._after_commit:
                try:
                    hook(record, committed)
                except Exception:
                    log.exception("after_commit_hook_failed")
            return record.after
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id", "event_id")

    def _announcements(self, conv: Conversation, record: DecisionRecord) -> list[NewOutbox]:
        """Outbox rows for the apps subscribed to the decided event.

        Not for a stale timer (nothing happened), nor for a message that reached a closed
        conversation: it moves to a new conversation as a new event, announced there. Events
        this decision emits (conversation.closed...) are announced when they are decided.
        """
        event = record.event
        if self._subscribers is None or record.outcome == "stale":
            return []
        if conv.state == "closed" and event.type in MESSAGES_AFTER_CLOSE:
            return []
        try:
            return self._subscribers(event, record.after)
        except Exception:
            # A broken subscription index must not stall the conversation.
            log.exception("subscribers_failed", event_type=event.type)
            return []

    def _make_record(
        self, conv: Conversation, event: Event, customer: dict[str, Any] | None = None
    ) -> DecisionRecord:
        rulebook = self._rulebook()
        if event.type == "timer.fired":
            ref = conv.timers.get(str(event.data.get("name")))
            if ref is None or ref.generation != event.data.get("generation"):
                log.info("timer_stale", timer=event.data.get("name"))
                return self._decider.unchanged(
                    conv, event, rules_version=rulebook.version, outcome="stale"
                )
        recovering = event.id in self._recovering
        matcher = "reference" if recovering else self._matcher
        if recovering:
            self._metrics.recovered.inc()
            log.warning("deciding_recovered_event", matcher=matcher, event_type=event.type)
        facts: dict[str, Any] | None = None
        try:
            # Shared state (the router's queues) enters only as derived facts, stored with
            # the decision, so build_facts stays pure and explain/backtest replay the same.
            queue = self._queue_facts(conv) if self._queue_facts is not None else None
            holiday = self._calendar.holiday(event.accepted_at) if self._calendar else None
            facts = build_facts(conv, event, self._tz, queue, customer, holiday)
            if conv.state == "closed" and event.type in MESSAGES_AFTER_CLOSE:
                fired = []  # the machine moves or drops it; rules see it where it lands
            else:
                fired = rulebook.decide(facts, matcher=matcher)  # type: ignore[arg-type]
            record = self._decider.apply(
                conv, event, fired, rules_version=rulebook.version, matcher=matcher
            )
            record.facts = facts  # stored with the decision: explain and backtest replay them
            return record
        except Exception as exc:
            # A bug must not stall the conversation: record the failure and move on.
            log.exception("decision_failed", event_type=event.type)
            record = self._decider.unchanged(
                conv, event, rules_version=rulebook.version, outcome="error"
            )
            record.matcher = matcher
            record.facts = facts
            record.refused.append({"rule": None, "action": "decide", "reason": repr(exc)})
            return record
