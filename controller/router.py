"""The router: the single owner of agents' presence and capacity, queue order and offers.

Rules only say ``route`` or ``assign``. After a decision is committed, the router learns what
changed (a conversation queued or left the queue, an agent was released) and offers waiting
conversations to agents: highest priority first, then longest waiting; the agent is the one
idle longest among those available with free capacity and the required skills. Offers time
out and move to the next agent. Every step is one store transaction that also stores the
event the conversation sees (``agent.offered``, ``agent.accepted``...). Memory is rebuilt
from the store at start, so a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from controller.calendar import BusinessCalendar
from controller.clock import Clock, sleep_until_woken
from controller.errors import Conflict, NotFound
from controller.ids import new_id
from controller.metrics import Metrics
from controller.models import Conversation
from controller.store.base import Accepted, Committed, DecisionRecord, OfferRecord, Store

log = structlog.get_logger(__name__)

PRESENCES = ("available", "busy", "away", "offline")
PushOffer = Callable[[str, dict[str, Any]], Awaitable[object]]
# Handle times kept per queue for ``queue.estimated_wait`` (the most recent ones).
HANDLE_SAMPLES = 20


@dataclass
class _Agent:
    id: str
    name: str
    presence: str
    capacity: int
    skills: frozenset[str]
    idle_since: datetime
    conversations: set[str] = field(default_factory=set)
    offers: set[str] = field(default_factory=set)

    @property
    def load(self) -> int:
        return len(self.conversations) + len(self.offers)


@dataclass
class _Waiting:
    conversation_id: str
    queue: str
    priority: int
    skills: frozenset[str]
    enqueued_at: datetime
    tried: set[str] = field(default_factory=set)
    offer_id: str | None = None


class Router:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notify: Callable[[Iterable[str]], None],
        *,
        offer_timeout: float,
        calendar: BusinessCalendar | None = None,
    ) -> None:
        self.calendar = calendar
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notify = notify
        self._offer_timeout = offer_timeout
        self._agents: dict[str, _Agent] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._offers: dict[str, OfferRecord] = {}
        self._accepting: set[str] = set()  # accepted, the agent.accepted not decided yet
        self._expiry: list[tuple[float, str]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._push: PushOffer | None = None
        # (agent, conversation) -> (queue, accepted at): open handles, for handle time.
        self._handling: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._handle_times: dict[str, deque[float]] = {}
        self._queues: set[str] = set()  # every queue seen, so its gauges can drop to 0

    def set_push(self, push: PushOffer) -> None:
        """Where offers are pushed live (the agent desk hub)."""
        self._push = push

    async def start(self) -> None:
        snap = await self._store.router_snapshot()
        for a in snap.agents:
            self._agents[a.id] = _Agent(
                a.id, a.name, a.presence, a.capacity, frozenset(a.skills), a.idle_since
            )
        for q in snap.queued:
            self._waiting[q.conversation_id] = _Waiting(
                q.conversation_id, q.queue, q.priority, frozenset(q.skills), q.enqueued_at
            )
        for conversation_id, agent_id in snap.tried:
            if conversation_id in self._waiting:
                self._waiting[conversation_id].tried.add(agent_id)
        for agent_id, conversation_id in snap.assignments:
            if agent_id in self._agents:
                self._agents[agent_id].conversations.add(conversation_id)
        for offer in snap.pending_offers:
            self._track_offer(offer)
        self._accepting.update(snap.accepting)
        self._task = asyncio.create_task(self._loop(), name="router")
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # public operations ---------------------------------------------------------------------
    def agent_known(self, agent_id: str) -> bool:
        return agent_id in self._agents

    def add_agent(
        self,
        agent_id: str,
        name: str,
        capacity: int,
        skills: Iterable[str],
        presence: str,
        idle_since: datetime,
    ) -> None:
        existing = self._agents.get(agent_id)
        if existing is None:
            self._agents[agent_id] = _Agent(
                agent_id, name, presence, capacity, frozenset(skills), idle_since
            )
        else:
            existing.name, existing.capacity = name, capacity
            existing.skills = frozenset(skills)
        self._wake.set()

    def agent_view(self, agent_id: str) -> dict[str, Any]:
        a = self._agents.get(agent_id)
        if a is None:
            raise NotFound(f"unknown agent {agent_id!r}", code="unknown_agent")
        return {
            "id": a.id,
            "name": a.name,
            "presence": a.presence,
            "capacity": a.capacity,
            "skills": sorted(a.skills),
            "conversations": sorted(a.conversations),
            "offers": [self._offer_view(self._offers[o]) for o in sorted(a.offers)],
        }

    async def set_presence(self, agent_id: str, presence: str) -> None:
        if presence not in PRESENCES:
            raise Conflict(f"presence must be one of {', '.join(PRESENCES)}", code="bad_presence")
        async with self._lock:
            agent = self._agents.get(agent_id)
            if agent is None:
                raise NotFound(f"unknown agent {agent_id!r}", code="unknown_agent")
            await self._store.set_presence(agent_id, presence, self._clock.now())
            if presence == "available" and agent.presence != "available" and agent.load == 0:
                agent.idle_since = self._clock.now()
                await self._store.touch_agent_idle(agent_id, agent.idle_since)
            agent.presence = presence
        self._wake.set()

    async def accept(self, agent_id: str, offer_id: str) -> Accepted:
        return await self._resolve(agent_id, offer_id, "accepted", "agent.accepted")

    async def decline(self, agent_id: str, offer_id: str) -> Accepted:
        return await self._resolve(agent_id, offer_id, "declined", "agent.declined")

    def after_commit(self, record: DecisionRecord, committed: Committed) -> None:
        """Follow a committed decision: queue membership, released and assigned agents."""
        conv = record.after
        now = self._clock.now()
        if record.event.type == "agent.accepted":
            self._accepting.discard(conv.id)
        for agent_id in record.released_agents:
            self._handled(agent_id, conv.id, now, refused=record.event.type == "agent.accepted")
            agent = self._agents.get(agent_id)
            if agent is not None and conv.id in agent.conversations:
                agent.conversations.discard(conv.id)
                if agent.load == 0:
                    agent.idle_since = now
        for agent_id in record.assigned_agents:
            agent = self._agents.get(agent_id)
            if agent is not None:
                agent.conversations.add(conv.id)
        if conv.id in self._accepting:
            # An agent accepted; its acceptance is still to be decided after earlier events
            # of this conversation. Those may re-queue it on paper, but it is taken.
            pass
        elif conv.state == "queued" and conv.enqueued_at is not None:
            waiting = self._waiting.get(conv.id)
            if waiting is None or waiting.enqueued_at != conv.enqueued_at:
                old_offer = waiting.offer_id if waiting else None
                # Agents who just left this conversation are not offered it again first.
                self._waiting[conv.id] = _Waiting(
                    conv.id,
                    conv.queue or "",
                    conv.priority,
                    frozenset(conv.skills),
                    conv.enqueued_at,
                    tried=set(record.released_agents),
                    offer_id=old_offer,
                )
            else:
                waiting.priority = conv.priority
                waiting.queue = conv.queue or ""
                waiting.skills = frozenset(conv.skills)
        elif conv.id in self._waiting:
            waiting = self._waiting.pop(conv.id)
            if waiting.offer_id is not None and conv.state != "agent":
                self._spawn(self._cancel_offer(waiting.offer_id))
        self._update_gauges()
        self._wake.set()

    def position(self, conversation_id: str) -> int | None:
        """1-based place of a waiting conversation in its queue."""
        me = self._waiting.get(conversation_id)
        if me is None:
            return None
        ahead = sum(
            1
            for w in self._waiting.values()
            if w.queue == me.queue and (-w.priority, w.enqueued_at) < (-me.priority, me.enqueued_at)
        )
        return ahead + 1

    def conversations_of(self, agent_id: str) -> list[str]:
        """The conversations the agent is assigned to (accepted or assigned, not released)."""
        agent = self._agents.get(agent_id)
        return sorted(agent.conversations) if agent is not None else []

    def agents_available(self, skills: Iterable[str] = ()) -> int:
        """Agents available now with free capacity and all of ``skills``."""
        need = frozenset(skills)
        return sum(
            1
            for a in self._agents.values()
            if a.presence == "available" and a.load < a.capacity and need <= a.skills
        )

    def estimated_wait(self, queue: str, position: int) -> int:
        """Seconds: position times the queue's average recent handle time (times the offer
        timeout while the queue has no handled conversation yet). Deliberately simple: one agent's
        throughput, so it errs on the long side when several agents serve the queue."""
        samples = self._handle_times.get(queue)
        average = sum(samples) / len(samples) if samples else self._offer_timeout
        return round(position * average)

    def queue_facts(self, conv: Conversation) -> dict[str, Any] | None:
        """The ``queue.*`` facts for a decision of ``conv``, from the router's state now.

        None while the conversation was never routed. ``position`` and ``estimated_wait`` are
        there only while it waits in the router's queue, so the decision that routes it does
        not see them yet (the router learns of it after the commit). ``open`` follows the
        business hours and holidays of the settings (always true without them).
        """
        if conv.queue is None:
            return None
        facts: dict[str, Any] = {
            "name": conv.queue,
            "open": self.calendar.open(conv.queue, self._clock.now()) if self.calendar else True,
            "agents_available": self.agents_available(conv.skills),
        }
        position = self.position(conv.id)
        if position is not None:
            facts["position"] = position
            facts["estimated_wait"] = self.estimated_wait(conv.queue, position)
        return facts

    # internals -----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    def _track_offer(self, offer: OfferRecord) -> None:
        self._offers[offer.id] = offer
        agent = self._agents.get(offer.agent_id)
        if agent is not None:
            agent.offers.add(offer.id)
        waiting = self._waiting.get(offer.conversation_id)
        if waiting is not None:
            waiting.offer_id = offer.id
        heapq.heappush(self._expiry, (offer.expires_at.timestamp(), offer.id))

    def _forget_offer(self, offer_id: str) -> OfferRecord | None:
        offer = self._offers.pop(offer_id, None)
        if offer is None:
            return None
        agent = self._agents.get(offer.agent_id)
        if agent is not None:
            agent.offers.discard(offer_id)
        waiting = self._waiting.get(offer.conversation_id)
        if waiting is not None and waiting.offer_id == offer_id:
            waiting.offer_id = None
        return offer

    async def _resolve(self, agent_id: str, offer_id: str, status: str, kind: str) -> Accepted:
        async with self._lock:
            offer = self._offers.get(offer_id)
            if offer is None or offer.agent_id != agent_id:
                known = await self._store.offer(offer_id)
                if known is None or known.agent_id != agent_id:
                    raise NotFound(f"unknown offer {offer_id!r}", code="unknown_offer")
                raise Conflict(f"offer {offer_id} is already {known.status}", code="offer_closed")
            result = await self._store.resolve_offer(offer_id, status, kind, self._clock.now())
            self._forget_offer(offer_id)
            if result is None:
                raise Conflict(f"offer {offer_id} is no longer pending", code="offer_closed")
            agent = self._agents[agent_id]
            if status == "accepted":
                agent.conversations.add(offer.conversation_id)
                taken = self._waiting.pop(offer.conversation_id, None)
                queue = taken.queue if taken is not None else ""
                self._handling[(agent_id, offer.conversation_id)] = (queue, self._clock.now())
                self._accepting.add(offer.conversation_id)
            else:
                waiting = self._waiting.get(offer.conversation_id)
                if waiting is not None:
                    waiting.tried.add(agent_id)
            self._metrics.offers.labels(status).inc()
        self._notify([result.conversation_id])
        self._update_gauges()
        self._wake.set()
        return result

    async def _cancel_offer(self, offer_id: str) -> None:
        async with self._lock:
            offer = self._forget_offer(offer_id)
            if offer is not None:
                await self._store.resolve_offer(offer_id, "cancelled", "", self._clock.now())
                self._metrics.offers.labels("cancelled").inc()
        if offer is not None:
            await self._push_closed(offer, "cancelled")
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                self._wake.clear()
                await self._expire_due()
                await self._match()
                await self._sleep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router_loop_failed")
                await self._clock.sleep(1.0)

    async def _sleep(self) -> None:
        while self._expiry and self._expiry[0][1] not in self._offers:
            heapq.heappop(self._expiry)
        deadline = (
            datetime.fromtimestamp(self._expiry[0][0], UTC)
            if self._expiry
            else self._clock.now() + timedelta(hours=1)
        )
        await sleep_until_woken(self._clock, deadline, self._wake)

    async def _expire_due(self) -> None:
        now = self._clock.now()
        while self._expiry and self._expiry[0][0] <= now.timestamp():
            _, offer_id = heapq.heappop(self._expiry)
            async with self._lock:
                offer = self._forget_offer(offer_id)
                if offer is None:
                    continue
                result = await self._store.resolve_offer(
                    offer_id, "expired", "agent.offer_expired", now
                )
                waiting = self._waiting.get(offer.conversation_id)
                if waiting is not None:
                    waiting.tried.add(offer.agent_id)
                self._metrics.offers.labels("expired").inc()
                log.info(
                    "offer_expired",
                    offer_id=offer_id,
                    agent_id=offer.agent_id,
                    conversation_id=offer.conversation_id,
                )
            if result is not None:
                self._notify([result.conversation_id])
            await self._push_closed(offer, "expired")

    async def _push_closed(self, offer: OfferRecord, outcome: str) -> None:
        """Tell the agent's desk that an offer it shows is gone."""
        if self._push is not None:
            await self._push(
                offer.agent_id,
                {
                    "type": "offer_closed",
                    "offer_id": offer.id,
                    "conversation_id": offer.conversation_id,
                    "outcome": outcome,
                },
            )

    def _with_room(self) -> list[_Agent]:
        return [
            a for a in self._agents.values() if a.presence == "available" and a.load < a.capacity
        ]

    def _pick(self, waiting: _Waiting, candidates: Iterable[_Agent]) -> _Agent | None:
        eligible = [
            a
            for a in candidates
            if a.presence == "available"
            and a.load < a.capacity
            and waiting.skills <= a.skills
            and waiting.conversation_id not in a.conversations
        ]
        if not eligible:
            return None
        fresh = [a for a in eligible if a.id not in waiting.tried]
        if not fresh:
            # Everyone able to take it has been tried: start a new round.
            waiting.tried.clear()
            fresh = eligible
        return min(fresh, key=lambda a: (a.idle_since, a.id))

    async def _match(self) -> None:
        order = sorted(
            (w for w in self._waiting.values() if w.offer_id is None),
            key=lambda w: (-w.priority, w.enqueued_at, w.conversation_id),
        )
        # Only agents with room can take an offer: found once per pass (not once per waiting
        # conversation, which cost a scan of every agent for every one of them), dropped
        # when full; the pass ends early once nobody has room.
        free = self._with_room()
        for waiting in order:
            if not free:
                free = self._with_room()  # agents may have become available meanwhile
                if not free:
                    break
            async with self._lock:
                if waiting.offer_id is not None or waiting.conversation_id not in self._waiting:
                    continue
                agent = self._pick(waiting, free)
                if agent is None:
                    continue
                now = self._clock.now()
                offer = OfferRecord(
                    id=new_id("of"),
                    conversation_id=waiting.conversation_id,
                    agent_id=agent.id,
                    status="pending",
                    created_at=now,
                    expires_at=now + timedelta(seconds=self._offer_timeout),
                )
                try:
                    result = await self._store.create_offer(offer, now)
                except Conflict:
                    self._waiting.pop(waiting.conversation_id, None)
                    continue
                self._track_offer(offer)
                self._metrics.offers.labels("offered").inc()
                if agent.load >= agent.capacity:
                    free.remove(agent)
            self._notify([result.conversation_id])
            if self._push is not None:
                await self._push(agent.id, {"type": "offer", **self._offer_view(offer)})
        self._update_gauges()

    @staticmethod
    def _offer_view(offer: OfferRecord) -> dict[str, Any]:
        return {
            "offer_id": offer.id,
            "conversation_id": offer.conversation_id,
            "expires_at": offer.expires_at.isoformat(),
        }

    def _handled(
        self, agent_id: str, conversation_id: str, now: datetime, *, refused: bool
    ) -> None:
        """An agent was released: observe the handle time since its acceptance."""
        handle = self._handling.pop((agent_id, conversation_id), None)
        if handle is None or refused:
            return  # not accepted from a queue in this process, or the acceptance was refused
        queue, since = handle
        seconds = max(0.0, (now - since).total_seconds())
        self._metrics.handle_seconds.labels(queue).observe(seconds)
        self._handle_times.setdefault(queue, deque(maxlen=HANDLE_SAMPLES)).append(seconds)

    def _longest_wait(self, queue: str) -> float:
        """Seconds the longest-waiting conversation of ``queue`` has waited (0 when empty)."""
        oldest = min(
            (w.enqueued_at for w in self._waiting.values() if w.queue == queue), default=None
        )
        if oldest is None:
            return 0.0
        return max(0.0, (self._clock.now() - oldest).total_seconds())

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for w in self._waiting.values():
            counts[w.queue] = counts.get(w.queue, 0) + 1
        for queue in counts.keys() - self._queues:
            self._queues.add(queue)
            # Read at scrape time, so the age keeps growing between router steps.
            self._metrics.queue_longest_wait.labels(queue).set_function(
                functools.partial(self._longest_wait, queue)
            )
        for queue in self._queues:
            self._metrics.queue_length.labels(queue).set(counts.get(queue, 0))


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router_task_failed", error=repr(task.exception()))
