"""The router: the single owner of agents' presence and capacity, queue order and offers.

Rules only say ``route`` or ``assign``. After a decision is committed, the router learns what
changed (a conversation queued or left the queue, an agent was released) and offers waiting
conversations to agents: highest priority first, then longest waiting; the agent is the one
idle longest among those available with room on the conversation's channel, the required
skills at the required levels and (when the queue names teams) one of the queue's teams.
Offers time out and move to the next agent.

One matching pass plans every offer it can make and stores them (offer rows and their
``agent.offered`` events) in ONE store transaction, then pushes them to the desks. Every
other step (accept, decline, expire, cancel) is one transaction that also stores the event
the conversation sees; answers are not serialised behind the pass's lock. Memory is rebuilt
from the store at start, so a crash loses nothing.

What keeps a pass cheap with thousands waiting: waiting conversations are kept in groups of
the same needs (queue, skills and levels, teams, channel), each sorted in offer order; for
each need a pool holds the agents who could take it now, longest idle first, updated on
every change of an agent (no scan). A pass merges only the groups whose pool is not empty,
so a pass where nobody has room costs nothing. Queue positions and the queue gauges come
from per-queue sorted lists (a bisection, not a scan).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

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
# Offers one pass writes in one transaction at most: the pass holds the router's lock (an
# accept waits for it) and SQLite's one writer, so a huge backlog goes out in slices.
MAX_OFFERS_PER_PASS = 500
MAX_SKILL_LEVEL = 10
# Needs (queue, skills, teams, channel) whose eligible agents are kept up to date at most.
MAX_POOLS = 200


class QueueNeeds(Protocol):
    """What a queue asks of its agents (``Settings.queue_routing``)."""

    @property
    def skills(self) -> Mapping[str, int]: ...

    @property
    def teams(self) -> Iterable[str]: ...


def conversation_skills(skills: Iterable[str]) -> dict[str, int]:
    """A route action's skills as {name: minimum level}: ``billing`` is level 1 or more,
    ``billing:5`` level 5 or more (clamped to 1..10); a name given twice keeps the higher."""
    needs: dict[str, int] = {}
    for text in skills:
        name, sep, level = text.rpartition(":")
        if not sep or not level.isdigit() or not name:
            name, wanted = text, 1
        else:
            wanted = min(max(int(level), 1), MAX_SKILL_LEVEL)
        needs[name] = max(needs.get(name, 0), wanted)
    return needs


@dataclass(frozen=True, slots=True)
class _Need:
    """What a waiting conversation asks of an agent; waiting conversations with equal needs
    (and queue) form one group in the matching pass."""

    skills: tuple[tuple[str, int], ...]  # sorted (name, minimum level)
    teams: frozenset[str]  # empty: any team
    channel: str


@dataclass
class _Agent:
    id: str
    name: str
    presence: str
    capacity: int  # total
    channels: dict[str, int]  # capacity per channel kind; empty: any channel, up to the total
    skills: dict[str, int]  # name -> level
    teams: frozenset[str]
    idle_since: datetime
    conversations: dict[str, str] = field(default_factory=dict)  # conversation -> channel
    offers: dict[str, str] = field(default_factory=dict)  # pending offer -> channel
    by_channel: dict[str, int] = field(default_factory=dict)  # assignments + offers

    @property
    def load(self) -> int:
        return len(self.conversations) + len(self.offers)

    def room(self, channel: str) -> bool:
        """Room for one more conversation on ``channel`` (presence aside)."""
        if self.load >= self.capacity:
            return False
        if not self.channels:
            return True
        return self.by_channel.get(channel, 0) < self.channels.get(channel, 0)

    def any_room(self) -> bool:
        if self.load >= self.capacity:
            return False
        return not self.channels or any(
            self.by_channel.get(c, 0) < n for c, n in self.channels.items()
        )

    def serves(self, need: _Need) -> bool:
        """Skills, levels, teams and channel fit (capacity and presence aside)."""
        if self.channels and self.channels.get(need.channel, 0) <= 0:
            return False
        if need.teams and not need.teams & self.teams:
            return False
        return all(self.skills.get(name, 0) >= level for name, level in need.skills)

    def count(self, channel: str, delta: int) -> None:
        self.by_channel[channel] = self.by_channel.get(channel, 0) + delta


@dataclass
class _Waiting:
    conversation_id: str
    queue: str
    priority: int
    skills: tuple[str, ...]  # as the route action gave them
    channel: str
    enqueued_at: datetime
    need: _Need
    tried: set[str] = field(default_factory=set)
    offer_id: str | None = None

    @property
    def key(self) -> tuple[int, datetime, str]:
        """Offer order: highest priority, then longest waiting, then the id."""
        return (-self.priority, self.enqueued_at, self.conversation_id)


class _QueueOrder:
    """One queue's waiting conversations, in offer order and by age."""

    def __init__(self) -> None:
        self.order: list[tuple[int, datetime, str]] = []
        self.ages: list[tuple[datetime, str]] = []

    def add(self, w: _Waiting) -> None:
        insort(self.order, w.key)
        insort(self.ages, (w.enqueued_at, w.conversation_id))

    def remove(self, w: _Waiting) -> None:
        _remove_sorted(self.order, w.key)
        _remove_sorted(self.ages, (w.enqueued_at, w.conversation_id))

    def position(self, w: _Waiting) -> int:
        return bisect_left(self.order, w.key) + 1

    def oldest(self) -> datetime | None:
        return self.ages[0][0] if self.ages else None


def _remove_sorted(items: list[Any], item: Any) -> None:
    i = bisect_left(items, item)
    if i < len(items) and items[i] == item:
        del items[i]


class _Pool:
    """The agents who could be offered a conversation of one need now (available, room on
    its channel and in total, skills, teams), longest idle first (then by id)."""

    def __init__(self) -> None:
        self.order: list[tuple[datetime, str]] = []
        self._keys: dict[str, tuple[datetime, str]] = {}

    def put(self, agent: _Agent) -> None:
        key = (agent.idle_since, agent.id)
        old = self._keys.get(agent.id)
        if old == key:
            return
        if old is not None:
            _remove_sorted(self.order, old)
        insort(self.order, key)
        self._keys[agent.id] = key

    def drop(self, agent_id: str) -> None:
        old = self._keys.pop(agent_id, None)
        if old is not None:
            _remove_sorted(self.order, old)


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
        queues: Mapping[str, QueueNeeds] | None = None,
    ) -> None:
        self.calendar = calendar
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notify = notify
        self._offer_timeout = offer_timeout
        self._queue_needs = dict(queues or {})
        self._agents: dict[str, _Agent] = {}
        self._free: set[str] = set()  # available with room on some channel
        self._pools: dict[_Need, _Pool] = {}  # per need seen: who could take it now
        self._waiting: dict[str, _Waiting] = {}
        self._queues: dict[str, _QueueOrder] = {}  # every queue seen (gauges drop to 0)
        # Waiting conversations without an offer, by (queue, needs), each in offer order.
        self._groups: dict[tuple[str, _Need], list[tuple[int, datetime, str]]] = {}
        self._dirty: set[str] = set()  # queues whose length gauge is stale
        self._offers: dict[str, OfferRecord] = {}
        self._accepting: set[str] = set()  # accepted, the agent.accepted not decided yet
        self._answering: set[str] = set()  # offers whose outcome is being written
        self._expiry: list[tuple[float, str]] = []
        self._lock = asyncio.Lock()  # one matching pass (or cancel) at a time
        self._presence_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._push: PushOffer | None = None
        # (agent, conversation) -> (queue, accepted at): open handles, for handle time.
        self._handling: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._handle_times: dict[str, deque[float]] = {}

    def set_push(self, push: PushOffer) -> None:
        """Where offers are pushed live (the agent desk hub)."""
        self._push = push

    async def start(self) -> None:
        snap = await self._store.router_snapshot()
        for a in snap.agents:
            self.add_agent(
                a.id,
                a.name,
                a.capacity,
                a.skills,
                a.presence,
                a.idle_since,
                channels=a.channels,
                teams=a.teams,
            )
        tried: dict[str, set[str]] = {}
        for conversation_id, agent_id in snap.tried:
            tried.setdefault(conversation_id, set()).add(agent_id)
        for q in snap.queued:
            self._enqueue(
                self._new_waiting(
                    q.conversation_id,
                    q.queue,
                    q.priority,
                    q.skills,
                    snap.channels.get(q.conversation_id, ""),
                    q.enqueued_at,
                    tried.get(q.conversation_id, set()),
                )
            )
        for agent_id, conversation_id in snap.assignments:
            agent = self._agents.get(agent_id)
            if agent is not None:
                self._assign(agent, conversation_id, snap.channels.get(conversation_id, ""))
        for offer in snap.pending_offers:
            self._track_offer(offer, snap.channels.get(offer.conversation_id, ""))
        self._accepting.update(snap.accepting)
        self._update_gauges()
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
        skills: Mapping[str, int] | Iterable[str],
        presence: str,
        idle_since: datetime,
        *,
        channels: Mapping[str, int] | None = None,
        teams: Iterable[str] = (),
    ) -> None:
        """Create or update an agent (an update keeps its presence, load and idle time).
        ``skills``: {name: level}, or names (level 1)."""
        levels = dict(skills) if isinstance(skills, Mapping) else dict.fromkeys(skills, 1)
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(
                agent_id, name, presence, capacity, {}, {}, frozenset(), idle_since
            )
        agent.name, agent.capacity = name, capacity
        agent.channels = dict(channels or {})
        agent.skills = levels
        agent.teams = frozenset(teams)
        self._refresh(agent)
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
            "channels": {
                c: {"capacity": n, "load": a.by_channel.get(c, 0)}
                for c, n in sorted(a.channels.items())
            },
            "load": a.load,
            "skills": dict(sorted(a.skills.items())),
            "teams": sorted(a.teams),
            "conversations": sorted(a.conversations),
            "offers": [self._offer_view(self._offers[o]) for o in sorted(a.offers)],
        }

    async def set_presence(self, agent_id: str, presence: str) -> None:
        if presence not in PRESENCES:
            raise Conflict(f"presence must be one of {', '.join(PRESENCES)}", code="bad_presence")
        # One change at a time per agent (the store and memory end in the same order);
        # different agents' changes are written at once and no pass waits for them.
        async with self._presence_locks[agent_id]:
            agent = self._agents.get(agent_id)
            if agent is None:
                raise NotFound(f"unknown agent {agent_id!r}", code="unknown_agent")
            await self._store.set_presence(agent_id, presence, self._clock.now())
            if presence == "available" and agent.presence != "available" and agent.load == 0:
                agent.idle_since = self._clock.now()
                await self._store.touch_agent_idle(agent_id, agent.idle_since)
            agent.presence = presence
            self._refresh(agent)
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
                agent.count(agent.conversations.pop(conv.id), -1)
                if agent.load == 0:
                    agent.idle_since = now
                self._refresh(agent)
        for agent_id in record.assigned_agents:
            agent = self._agents.get(agent_id)
            if agent is not None:
                self._assign(agent, conv.id, conv.channel)
        if conv.id in self._accepting:
            # An agent accepted; its acceptance is still to be decided after earlier events
            # of this conversation. Those may re-queue it on paper, but it is taken.
            pass
        elif conv.state == "queued" and conv.enqueued_at is not None:
            waiting = self._waiting.get(conv.id)
            if waiting is None or waiting.enqueued_at != conv.enqueued_at:
                old_offer = waiting.offer_id if waiting else None
                self._dequeue(conv.id)
                # Agents who just left this conversation are not offered it again first.
                fresh = self._new_waiting(
                    conv.id,
                    conv.queue or "",
                    conv.priority,
                    conv.skills,
                    conv.channel,
                    conv.enqueued_at,
                    set(record.released_agents),
                )
                fresh.offer_id = old_offer
                self._enqueue(fresh)
            elif (waiting.priority, waiting.queue, waiting.skills) != (
                conv.priority,
                conv.queue or "",
                tuple(conv.skills),
            ):
                self._dequeue(conv.id)
                changed = self._new_waiting(
                    conv.id,
                    conv.queue or "",
                    conv.priority,
                    conv.skills,
                    conv.channel,
                    conv.enqueued_at,
                    waiting.tried,
                )
                changed.offer_id = waiting.offer_id
                self._enqueue(changed)
        elif conv.id in self._waiting:
            gone = self._dequeue(conv.id)
            if gone is not None and gone.offer_id is not None and conv.state != "agent":
                self._spawn(self._cancel_offer(gone.offer_id))
        self._update_gauges()
        self._wake.set()

    def position(self, conversation_id: str) -> int | None:
        """1-based place of a waiting conversation in its queue."""
        me = self._waiting.get(conversation_id)
        if me is None:
            return None
        return self._queues[me.queue].position(me)

    def queue_length(self, queue: str) -> int:
        order = self._queues.get(queue)
        return len(order.order) if order is not None else 0

    def conversations_of(self, agent_id: str) -> list[str]:
        """The conversations the agent is assigned to (accepted or assigned, not released)."""
        agent = self._agents.get(agent_id)
        return sorted(agent.conversations) if agent is not None else []

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
        ``agents_available`` counts agents who could be offered this conversation now:
        available, room on its channel, its skills at their levels, the queue's teams.
        """
        if conv.queue is None:
            return None
        need = self._need(conv.queue, conv.skills, conv.channel)
        facts: dict[str, Any] = {
            "name": conv.queue,
            "open": self.calendar.open(conv.queue, self._clock.now()) if self.calendar else True,
            "agents_available": len(self._pool(need).order),
            "waiting": self.queue_length(conv.queue),
        }
        position = self.position(conv.id)
        if position is not None:
            facts["position"] = position
            facts["estimated_wait"] = self.estimated_wait(conv.queue, position)
        return facts

    # indexes -------------------------------------------------------------------------------
    def _need(self, queue: str, skills: Iterable[str], channel: str) -> _Need:
        """The conversation's skills merged with its queue's (the higher level wins)."""
        levels = conversation_skills(skills)
        rules = self._queue_needs.get(queue)
        teams: frozenset[str] = frozenset()
        if rules is not None:
            for name, level in rules.skills.items():
                levels[name] = max(levels.get(name, 0), level)
            teams = frozenset(rules.teams)
        return _Need(tuple(sorted(levels.items())), teams, channel)

    def _new_waiting(
        self,
        conversation_id: str,
        queue: str,
        priority: int,
        skills: Iterable[str],
        channel: str,
        enqueued_at: datetime,
        tried: set[str],
    ) -> _Waiting:
        skills = tuple(skills)
        return _Waiting(
            conversation_id,
            queue,
            priority,
            skills,
            channel,
            enqueued_at,
            self._need(queue, skills, channel),
            tried=set(tried),
        )

    def _enqueue(self, w: _Waiting) -> None:
        self._waiting[w.conversation_id] = w
        order = self._queues.get(w.queue)
        if order is None:
            order = self._queues[w.queue] = _QueueOrder()
            # Read at scrape time, so the age keeps growing between router steps.
            self._metrics.queue_longest_wait.labels(w.queue).set_function(
                functools.partial(self._longest_wait, w.queue)
            )
        order.add(w)
        self._dirty.add(w.queue)
        if w.offer_id is None:
            insort(self._groups.setdefault((w.queue, w.need), []), w.key)

    def _dequeue(self, conversation_id: str) -> _Waiting | None:
        w = self._waiting.pop(conversation_id, None)
        if w is None:
            return None
        self._queues[w.queue].remove(w)
        self._dirty.add(w.queue)
        if w.offer_id is None:
            self._ungroup(w)
        return w

    def _ungroup(self, w: _Waiting) -> None:
        group = self._groups.get((w.queue, w.need))
        if group is not None:
            _remove_sorted(group, w.key)
            if not group:
                del self._groups[(w.queue, w.need)]

    def _set_offer(self, w: _Waiting, offer_id: str | None) -> None:
        """Mark a waiting conversation offered (out of its group) or not (back in)."""
        if self._waiting.get(w.conversation_id) is not w or w.offer_id == offer_id:
            w.offer_id = offer_id
            return
        if w.offer_id is None:
            self._ungroup(w)
        elif offer_id is None:
            insort(self._groups.setdefault((w.queue, w.need), []), w.key)
        w.offer_id = offer_id

    def _refresh(self, agent: _Agent) -> None:
        """Keep the agents with room (in all and per need) true after a change of presence,
        load, idle time or definition: a few set and bisect operations, no scan."""
        available = agent.presence == "available"
        if available and agent.any_room():
            self._free.add(agent.id)
        else:
            self._free.discard(agent.id)
        for need, pool in self._pools.items():
            if available and agent.room(need.channel) and agent.serves(need):
                pool.put(agent)
            else:
                pool.drop(agent.id)

    def _pool(self, need: _Need) -> _Pool:
        pool = self._pools.get(need)
        if pool is None:
            if len(self._pools) >= MAX_POOLS:
                # Every agent change updates every pool: keep those of waiting conversations.
                waiting = {n for _, n in self._groups}
                self._pools = {n: p for n, p in self._pools.items() if n in waiting}
            pool = self._pools[need] = _Pool()
            for agent in self._agents.values():  # once per need ever seen
                if (
                    agent.presence == "available"
                    and agent.room(need.channel)
                    and agent.serves(need)
                ):
                    pool.put(agent)
        return pool

    def _assign(self, agent: _Agent, conversation_id: str, channel: str) -> None:
        if conversation_id not in agent.conversations:
            agent.conversations[conversation_id] = channel
            agent.count(channel, 1)
            self._refresh(agent)

    # internals -----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    def _track_offer(self, offer: OfferRecord, channel: str) -> None:
        self._offers[offer.id] = offer
        agent = self._agents.get(offer.agent_id)
        if agent is not None:
            agent.offers[offer.id] = channel
            agent.count(channel, 1)
            self._refresh(agent)
        waiting = self._waiting.get(offer.conversation_id)
        if waiting is not None:
            self._set_offer(waiting, offer.id)
        heapq.heappush(self._expiry, (offer.expires_at.timestamp(), offer.id))

    def _forget_offer(self, offer_id: str) -> OfferRecord | None:
        offer = self._offers.pop(offer_id, None)
        if offer is None:
            return None
        agent = self._agents.get(offer.agent_id)
        if agent is not None and offer_id in agent.offers:
            agent.count(agent.offers.pop(offer_id), -1)
            self._refresh(agent)
        waiting = self._waiting.get(offer.conversation_id)
        if waiting is not None and waiting.offer_id == offer_id:
            self._set_offer(waiting, None)
        return offer

    async def _resolve(self, agent_id: str, offer_id: str, status: str, kind: str) -> Accepted:
        """Accept or decline. Not under the router's lock: many answers are written at once
        (SQLite commits them together), and a matching pass does not wait for them. The
        offer is marked as being answered meanwhile: it keeps the agent's capacity and its
        conversation out of the next pass, and an expiry or cancel leaves it alone."""
        offer = self._offers.get(offer_id)
        if offer is None or offer.agent_id != agent_id or offer_id in self._answering:
            known = await self._store.offer(offer_id)
            if known is None or known.agent_id != agent_id:
                raise NotFound(f"unknown offer {offer_id!r}", code="unknown_offer")
            state = "being answered" if known.status == "pending" else f"already {known.status}"
            raise Conflict(f"offer {offer_id} is {state}", code="offer_closed")
        self._answering.add(offer_id)
        try:
            result = await self._store.resolve_offer(offer_id, status, kind, self._clock.now())
        except BaseException:
            self._answering.discard(offer_id)
            # Still pending in the store: it may be answered again or expire.
            heapq.heappush(self._expiry, (offer.expires_at.timestamp(), offer_id))
            self._wake.set()
            raise
        self._answering.discard(offer_id)
        agent = self._agents[agent_id]
        channel = agent.offers.get(offer_id, "")
        self._forget_offer(offer_id)
        if result is None:
            raise Conflict(f"offer {offer_id} is no longer pending", code="offer_closed")
        if status == "accepted":
            self._assign(agent, offer.conversation_id, channel)
            taken = self._dequeue(offer.conversation_id)
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
        # Under the lock: an offer of a pass still being written is cancelled after it.
        async with self._lock:
            if offer_id in self._answering:
                return  # an answer is being written; an acceptance is refused by the rules
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
        """Expire every due offer (their writes in flight together)."""
        now = self._clock.now()
        due: list[str] = []
        while self._expiry and self._expiry[0][0] <= now.timestamp():
            _, offer_id = heapq.heappop(self._expiry)
            if offer_id in self._offers and offer_id not in self._answering:
                due.append(offer_id)
        if due:
            await asyncio.gather(*(self._expire(offer_id, now) for offer_id in due))

    async def _expire(self, offer_id: str, now: datetime) -> None:
        self._answering.add(offer_id)
        try:
            result = await self._store.resolve_offer(
                offer_id, "expired", "agent.offer_expired", now
            )
        except BaseException:
            self._answering.discard(offer_id)
            heapq.heappush(self._expiry, (now.timestamp(), offer_id))  # try again
            raise
        self._answering.discard(offer_id)
        offer = self._forget_offer(offer_id)
        if offer is None:
            return
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

    def _plan(self, limit: int) -> list[tuple[_Waiting, _Agent]]:
        """Choose the pass's offers, in offer order over every group some agent can serve.

        Each choice takes the agent's capacity at once (its offer is tracked here, which
        updates the pools), so the next choice sees it. Synchronous: nothing else changes
        the router meanwhile.
        """
        streams: dict[tuple[str, _Need], tuple[list[tuple[int, datetime, str]], _Pool]] = {}
        heads: list[tuple[tuple[int, datetime, str], tuple[str, _Need], int]] = []
        for gkey, keys in self._groups.items():
            pool = self._pool(gkey[1])
            if pool.order:
                streams[gkey] = (list(keys), pool)
                heads.append((keys[0], gkey, 0))
        heapq.heapify(heads)
        now = self._clock.now()
        planned: list[tuple[_Waiting, _Agent]] = []
        while heads and len(planned) < limit:
            key, gkey, i = heapq.heappop(heads)
            keys, pool = streams[gkey]
            waiting = self._waiting[key[2]]
            agent = self._pick(waiting, pool)
            if agent is not None:
                offer = OfferRecord(
                    id=new_id("of"),
                    conversation_id=waiting.conversation_id,
                    agent_id=agent.id,
                    status="pending",
                    created_at=now,
                    expires_at=now + timedelta(seconds=self._offer_timeout),
                )
                self._track_offer(offer, waiting.channel)
                planned.append((waiting, agent))
            if pool.order and i + 1 < len(keys):
                heapq.heappush(heads, (keys[i + 1], gkey, i + 1))
        return planned

    def _pick(self, waiting: _Waiting, pool: _Pool) -> _Agent | None:
        """The longest-idle agent of the pool who has not had this conversation yet in this
        round; everyone tried: a new round."""
        first: _Agent | None = None
        for _, agent_id in pool.order:
            agent = self._agents[agent_id]
            if waiting.conversation_id in agent.conversations:
                continue
            if agent_id not in waiting.tried:
                return agent
            if first is None:
                first = agent
        if first is not None:
            # Everyone able to take it has been tried: start a new round.
            waiting.tried.clear()
        return first

    async def _match(self) -> None:
        if not self._free or not self._groups:
            return  # nobody has room, or nothing waits without an offer
        async with self._lock:
            planned = self._plan(MAX_OFFERS_PER_PASS)
            if not planned:
                return
            offers = [self._offers[w.offer_id] for w, _ in planned if w.offer_id is not None]
            try:
                results = await self._store.create_offers(offers, self._clock.now())
            except Exception:
                for offer in offers:
                    self._forget_offer(offer.id)
                raise
            made: list[OfferRecord] = []
            for offer, result in zip(offers, results, strict=True):
                if result is None:  # the conversation closed meanwhile
                    self._forget_offer(offer.id)
                    self._dequeue(offer.conversation_id)
                else:
                    made.append(offer)
            self._metrics.offers.labels("offered").inc(len(made))
        self._notify([offer.conversation_id for offer in made])
        self._update_gauges()
        if len(planned) >= MAX_OFFERS_PER_PASS:
            self._wake.set()  # more may be waiting: another pass at once
        if self._push is not None:
            for offer in made:
                await self._push(offer.agent_id, {"type": "offer", **self._offer_view(offer)})

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
        order = self._queues.get(queue)
        oldest = order.oldest() if order is not None else None
        if oldest is None:
            return 0.0
        return max(0.0, (self._clock.now() - oldest).total_seconds())

    def _update_gauges(self) -> None:
        for queue in self._dirty:
            self._metrics.queue_length.labels(queue).set(self.queue_length(queue))
        self._dirty.clear()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router_task_failed", error=repr(task.exception()))
