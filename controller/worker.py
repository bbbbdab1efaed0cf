"""Conversation workers: each conversation's events are decided one at a time, in order.

A conversation with undecided events gets one task; the task loads the snapshot, decides
each pending event (rules, then the machine), commits the decision in one transaction and
moves on. Different conversations run in parallel, bounded by a semaphore. Nothing here keeps
a conversation in memory once its task has finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from zoneinfo import ZoneInfo

import structlog

from controller.errors import Conflict
from controller.facts import build_facts
from controller.machine import Decider
from controller.metrics import Metrics
from controller.models import Conversation, Event
from controller.rulebook import Rulebook
from controller.store.base import Accepted, DecisionRecord
from controller.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

AfterCommit = Callable[[DecisionRecord, list[Accepted]], None]


class Workers:
    """Schedules conversation tasks and decides their events."""

    def __init__(
        self,
        store: SqliteStore,
        rulebook: Callable[[], Rulebook],
        *,
        metrics: Metrics,
        timezone: str,
        concurrency: int,
        matcher: str,
    ) -> None:
        self._store = store
        self._rulebook = rulebook
        self._metrics = metrics
        self._tz = ZoneInfo(timezone)
        self._decider = Decider()
        self._matcher = matcher
        self._semaphore = asyncio.Semaphore(concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._after_commit: list[AfterCommit] = []
        self._recovering: set[str] = set()
        self.decided = 0

    def on_commit(self, hook: AfterCommit) -> None:
        self._after_commit.append(hook)

    def notify(self, conversation_ids: Iterable[str]) -> None:
        """New events are committed for these conversations: decide them soon."""
        for cid in conversation_ids:
            self._dirty.add(cid)
            if cid not in self._tasks:
                self._idle.clear()
                self._tasks[cid] = asyncio.create_task(self._run(cid), name=f"conv-{cid}")

    async def recover(self) -> int:
        """At start: pick up every conversation with undecided events.

        The first undecided event of each may have been in flight when the previous process
        died (possibly inside the native matcher), so it is decided by the reference
        evaluator; a crash on one event can never repeat at every start.
        """
        pending = await self._store.conversations_with_pending()
        for cid in pending:
            events = await self._store.pending_events(cid, limit=1)
            if events:
                self._recovering.add(events[0].id)
        self.notify(pending)
        return len(pending)

    @property
    def idle(self) -> bool:
        return not self._tasks

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, cid: str) -> None:
        try:
            async with self._semaphore:
                while cid in self._dirty:
                    self._dirty.discard(cid)
                    conv, events = await self._store.load_for_decision(cid)
                    if conv is None:
                        log.error("events_for_unknown_conversation", conversation_id=cid)
                        return
                    current: Conversation = conv
                    for event in events:
                        decided = await self._decide(current, event)
                        if decided is None:
                            break
                        current = decided
                    if len(events) == 100:
                        self._dirty.add(cid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker_failed", conversation_id=cid)
        finally:
            self._tasks.pop(cid, None)
            if cid in self._dirty and cid not in self._tasks:
                # Work arrived while finishing: start again.
                self._tasks[cid] = asyncio.create_task(self._run(cid), name=f"conv-{cid}")
            if not self._tasks:
                self._idle.set()

    async def _decide(self, conv: Conversation, event: Event) -> Conversation | None:
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(conversation_id=conv.id, event_id=event.id)
        try:
            record = self._make_record(conv, event)
            try:
                accepted = await self._store.commit_decision(record, event.accepted_at)
            except Conflict as exc:
                log.warning("decision_conflict", reason=exc.message)
                self._dirty.add(conv.id)
                return None
            self._recovering.discard(event.id)
            # Events the decision emitted (conversation.closed, agent.left...) are decided next.
            self.notify(a.conversation_id for a in accepted if not a.duplicate)
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
                    hook(record, accepted)
                except Exception:
                    log.exception("after_commit_hook_failed")
            return record.after
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id", "event_id")

    def _make_record(self, conv: Conversation, event: Event) -> DecisionRecord:
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
        try:
            facts = build_facts(conv, event, self._tz)
            fired = rulebook.decide(facts, matcher=matcher)  # type: ignore[arg-type]
            return self._decider.apply(
                conv, event, fired, rules_version=rulebook.version, matcher=matcher
            )
        except Exception as exc:
            # A bug must not stall the conversation: record the failure and move on.
            log.exception("decision_failed", event_type=event.type)
            record = self._decider.unchanged(
                conv, event, rules_version=rulebook.version, outcome="error"
            )
            record.matcher = matcher
            record.refused.append({"rule": None, "action": "decide", "reason": repr(exc)})
            return record
