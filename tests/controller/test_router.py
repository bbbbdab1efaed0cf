"""The router on its own: a real SQLite store, a manual clock, desks that record pushes.

Conversations are queued the way the worker queues them (a committed decision, then
``after_commit``); nobody decides the router's own events here, so the store's rows and the
pushed frames are what the tests read.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from controller import router as router_module
from controller.clock import ManualClock
from controller.metrics import Metrics
from controller.models import NewEvent
from controller.router import MAX_OFFERS_PER_PASS, Router, conversation_skills
from controller.settings import QueueRouting
from controller.store.base import AgentRecord, DecisionRecord
from controller.store.sqlite import SqliteStore

OFFER_TIMEOUT = 30.0


@dataclass
class Desks:
    """Every frame the router pushed, by agent."""

    frames: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def push(self, agent_id: str, frame: dict[str, Any]) -> int:
        self.frames.append((agent_id, frame))
        return 1

    def offers(self) -> list[tuple[str, str]]:
        """(agent, conversation) of every offer pushed, in push order."""
        return [(a, f["conversation_id"]) for a, f in self.frames if f["type"] == "offer"]

    def offer_id(self, conversation_id: str) -> str:
        return next(
            f["offer_id"]
            for _, f in reversed(self.frames)
            if f["type"] == "offer" and f["conversation_id"] == conversation_id
        )


class Bench:
    def __init__(self, tmp_path: Path, clock: ManualClock) -> None:
        self.clock = clock
        self.store = SqliteStore(tmp_path / "router.db")
        self.desks = Desks()
        self.metrics = Metrics()
        self.router: Router | None = None
        self.counter = 0

    def make_router(self, queues: Mapping[str, QueueRouting] | None = None) -> Router:
        self.router = Router(
            self.store,
            self.clock,
            self.metrics,
            lambda ids: None,
            offer_timeout=OFFER_TIMEOUT,
            queues=queues,
        )
        self.router.set_push(self.desks.push)
        return self.router

    async def agent(
        self,
        agent_id: str,
        *,
        capacity: int = 3,
        skills: Mapping[str, int] | None = None,
        channels: Mapping[str, int] | None = None,
        teams: Iterable[str] = (),
        presence: str = "available",
        idle: float = 0.0,
    ) -> None:
        """An agent as the admin API makes it; ``idle``: seconds idle before now."""
        record = AgentRecord(
            agent_id,
            agent_id.title(),
            presence,
            capacity,
            dict(skills or {}),
            self.clock.now() - timedelta(seconds=idle),
            dict(channels or {}),
            tuple(teams),
        )
        await self.store.upsert_agent(record)
        if self.router is not None:
            self.router.add_agent(
                record.id,
                record.name,
                record.capacity,
                record.skills,
                presence,
                record.idle_since,
                channels=record.channels,
                teams=record.teams,
            )

    async def queue(
        self,
        *,
        queue: str = "support",
        priority: int = 0,
        skills: Iterable[str] = (),
        channel: str = "webchat",
        tell_router: bool = True,
    ) -> str:
        """A new conversation routed to ``queue`` (decided, committed, and told the router)."""
        self.counter += 1
        [acc] = await self.store.accept(
            [
                NewEvent(
                    type="customer.message",
                    source=f"{channel}:{channel}",
                    dedupe_key=secrets.token_hex(6),
                    channel=channel,
                    instance=channel,
                    endpoint="business",
                    identity=f"customer-{self.counter}",
                    data={"text": "agent"},
                )
            ],
            self.clock.now(),
        )
        await self.decide(
            acc.conversation_id,
            tell_router=tell_router,
            state="queued",
            queue=queue,
            priority=priority,
            skills=list(skills),
            enqueued_at=self.clock.now(),
        )
        return acc.conversation_id

    async def decide(
        self,
        conversation_id: str,
        *,
        tell_router: bool = True,
        released: Iterable[str] = (),
        **snapshot: Any,
    ) -> None:
        """A new event for the conversation, then its pending events decided: the last one
        changes the snapshot."""
        await self.store.accept(
            [
                NewEvent(
                    type="customer.message",
                    source="test",
                    dedupe_key=secrets.token_hex(6),
                    conversation_id=conversation_id,
                    data={"text": "still here"},
                )
            ],
            self.clock.now(),
        )
        conv, events = await self.store.load_for_decision(conversation_id)
        assert conv is not None and events
        for i, event in enumerate(events):
            after = conv.model_copy(update=snapshot if i == len(events) - 1 else {})
            record = DecisionRecord(
                event=event,
                before_version=conv.version,
                after=after,
                rules_version="v-test",
                matcher="reference",
                released_agents=list(released) if i == len(events) - 1 else [],
            )
            committed = await self.store.commit_decision(record, self.clock.now())
            if tell_router and self.router is not None:
                self.router.after_commit(record, committed)
            loaded = await self.store.load_conversation(conversation_id)
            assert loaded is not None
            conv = loaded

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Let the router work until ``predicate`` holds (bounded, so a bug fails the test)."""
        for _ in range(2000):
            if predicate():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never happened: {what}")

    async def offers_pushed(self, n: int) -> list[tuple[str, str]]:
        await self.until(lambda: len(self.desks.offers()) >= n, f"{n} offers pushed")
        await asyncio.sleep(0.02)  # and no more than that
        return self.desks.offers()


@pytest.fixture
async def bench(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Bench]:
    b = Bench(tmp_path, clock)
    await b.store.open()
    yield b
    if b.router is not None:
        await b.router.stop()
    await b.store.close()


def _gauge(metrics: Metrics, name: str, queue: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"queue": queue})


# step 1: routing at scale ---------------------------------------------------------------------
async def test_one_pass_writes_all_its_offers_in_one_transaction(bench: Bench) -> None:
    """Waiting conversations and agents with room found at start: one pass, one transaction,
    offers in priority-then-age order to the longest-idle agents, capacity respected."""
    for i in range(10):
        await bench.agent(f"a{i}", capacity=3, idle=100 - i)  # a0 idle longest
    queued = []
    for i in range(30):
        queued.append(await bench.queue(priority=5 if i == 29 else 0))
        bench.clock.advance(1)
    router = bench.make_router()
    before = bench.store.transactions
    await router.start()
    offers = await bench.offers_pushed(30)
    assert bench.store.transactions == before + 1
    # the urgent one first, to the agent idle longest; then the oldest waiting
    assert offers[0] == ("a0", queued[29])
    assert [c for _, c in offers] == [queued[29], *queued[:29]]
    by_agent: dict[str, int] = {}
    for agent, _ in offers:
        by_agent[agent] = by_agent.get(agent, 0) + 1
    assert by_agent == {f"a{i}": 3 for i in range(10)}
    # longest idle fills first: a0 takes offers 1-3, a1 offers 4-6, …
    assert [a for a, _ in offers[:6]] == ["a0"] * 3 + ["a1"] * 3
    snap = await bench.store.router_snapshot()
    assert len(snap.pending_offers) == 30
    offered = await asyncio.gather(*(bench.store.events(c) for c in queued))
    assert all([e.type for e, _ in events].count("agent.offered") == 1 for events in offered)


async def test_a_big_backlog_goes_out_in_slices_and_nothing_is_offered_twice(
    bench: Bench,
) -> None:
    n = MAX_OFFERS_PER_PASS + 40
    await bench.agent("alice", capacity=100)
    for i in range(n // 100 + 1):
        await bench.agent(f"b{i}", capacity=100)
    queued = [await bench.queue() for _ in range(n)]
    router = bench.make_router()
    before = bench.store.transactions
    await router.start()
    offers = await bench.offers_pushed(n)
    assert sorted(c for _, c in offers) == sorted(queued)
    assert bench.store.transactions == before + 2  # two slices
    assert len((await bench.store.router_snapshot()).pending_offers) == n


async def test_no_pass_while_nobody_has_room(bench: Bench) -> None:
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", presence="away")
    for _ in range(50):
        await bench.queue()
    await asyncio.sleep(0.05)
    assert bench.desks.offers() == []
    assert (await bench.store.router_snapshot()).pending_offers == []
    await router.set_presence("alice", "available")
    offers = await bench.offers_pushed(3)
    assert len(offers) == 3  # capacity 3


async def test_offer_timeout_and_decline_move_to_the_next_agent(bench: Bench) -> None:
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", idle=20)
    await bench.agent("bob", idle=10)
    cid = await bench.queue()
    assert (await bench.offers_pushed(1)) == [("alice", cid)]
    bench.clock.advance(OFFER_TIMEOUT + 1)
    await bench.until(lambda: len(bench.desks.offers()) == 2, "offer to bob after expiry")
    assert bench.desks.offers()[-1] == ("bob", cid)
    closed = [f for a, f in bench.desks.frames if f["type"] == "offer_closed"]
    assert [(f["conversation_id"], f["outcome"]) for f in closed] == [(cid, "expired")]
    await router.decline("bob", bench.desks.offer_id(cid))
    # everyone able to take it was tried: a new round, from the longest idle again
    await bench.until(lambda: len(bench.desks.offers()) == 3, "a new round")
    assert bench.desks.offers()[-1] == ("alice", cid)
    await router.accept("alice", bench.desks.offer_id(cid))
    assert router.conversations_of("alice") == [cid] and router.position(cid) is None


async def test_answers_are_written_together_and_one_answer_wins(bench: Bench) -> None:
    """Accepts are not serialised behind one lock: many in flight at once; of two answers to
    one offer (or an answer and its expiry) exactly one counts."""
    router = bench.make_router()
    await router.start()
    for i in range(4):
        await bench.agent(f"a{i}", capacity=5)
    queued = [await bench.queue() for _ in range(20)]
    offers = await bench.offers_pushed(20)
    ids = {c: bench.desks.offer_id(c) for c in queued}
    twice = queued[0]
    agent_of = {c: a for a, c in offers}
    results = await asyncio.gather(
        *(router.accept(agent_of[c], ids[c]) for c in queued),
        router.decline(agent_of[twice], ids[twice]),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and getattr(refused[0], "code", None) == "offer_closed"
    assert sum(len(router.conversations_of(f"a{i}")) for i in range(4)) == 20
    bench.clock.advance(OFFER_TIMEOUT + 1)  # nothing left to expire
    await asyncio.sleep(0.02)
    assert not [f for _, f in bench.desks.frames if f["type"] == "offer_closed"]
    stored = await asyncio.gather(*(bench.store.offer(ids[c]) for c in queued))
    assert all(o is not None and o.status == "accepted" for o in stored)


async def test_a_conversation_closed_before_the_write_gets_no_offer(bench: Bench) -> None:
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", presence="away")
    kept, gone = await bench.queue(), await bench.queue()
    await bench.decide(gone, tell_router=False, state="closed")  # the router hears it later
    await router.set_presence("alice", "available")
    assert (await bench.offers_pushed(1)) == [("alice", kept)]
    assert router.position(gone) is None and router.position(kept) == 1
    assert len((await bench.store.router_snapshot()).pending_offers) == 1


async def test_positions_and_gauges_follow_every_change(bench: Bench) -> None:
    """The incremental positions and gauges equal a count from scratch after random moves."""
    rng = random.Random(8)
    router = bench.make_router()
    await router.start()
    live: dict[str, tuple[str, int, float]] = {}  # conversation -> (queue, priority, at)
    for step in range(120):
        if live and rng.random() < 0.3:
            cid = rng.choice(sorted(live))
            if rng.random() < 0.5:
                await bench.decide(cid, state="closed")
                del live[cid]
            else:  # re-prioritised, maybe to the other queue, keeping its place in time
                queue, priority = rng.choice(["support", "sales"]), rng.randint(0, 3)
                await bench.decide(cid, queue=queue, priority=priority)
                live[cid] = (queue, priority, live[cid][2])
        else:
            queue, priority = rng.choice(["support", "sales"]), rng.randint(0, 3)
            cid = await bench.queue(queue=queue, priority=priority)
            live[cid] = (queue, priority, bench.clock.now().timestamp())
        bench.clock.advance(rng.choice([0, 1]))
        if step % 10 == 9:
            for cid, (queue, priority, at) in live.items():
                ahead = [
                    c
                    for c, (q, p, t) in live.items()
                    if q == queue and (-p, t, c) < (-priority, at, cid)
                ]
                assert router.position(cid) == len(ahead) + 1
            for queue in ("support", "sales"):
                mine = [at for q, _, at in live.values() if q == queue]
                assert _gauge(bench.metrics, "convctl_queue_length", queue) == len(mine)
                wait = _gauge(bench.metrics, "convctl_queue_longest_wait_seconds", queue)
                oldest = bench.clock.now().timestamp() - min(mine) if mine else 0.0
                assert wait == pytest.approx(oldest)


def test_route_skills_with_levels() -> None:
    assert conversation_skills(["billing", "german:5", "german:3", "x:99", "odd:", "a:b"]) == {
        "billing": 1,
        "german": 5,
        "x": 10,
        "odd:": 1,
        "a:b": 1,
    }


# step 2: capacity per channel -----------------------------------------------------------------
async def test_capacity_per_channel_and_in_total(bench: Bench) -> None:
    """alice: whatsapp 1, webchat 2, 2 in total; a messenger conversation is never hers."""
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", capacity=2, channels={"whatsapp": 1, "webchat": 2}, idle=10)
    await bench.agent("bob", presence="away")  # any channel, 3 in total
    w1 = await bench.queue(channel="whatsapp")
    w2 = await bench.queue(channel="whatsapp")
    m1 = await bench.queue(channel="messenger")
    c1 = await bench.queue(channel="webchat")
    c2 = await bench.queue(channel="webchat")
    # whatsapp 1/1, then the total 2/2 with a web chat; messenger is not hers
    assert (await bench.offers_pushed(2)) == [("alice", w1), ("alice", c1)]
    view = router.agent_view("alice")
    assert view["load"] == 2 and view["capacity"] == 2
    assert view["channels"] == {
        "webchat": {"capacity": 2, "load": 1},
        "whatsapp": {"capacity": 1, "load": 1},
    }
    await router.accept("alice", bench.desks.offer_id(w1))
    await bench.decide(w1, state="closed")  # whatsapp free again, the total still full
    await asyncio.sleep(0.02)
    assert len(bench.desks.offers()) == 2
    await router.set_presence("bob", "available")  # bob takes any channel, oldest first
    offers = await bench.offers_pushed(5)
    assert offers[2:] == [("bob", w2), ("bob", m1), ("bob", c2)]


async def test_channel_loads_are_rebuilt_at_start(bench: Bench) -> None:
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", capacity=5, channels={"whatsapp": 1, "webchat": 1})
    first = await bench.queue(channel="whatsapp")
    assert (await bench.offers_pushed(1)) == [("alice", first)]
    await router.stop()
    restarted = bench.make_router()  # a new process: memory from the store only
    await restarted.start()
    second = await bench.queue(channel="whatsapp")
    chat = await bench.queue(channel="webchat")
    offers = await bench.offers_pushed(2)
    assert offers[1] == ("alice", chat)
    # still waiting (whatsapp is full), behind the first one, which is offered but not taken
    assert restarted.position(second) == 2
    assert restarted.agent_view("alice")["channels"]["whatsapp"] == {"capacity": 1, "load": 1}


# step 3: skills with levels --------------------------------------------------------------------
async def test_skill_levels_pick_among_eligible_the_longest_idle(bench: Bench) -> None:
    router = bench.make_router()
    await router.start()
    await bench.agent("novice", skills={"billing": 2}, idle=300)  # idle longest, level too low
    await bench.agent("carol", skills={"billing": 7, "german": 5}, idle=100)
    await bench.agent("dave", skills={"billing": 9}, idle=100)  # same idle time as carol
    await bench.agent("erin", skills={"billing": 10}, idle=50)
    cid = await bench.queue(skills=["billing:5"])
    # eligible: carol, dave, erin; longest idle: carol and dave tie; the id decides
    assert (await bench.offers_pushed(1)) == [("carol", cid)]
    plain = await bench.queue(skills=["billing"])  # level 1 or more: the novice too
    assert (await bench.offers_pushed(2))[1] == ("novice", plain)
    german = await bench.queue(skills=["billing:5", "german:6"])  # nobody is good enough
    await asyncio.sleep(0.02)
    assert len(bench.desks.offers()) == 2 and router.position(german) == 3


async def test_a_queue_asks_for_skill_levels(bench: Bench) -> None:
    router = bench.make_router({"billing": QueueRouting(skills={"billing": 6})})
    await router.start()
    await bench.agent("low", skills={"billing": 5}, idle=100)
    await bench.agent("high", skills={"billing": 6})
    cid = await bench.queue(queue="billing")
    # the route's own skill (level 3) is lower: the queue's level wins
    other = await bench.queue(queue="billing", skills=["billing:3"])
    assert (await bench.offers_pushed(2)) == [("high", cid), ("high", other)]
    fact = await bench.queue(queue="support", skills=["billing:3"])
    assert (await bench.offers_pushed(3))[2] == ("low", fact)


# step 4: teams ---------------------------------------------------------------------------------
async def test_a_queue_restricted_to_teams_is_offered_to_their_agents_only(bench: Bench) -> None:
    router = bench.make_router({"vip": QueueRouting(teams=["gold", "platinum"])})
    await router.start()
    await bench.agent("silver", teams=["silver"], idle=100)
    await bench.agent("nobody", idle=90)
    await bench.agent("goldie", teams=["gold"], idle=10)
    vip = await bench.queue(queue="vip")
    anyone = await bench.queue(queue="support")
    assert (await bench.offers_pushed(2)) == [("goldie", vip), ("silver", anyone)]


async def test_agents_available_follows_every_change(bench: Bench) -> None:
    """``queue.agents_available`` (the pools kept up to date on every change) equals a count
    from scratch after random presence changes, offers, answers and releases."""
    rng = random.Random(11)
    router = bench.make_router({"vip": QueueRouting(teams=["gold"], skills={"fr": 2})})
    await router.start()
    channels = [{}, {"webchat": 1}, {"whatsapp": 2, "webchat": 1}, {"messenger": 1}]
    agents = {}
    for i in range(12):
        agents[f"a{i}"] = (
            rng.choice(channels),
            {"fr": rng.randint(1, 4)} if rng.random() < 0.6 else {},
            ["gold"] if rng.random() < 0.5 else [],
        )
        chans, skills, teams = agents[f"a{i}"]
        await bench.agent(
            f"a{i}", capacity=rng.randint(1, 3), channels=chans, skills=skills, teams=teams
        )
    convs = []
    done = {"answered": 0, "released": 0}
    for step in range(60):
        roll = rng.random()
        if roll < 0.4:
            convs.append(
                await bench.queue(
                    queue=rng.choice(["support", "vip"]),
                    skills=rng.choice([[], ["fr:3"], ["fr"]]),
                    channel=rng.choice(["webchat", "whatsapp", "messenger"]),
                )
            )
        elif roll < 0.6:
            await router.set_presence(f"a{rng.randrange(12)}", rng.choice(["available", "away"]))
        elif roll < 0.8:
            pending = [(a, f["offer_id"]) for a, f in bench.desks.frames if f["type"] == "offer"]
            if pending:
                agent, offer_id = rng.choice(pending)
                answer = router.accept if rng.random() < 0.5 else router.decline
                try:
                    await answer(agent, offer_id)
                    done["answered"] += 1
                except Exception as exc:  # answered already: a 409
                    assert getattr(exc, "code", None) == "offer_closed"
        else:
            busy = [(a, c) for a in agents for c in router.conversations_of(a)]
            if busy:
                agent, cid = rng.choice(busy)
                await bench.decide(cid, state="closed", released=[agent])
                done["released"] += 1
        await asyncio.sleep(0.01)
        if step % 6 != 5:
            continue
        for cid in convs:
            conv = await bench.store.load_conversation(cid)
            assert conv is not None
            facts = router.queue_facts(conv)
            assert facts is not None
            need = conversation_skills(conv.skills)
            if conv.queue == "vip":
                need["fr"] = max(need.get("fr", 0), 2)
            expected = 0
            for agent_id, (chans, skills, teams) in agents.items():
                view = router.agent_view(agent_id)
                on_channel = view["channels"].get(conv.channel, {"load": 0, "capacity": 0})
                room = view["load"] < view["capacity"] and (
                    not chans or on_channel["load"] < on_channel["capacity"]
                )
                expected += bool(
                    view["presence"] == "available"
                    and room
                    and all(skills.get(n, 0) >= lv for n, lv in need.items())
                    and (conv.queue != "vip" or "gold" in teams)
                )
            assert facts["agents_available"] == expected, (cid, step)
    assert done["answered"] >= 5 and done["released"] >= 3, done  # the moves did happen


async def test_pools_of_needs_nobody_waits_for_are_dropped(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each agent change updates every pool: past MAX_POOLS, pools are kept only for the
    needs of waiting conversations (the others are made again when asked for)."""
    monkeypatch.setattr(router_module, "MAX_POOLS", 2)
    router = bench.make_router()
    await router.start()
    await bench.agent("alice", skills={"a": 1, "b": 1, "c": 1}, presence="away")
    gone_a, gone_b = await bench.queue(skills=["a"]), await bench.queue(skills=["b"])
    for cid in (gone_a, gone_b):  # asking for the facts makes a pool per need
        conv = await bench.store.load_conversation(cid)
        assert conv is not None and router.queue_facts(conv) is not None
    await bench.decide(gone_a, state="closed")
    await bench.decide(gone_b, state="closed")
    assert len(router._pools) == 2
    kept = await bench.queue(skills=["c"])
    conv = await bench.store.load_conversation(kept)
    assert conv is not None and router.queue_facts(conv) is not None
    assert [dict(n.skills) for n in router._pools] == [{"c": 1}]
    await router.set_presence("alice", "available")
    assert await bench.offers_pushed(1) == [("alice", kept)]
    conv = await bench.store.load_conversation(gone_a)
    assert conv is not None
    facts = router.queue_facts(conv)  # made again, from scratch
    assert facts is not None and facts["agents_available"] == 1
