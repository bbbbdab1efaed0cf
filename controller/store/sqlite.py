"""The embedded SQLite store (WAL).

One writer thread owns the write connection and commits in groups: every write job queued
while the previous transaction ran is applied in the next one, each inside its own
savepoint, so one failing job never spoils the others and every caller still learns about
its own commit only after it happened. Reads go to a second connection on its own thread.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import structlog

from controller.errors import Conflict, ConvctlError, NotFound, PreconditionFailed, RequestError
from controller.ids import new_id
from controller.models import Conversation, Event, NewEvent
from controller.store.base import (
    IDENTITY_FIELDS,
    PROFILE_FIELDS,
    Accepted,
    AgentRecord,
    AppRecord,
    AppSubscription,
    BulkOutcome,
    CampaignOutcome,
    CampaignRecipient,
    CampaignRecord,
    CampaignSend,
    CampaignWork,
    Committed,
    CustomerChange,
    CustomerQuery,
    CustomerRecord,
    CustomerSchema,
    DecisionRecord,
    IdempotencyKey,
    Identity,
    MergeResult,
    Message,
    Notify,
    OfferRecord,
    OptOut,
    OutboxEntry,
    OutboxRow,
    ProviderMessage,
    QueuedConversation,
    Replay,
    RouterSnapshot,
    RulesVersion,
    Store,
    TimerRow,
    change_kind,
    channel_identity,
    offered_event,
    skill_levels,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

# An outbox row is deliverable only when no earlier row of its lane (conversation and
# destination) is still pending, so retries never overtake.
_HEAD_OF_LANE = (
    "NOT EXISTS (SELECT 1 FROM outbox p WHERE p.status = 'pending' "
    "AND p.conversation_id = o.conversation_id AND p.destination = o.destination AND p.id < o.id)"
)
_GROUP_MAX = 256


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA secure_delete=ON")
    conn.row_factory = sqlite3.Row
    return conn


class _Writer(threading.Thread):
    """Runs write jobs in grouped transactions on one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(name="convctl-sqlite-writer", daemon=True)
        self._conn = conn
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self.transactions = 0

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _GROUP_MAX:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self._run_batch(batch)
        self._conn.close()

    def _run_batch(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
    ) -> None:
        # The whole group in one transaction. If a job fails, the group is rolled back and
        # every job runs again in a transaction of its own, so one failing job never spoils
        # the others (failures are rare: a version conflict, a closed conversation).
        jobs = [fn for fn, _ in batch]
        outcomes: list[tuple[bool, Any]]
        try:
            outcomes = [(True, value) for value in self._transaction(jobs)]
        except Exception:
            outcomes = [self._alone(fn) for fn in jobs]
        # One wake-up of each event loop per batch, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(fut.get_loop(), []).append((fut, ok, value))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_settle, results)

    def _transaction(self, jobs: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [fn(conn) for fn in jobs]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.transactions += 1
        return results

    def _alone(self, job: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
        try:
            return True, self._transaction([job])[0]
        except Exception as exc:  # handed to the job's caller, never swallowed
            if not isinstance(exc, ConvctlError):
                log.error("sqlite_transaction_failed", error=repr(exc))
            return False, exc


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        type=row["type"],
        conversation_id=row["conversation_id"],
        seq=row["seq"],
        source=row["source"],
        dedupe_key=row["dedupe_key"],
        accepted_at=_dt(row["accepted_at"]),
        data=json.loads(row["data"]),
    )


class SqliteStore(Store):
    """SQLite implementation of the Store, for one process."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        self._path = str(path)
        self._synchronous = synchronous
        self._writer: _Writer | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convctl-sqlite-read")

    # plumbing ----------------------------------------------------------------------------
    async def open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self._path, self._synchronous)
        self._migrate(conn)
        # A previous process may have died with rows claimed: they are due again now, marked
        # unsure (they may have reached their destination just before the end).
        conn.execute(
            "UPDATE outbox SET claimed = 0, unsure = MAX(unsure, 1) "
            "WHERE status = 'pending' AND claimed = 1"
        )
        self._writer = _Writer(conn)
        self._writer.start()
        loop = asyncio.get_running_loop()
        self._reader_conn = await loop.run_in_executor(
            self._reader, _connect, self._path, self._synchronous
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        if self._reader_conn is not None:
            conn = self._reader_conn
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
            self._reader_conn = None
        self._reader.shutdown(wait=True)

    @property
    def transactions(self) -> int:
        return self._writer.transactions if self._writer else 0

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        folder = resources.files("controller.store") / "migrations"
        scripts = sorted(
            (p.name for p in folder.iterdir() if p.name.startswith("sqlite_")),
        )
        for name in scripts:
            version = int(name.split("_")[1])
            if version in applied:
                continue
            sql = (folder / name).read_text(encoding="utf-8")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in sql.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (version, name, datetime.now(UTC).timestamp()),
                )
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
            log.info("schema_migrated", version=version, script=name)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._writer is not None, "store is not open"
        return await self._writer.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader_conn
        assert conn is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    # inbox -------------------------------------------------------------------------------
    async def accept(
        self, events: Sequence[NewEvent], now: datetime, *, notify: Notify | None = None
    ) -> list[Accepted]:
        def run(conn: sqlite3.Connection) -> list[Accepted]:
            return [_accept_one(conn, ev, now, notify=notify) for ev in events]

        return await self._write(run)

    async def load_for_decision(
        self, conversation_id: str, limit: int = 100
    ) -> tuple[Conversation | None, list[Event]]:
        """The snapshot and its undecided events, read in one go."""

        def run(conn: sqlite3.Connection) -> tuple[Conversation | None, list[Event]]:
            conn.execute("BEGIN")
            try:
                conv = _load_conversation(conn, conversation_id)
                rows = conn.execute(
                    "SELECT * FROM events WHERE conversation_id = ? AND status = 'pending' "
                    "ORDER BY seq LIMIT ?",
                    (conversation_id, limit),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return conv, [_event_from_row(r) for r in rows]

        return await self._read(run)

    async def first_pending_events(self) -> list[tuple[str, str]]:
        """(conversation id, id of its first undecided event), oldest first."""

        def run(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT e.conversation_id, e.id FROM events e JOIN ("
                "SELECT conversation_id, MIN(seq) AS seq FROM events WHERE status = 'pending' "
                "GROUP BY conversation_id) h ON h.conversation_id = e.conversation_id "
                "AND h.seq = e.seq ORDER BY e.accepted_at"
            ).fetchall()
            return [(r[0], r[1]) for r in rows]

        return await self._read(run)

    async def event(self, event_id: str) -> Event | None:
        def run(conn: sqlite3.Connection) -> Event | None:
            row = conn.execute("SELECT * FROM events WHERE id = ?", (event_id,)).fetchone()
            return _event_from_row(row) if row else None

        return await self._read(run)

    async def events(self, conversation_id: str) -> list[tuple[Event, str]]:
        def run(conn: sqlite3.Connection) -> list[tuple[Event, str]]:
            rows = conn.execute(
                "SELECT * FROM events WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
            ).fetchall()
            return [(_event_from_row(r), r["status"]) for r in rows]

        return await self._read(run)

    async def decisions(self, conversation_id: str) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT d.*, e.type FROM decisions d JOIN events e ON e.id = d.event_id "
                "WHERE d.conversation_id = ? ORDER BY d.seq",
                (conversation_id,),
            ).fetchall()
            return [
                {
                    "event_id": r["event_id"],
                    "event_type": r["type"],
                    "seq": r["seq"],
                    "rules_version": r["rules_version"],
                    "matcher": r["matcher"],
                    "outcome": r["outcome"],
                    "state_after": r["state_after"],
                    "fired": json.loads(r["fired"]),
                    "refused": json.loads(r["refused"]),
                    "decided_at": _dt(r["decided_at"]).isoformat(),
                    "facts": None if r["facts"] is None else json.loads(r["facts"]),
                }
                for r in rows
            ]

        return await self._read(run)

    # conversations -----------------------------------------------------------------------
    async def load_conversation(self, conversation_id: str) -> Conversation | None:
        return await self._read(lambda conn: _load_conversation(conn, conversation_id))

    async def latest_conversation_id(
        self, instance: str, endpoint: str, identity: str
    ) -> str | None:
        """The newest conversation of an identity, open or closed (for a returning visitor)."""

        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT id FROM conversations WHERE instance = ? AND endpoint = ? "
                "AND identity = ? ORDER BY closed ASC, created_at DESC LIMIT 1",
                (instance, endpoint, identity),
            ).fetchone()
            return row[0] if row else None

        return await self._read(run)

    async def present_customers(self, instance: str) -> list[tuple[str, str, int]]:
        """Open conversations whose customer was last seen connected.

        Returns (conversation id, identity, seq of that last presence event). Events not yet
        decided count too, so a restart never misses a customer whose return was in flight.
        """

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            rows = conn.execute(
                "SELECT c.id, c.identity, (SELECT e.seq || ':' || e.type FROM events e "
                "WHERE e.conversation_id = c.id AND e.type IN ('customer.message', "
                "'customer.returned', 'customer.disconnected') ORDER BY e.seq DESC LIMIT 1) "
                "FROM conversations c WHERE c.instance = ? AND c.closed = 0",
                (instance,),
            ).fetchall()
            found = []
            for cid, identity, last in rows:
                if last is None:
                    continue
                seq, kind = last.split(":", 1)
                if kind != "customer.disconnected":
                    found.append((cid, identity, int(seq)))
            return found

        return await self._read(run)

    async def commit_decision(self, record: DecisionRecord, now: datetime) -> Committed:
        def run(conn: sqlite3.Connection) -> Committed:
            return _commit_decision(conn, record, now)

        return await self._write(run)

    async def messages(self, conversation_id: str, *, include_agent_only: bool) -> list[Message]:
        def run(conn: sqlite3.Connection) -> list[Message]:
            sql = "SELECT * FROM messages WHERE conversation_id = ?"
            if not include_agent_only:
                sql += " AND visibility = 'all'"
            rows = conn.execute(sql + " ORDER BY created_at, rowid", (conversation_id,)).fetchall()
            return [
                Message(
                    id=r["id"],
                    conversation_id=r["conversation_id"],
                    sender_role=r["sender_role"],
                    sender_id=r["sender_id"],
                    text=r["text"],
                    created_at=_dt(r["created_at"]),
                    visibility=r["visibility"],
                    content=json.loads(r["content"]) if r["content"] else None,
                )
                for r in rows
            ]

        return await self._read(run)

    async def record_provider_message(
        self,
        instance: str,
        provider_id: str,
        conversation_id: str,
        message_id: str,
        sent_at: datetime,
    ) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO provider_messages (instance, provider_id, "
                "conversation_id, message_id, sent_at) VALUES (?, ?, ?, ?, ?)",
                (instance, provider_id, conversation_id, message_id, _ts(sent_at)),
            )
        )

    async def provider_message(self, instance: str, provider_id: str) -> ProviderMessage | None:
        def run(conn: sqlite3.Connection) -> ProviderMessage | None:
            row = conn.execute(
                "SELECT conversation_id, message_id, sent_at FROM provider_messages "
                "WHERE instance = ? AND provider_id = ?",
                (instance, provider_id),
            ).fetchone()
            if row is None:
                return None
            return ProviderMessage(instance, provider_id, row[0], row[1], _dt(row[2]))

        return await self._read(run)

    # outbox ------------------------------------------------------------------------------
    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxRow]:
        def run(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT o.* FROM outbox o WHERE o.status = 'pending' AND o.claimed = 0 "
                f"AND o.next_attempt_at <= ? AND {_HEAD_OF_LANE} ORDER BY o.id LIMIT ?",
                (_ts(now), limit),
            ).fetchall()
            if rows:
                conn.executemany(
                    "UPDATE outbox SET claimed = 1 WHERE id = ?", [(r["id"],) for r in rows]
                )
            return [_outbox_row(r) for r in rows]

        return await self._write(run)

    async def outbox_done(self, row_id: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE outbox SET status = 'done', claimed = 0, attempts = attempts + 1, "
                "done_at = ? WHERE id = ?",
                (datetime.now(UTC).timestamp(), row_id),
            )
        )

    async def outbox_retry(self, row_id: int, at: datetime, error: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE outbox SET claimed = 0, attempts = attempts + 1, next_attempt_at = ?, "
                "last_error = ? WHERE id = ?",
                (_ts(at), error[:1000], row_id),
            )
        )

    async def outbox_release(self, row_ids: Sequence[int]) -> None:
        """Unclaim rows without counting an attempt (they waited behind a failed row)."""
        if row_ids:
            await self._write(
                lambda conn: conn.executemany(
                    "UPDATE outbox SET claimed = 0 WHERE id = ?", [(i,) for i in row_ids]
                )
            )

    async def outbox_dead(self, row_id: int, error: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE outbox SET status = 'dead', claimed = 0, attempts = attempts + 1, "
                "last_error = ? WHERE id = ?",
                (error[:1000], row_id),
            )
        )

    async def outbox_hold(self, row_id: int, until: datetime, error: str | None = None) -> None:
        attempted = 0 if error is None else 1
        await self._write(
            lambda conn: conn.execute(
                "UPDATE outbox SET claimed = 0, unsure = 2, attempts = attempts + ?, "
                "next_attempt_at = MAX(next_attempt_at, ?), "
                "last_error = COALESCE(?, last_error) WHERE id = ?",
                (attempted, _ts(until), None if error is None else error[:1000], row_id),
            )
        )

    async def delivery_status_of(self, conversation_id: str, callback_data: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT json_extract(data, '$.wamid') FROM events WHERE conversation_id = ? "
                "AND type = 'delivery.status' AND json_extract(data, '$.callback_data') = ? "
                "LIMIT 1",
                (conversation_id, callback_data),
            ).fetchone()
            return str(row[0]) if row is not None and row[0] else None

        return await self._read(run)

    async def outbox_held(self) -> list[OutboxRow]:
        def run(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE status = 'pending' AND unsure = 2 ORDER BY id"
            ).fetchall()
            return [_outbox_row(r) for r in rows]

        return await self._read(run)

    async def outbox_confirm(self, row_id: int) -> OutboxRow | None:
        def run(conn: sqlite3.Connection) -> OutboxRow | None:
            row = conn.execute(
                "UPDATE outbox SET status = 'done', unsure = 0, attempts = attempts + 1, "
                "done_at = ? WHERE id = ? AND status = 'pending' AND claimed = 0 "
                "AND unsure = 2 RETURNING *",
                (datetime.now(UTC).timestamp(), row_id),
            ).fetchone()
            return None if row is None else _outbox_row(row)

        return await self._write(run)

    async def outbox_next_due(self) -> datetime | None:
        def run(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT MIN(o.next_attempt_at) FROM outbox o WHERE o.status = 'pending' "
                f"AND o.claimed = 0 AND {_HEAD_OF_LANE}"
            ).fetchone()
            return _dt(row[0]) if row and row[0] is not None else None

        return await self._read(run)

    async def outbox_pending_lanes(self) -> list[tuple[str, str]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT DISTINCT conversation_id, destination FROM outbox WHERE status = 'pending'"
            ).fetchall()
            return [(r[0], r[1]) for r in rows]

        return await self._read(run)

    async def outbox_lane_pending(self, conversation_id: str, destination: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND conversation_id = ? "
                "AND destination = ?",
                (conversation_id, destination),
            ).fetchone()
            return int(row[0])

        return await self._read(run)

    async def outbox_rows(self, status: str | None = None) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT * FROM outbox"
            args: tuple[Any, ...] = ()
            if status is not None:
                sql += " WHERE status = ?"
                args = (status,)
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
            return [
                {
                    "id": r["id"],
                    "conversation_id": r["conversation_id"],
                    "event_id": r["event_id"],
                    "n": r["n"],
                    "destination": r["destination"],
                    "payload": json.loads(r["payload"]),
                    "status": r["status"],
                    "attempts": r["attempts"],
                    "last_error": r["last_error"],
                }
                for r in rows
            ]

        return await self._read(run)

    # timers ------------------------------------------------------------------------------
    async def timers(self) -> list[TimerRow]:
        def run(conn: sqlite3.Connection) -> list[TimerRow]:
            return [
                TimerRow(r[0], r[1], r[2], _dt(r[3]))
                for r in conn.execute(
                    "SELECT conversation_id, name, generation, due_at FROM timers"
                )
            ]

        return await self._read(run)

    async def fire_timer(self, timer: TimerRow, now: datetime) -> Accepted | None:
        def run(conn: sqlite3.Connection) -> Accepted | None:
            deleted = conn.execute(
                "DELETE FROM timers WHERE conversation_id = ? AND name = ? AND generation = ?",
                (timer.conversation_id, timer.name, timer.generation),
            ).rowcount
            if not deleted:
                return None
            return _accept_one(
                conn,
                NewEvent(
                    type="timer.fired",
                    source="timer",
                    dedupe_key=f"{timer.conversation_id}:{timer.name}:{timer.generation}",
                    conversation_id=timer.conversation_id,
                    data={"name": timer.name, "generation": timer.generation},
                ),
                now,
                allow_closed=True,
            )

        return await self._write(run)

    # agents and routing ------------------------------------------------------------------
    async def upsert_agent(self, agent: AgentRecord) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO agents (id, name, presence, capacity, skills, idle_since, channels, "
                "teams) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "name = excluded.name, capacity = excluded.capacity, skills = excluded.skills, "
                "channels = excluded.channels, teams = excluded.teams",
                (
                    agent.id,
                    agent.name,
                    agent.presence,
                    agent.capacity,
                    json.dumps(dict(agent.skills)),
                    _ts(agent.idle_since),
                    json.dumps(dict(agent.channels)),
                    json.dumps(list(agent.teams)),
                ),
            )
        )

    async def agent(self, agent_id: str) -> AgentRecord | None:
        def run(conn: sqlite3.Connection) -> AgentRecord | None:
            row = conn.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
            return _agent_from_row(row) if row else None

        return await self._read(run)

    async def set_presence(self, agent_id: str, presence: str, now: datetime) -> None:
        def run(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE agents SET presence = ? WHERE id = ?", (presence, agent_id)
            ).rowcount
            if not changed:
                raise NotFound(f"unknown agent {agent_id!r}", code="unknown_agent")

        await self._write(run)

    async def touch_agent_idle(self, agent_id: str, now: datetime) -> None:
        """Record that an agent became free, for longest-idle routing."""
        await self._write(
            lambda conn: conn.execute(
                "UPDATE agents SET idle_since = ? WHERE id = ?", (_ts(now), agent_id)
            )
        )

    async def router_snapshot(self) -> RouterSnapshot:
        def run(conn: sqlite3.Connection) -> RouterSnapshot:
            agents = [_agent_from_row(r) for r in conn.execute("SELECT * FROM agents")]
            # Queued, and not already promised to an agent whose acceptance is being decided.
            queued = [
                QueuedConversation(
                    r["id"],
                    r["queue"] or "",
                    r["priority"],
                    tuple(json.loads(r["snapshot"]).get("skills", [])),
                    _dt(r["enqueued_at"] or r["created_at"]),
                )
                for r in conn.execute(
                    "SELECT c.* FROM conversations c WHERE c.state = 'queued' AND NOT EXISTS "
                    "(SELECT 1 FROM offers o JOIN events e ON e.source = 'router' "
                    "AND e.dedupe_key = o.id || ':accepted' WHERE o.conversation_id = c.id "
                    "AND e.status = 'pending')"
                )
            ]
            offers = [
                _offer_from_row(r)
                for r in conn.execute("SELECT * FROM offers WHERE status = 'pending'")
            ]
            assignments = [
                (r[0], r[1])
                for r in conn.execute("SELECT agent_id, conversation_id FROM assignments")
            ]
            tried = [
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT o.conversation_id, o.agent_id FROM offers o JOIN conversations c "
                    "ON c.id = o.conversation_id WHERE c.state = 'queued' "
                    "AND o.status IN ('declined', 'expired') "
                    "AND o.created_at >= COALESCE(c.enqueued_at, 0)"
                )
            ]
            accepting = [
                r[0]
                for r in conn.execute(
                    "SELECT o.conversation_id FROM offers o JOIN events e ON e.source = 'router' "
                    "AND e.dedupe_key = o.id || ':accepted' WHERE e.status = 'pending'"
                )
            ]
            channels = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT id, json_extract(snapshot, '$.channel') FROM conversations "
                    "WHERE state = 'queued' OR id IN "
                    "(SELECT conversation_id FROM assignments UNION SELECT conversation_id "
                    "FROM offers WHERE status = 'pending')"
                )
            }
            return RouterSnapshot(agents, queued, offers, assignments, tried, accepting, channels)

        return await self._read(run)

    async def create_offer(self, offer: OfferRecord, now: datetime) -> Accepted:
        def run(conn: sqlite3.Connection) -> Accepted:
            _insert_offer(conn, offer)
            return _accept_one(conn, offered_event(offer), now)

        return await self._write(run)

    async def create_offers(
        self, offers: Sequence[OfferRecord], now: datetime
    ) -> list[Accepted | None]:
        def run(conn: sqlite3.Connection) -> list[Accepted | None]:
            results: list[Accepted | None] = []
            for offer in offers:
                row = conn.execute(
                    "SELECT closed FROM conversations WHERE id = ?", (offer.conversation_id,)
                ).fetchone()
                if row is None or row[0]:
                    results.append(None)
                    continue
                _insert_offer(conn, offer)
                results.append(_accept_one(conn, offered_event(offer), now))
            return results

        return await self._write(run)

    async def resolve_offer(
        self, offer_id: str, status: str, event_type: str, now: datetime
    ) -> Accepted | None:
        def run(conn: sqlite3.Connection) -> Accepted | None:
            row = conn.execute(
                "SELECT * FROM offers WHERE id = ? AND status = 'pending'", (offer_id,)
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE offers SET status = ?, resolved_at = ? WHERE id = ?",
                (status, _ts(now), offer_id),
            )
            if status == "accepted":
                conn.execute(
                    "INSERT OR IGNORE INTO assignments VALUES (?, ?, ?)",
                    (row["agent_id"], row["conversation_id"], _ts(now)),
                )
            if status == "cancelled":
                return None
            return _accept_one(
                conn,
                NewEvent(
                    type=event_type,  # type: ignore[arg-type]
                    source="router",
                    dedupe_key=f"{offer_id}:{status}",
                    conversation_id=row["conversation_id"],
                    data={"agent_id": row["agent_id"], "offer_id": offer_id},
                ),
                now,
                allow_closed=True,
            )

        return await self._write(run)

    async def offer(self, offer_id: str) -> OfferRecord | None:
        def run(conn: sqlite3.Connection) -> OfferRecord | None:
            row = conn.execute("SELECT * FROM offers WHERE id = ?", (offer_id,)).fetchone()
            return _offer_from_row(row) if row else None

        return await self._read(run)

    async def put_token(self, token_hash: str, role: str, subject: str, now: datetime) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO tokens (hash, role, subject, created_at) VALUES (?,?,?,?)",
                (token_hash, role, subject, _ts(now)),
            )
        )

    async def token(self, token_hash: str) -> tuple[str, str] | None:
        def run(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute(
                "SELECT role, subject FROM tokens WHERE hash = ? AND revoked = 0", (token_hash,)
            ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._read(run)

    async def count(self, table: str) -> int:
        """Rows in a table (for tests and benchmarks)."""
        if table not in {
            "events",
            "conversations",
            "decisions",
            "outbox",
            "timers",
            "messages",
            "provider_messages",
        }:
            raise ValueError(table)
        return await self._read(
            lambda conn: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        )

    # rules versions ----------------------------------------------------------------------
    async def save_rules_version(self, record: RulesVersion) -> bool:
        files = json.dumps(record.files, separators=(",", ":"), sort_keys=True)
        return await self._write(
            lambda conn: (
                conn.execute(
                    "INSERT OR IGNORE INTO rules_versions (version, files, loaded_at, source) "
                    "VALUES (?, ?, ?, ?)",
                    (record.version, files, _ts(record.loaded_at), record.source),
                ).rowcount
                == 1
            )
        )

    async def rules_versions(self) -> list[RulesVersion]:
        def run(conn: sqlite3.Connection) -> list[RulesVersion]:
            rows = conn.execute(
                "SELECT version, loaded_at, source FROM rules_versions "
                "ORDER BY loaded_at DESC, rowid DESC"
            ).fetchall()
            return [RulesVersion(r[0], {}, _dt(r[1]), r[2]) for r in rows]

        return await self._read(run)

    async def rules_version(self, version: str) -> RulesVersion | None:
        def run(conn: sqlite3.Connection) -> RulesVersion | None:
            row = conn.execute(
                "SELECT version, files, loaded_at, source FROM rules_versions WHERE version = ?",
                (version,),
            ).fetchone()
            if row is None:
                return None
            return RulesVersion(row[0], json.loads(row[1]), _dt(row[2]), row[3])

        return await self._read(run)

    # customers ---------------------------------------------------------------------------
    async def create_customer(
        self,
        profile: Mapping[str, Any],
        identities: Sequence[Identity],
        now: datetime,
        idempotency: IdempotencyKey | None = None,
        *,
        notify: Notify | None = None,
    ) -> CustomerRecord | Replay:
        def run(conn: sqlite3.Connection) -> CustomerRecord | Replay:
            replay = _replay(conn, idempotency)
            if replay is not None:
                return replay
            record = _create_customer(conn, profile, identities, now)
            _remember(conn, idempotency, 201, record.as_dict(), now)
            _notify(conn, notify, CustomerChange("created", record.id, record.version, now, record))
            return record

        return await self._write(run)

    async def customer(self, customer_id: str) -> CustomerRecord | None:
        return await self._read(lambda conn: _customer(conn, customer_id))

    async def update_customer(
        self,
        customer_id: str,
        changes: Mapping[str, Any],
        now: datetime,
        *,
        expected_version: int | None,
        notify: Notify | None = None,
    ) -> CustomerRecord:
        def run(conn: sqlite3.Connection) -> CustomerRecord:
            known = _current(conn, customer_id, expected_version).known
            record = _update_customer(conn, customer_id, changes, now, expected_version)
            kind = change_kind(known, record)
            _notify(conn, notify, CustomerChange(kind, record.id, record.version, now, record))
            return record

        return await self._write(run)

    async def delete_customer(
        self,
        customer_id: str,
        now: datetime,
        *,
        expected_version: int | None = None,
        notify: Notify | None = None,
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            current = _current(conn, customer_id, expected_version)
            change = CustomerChange("deleted", customer_id, current.version + 1, now)
            _notify(conn, notify, change)
            conn.execute("DELETE FROM identities WHERE customer_id = ?", (customer_id,))
            used = conn.execute(
                "SELECT 1 FROM conversations WHERE customer_id = ? LIMIT 1", (customer_id,)
            ).fetchone()
            if used is None:
                conn.execute("DELETE FROM customers WHERE id = ?", (customer_id,))
            else:
                # The conversations keep their customer id: a tombstone without personal
                # fields, whose first-contact key is released (a new contact is a new customer).
                conn.execute(
                    "UPDATE customers SET identity_key = ?, name = NULL, email = NULL, "
                    "phone = NULL, language = NULL, external_id = NULL, custom = '{}', "
                    "known = 0, version = version + 1, updated_at = ?, deleted_at = ? "
                    "WHERE id = ?",
                    (f"deleted:{customer_id}", _ts(now), _ts(now), customer_id),
                )
            return current.version + 1

        return await self._write(run)

    async def list_customers(self, query: CustomerQuery) -> tuple[list[CustomerRecord], str | None]:
        def run(conn: sqlite3.Connection) -> tuple[list[CustomerRecord], str | None]:
            where: list[str] = ["deleted_at IS NULL"]
            args: list[Any] = []
            if query.cursor is not None:
                where.append("id > ?")
                args.append(query.cursor)
            if query.known is not None:
                where.append("known = ?")
                args.append(int(query.known))
            for column in ("email", "phone", "external_id"):
                value = getattr(query, column)
                if value is not None:
                    where.append(f"{column} = ?")
                    args.append(value)
            if query.name_prefix:
                where.append("name >= ? AND name < ?")
                args += [query.name_prefix, query.name_prefix + "\U0010ffff"]
            if query.updated_since is not None:
                where.append("updated_at >= ?")
                args.append(_ts(query.updated_since))
            rows = conn.execute(
                f"SELECT * FROM customers WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                (*args, query.limit + 1),
            ).fetchall()
            records = _customers_from_rows(conn, rows[: query.limit])
            more = len(rows) > query.limit
            return records, records[-1].id if more and records else None

        return await self._read(run)

    async def lookup_customer(self, identity: Identity) -> CustomerRecord | None:
        def run(conn: sqlite3.Connection) -> CustomerRecord | None:
            row = conn.execute(
                "SELECT customer_id FROM identities WHERE kind = ? AND value = ?",
                (identity.kind, identity.value),
            ).fetchone()
            return _customer(conn, row[0]) if row else None

        return await self._read(run)

    async def attach_identity(
        self,
        customer_id: str,
        identity: Identity,
        now: datetime,
        idempotency: IdempotencyKey | None = None,
        *,
        notify: Notify | None = None,
    ) -> CustomerRecord | Replay:
        def run(conn: sqlite3.Connection) -> CustomerRecord | Replay:
            replay = _replay(conn, idempotency)
            if replay is not None:
                return replay
            current = _current(conn, customer_id, None)
            added = _add_identity(conn, customer_id, identity, now)
            field_name = next((f for f, k in IDENTITY_FIELDS.items() if k == identity.kind), None)
            fill = field_name is not None and current.profile[field_name] is None
            if added or fill or not current.known:
                conn.execute(
                    f"UPDATE customers SET known = 1, version = version + 1, updated_at = ?"
                    f"{f', {field_name} = ?' if fill else ''} WHERE id = ?",
                    (_ts(now), *([identity.value] if fill else []), customer_id),
                )
            record = _customer(conn, customer_id)
            assert record is not None
            _remember(conn, idempotency, 200, record.as_dict(), now)
            if record.version != current.version:
                change = CustomerChange("identified", record.id, record.version, now, record)
                _notify(conn, notify, change)
            return record

        return await self._write(run)

    async def customer_open_conversations(self, customer_id: str) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM conversations WHERE customer_id = ? AND closed = 0 "
                "ORDER BY created_at",
                (customer_id,),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(run)

    async def bulk_upsert_customers(
        self,
        lines: Sequence[tuple[int, Mapping[str, Any]]],
        now: datetime,
        *,
        notify: Notify | None = None,
        required_custom: Collection[str] = (),
    ) -> list[BulkOutcome]:
        def run(conn: sqlite3.Connection) -> list[BulkOutcome]:
            outcomes: list[BulkOutcome] = []
            for number, changes in lines:
                # each line atomic on its own inside the batch's transaction
                conn.execute("SAVEPOINT bulk_line")
                try:
                    outcome, record = _upsert_by_external_id(conn, changes, now, required_custom)
                    if outcome != "unchanged":
                        change = CustomerChange(outcome, record.id, record.version, now, record)
                        _notify(conn, notify, change)
                except (ConvctlError, sqlite3.IntegrityError) as exc:
                    conn.execute("ROLLBACK TO bulk_line")
                    conn.execute("RELEASE bulk_line")
                    code, message = (
                        (exc.code, exc.message)
                        if isinstance(exc, ConvctlError)
                        else ("conflict", str(exc))
                    )
                    outcomes.append(BulkOutcome(number, "failed", None, code, message))
                    continue
                conn.execute("RELEASE bulk_line")
                outcomes.append(BulkOutcome(number, outcome, record))
            return _with_open_conversations(conn, outcomes)

        return await self._write(run)

    async def merge_customers(
        self, into_id: str, from_id: str, now: datetime, *, notify: Notify | None = None
    ) -> MergeResult:
        def run(conn: sqlite3.Connection) -> MergeResult:
            if into_id == from_id:
                raise RequestError(
                    "a customer cannot be merged into itself", code="merge_self", status=422
                )
            done = conn.execute(
                "SELECT into_id, identities, conversations, merged_at FROM customer_merges "
                "WHERE from_id = ?",
                (from_id,),
            ).fetchone()
            if done is not None:
                if done[0] != into_id:
                    raise Conflict(
                        f"customer {from_id!r} was merged into {done[0]!r}",
                        code="already_merged",
                    )
                record = _current(conn, into_id, None)
                version = conn.execute(
                    "SELECT version FROM customers WHERE id = ?", (from_id,)
                ).fetchone()[0]
                return MergeResult(
                    into_id, from_id, done[1], done[2], _dt(done[3]), record, version, True
                )
            into = _current(conn, into_id, None)
            source = _current(conn, from_id, None)
            # Empty fields of the survivor are filled from the merged-away profile; the unique
            # external id is released first. Every identity moves as it is.
            fill = {
                f: source.profile[f]
                for f in PROFILE_FIELDS
                if into.profile[f] is None and source.profile[f] is not None
            }
            custom = {**source.custom, **into.custom}
            conn.execute("UPDATE customers SET external_id = NULL WHERE id = ?", (from_id,))
            identities = conn.execute(
                "UPDATE identities SET customer_id = ? WHERE customer_id = ?", (into_id, from_id)
            ).rowcount
            # The conversations keep the identity they run on; their version moves so a
            # decision in flight on the old snapshot is retried on the new one.
            conversations = conn.execute(
                "UPDATE conversations SET customer_id = ?, "
                "snapshot = json_set(snapshot, '$.customer_id', ?), version = version + 1 "
                "WHERE customer_id = ?",
                (into_id, into_id, from_id),
            ).rowcount
            assignments = "".join(f", {f} = ?" for f in fill)
            conn.execute(
                f"UPDATE customers SET version = version + 1, updated_at = ?, known = ?, "
                f"custom = ?{assignments} WHERE id = ?",
                (
                    _ts(now),
                    int(into.known or source.known),
                    json.dumps(custom, separators=(",", ":")),
                    *fill.values(),
                    into_id,
                ),
            )
            conn.execute(
                "UPDATE customers SET identity_key = ?, name = NULL, email = NULL, "
                "phone = NULL, language = NULL, external_id = NULL, custom = '{}', known = 0, "
                "version = version + 1, updated_at = ?, deleted_at = ? WHERE id = ?",
                (f"merged:{from_id}", _ts(now), _ts(now), from_id),
            )
            conn.execute(
                "INSERT INTO customer_merges VALUES (?, ?, ?, ?, ?)",
                (from_id, into_id, identities, conversations, _ts(now)),
            )
            merged = _customer(conn, into_id)
            assert merged is not None
            change = CustomerChange("merged", into_id, merged.version, now, merged, from_id)
            _notify(conn, notify, change)
            return MergeResult(
                into_id,
                from_id,
                identities,
                conversations,
                now,
                merged,
                source.version + 1,
                False,
            )

        return await self._write(run)

    async def merged_into(self, customer_id: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            found: str | None = None
            current = customer_id
            for _ in range(100):  # merge chains are short; a bound guards against a cycle
                row = conn.execute(
                    "SELECT into_id FROM customer_merges WHERE from_id = ?", (current,)
                ).fetchone()
                if row is None:
                    break
                found = current = row[0]
            return found

        return await self._read(run)

    async def merged_from(self, customer_id: str) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT from_id FROM customer_merges WHERE into_id = ? ORDER BY merged_at, from_id",
                (customer_id,),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(run)

    async def erase_customer(
        self, customer_id: str, now: datetime, marker: str, *, notify: Notify | None = None
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            version = _erase(conn, customer_id, now, marker)
            _notify(conn, notify, CustomerChange("erased", customer_id, version, now))
            return version

        version = await self._write(run)
        # Old page images live on in the WAL until a checkpoint; deleted cells are zeroed
        # (secure_delete) in the pages the checkpoint writes back.
        busy = await self._read(
            lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        )
        if busy:
            log.warning("erase_checkpoint_busy", customer_id=customer_id)
        return version

    async def customer_schema(self, version: int | None = None) -> CustomerSchema | None:
        return await self._read(lambda conn: _customer_schema(conn, version))

    async def save_customer_schema(
        self, document: Mapping[str, Any], now: datetime, *, expected_version: int | None
    ) -> tuple[CustomerSchema, bool]:
        def run(conn: sqlite3.Connection) -> tuple[CustomerSchema, bool]:
            current = _customer_schema(conn, None)
            version = current.version if current else 0
            if expected_version is not None and expected_version != version:
                raise PreconditionFailed(
                    f"the customer schema is at version {version}, not {expected_version}"
                )
            if current is not None and current.document == document:
                return current, False
            conn.execute(
                "INSERT INTO customer_schemas VALUES (?, ?, ?)",
                (version + 1, json.dumps(document, separators=(",", ":")), _ts(now)),
            )
            return CustomerSchema(version + 1, dict(document), now), True

        return await self._write(run)

    async def customer_conversations(self, customer_id: str) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, json_extract(snapshot, '$.channel') AS channel, instance, endpoint, "
                "identity, state, created_at FROM conversations WHERE customer_id = ? "
                "ORDER BY created_at, id",
                (customer_id,),
            ).fetchall()
            return [
                {
                    "id": r["id"],
                    "channel": r["channel"],
                    "instance": r["instance"],
                    "endpoint": r["endpoint"],
                    "identity": r["identity"],
                    "state": r["state"],
                    "created_at": _dt(r["created_at"]).isoformat(),
                }
                for r in rows
            ]

        return await self._read(run)

    # apps --------------------------------------------------------------------------------
    async def create_app(self, app: AppRecord, token_hash: str) -> AppRecord:
        def run(conn: sqlite3.Connection) -> AppRecord:
            taken = conn.execute(
                "SELECT 1 FROM apps WHERE name = ? AND deleted_at IS NULL", (app.name,)
            ).fetchone()
            if taken:
                raise Conflict(f"an app named {app.name!r} exists", code="name_taken")
            conn.execute(
                "INSERT INTO apps (id, name, description, scopes, webhook_url, webhook_secret, "
                "enabled, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    app.id,
                    app.name,
                    app.description,
                    json.dumps(list(app.scopes)),
                    app.webhook_url,
                    app.webhook_secret,
                    int(app.enabled),
                    _ts(app.created_at),
                    _ts(app.updated_at),
                ),
            )
            conn.execute(
                "INSERT INTO tokens (hash, role, subject, created_at) VALUES (?, 'app', ?, ?)",
                (token_hash, app.id, _ts(app.created_at)),
            )
            return _app(conn, app.id)

        return await self._write(run)

    async def app_record(self, app_id: str) -> AppRecord | None:
        def run(conn: sqlite3.Connection) -> AppRecord | None:
            row = conn.execute("SELECT * FROM apps WHERE id = ?", (app_id,)).fetchone()
            return _app_from_row(row) if row else None

        return await self._read(run)

    async def app_records(self, *, include_deleted: bool = False) -> list[AppRecord]:
        def run(conn: sqlite3.Connection) -> list[AppRecord]:
            where = "" if include_deleted else " WHERE deleted_at IS NULL"
            rows = conn.execute(f"SELECT * FROM apps{where} ORDER BY created_at, rowid").fetchall()
            return [_app_from_row(r) for r in rows]

        return await self._read(run)

    async def update_app(self, app_id: str, changes: Mapping[str, Any], now: datetime) -> AppRecord:
        columns = ("name", "description", "scopes", "webhook_url", "enabled", "webhook_secret")
        values = {k: v for k, v in changes.items() if k in columns}
        if "scopes" in values:
            values["scopes"] = json.dumps(list(values["scopes"]))
        if "enabled" in values:
            values["enabled"] = int(values["enabled"])

        def run(conn: sqlite3.Connection) -> AppRecord:
            _live_app(conn, app_id)
            if "name" in values:
                taken = conn.execute(
                    "SELECT 1 FROM apps WHERE name = ? AND id <> ? AND deleted_at IS NULL",
                    (values["name"], app_id),
                ).fetchone()
                if taken:
                    raise Conflict(f"an app named {values['name']!r} exists", code="name_taken")
            assignments = "".join(f", {column} = ?" for column in values)
            conn.execute(
                f"UPDATE apps SET updated_at = ?{assignments} WHERE id = ?",
                (_ts(now), *values.values(), app_id),
            )
            return _app(conn, app_id)

        return await self._write(run)

    async def replace_app_token(self, app_id: str, token_hash: str, now: datetime) -> None:
        def run(conn: sqlite3.Connection) -> None:
            _live_app(conn, app_id)
            conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE role = 'app' AND subject = ?", (app_id,)
            )
            conn.execute(
                "INSERT INTO tokens (hash, role, subject, created_at) VALUES (?, 'app', ?, ?)",
                (token_hash, app_id, _ts(now)),
            )
            conn.execute("UPDATE apps SET updated_at = ? WHERE id = ?", (_ts(now), app_id))

        await self._write(run)

    async def delete_app(self, app_id: str, now: datetime, reason: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            _live_app(conn, app_id)
            conn.execute(
                "UPDATE apps SET enabled = 0, deleted_at = ?, updated_at = ? WHERE id = ?",
                (_ts(now), _ts(now), app_id),
            )
            conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE role = 'app' AND subject = ?", (app_id,)
            )
            conn.execute("DELETE FROM app_subscriptions WHERE app_id = ?", (app_id,))
            return int(
                conn.execute(
                    "UPDATE outbox SET status = 'dead', claimed = 0, last_error = ? "
                    "WHERE destination = ? AND status = 'pending'",
                    (reason[:1000], f"app:{app_id}"),
                ).rowcount
            )

        return await self._write(run)

    async def add_app_subscription(self, subscription: AppSubscription) -> None:
        def run(conn: sqlite3.Connection) -> None:
            _live_app(conn, subscription.app_id)
            conn.execute(
                "INSERT INTO app_subscriptions (id, app_id, event_types, created_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    subscription.id,
                    subscription.app_id,
                    json.dumps(list(subscription.event_types)),
                    _ts(subscription.created_at),
                ),
            )

        await self._write(run)

    async def app_subscriptions(self, app_id: str | None = None) -> list[AppSubscription]:
        def run(conn: sqlite3.Connection) -> list[AppSubscription]:
            sql = "SELECT * FROM app_subscriptions"
            args: tuple[str, ...] = ()
            if app_id is not None:
                sql += " WHERE app_id = ?"
                args = (app_id,)
            rows = conn.execute(sql + " ORDER BY created_at, rowid", args).fetchall()
            return [
                AppSubscription(
                    r["id"], r["app_id"], tuple(json.loads(r["event_types"])), _dt(r["created_at"])
                )
                for r in rows
            ]

        return await self._read(run)

    async def delete_app_subscriptions(self, app_id: str, subscription_ids: Sequence[str]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(
                    "DELETE FROM app_subscriptions WHERE app_id = ? AND id = ?", (app_id, sid)
                ).rowcount
                for sid in subscription_ids
            )

        return await self._write(run)

    async def outbox_entries(
        self,
        destination: str,
        *,
        status: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[OutboxEntry]:
        def run(conn: sqlite3.Connection) -> list[OutboxEntry]:
            sql = "SELECT * FROM outbox WHERE destination = ?"
            args: list[Any] = [destination]
            if status is not None:
                sql += " AND status = ?"
                args.append(status)
            if before_id is not None:
                sql += " AND id < ?"
                args.append(before_id)
            rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
            return [_outbox_entry(r) for r in rows]

        return await self._read(run)

    async def outbox_entry(self, destination: str, event_id: str, n: int) -> OutboxEntry | None:
        def run(conn: sqlite3.Connection) -> OutboxEntry | None:
            row = conn.execute(
                "SELECT * FROM outbox WHERE event_id = ? AND n = ? AND destination = ?",
                (event_id, n, destination),
            ).fetchone()
            return _outbox_entry(row) if row else None

        return await self._read(run)

    async def outbox_replay(self, row_id: int, now: datetime) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "UPDATE outbox SET status = 'pending', claimed = 0, attempts = 0, "
                    "replays = replays + 1, next_attempt_at = ?, done_at = NULL "
                    "WHERE id = ? AND status = 'dead'",
                    (_ts(now), row_id),
                ).rowcount
            )

        return await self._write(run)

    # campaigns ---------------------------------------------------------------------------
    async def create_campaign(
        self,
        campaign: CampaignRecord,
        recipients: Sequence[tuple[str, Mapping[str, Any]]],
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[CampaignRecord, bool]:
        now = _ts(campaign.created_at)
        rows = [
            (campaign.id, customer_id, position, json.dumps(dict(params)), now)
            for position, (customer_id, params) in enumerate(_first_of_each(recipients), start=1)
        ]

        def run(conn: sqlite3.Connection) -> tuple[CampaignRecord, bool]:
            replay = _replay(conn, idempotency)
            if replay is not None:
                earlier = _campaign(conn, str(replay.body["id"]))
                assert earlier is not None
                return earlier, False
            conn.execute(
                "INSERT INTO campaigns (id, name, owner, channel, endpoint, template, text, "
                "audience, rate, starts_at, ends_at, hours_from, hours_to, status, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    campaign.id,
                    campaign.name,
                    campaign.owner,
                    campaign.channel,
                    campaign.endpoint,
                    json.dumps(campaign.template),
                    campaign.text,
                    json.dumps(campaign.audience),
                    campaign.rate,
                    _ts(campaign.starts_at) if campaign.starts_at else None,
                    _ts(campaign.ends_at) if campaign.ends_at else None,
                    campaign.hours_from,
                    campaign.hours_to,
                    campaign.status,
                    now,
                    _ts(campaign.updated_at),
                ),
            )
            # A customer given twice keeps its first place (and parameters).
            conn.executemany(
                "INSERT OR IGNORE INTO campaign_recipients (campaign_id, customer_id, position, "
                "params, updated_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            count = conn.execute(
                "SELECT COUNT(*) FROM campaign_recipients WHERE campaign_id = ?", (campaign.id,)
            ).fetchone()[0]
            conn.execute("UPDATE campaigns SET recipients = ? WHERE id = ?", (count, campaign.id))
            _remember(conn, idempotency, 201, {"id": campaign.id}, campaign.created_at)
            found = _campaign(conn, campaign.id)
            assert found is not None
            return found, True

        return await self._write(run)

    async def campaign(self, campaign_id: str) -> CampaignRecord | None:
        return await self._read(lambda conn: _campaign(conn, campaign_id))

    async def campaigns(
        self,
        *,
        owner: str | None = None,
        statuses: Sequence[str] | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[CampaignRecord]:
        def run(conn: sqlite3.Connection) -> list[CampaignRecord]:
            where, args = ["1 = 1"], []
            if owner is not None:
                where.append("owner = ?")
                args.append(owner)
            if statuses is not None:
                where.append(f"status IN ({','.join('?' * len(statuses))})")
                args += list(statuses)
            if before is not None:
                where.append("id < ?")
                args.append(before)
            rows = conn.execute(
                f"SELECT * FROM campaigns WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [_campaign_from_row(r) for r in rows]

        return await self._read(run)

    async def campaign_counts(self, campaign_id: str) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT status, COUNT(*) FROM campaign_recipients WHERE campaign_id = ? "
                "GROUP BY status",
                (campaign_id,),
            ).fetchall()
            return {r[0]: int(r[1]) for r in rows}

        return await self._read(run)

    async def set_campaign_status(
        self,
        campaign_id: str,
        status: str,
        *,
        allowed_from: Sequence[str],
        now: datetime,
        skip_pending: str | None = None,
    ) -> CampaignRecord | None:
        final = status in ("completed", "expired", "cancelled")

        def run(conn: sqlite3.Connection) -> CampaignRecord | None:
            current = _campaign(conn, campaign_id)
            if current is None:
                raise NotFound(f"unknown campaign {campaign_id!r}", code="unknown_campaign")
            if current.status not in allowed_from:
                return None
            conn.execute(
                "UPDATE campaigns SET status = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (status, _ts(now), _ts(now) if final else None, campaign_id),
            )
            if skip_pending is not None:
                conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', reason = ?, "
                    "updated_at = ? WHERE campaign_id = ? AND status = 'pending'",
                    (skip_pending, _ts(now), campaign_id),
                )
            return _campaign(conn, campaign_id)

        return await self._write(run)

    async def campaign_batch(self, campaign_id: str, limit: int) -> list[CampaignWork]:
        def run(conn: sqlite3.Connection) -> list[CampaignWork]:
            rows = conn.execute(
                "SELECT * FROM campaign_recipients WHERE campaign_id = ? AND status = 'pending' "
                "ORDER BY position LIMIT ?",
                (campaign_id, limit),
            ).fetchall()
            return [
                CampaignWork(_recipient_from_row(r), _customer(conn, r["customer_id"]))
                for r in rows
            ]

        return await self._read(run)

    async def campaign_send(
        self, campaign_id: str, customer_id: str, event: NewEvent, now: datetime
    ) -> CampaignSend:
        def run(conn: sqlite3.Connection) -> CampaignSend:
            status = conn.execute(
                "SELECT status FROM campaigns WHERE id = ?", (campaign_id,)
            ).fetchone()
            if status is None or status[0] != "running":
                return CampaignSend("not_running")
            recipient = conn.execute(
                "SELECT status FROM campaign_recipients WHERE campaign_id = ? AND customer_id = ?",
                (campaign_id, customer_id),
            ).fetchone()
            if recipient is None or recipient[0] != "pending":
                return CampaignSend("not_pending")
            opted_out = conn.execute(
                "SELECT 1 FROM campaign_opt_outs WHERE customer_id = ?", (customer_id,)
            ).fetchone()
            if opted_out:
                conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', reason = 'opted_out', "
                    "updated_at = ? WHERE campaign_id = ? AND customer_id = ?",
                    (_ts(now), campaign_id, customer_id),
                )
                return CampaignSend("opted_out")
            if not _campaign_identity(conn, customer_id, event, now):
                conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', "
                    "reason = 'unknown_customer', updated_at = ? WHERE campaign_id = ? "
                    "AND customer_id = ?",
                    (_ts(now), campaign_id, customer_id),
                )
                return CampaignSend("unknown_customer")
            accepted = _accept_one(conn, event, now)
            conn.execute(
                "UPDATE campaign_recipients SET status = 'sent', conversation_id = ?, "
                "event_id = ?, sent_at = ?, updated_at = ? WHERE campaign_id = ? "
                "AND customer_id = ?",
                (
                    accepted.conversation_id,
                    accepted.event_id,
                    _ts(now),
                    _ts(now),
                    campaign_id,
                    customer_id,
                ),
            )
            return CampaignSend("sent", accepted)

        return await self._write(run)

    async def campaign_skip(
        self, campaign_id: str, customer_id: str, reason: str, now: datetime
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', reason = ?, "
                    "updated_at = ? WHERE campaign_id = ? AND customer_id = ? "
                    "AND status = 'pending'",
                    (reason, _ts(now), campaign_id, customer_id),
                ).rowcount
            )

        return await self._write(run)

    async def campaign_outcomes(self, outcomes: Sequence[CampaignOutcome], now: datetime) -> int:
        def run(conn: sqlite3.Connection) -> int:
            changed = 0
            for outcome in outcomes:
                sql, args = _outcome_update(outcome, now, "?")
                changed += conn.execute(sql, args).rowcount
            return changed

        return await self._write(run)

    async def campaign_recipients(
        self,
        campaign_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        after: int | None = None,
    ) -> list[CampaignRecipient]:
        def run(conn: sqlite3.Connection) -> list[CampaignRecipient]:
            sql = "SELECT * FROM campaign_recipients WHERE campaign_id = ?"
            args: list[Any] = [campaign_id]
            if status is not None:
                sql += " AND status = ?"
                args.append(status)
            if after is not None:
                sql += " AND position > ?"
                args.append(after)
            rows = conn.execute(sql + " ORDER BY position LIMIT ?", (*args, limit)).fetchall()
            return [_recipient_from_row(r) for r in rows]

        return await self._read(run)

    async def add_opt_out(self, customer_id: str, source: str, now: datetime) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "INSERT OR IGNORE INTO campaign_opt_outs (customer_id, source, created_at) "
                    "VALUES (?, ?, ?)",
                    (customer_id, source, _ts(now)),
                ).rowcount
            )

        return await self._write(run)

    async def remove_opt_out(self, customer_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "DELETE FROM campaign_opt_outs WHERE customer_id = ?", (customer_id,)
                ).rowcount
            )

        return await self._write(run)

    async def opt_outs(self, *, limit: int = 50, after: str | None = None) -> list[OptOut]:
        def run(conn: sqlite3.Connection) -> list[OptOut]:
            rows = conn.execute(
                "SELECT * FROM campaign_opt_outs WHERE customer_id > ? "
                "ORDER BY customer_id LIMIT ?",
                (after or "", limit),
            ).fetchall()
            return [OptOut(r["customer_id"], r["source"], _dt(r["created_at"])) for r in rows]

        return await self._read(run)


# campaigns (run on the reader or the writer thread) -----------------------------------------
def _campaign_from_row(row: sqlite3.Row) -> CampaignRecord:
    return CampaignRecord(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        channel=row["channel"],
        endpoint=row["endpoint"],
        template=json.loads(row["template"]),
        text=row["text"],
        audience=json.loads(row["audience"]),
        rate=row["rate"],
        starts_at=_dt(row["starts_at"]) if row["starts_at"] is not None else None,
        ends_at=_dt(row["ends_at"]) if row["ends_at"] is not None else None,
        hours_from=row["hours_from"],
        hours_to=row["hours_to"],
        status=row["status"],
        recipients=row["recipients"],
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        finished_at=_dt(row["finished_at"]) if row["finished_at"] is not None else None,
    )


def _campaign(conn: sqlite3.Connection, campaign_id: str) -> CampaignRecord | None:
    row = conn.execute("SELECT * FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
    return _campaign_from_row(row) if row else None


def _recipient_from_row(row: sqlite3.Row) -> CampaignRecipient:
    def at(column: str) -> datetime | None:
        return _dt(row[column]) if row[column] is not None else None

    return CampaignRecipient(
        campaign_id=row["campaign_id"],
        customer_id=row["customer_id"],
        position=row["position"],
        params=json.loads(row["params"]),
        status=row["status"],
        reason=row["reason"],
        conversation_id=row["conversation_id"],
        event_id=row["event_id"],
        sent_at=at("sent_at"),
        delivered_at=at("delivered_at"),
        read_at=at("read_at"),
        replied_at=at("replied_at"),
        failed_at=at("failed_at"),
    )


def _campaign_identity(
    conn: sqlite3.Connection, customer_id: str, event: NewEvent, now: datetime
) -> bool:
    """The customer (False if gone) gets the channel identity a campaign writes to when
    nobody has it yet, so the conversation, and every reply, is the customer's."""
    if not conn.execute(
        "SELECT 1 FROM customers WHERE id = ? AND deleted_at IS NULL", (customer_id,)
    ).fetchone():
        return False
    assert event.channel is not None and event.identity is not None
    ident = channel_identity(event.channel, event.identity)
    added = conn.execute(
        "INSERT OR IGNORE INTO identities (kind, value, customer_id, created_at) "
        "VALUES (?, ?, ?, ?)",
        (ident.kind, ident.value, customer_id, _ts(now)),
    ).rowcount
    if added:
        conn.execute(
            "UPDATE customers SET version = version + 1, updated_at = ? WHERE id = ?",
            (_ts(now), customer_id),
        )
    return True


def _first_of_each(
    recipients: Sequence[tuple[str, Mapping[str, Any]]],
) -> list[tuple[str, Mapping[str, Any]]]:
    """One entry per customer: the first, in audience order."""
    first: dict[str, Mapping[str, Any]] = {}
    for customer_id, params in recipients:
        first.setdefault(customer_id, params)
    return list(first.items())


# Where each outcome may move a recipient from (it never moves one back: a read message is
# not "delivered" again, a reply stays a reply).
_OUTCOME_FROM: dict[str, tuple[str, ...]] = {
    "delivered": ("sent",),
    "read": ("sent", "delivered"),
    "failed": ("sent", "delivered", "failed"),
    "replied": ("sent", "delivered", "read", "failed"),
}


def _outcome_update(outcome: CampaignOutcome, now: datetime, mark: str) -> tuple[str, list[Any]]:
    """The UPDATE applying one outcome, for SQLite (``mark`` ``?``) and PostgreSQL (``$``).

    The time column is set once (the first report wins) even when the status stays; every
    expression sees the row as it was before the statement."""
    args: list[Any] = []

    def p(value: Any) -> str:
        args.append(value)
        return "?" if mark == "?" else f"${len(args)}"

    if outcome.kind == "moved":
        sql = f"UPDATE campaign_recipients SET conversation_id = {p(outcome.conversation_id)}, "
        sql += f"event_id = {p(outcome.event_id)}, updated_at = {p(_ts(now))} "
        sql += f"WHERE campaign_id = {p(outcome.campaign_id)} "
        sql += f"AND customer_id = {p(outcome.customer_id)}"
        return sql, args
    movable = f"status IN ({', '.join(repr(s) for s in _OUTCOME_FROM[outcome.kind])})"
    column = f"{outcome.kind}_at"
    sql = f"UPDATE campaign_recipients SET {column} = COALESCE({column}, {p(_ts(outcome.at))}), "
    sql += f"status = CASE WHEN {movable} THEN {p(outcome.kind)} ELSE status END, "
    if outcome.kind == "failed":
        sql += f"reason = CASE WHEN {movable} THEN {p(outcome.reason)} ELSE reason END, "
    elif outcome.kind == "replied":
        sql += "reason = NULL, "
    sql += f"updated_at = {p(_ts(now))} WHERE status <> 'skipped' AND "
    if outcome.kind == "replied":
        sql += f"campaign_id = {p(outcome.campaign_id)} "
        sql += f"AND conversation_id = {p(outcome.conversation_id)}"
    else:
        sql += f"event_id = {p(outcome.event_id)}"
    return sql, args


# apps (run on the reader or the writer thread) ----------------------------------------------
def _app_from_row(row: sqlite3.Row) -> AppRecord:
    return AppRecord(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        scopes=tuple(json.loads(row["scopes"])),
        webhook_url=row["webhook_url"],
        webhook_secret=row["webhook_secret"],
        enabled=bool(row["enabled"]),
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        deleted_at=_dt(row["deleted_at"]) if row["deleted_at"] is not None else None,
    )


def _app(conn: sqlite3.Connection, app_id: str) -> AppRecord:
    row = conn.execute("SELECT * FROM apps WHERE id = ?", (app_id,)).fetchone()
    if row is None:
        raise NotFound(f"unknown app {app_id!r}", code="unknown_app")
    return _app_from_row(row)


def _live_app(conn: sqlite3.Connection, app_id: str) -> AppRecord:
    app = _app(conn, app_id)
    if app.deleted_at is not None:
        raise Conflict(f"app {app_id!r} was deleted", code="app_deleted")
    return app


def _outbox_row(row: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=row["id"],
        conversation_id=row["conversation_id"],
        event_id=row["event_id"],
        n=row["n"],
        destination=row["destination"],
        payload=json.loads(row["payload"]),
        attempts=row["attempts"],
        unsure=row["unsure"],
    )


def _outbox_entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        row=_outbox_row(row),
        status=row["status"],
        replays=row["replays"],
        last_error=row["last_error"],
        created_at=_dt(row["created_at"]),
        next_attempt_at=_dt(row["next_attempt_at"]),
        done_at=_dt(row["done_at"]) if row["done_at"] is not None else None,
    )


# transaction bodies (run on the writer thread) ---------------------------------------------
def _load_conversation(conn: sqlite3.Connection, conversation_id: str) -> Conversation | None:
    row = conn.execute(
        "SELECT snapshot, version FROM conversations WHERE id = ?", (conversation_id,)
    ).fetchone()
    if row is None:
        return None
    conv = Conversation.model_validate_json(row[0])
    conv.version = row[1]
    return conv


def _accept_one(
    conn: sqlite3.Connection,
    ev: NewEvent,
    now: datetime,
    *,
    allow_closed: bool = False,
    notify: Notify | None = None,
) -> Accepted:
    found = conn.execute(
        "SELECT id, conversation_id, seq FROM events WHERE source = ? AND dedupe_key = ?",
        (ev.source, ev.dedupe_key),
    ).fetchone()
    if found is not None:
        return Accepted(found[0], found[1], found[2], duplicate=True)
    conversation_id = ev.conversation_id
    if conversation_id is not None:
        row = conn.execute(
            "SELECT closed FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"unknown conversation {conversation_id!r}", code="unknown_conversation")
        if row[0] and not allow_closed:
            raise Conflict(
                f"conversation {conversation_id!r} is closed", code="conversation_closed"
            )
    else:
        if not (ev.channel and ev.instance and ev.endpoint and ev.identity):
            raise ValueError(
                "an event without conversation_id needs channel, instance, endpoint, identity"
            )
        row = conn.execute(
            "SELECT id FROM conversations WHERE instance = ? AND endpoint = ? AND identity = ? "
            "AND closed = 0",
            (ev.instance, ev.endpoint, ev.identity),
        ).fetchone()
        conversation_id = row[0] if row else _open_conversation(conn, ev, now, notify)
    return _insert_event(conn, conversation_id, ev, now)


def _insert_event(
    conn: sqlite3.Connection, conversation_id: str, ev: NewEvent, now: datetime
) -> Accepted:
    seq = conn.execute(
        "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = ? RETURNING next_seq - 1",
        (conversation_id,),
    ).fetchone()[0]
    event_id = new_id("ev")
    conn.execute(
        "INSERT INTO events (id, conversation_id, seq, type, source, dedupe_key, data, "
        "accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event_id,
            conversation_id,
            seq,
            ev.type,
            ev.source,
            ev.dedupe_key,
            json.dumps(ev.data, separators=(",", ":")),
            _ts(now),
        ),
    )
    return Accepted(event_id, conversation_id, seq, duplicate=False)


def _profile_name(ev: NewEvent) -> str | None:
    """The display name a channel sends with a first message (at most 256 characters)."""
    name = ev.data.get("profile_name")
    return name.strip()[:256] or None if isinstance(name, str) else None


def _open_conversation(
    conn: sqlite3.Connection, ev: NewEvent, now: datetime, notify: Notify | None = None
) -> str:
    assert ev.instance and ev.endpoint and ev.identity and ev.channel
    identity_key = f"{ev.instance}:{ev.endpoint}:{ev.identity}"
    # The customer: by the first contact's key, else by the channel identity (a profile the
    # Customer API made or identified, or the same user on another endpoint), else a new
    # anonymous customer with that identity.
    ident = channel_identity(ev.channel, ev.identity)
    row = (
        conn.execute("SELECT id FROM customers WHERE identity_key = ?", (identity_key,)).fetchone()
        or conn.execute(
            "SELECT customer_id FROM identities WHERE kind = ? AND value = ?",
            (ident.kind, ident.value),
        ).fetchone()
    )
    if row is None:
        customer_id = new_id("cu")
        # Anonymous, with the name the channel gives (a WhatsApp profile name), if any.
        conn.execute(
            "INSERT INTO customers (id, identity_key, name, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (customer_id, identity_key, _profile_name(ev), _ts(now), _ts(now)),
        )
        conn.execute(
            "INSERT OR IGNORE INTO identities (kind, value, customer_id, created_at) "
            "VALUES (?, ?, ?, ?)",
            (ident.kind, ident.value, customer_id, _ts(now)),
        )
        if notify is not None:  # only when someone hears profile.created
            record = _customer(conn, customer_id)
            assert record is not None
            change = CustomerChange("created", customer_id, record.version, now, record)
            _notify(conn, notify, change)
    else:
        customer_id = row[0]
    previous = conn.execute(
        "SELECT id FROM conversations WHERE instance = ? AND endpoint = ? AND identity = ? "
        "ORDER BY created_at DESC LIMIT 1",
        (ev.instance, ev.endpoint, ev.identity),
    ).fetchone()
    conv_id = new_id("cv")
    language = ev.data.get("language")
    conv = Conversation(
        id=conv_id,
        channel=ev.channel,
        instance=ev.instance,
        endpoint=ev.endpoint,
        identity=ev.identity,
        customer_id=customer_id,
        created_at=now,
        last_activity_at=now,
        language=language if isinstance(language, str) and language else "en",
        previous_conversation_id=previous[0] if previous else None,
    )
    conn.execute(
        "INSERT INTO conversations (id, instance, endpoint, identity, customer_id, state, "
        "snapshot, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'new', ?, ?, ?)",
        (
            conv_id,
            ev.instance,
            ev.endpoint,
            ev.identity,
            customer_id,
            conv.model_dump_json(exclude={"version"}),
            _ts(now),
            _ts(now),
        ),
    )
    _insert_event(
        conn,
        conv_id,
        NewEvent(
            type="conversation.created",
            source="controller",
            dedupe_key=f"{conv_id}:created",
            conversation_id=conv_id,
            data={
                "channel": ev.channel,
                "direction": "outbound"
                if ev.type in ("agent.outbound", "campaign.message")
                else "inbound",
            },
        ),
        now,
    )
    return conv_id


def _commit_decision(conn: sqlite3.Connection, rec: DecisionRecord, now: datetime) -> Committed:
    after = rec.after
    snapshot = after.model_dump_json(exclude={"version"})
    updated = conn.execute(
        "UPDATE conversations SET snapshot = ?, state = ?, closed = ?, queue = ?, priority = ?, "
        "enqueued_at = ?, version = version + 1, updated_at = ? WHERE id = ? AND version = ?",
        (
            snapshot,
            after.state,
            1 if after.state == "closed" else 0,
            after.queue,
            after.priority,
            _ts(after.enqueued_at) if after.enqueued_at else None,
            _ts(now),
            after.id,
            rec.before_version,
        ),
    ).rowcount
    if not updated:
        raise Conflict(f"conversation {after.id} changed concurrently", code="version_conflict")
    marked = conn.execute(
        "UPDATE events SET status = ? WHERE id = ? AND status = 'pending'",
        (rec.outcome, rec.event.id),
    ).rowcount
    if not marked:
        raise Conflict(f"event {rec.event.id} was already decided", code="already_decided")
    conn.execute(
        "INSERT INTO decisions (event_id, conversation_id, seq, rules_version, matcher, outcome, "
        "state_after, fired, refused, decided_at, facts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            rec.event.id,
            after.id,
            rec.event.seq,
            rec.rules_version,
            rec.matcher,
            rec.outcome,
            after.state,
            json.dumps(rec.fired, separators=(",", ":")),
            json.dumps(rec.refused, separators=(",", ":")),
            _ts(now),
            None
            if rec.facts is None
            else json.dumps(rec.facts, separators=(",", ":"), default=str),
        ),
    )
    outbox: list[OutboxRow] = []
    for n, new in enumerate(rec.outbox):
        # Claimed at once: the dispatcher takes these rows from memory after the commit.
        row_id = conn.execute(
            "INSERT INTO outbox (conversation_id, event_id, n, destination, payload, claimed, "
            "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?) RETURNING id",
            (
                after.id,
                rec.event.id,
                n,
                new.destination,
                json.dumps(new.payload, separators=(",", ":")),
                _ts(now),
                _ts(now),
            ),
        ).fetchone()[0]
        outbox.append(OutboxRow(row_id, after.id, rec.event.id, n, new.destination, new.payload, 0))
    for op in rec.timers:
        if op.due_at is None:
            conn.execute(
                "DELETE FROM timers WHERE conversation_id = ? AND name = ?", (after.id, op.name)
            )
        else:
            conn.execute(
                "INSERT INTO timers VALUES (?, ?, ?, ?) ON CONFLICT (conversation_id, name) "
                "DO UPDATE SET generation = excluded.generation, due_at = excluded.due_at",
                (after.id, op.name, op.generation, _ts(op.due_at)),
            )
    if after.state == "closed":
        conn.execute("DELETE FROM timers WHERE conversation_id = ?", (after.id,))
    if rec.messages:
        conn.executemany(
            "INSERT INTO messages (id, conversation_id, sender_role, sender_id, text, "
            "visibility, created_at, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    m.id,
                    m.conversation_id,
                    m.sender_role,
                    m.sender_id,
                    m.text,
                    m.visibility,
                    _ts(m.created_at),
                    json.dumps(m.content) if m.content else None,
                )
                for m in rec.messages
            ],
        )
    for agent_id in rec.released_agents:
        conn.execute(
            "DELETE FROM assignments WHERE agent_id = ? AND conversation_id = ?",
            (agent_id, after.id),
        )
    for agent_id in rec.assigned_agents:
        conn.execute(
            "INSERT OR IGNORE INTO assignments VALUES (?, ?, ?)", (agent_id, after.id, _ts(now))
        )
    accepted = [_accept_one(conn, ev, now, allow_closed=True) for ev in rec.emitted]
    return Committed(accepted, outbox)


def _agent_from_row(row: sqlite3.Row) -> AgentRecord:
    return AgentRecord(
        id=row["id"],
        name=row["name"],
        presence=row["presence"],
        capacity=row["capacity"],
        skills=skill_levels(json.loads(row["skills"])),
        idle_since=_dt(row["idle_since"]),
        channels=json.loads(row["channels"]),
        teams=tuple(json.loads(row["teams"])),
    )


def _insert_offer(conn: sqlite3.Connection, offer: OfferRecord) -> None:
    conn.execute(
        "INSERT INTO offers (id, conversation_id, agent_id, status, created_at, "
        "expires_at) VALUES (?, ?, ?, 'pending', ?, ?)",
        (
            offer.id,
            offer.conversation_id,
            offer.agent_id,
            _ts(offer.created_at),
            _ts(offer.expires_at),
        ),
    )


def _offer_from_row(row: sqlite3.Row) -> OfferRecord:
    return OfferRecord(
        id=row["id"],
        conversation_id=row["conversation_id"],
        agent_id=row["agent_id"],
        status=row["status"],
        created_at=_dt(row["created_at"]),
        expires_at=_dt(row["expires_at"]),
    )


def _create_customer(
    conn: sqlite3.Connection,
    profile: Mapping[str, Any],
    identities: Sequence[Identity],
    now: datetime,
) -> CustomerRecord:
    customer_id = new_id("cu")
    fields = {f: profile.get(f) for f in PROFILE_FIELDS}
    custom = {k: v for k, v in (profile.get("custom") or {}).items() if v is not None}
    _external_id_free(conn, fields["external_id"])
    conn.execute(
        "INSERT INTO customers (id, identity_key, created_at, updated_at, known, "
        "custom, name, email, phone, language, external_id) "
        "VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
        (
            customer_id,
            f"customer:{customer_id}",  # no channel contact yet; unique placeholder
            _ts(now),
            _ts(now),
            json.dumps(custom, separators=(",", ":")),
            *fields.values(),
        ),
    )
    wanted = [Identity(k, str(fields[f])) for f, k in IDENTITY_FIELDS.items() if fields[f]]
    added = list(dict.fromkeys([*wanted, *identities]))
    for ident in added:
        _add_identity(conn, customer_id, ident, now)
    return _new_record(customer_id, fields, custom, added, _dt(_ts(now)))


def _external_id_free(conn: sqlite3.Connection, external_id: str | None) -> None:
    """Conflict if another customer has the external id (before the unique index refuses
    the insert with an IntegrityError)."""
    if (
        external_id
        and conn.execute("SELECT 1 FROM customers WHERE external_id = ?", (external_id,)).fetchone()
    ):
        raise Conflict(
            f"external id {external_id!r} belongs to another customer", code="identity_taken"
        )


def _new_record(
    customer_id: str,
    fields: Mapping[str, Any],
    custom: Mapping[str, Any],
    identities: Sequence[Identity],
    at: datetime,
) -> CustomerRecord:
    """A customer just created, as reading it back would give it (its identities all have
    its creation time, so they are listed by kind and value)."""
    return CustomerRecord(
        id=customer_id,
        known=True,
        profile=dict(fields),
        custom=dict(custom),
        identities=tuple(sorted(identities, key=lambda i: (i.kind, i.value))),
        version=1,
        created_at=at,
        updated_at=at,
    )


def _update_customer(
    conn: sqlite3.Connection,
    customer_id: str,
    changes: Mapping[str, Any],
    now: datetime,
    expected_version: int | None,
) -> CustomerRecord:
    current = _current(conn, customer_id, expected_version)
    fields = {f: changes[f] for f in PROFILE_FIELDS if f in changes}
    known = current.known
    for field_name, kind in IDENTITY_FIELDS.items():
        if field_name not in fields or fields[field_name] == current.profile[field_name]:
            continue
        old, new = current.profile[field_name], fields[field_name]
        if old is not None:
            conn.execute(
                "DELETE FROM identities WHERE kind = ? AND value = ? AND customer_id = ?",
                (kind, old, customer_id),
            )
        if new is not None:
            _add_identity(conn, customer_id, Identity(kind, new), now)
            known = True
    custom = dict(current.custom)
    for key, value in (changes.get("custom") or {}).items():
        if value is None:
            custom.pop(key, None)
        else:
            custom[key] = value
    assignments = "".join(f", {f} = ?" for f in fields)
    conn.execute(
        f"UPDATE customers SET version = version + 1, updated_at = ?, known = ?, "
        f"custom = ?{assignments} WHERE id = ?",
        (
            _ts(now),
            int(known),
            json.dumps(custom, separators=(",", ":")),
            *fields.values(),
            customer_id,
        ),
    )
    record = _customer(conn, customer_id)
    assert record is not None
    return record


def _upsert_by_external_id(
    conn: sqlite3.Connection,
    changes: Mapping[str, Any],
    now: datetime,
    required_custom: Collection[str] = (),
) -> tuple[str, CustomerRecord]:
    """One bulk line: ("created" | "updated" | "unchanged", the record)."""
    row = conn.execute(
        "SELECT id FROM customers WHERE external_id = ? AND deleted_at IS NULL",
        (changes["external_id"],),
    ).fetchone()
    if row is None:
        _check_required(changes, required_custom)
        return "created", _create_customer(conn, changes, (), now)
    current = _current(conn, row[0], None)
    same_fields = all(current.profile[f] == changes[f] for f in PROFILE_FIELDS if f in changes)
    custom = changes.get("custom") or {}
    same_custom = all(
        (k not in current.custom) if v is None else current.custom.get(k) == v
        for k, v in custom.items()
    )
    if same_fields and same_custom and current.known:
        return "unchanged", current
    return "updated", _update_customer(conn, current.id, changes, now, None)


def _customer_schema(conn: sqlite3.Connection, version: int | None) -> CustomerSchema | None:
    row = conn.execute(
        "SELECT version, document, created_at FROM customer_schemas "
        + ("WHERE version = ?" if version is not None else "ORDER BY version DESC LIMIT 1"),
        (version,) if version is not None else (),
    ).fetchone()
    return CustomerSchema(row[0], json.loads(row[1]), _dt(row[2])) if row else None


def _check_required(changes: Mapping[str, Any], required_custom: Collection[str]) -> None:
    """A new profile must have every required custom field (the schema's ``required``)."""
    custom = changes.get("custom") or {}
    missing = [k for k in required_custom if custom.get(k) is None]
    if missing:
        raise RequestError(
            f"custom field {missing[0]!r} is required", code="invalid_custom", status=422
        )


def _with_open_conversations(
    conn: sqlite3.Connection, outcomes: list[BulkOutcome]
) -> list[BulkOutcome]:
    """Updated lines with their customers' open conversations: one query per batch (it walks
    the open conversations' partial index), none when no line changed a customer."""
    updated = {o.record.id for o in outcomes if o.outcome == "updated" and o.record is not None}
    if not updated:
        return outcomes
    found: dict[str, list[str]] = {}
    for customer_id, conversation_id in conn.execute(
        "SELECT customer_id, id FROM conversations WHERE closed = 0 "
        "AND customer_id IN (SELECT value FROM json_each(?)) ORDER BY created_at",
        (json.dumps(sorted(updated)),),
    ):
        found.setdefault(customer_id, []).append(conversation_id)
    return [
        replace(o, conversations=tuple(found[o.record.id]))
        if o.outcome == "updated" and o.record is not None and o.record.id in found
        else o
        for o in outcomes
    ]


def _notify(conn: sqlite3.Connection, notify: Notify | None, change: CustomerChange) -> None:
    """Outbox rows announcing ``change``, in the caller's transaction, on the customer's lane
    (unclaimed and due now: the dispatcher's poller delivers them, in lane order)."""
    if notify is None:
        return
    rows = [
        (
            change.customer_id,
            change.notice_id,
            n,
            new.destination,
            json.dumps(new.payload, separators=(",", ":")),
            _ts(change.at),
            _ts(change.at),
        )
        for n, new in enumerate(notify(change))
    ]
    if rows:
        conn.executemany(
            "INSERT INTO outbox (conversation_id, event_id, n, destination, payload, claimed, "
            "next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
            rows,
        )


def _notice_lanes(conn: sqlite3.Connection, customer_id: str) -> list[str]:
    """The customer and everyone merged into it (through chains): their notification lanes."""
    lanes, todo = [customer_id], [customer_id]
    while todo and len(lanes) < 10_000:
        into = todo.pop()
        for (from_id,) in conn.execute(
            "SELECT from_id FROM customer_merges WHERE into_id = ?", (into,)
        ).fetchall():
            if from_id not in lanes:
                lanes.append(from_id)
                todo.append(from_id)
    return lanes


def _customers_from_rows(
    conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]
) -> list[CustomerRecord]:
    """Records of a page of customer rows, their identities read in one query."""
    if not rows:
        return []
    found: dict[str, list[sqlite3.Row]] = {r["id"]: [] for r in rows}
    marks = ",".join("?" * len(found))
    for ident in conn.execute(
        f"SELECT customer_id, kind, value FROM identities WHERE customer_id IN ({marks}) "
        "ORDER BY created_at, kind, value",
        list(found),
    ):
        found[ident[0]].append(ident)
    return [_customer_record(r, found[r["id"]]) for r in rows]


def _customer_record(row: sqlite3.Row, idents: Sequence[sqlite3.Row]) -> CustomerRecord:
    return CustomerRecord(
        id=row["id"],
        known=bool(row["known"]),
        profile={f: row[f] for f in PROFILE_FIELDS},
        custom=json.loads(row["custom"]),
        identities=tuple(Identity(r["kind"], r["value"]) for r in idents),
        version=row["version"],
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"] if row["updated_at"] is not None else row["created_at"]),
    )


def _customer_from_row(conn: sqlite3.Connection, row: sqlite3.Row) -> CustomerRecord:
    idents = conn.execute(
        "SELECT kind, value FROM identities WHERE customer_id = ? ORDER BY created_at, kind, value",
        (row["id"],),
    ).fetchall()
    return _customer_record(row, idents)


def _customer(conn: sqlite3.Connection, customer_id: str) -> CustomerRecord | None:
    row = conn.execute(
        "SELECT * FROM customers WHERE id = ? AND deleted_at IS NULL", (customer_id,)
    ).fetchone()
    return _customer_from_row(conn, row) if row else None


def _current(
    conn: sqlite3.Connection, customer_id: str, expected_version: int | None
) -> CustomerRecord:
    record = _customer(conn, customer_id)
    if record is None:
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    if expected_version is not None and record.version != expected_version:
        raise PreconditionFailed(
            f"customer {customer_id!r} is at version {record.version}, not {expected_version}"
        )
    return record


def _add_identity(
    conn: sqlite3.Connection, customer_id: str, identity: Identity, now: datetime
) -> bool:
    """Give the customer an identity; False if it had it already, Conflict if another has."""
    row = conn.execute(
        "SELECT customer_id FROM identities WHERE kind = ? AND value = ?",
        (identity.kind, identity.value),
    ).fetchone()
    if row is not None:
        if row[0] != customer_id:
            raise Conflict(
                f"identity {identity} belongs to another customer", code="identity_taken"
            )
        return False
    if identity.kind == "external":
        taken = conn.execute(
            "SELECT 1 FROM customers WHERE external_id = ? AND id <> ?",
            (identity.value, customer_id),
        ).fetchone()
        if taken:
            raise Conflict(
                f"external id {identity.value!r} belongs to another customer",
                code="identity_taken",
            )
    conn.execute(
        "INSERT INTO identities (kind, value, customer_id, created_at) VALUES (?, ?, ?, ?)",
        (identity.kind, identity.value, customer_id, _ts(now)),
    )
    return True


# keys whose string values are what a person wrote or is called: replaced whole on erasure
_PERSONAL_KEYS = frozenset({"text", "caption", "profile_name", "name", "email", "phone"})


def _redact(value: Any, secrets: Sequence[str], marker: str) -> Any:
    """``value`` (parsed JSON) with personal strings replaced by ``marker``."""
    if isinstance(value, dict):
        return {
            k: marker
            if k in _PERSONAL_KEYS and isinstance(v, str) and v
            else _redact(v, secrets, marker)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, secrets, marker) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, marker)
    return value


def _strip_notice(payload: Any, secrets: Sequence[str], marker: str) -> Any:
    """A profile notification after erasure: its ``customer`` is only the id, and whatever
    else it holds is redacted."""
    if isinstance(payload, dict) and isinstance(payload.get("customer"), dict):
        payload = {**payload, "customer": {"id": payload["customer"].get("id")}}
    return _redact(payload, secrets, marker)


def _rewrite_json(
    conn: sqlite3.Connection,
    table: str,
    key: str,
    column: str,
    where: str,
    args: Sequence[Any],
    secrets: Sequence[str],
    marker: str,
) -> None:
    rows = conn.execute(f"SELECT {key}, {column} FROM {table} WHERE {where}", args).fetchall()
    for row_key, raw in rows:
        if raw is None:
            continue
        redacted = json.dumps(
            _redact(json.loads(raw), secrets, marker), separators=(",", ":"), default=str
        )
        if redacted != raw:
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (redacted, row_key))


def _erase(conn: sqlite3.Connection, customer_id: str, now: datetime, marker: str) -> int:
    """Erasure in one transaction (see ``Store.erase_customer``)."""
    row = conn.execute("SELECT * FROM customers WHERE id = ?", (customer_id,)).fetchone()
    # A deleted customer's tombstone can still be erased (its message history stays on
    # delete); an erased or merged-away one is gone.
    if row is None or row["identity_key"].startswith(("erased:", "merged:")):
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    conversations = conn.execute(
        "SELECT id, identity FROM conversations WHERE customer_id = ?", (customer_id,)
    ).fetchall()
    idents = conn.execute(
        "SELECT value FROM identities WHERE customer_id = ?", (customer_id,)
    ).fetchall()
    values: set[str] = {r[0] for r in idents}
    values.update(str(row[f]) for f in PROFILE_FIELDS if f != "language" and row[f])
    values.update(v for v in json.loads(row["custom"]).values() if isinstance(v, str))
    for conv in conversations:
        values.add(conv["identity"])
    for value in list(values):  # the E.164 number and the WhatsApp wa_id digits
        if value.startswith("+"):
            values.add(value[1:])
    secrets = sorted((v for v in values if len(v) >= 3), key=len, reverse=True)
    ids = [c["id"] for c in conversations]
    for chunk_start in range(0, len(ids), 500):
        chunk = ids[chunk_start : chunk_start + 500]
        marks = ",".join("?" * len(chunk))
        conn.execute(
            f"UPDATE messages SET text = ? WHERE conversation_id IN ({marks})", [marker, *chunk]
        )
        for table, key, column in (
            ("events", "id", "data"),
            ("decisions", "event_id", "facts"),
            ("outbox", "id", "payload"),
        ):
            _rewrite_json(
                conn, table, key, column, f"conversation_id IN ({marks})", chunk, secrets, marker
            )
        conn.execute(
            f"UPDATE outbox SET last_error = NULL WHERE conversation_id IN ({marks})", chunk
        )
    for conv in conversations:
        # The conversation no longer answers to the person's channel id: whoever writes from
        # it again starts a new conversation with a new anonymous customer.
        identity = f"erased:{conv['id']}"
        snapshot = conn.execute(
            "SELECT snapshot FROM conversations WHERE id = ?", (conv["id"],)
        ).fetchone()[0]
        data = _redact(json.loads(snapshot), secrets, marker)
        data["identity"] = identity
        conn.execute(
            "UPDATE conversations SET identity = ?, snapshot = ?, version = version + 1 "
            "WHERE id = ?",
            (identity, json.dumps(data, separators=(",", ":")), conv["id"]),
        )
    # Profile notifications (pending, delivered or dead) keep only the customer's id.
    lanes = _notice_lanes(conn, customer_id)
    for start in range(0, len(lanes), 500):
        chunk = lanes[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row_id, raw in conn.execute(
            f"SELECT id, payload FROM outbox WHERE conversation_id IN ({marks})", chunk
        ).fetchall():
            stripped = json.dumps(
                _strip_notice(json.loads(raw), secrets, marker), separators=(",", ":")
            )
            conn.execute(
                "UPDATE outbox SET payload = ?, last_error = NULL WHERE id = ?", (stripped, row_id)
            )
    conn.execute("DELETE FROM identities WHERE customer_id = ?", (customer_id,))
    # literal campaign parameters given for the customer (an order number, a name...)
    conn.execute(
        "UPDATE campaign_recipients SET params = '{}' WHERE customer_id = ?", (customer_id,)
    )
    conn.execute(
        "DELETE FROM idempotency_keys WHERE response LIKE ?", (f'%"id": "{customer_id}"%',)
    )
    if (
        not conversations
        and not conn.execute(
            "SELECT 1 FROM customer_merges WHERE from_id = ? OR into_id = ?",
            (customer_id, customer_id),
        ).fetchone()
    ):
        conn.execute("DELETE FROM customers WHERE id = ?", (customer_id,))
        return int(row["version"]) + 1
    conn.execute(
        "UPDATE customers SET identity_key = ?, name = NULL, email = NULL, phone = NULL, "
        "language = NULL, external_id = NULL, custom = '{}', known = 0, "
        "version = version + 1, updated_at = ?, deleted_at = ? WHERE id = ?",
        (f"erased:{customer_id}", _ts(now), _ts(now), customer_id),
    )
    return int(row["version"]) + 1


def _replay(conn: sqlite3.Connection, key: IdempotencyKey | None) -> Replay | None:
    if key is None:
        return None
    row = conn.execute(
        "SELECT request_hash, status, response FROM idempotency_keys WHERE scope = ? AND key = ?",
        (key.scope, key.key),
    ).fetchone()
    if row is None:
        return None
    if row[0] != key.request_hash:
        raise RequestError(
            "this idempotency key was used with a different request",
            code="idempotency_key_reused",
            status=422,
        )
    return Replay(row[1], json.loads(row[2]))


def _remember(
    conn: sqlite3.Connection,
    key: IdempotencyKey | None,
    status: int,
    body: dict[str, Any],
    now: datetime,
) -> None:
    if key is not None:
        conn.execute(
            "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?)",
            (key.scope, key.key, key.request_hash, status, json.dumps(body), _ts(now)),
        )


__all__ = ["SqliteStore"]
