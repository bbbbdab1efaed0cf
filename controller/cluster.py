"""Several ``convctl serve`` processes sharing one PostgreSQL database.

Each process registers in the ``processes`` table and heartbeats (database time). A
conversation is decided by the one process holding its lease; every lease has a fencing
token, and a decision commits only while its process still holds the lease with that token,
so a process that was taken for dead (a long pause, a lost network) can never commit over the
process that took its conversations.

- **Any process accepts any event.** The inbox stores it and wakes the local workers; a
  worker takes the conversation's lease when nobody holds it, else the store tells the owner
  (``NOTIFY``) and the owner decides it. A periodic sweep is the safety net for lost
  notifications and for events whose accepting process died before deciding them.
- **Takeover.** A process whose heartbeat is older than the heartbeat timeout is dead: the
  survivor that notices it removes it in one transaction, handing its leases round robin to
  the living processes (new tokens) and releasing its outbox and timer claims; the living
  are told at once. A process finds the conversations it was given by its sweep (owned in the
  database, unknown in memory); the first undecided event of each is decided by the reference
  evaluator, as at a restart.
- **Hand-over.** A process that stops cleanly (SIGTERM) decides nothing new, lets the
  decisions in flight finish, then releases its leases and its timer claims in one
  transaction and tells the others (``handover``), who sweep at once: its conversations are
  decided elsewhere from their next event on, without waiting for a heartbeat timeout.
- **Singletons.** The router (agents, queues, offers) and the campaign runner run in one
  process only, the holder of a session advisory lock on the listening connection; when that
  process dies, its connection ends, the lock is free and another process takes the role.

Heartbeats and the sweep run on real time (``asyncio.sleep``), not the service clock: they
measure whether processes are alive, which a simulated clock cannot tell.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

import structlog

from controller.metrics import Metrics
from controller.store.base import TimerRow

log = structlog.get_logger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[None]]
Step = Callable[[], Awaitable[Any]]


class Link(Protocol):
    """The listening connection (it also holds the singleton lock)."""

    @property
    def closed(self) -> bool: ...

    async def heartbeat(self) -> bool: ...

    async def try_lock(self, name: str) -> bool: ...

    async def close(self) -> None: ...


class ClusterStore(Protocol):
    """What the cluster needs of the store (``PostgresStore`` has it)."""

    process_id: str

    async def heartbeat(self) -> bool: ...

    async def release_dead_processes(self, timeout: float) -> list[str]: ...

    async def hand_over(self) -> int: ...

    async def acquire_lease(self, conversation_id: str) -> tuple[str, int]: ...

    async def release_lease(self, conversation_id: str) -> None: ...

    async def pending_work(self) -> list[tuple[str, str, int | None]]: ...

    async def claim_timers(self, now: datetime, limit: int) -> list[TimerRow]: ...

    async def processes(self) -> list[dict[str, Any]]: ...

    async def publish(self, message: Mapping[str, Any]) -> None: ...

    async def listen(self, on_message: Callable[[Message], None]) -> Link: ...


SINGLETON_LOCK = "singletons"


class Cluster:
    """This process among the others: its leases, heartbeat, sweep and messages."""

    def __init__(
        self,
        store: ClusterStore,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.process_id = store.process_id
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        # Conversations this process holds the lease of, with the fencing token.
        self.owned: dict[str, int] = {}
        self._work: Callable[[Iterable[str]], None] | None = None
        self._adopt: Callable[[list[tuple[str, str]]], None] | None = None
        self._after_takeover: list[Callable[[], None]] = []
        self._handlers: dict[str, Handler] = {}
        self._singletons: list[tuple[Step, Step]] = []
        self.leader = False
        self.takeovers = 0
        self.handovers = 0  # other processes' clean stops this process heard of
        self.leaving = False  # stopping: no new decisions here (``hand_over``)
        self._handed_over = False  # another process left: wake the pollers after the sweep
        self._link: Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._sweep_now = asyncio.Event()
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self.swept = asyncio.Event()  # set after each sweep (tests and benchmarks wait on it)

    # wiring --------------------------------------------------------------------------------
    def serve(
        self,
        work: Callable[[Iterable[str]], None],
        adopt: Callable[[list[tuple[str, str]]], None],
    ) -> None:
        """``work``: wake the workers for conversations; ``adopt``: conversations this
        process was given by a takeover, with their first undecided event."""
        self._work, self._adopt = work, adopt

    def after_takeover(self, hook: Callable[[], None]) -> None:
        """Called when claims were released by a takeover (wake the outbox poller...)."""
        self._after_takeover.append(hook)

    def on_message(self, kind: str, handler: Handler) -> None:
        """Handle the messages of one kind that processes publish to each other; messages
        are handled one at a time, in the order they arrive."""
        self._handlers[kind] = handler

    def singleton(self, start: Step, stop: Step) -> None:
        """Run ``start`` in the one process that holds the singleton lock, once it does;
        ``stop`` when it loses the lock."""
        self._singletons.append((start, stop))

    async def publish(self, message: Mapping[str, Any]) -> None:
        await self._store.publish({**message, "from": self.process_id})

    def publish_soon(self, message: Mapping[str, Any]) -> None:
        """Publish from synchronous code (an after-commit hook); failures are logged."""
        task = asyncio.create_task(self.publish(message))
        self._chores.add(task)
        task.add_done_callback(self._chore_done)

    def _chore_done(self, task: asyncio.Task[None]) -> None:
        self._chores.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster_publish_failed", error=repr(task.exception()))

    async def alone(self) -> bool:
        """Whether no other process is registered."""
        return all(p["id"] == self.process_id for p in await self._store.processes())

    # lifecycle -----------------------------------------------------------------------------
    async def start(self) -> int:
        """Join: listen, heartbeat, first sweep (and the singleton role if free). Returns
        how many conversations with undecided events this process picked up."""
        await self._connect()
        self._consumer = asyncio.create_task(self._consume(), name="cluster-messages")
        await self._heartbeat()
        found = await self._tick()
        self._task = asyncio.create_task(self._loop(), name="cluster")
        self._beat = asyncio.create_task(self._heartbeats(), name="cluster-heartbeat")
        return found

    async def stop(self) -> None:
        for task in (self._beat, self._task, self._consumer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._beat = self._task = self._consumer = None
        if self._chores:
            await asyncio.gather(*self._chores, return_exceptions=True)
        if self._link is not None:
            await self._link.close()
            self._link = None

    async def hand_over(self, finish: Step, timeout: float) -> int:
        """Leaving cleanly: decide nothing new, wait (at most ``timeout`` seconds) for
        ``finish`` — the decisions in flight —, then release this process's leases and timer
        claims and tell the others, who take the conversations from their next event on.
        Returns how many leases were released. The process stays registered (its outbox
        deliveries finish) until the store closes."""
        self.leaving = True
        try:
            async with asyncio.timeout(timeout):
                await finish()
        except TimeoutError:
            # A decision still running commits nothing now: its lease is gone (fencing).
            log.warning("hand_over_decisions_unfinished", timeout=timeout)
        try:
            released = await self._store.hand_over()
        except Exception:
            # The database is away: the others take the work over by the heartbeat timeout.
            log.exception("hand_over_failed", leases=len(self.owned))
            return 0
        self.owned.clear()
        if self._metrics is not None:
            self._metrics.cluster_leases_handed_over.inc(released)
        log.info("conversations_handed_over", leases=released, process_id=self.process_id)
        return released

    # leases --------------------------------------------------------------------------------
    async def lease(self, conversation_id: str) -> int | None:
        """The fencing token to decide the conversation with, or None when another process
        holds its lease (that process has been told there is work) or this process is
        leaving (the others will be told)."""
        if self.leaving:
            return None
        token = self.owned.get(conversation_id)
        if token is not None:
            return token
        owner, token = await self._store.acquire_lease(conversation_id)
        if owner != self.process_id:
            return None
        self.owned[conversation_id] = token
        return token

    def lost(self, conversation_id: str) -> None:
        """A commit was refused for the lease: another process has the conversation now."""
        if self.owned.pop(conversation_id, None) is not None:
            log.warning("lease_lost", conversation_id=conversation_id)

    async def release(self, conversation_id: str) -> None:
        """The conversation is closed and has no work: give its lease up."""
        if self.owned.pop(conversation_id, None) is not None:
            await self._store.release_lease(conversation_id)

    # internals -----------------------------------------------------------------------------
    async def _connect(self) -> None:
        self._link = await self._store.listen(self._received)

    def _received(self, message: Message) -> None:
        kind = message.get("kind")
        if kind == "work":
            conversation = message.get("conversation")
            mine = message.get("to") == self.process_id and isinstance(conversation, str)
            if mine and self._work is not None:
                self._work([str(conversation)])
        elif kind == "takeover":
            self._sweep_now.set()
        elif kind == "handover":
            if message.get("from") != self.process_id:
                # Another process left cleanly: its conversations are free to take now.
                self.handovers += 1
                self._handed_over = True
                if self._metrics is not None:
                    self._metrics.cluster_takeovers.labels("handover").inc()
                log.info("process_handed_over", gone=message.get("from"))
                self._sweep_now.set()
        elif isinstance(kind, str) and kind in self._handlers:
            self._inbox.put_nowait(message)

    async def _consume(self) -> None:
        while True:
            message = await self._inbox.get()
            kind = str(message.get("kind"))
            try:
                await self._handlers[kind](message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster_message_failed", kind=kind)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), timeout=self._interval)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster_tick_failed")

    async def _heartbeats(self) -> None:
        """Heartbeats have a task (and a connection) of their own: a long sweep or a busy
        pool must not make a live process look dead."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster_heartbeat_failed")

    async def _heartbeat(self) -> None:
        link = self._link
        if link is not None and not link.closed:
            alive = await link.heartbeat()
        else:
            alive = await self._store.heartbeat()
        if not alive:
            # Taken for dead (a pause longer than the timeout): the leases went to others.
            log.error("process_was_taken_for_dead", leases=len(self.owned))
            self.owned.clear()

    async def _tick(self) -> int:
        """Remove dead processes, sweep for work, take the singleton role; returns how many
        conversations with work the sweep found."""
        self._sweep_now.clear()
        dead = await self._store.release_dead_processes(self._timeout)
        if dead:
            self.takeovers += len(dead)
            if self._metrics is not None:
                self._metrics.cluster_takeovers.labels("dead").inc(len(dead))
            log.warning("processes_taken_over", dead=dead)
        released, self._handed_over = self._handed_over, False
        found = await self._sweep()
        if dead or released:
            for hook in self._after_takeover:
                hook()
        if self._link is None or self._link.closed:
            await self._reconnect()
        if not self.leader and self._link is not None and await self._link.try_lock(SINGLETON_LOCK):
            self.leader = True
            log.info("singletons_started_here", process_id=self.process_id)
            for start, _stop in self._singletons:
                await start()
        self.swept.set()
        return found

    async def _reconnect(self) -> None:
        if self.leader:
            # The lock went with the connection: another process may hold the role now, and
            # two routers must never run. Stop them here; the role is tried for again.
            log.error("singleton_lock_lost")
            self.leader = False
            for _start, stop in reversed(self._singletons):
                await stop()
        log.warning("cluster_listener_reconnecting")
        with contextlib.suppress(OSError):
            await self._connect()

    async def _sweep(self) -> int:
        """Wake the workers for every conversation with undecided events that this process
        owns or nobody owns; conversations given to this process by a takeover are adopted
        (and at start, as after a restart on SQLite, every one found)."""
        adopted: list[tuple[str, str]] = []
        work: list[str] = []
        starting = not self.swept.is_set()
        for conversation_id, first_event, token in await self._store.pending_work():
            if token is not None and conversation_id not in self.owned:
                self.owned[conversation_id] = token
                adopted.append((conversation_id, first_event))
            elif starting and token is None:
                adopted.append((conversation_id, first_event))
            else:
                work.append(conversation_id)
        if adopted and self._adopt is not None:
            log.info("conversations_adopted", count=len(adopted))
            self._adopt(adopted)
        if work and self._work is not None:
            self._work(work)
        return len(adopted) + len(work)
