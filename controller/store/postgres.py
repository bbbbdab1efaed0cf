"""The PostgreSQL store (asyncpg), for installations that outgrow one process on SQLite.

Same methods and the same meaning as ``SqliteStore``; what differs is how concurrency is
handled. SQLite has one writer thread, so its transactions never overlap; here every method is
one transaction on a pooled connection, several may run at once (in this process and in
others), and the database's locks give the same outcomes:

- the inbox stores an event once per (source, dedupe key) with ``INSERT … ON CONFLICT DO
  NOTHING RETURNING``; a transaction that loses such a race (or the race to open a
  conversation, or a deadlock) is rolled back and run again, and the next run finds the
  winner's row, so a sequence number is never skipped;
- a decision commits with ``UPDATE … WHERE version = $before``, which takes the conversation's
  row lock and checks the version in one statement: a concurrent decision makes it a
  ``Conflict`` (``version_conflict``) exactly as on SQLite;
- outbox rows are claimed with ``FOR UPDATE SKIP LOCKED``; offers and timers are resolved by
  statements that lock the row and re-check its state, so one caller wins.

Times are epoch seconds (double precision) as on SQLite; JSON columns are ``jsonb`` (a NUL
character, which PostgreSQL cannot store in text, is kept as U+FFFD). Migrations are the
``postgres_*.sql`` scripts, applied at ``open`` under an advisory lock so processes starting
together do not race.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from controller.errors import (
    ConfigError,
    Conflict,
    ConvctlError,
    NotFound,
    PreconditionFailed,
    RequestError,
    StoreUnavailable,
)
from controller.ids import new_id
from controller.models import Conversation, Event, NewEvent
from controller.store.base import (
    IDENTITY_FIELDS,
    POOL_WAIT_BUCKETS,
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
    PoolStats,
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
from controller.store.sqlite import (  # the same rules on both stores
    _check_required,
    _first_of_each,
    _new_record,
    _outcome_update,
    _profile_name,
    _redact,
    _strip_notice,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
# asyncpg ships no type information: a (pooled) connection and a result row
Conn: TypeAlias = Any
Row: TypeAlias = Any

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# An outbox row is deliverable only when no earlier row of its lane (conversation and
# destination) is still pending, so retries never overtake.
_HEAD_OF_LANE = (
    "NOT EXISTS (SELECT 1 FROM outbox p WHERE p.status = 'pending' "
    "AND p.conversation_id = o.conversation_id AND p.destination = o.destination AND p.id < o.id)"
)
_ATTEMPTS = 8  # runs of one transaction that keeps losing races (each loss means progress)
_SETTLE_TRIES = 120  # half seconds to learn whether a commit cut off by an outage went through
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
# Heartbeats and leases are dated by the database's clock: one clock for every machine.
_DB_NOW = "extract(epoch FROM clock_timestamp())::double precision"


class _Race(Exception):
    """Another transaction stored the same row first: run this one again."""


_RETRY = (
    _Race,
    asyncpg.exceptions.UniqueViolationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


def _unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The database cannot be reached (stopped, restarting, the connection cut): a 503 the
    caller may retry, not a bug. None for any other failure."""
    lost = isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError  # class 08 (and the connection closed under a query)
        | asyncpg.exceptions.OperatorInterventionError  # 57: shutdown, starting up, cancelled
        | asyncpg.exceptions.TooManyConnectionsError
        # a pooled connection the server cut between two queries ("another operation is in
        # progress"); the pool drops it when it comes back
        | asyncpg.exceptions.InternalClientError,
    ) or (isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))
    if not lost:
        return None
    log.warning("database_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
    return StoreUnavailable("the database is unavailable; try again shortly")


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _json(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """JSON text for a jsonb column (PostgreSQL refuses ``\\u0000`` in jsonb)."""
    text = json.dumps(value, separators=(",", ":"), default=default)
    if "\\u0000" in text:
        text = _JSON_NUL.sub(r"\1\\ufffd", text)
    return text


def _text(value: str) -> str:
    """Text for a text column (PostgreSQL refuses NUL characters)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag like ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def redact_url(url: str) -> str:
    """The database URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def _event_from_row(row: Row) -> Event:
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


# several processes --------------------------------------------------------------------------
def _channel_name(schema: str) -> str:
    """The NOTIFY channel of one schema (channels are per database, schemas share them)."""
    return "convctl_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


async def _register(conn: Conn, process_id: str) -> None:
    await conn.execute(
        "INSERT INTO processes (id, host, pid, started_at, heartbeat_at) "
        f"VALUES ($1, $2, $3, {_DB_NOW}, {_DB_NOW}) "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        process_id,
        socket.gethostname(),
        os.getpid(),
    )


async def _remove_processes(
    conn: Conn, ids: Sequence[str], channel: str, *, unsure: bool = False
) -> None:
    """Remove processes (dead, or leaving): their leases go round robin to the processes that
    remain (new fencing tokens, so a process only thought dead cannot commit any more), their
    outbox and timer claims are released. ``unsure``: the process died, its claimed rows may
    have been in flight."""
    await conn.execute("DELETE FROM processes WHERE id = ANY($1::text[])", list(ids))
    live = [r[0] for r in await conn.fetch("SELECT id FROM processes ORDER BY id")]
    if live:
        moved = await conn.execute(
            "WITH l AS (SELECT conversation_id, "
            "row_number() OVER (ORDER BY conversation_id) - 1 AS n "
            "FROM conversation_leases WHERE owner = ANY($1::text[])) "
            "UPDATE conversation_leases c SET owner = ($2::text[])[(l.n % $3) + 1], "
            f"token = nextval('lease_tokens'), acquired_at = {_DB_NOW} "
            "FROM l WHERE c.conversation_id = l.conversation_id",
            list(ids),
            live,
            len(live),
        )
    else:
        moved = await conn.execute(
            "DELETE FROM conversation_leases WHERE owner = ANY($1::text[])", list(ids)
        )
    await conn.execute(
        "UPDATE outbox SET claimed = FALSE, claimed_by = NULL, "
        "unsure = CASE WHEN $2 THEN GREATEST(unsure, 1) ELSE unsure END "
        "WHERE claimed_by = ANY($1::text[]) AND claimed",
        list(ids),
        unsure,
    )
    await conn.execute(
        "UPDATE timers SET claimed_by = NULL WHERE claimed_by = ANY($1::text[])", list(ids)
    )
    if channel:
        message = {"kind": "takeover", "gone": list(ids), "leases": _rowcount(moved)}
        await conn.execute("SELECT pg_notify($1, $2)", channel, _json(message))


class ClusterLink:
    """The connection a process listens on; it also holds the process's session advisory
    locks (the router's), which PostgreSQL releases when the connection ends."""

    def __init__(self, conn: Conn, process_id: str) -> None:
        self._conn = conn
        self._process_id = process_id
        self._busy = asyncio.Lock()  # one query at a time on a connection

    @property
    def closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def heartbeat(self) -> bool:
        """``PostgresStore.heartbeat`` on this connection: a busy pool never delays it."""
        async with self._busy, self._conn.transaction():
            updated = await self._conn.execute(
                f"UPDATE processes SET heartbeat_at = {_DB_NOW} WHERE id = $1", self._process_id
            )
            if _rowcount(updated):
                return True
            await _register(self._conn, self._process_id)
            return False

    async def try_lock(self, name: str) -> bool:
        """Take the session advisory lock ``name`` of this schema, if free (or already ours)."""
        async with self._busy:
            value = await self._conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1 || ':' || current_schema(), 0))",
                f"convctl:{name}",
            )
        return bool(value)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._conn.close(), timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            self._conn.terminate()


class PostgresStore(Store):
    """PostgreSQL implementation of the Store; several processes may share one database."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        if schema is not None and not SCHEMA_NAME.match(schema):
            raise ConfigError(f"invalid database schema name {schema!r}")
        self._url = url
        self._schema = schema
        self._min_size = min_size
        self._max_size = max(max_size, min_size)
        self._pool: asyncpg.Pool | None = None
        self._waiting = 0  # callers waiting for a connection now
        self._acquires = 0
        self._wait_seconds = 0.0
        self._wait_buckets = [0] * (len(POOL_WAIT_BUCKETS) + 1)  # the last: above them all
        # This process, as the others sharing the database know it (processes table); its
        # claims and leases carry this id. Registered at open, removed at close.
        self.process_id = new_id("pr")
        self.channel = ""  # the LISTEN/NOTIFY channel of this schema, known after open

    @property
    def location(self) -> str:
        where = redact_url(self._url)
        return f"{where} (schema {self._schema})" if self._schema else where

    # plumbing ----------------------------------------------------------------------------
    async def open(self) -> None:
        settings = {"application_name": "convctl"}
        try:
            if self._schema is not None:
                await self._create_schema()
                settings["search_path"] = self._schema
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=settings,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(f"cannot connect to {self.location}: {exc}") from exc
        async with self._pool.acquire() as conn:
            await self._migrate(conn)
            schema = await conn.fetchval("SELECT current_schema()")
            self.channel = _channel_name(str(schema))
            # Several processes may share the database: claims are not reset here (that
            # would take rows live processes are delivering). Claims of processes that are
            # gone (no row any more, or made before processes were recorded) are due again
            # now, marked unsure (they may have reached their destination just before the
            # end); those of processes that died without a word are released once their
            # heartbeat is stale (``release_dead_processes``).
            async with conn.transaction():
                await _register(conn, self.process_id)
                await conn.execute(
                    "UPDATE outbox SET claimed = FALSE, claimed_by = NULL, "
                    "unsure = GREATEST(unsure, 1) WHERE status = 'pending' AND claimed "
                    "AND (claimed_by IS NULL OR claimed_by NOT IN (SELECT id FROM processes))"
                )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                # Leaving: the others need not wait for a heartbeat timeout. A row still
                # claimed now was cut short (the dispatcher finishes its deliveries before
                # the store closes): it may have been sent, so it is released as unsure.
                async with pool.acquire() as conn, conn.transaction():
                    await _remove_processes(conn, [self.process_id], self.channel, unsure=True)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("process_not_deregistered", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    async def _create_schema(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
        except (asyncpg.exceptions.UniqueViolationError, asyncpg.exceptions.DuplicateSchemaError):
            pass  # another process created it at the same moment
        finally:
            await conn.close()

    async def _migrate(self, conn: Conn) -> None:
        # One process at a time migrates a schema; the others wait, then find nothing to do.
        lock = "SELECT pg_advisory_{}(hashtextextended('convctl:migrate:' || current_schema(), 0))"
        await conn.execute(lock.format("lock"))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            applied = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            folder = resources.files("controller.store") / "migrations"
            scripts = sorted(p.name for p in folder.iterdir() if p.name.startswith("postgres_"))
            for name in scripts:
                version = int(name.split("_")[1])
                if version in applied:
                    continue
                sql = (folder / name).read_text(encoding="utf-8")
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                        version,
                        name,
                        datetime.now(UTC).timestamp(),
                    )
                log.info("schema_migrated", version=version, script=name, backend="postgres")
        finally:
            await conn.execute(lock.format("unlock"))

    def _need_pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; the time spent waiting for it is counted (``pool_stats``)."""
        pool = self._need_pool()
        started = time.perf_counter()
        self._waiting += 1
        try:
            conn = await pool.acquire()
        finally:
            self._waiting -= 1
        waited = time.perf_counter() - started
        self._acquires += 1
        self._wait_seconds += waited
        self._wait_buckets[bisect.bisect_left(POOL_WAIT_BUCKETS, waited)] += 1
        try:
            yield conn
        finally:
            await pool.release(conn)

    def pool_stats(self) -> PoolStats | None:
        """The connection pool for the metrics; None while the store is not open."""
        pool = self._pool
        if pool is None:
            return None
        return PoolStats(
            size=pool.get_size(),
            idle=pool.get_idle_size(),
            min_size=pool.get_min_size(),
            max_size=pool.get_max_size(),
            waiting=self._waiting,
            acquires=self._acquires,
            wait_seconds=self._wait_seconds,
            wait_bounds=POOL_WAIT_BUCKETS,
            wait_buckets=tuple(self._wait_buckets[: len(POOL_WAIT_BUCKETS)]),
        )

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction; again (from the start) if it lost a race."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with self._conn() as conn, conn.transaction():
                    return await fn(conn)
            except _RETRY as exc:
                if attempt == _ATTEMPTS:
                    raise
                log.debug("postgres_transaction_retried", reason=type(exc).__name__)
            except Exception as exc:
                if (refusal := _unavailable(exc)) is not None:
                    raise refusal from exc
                raise
        raise AssertionError("unreachable")

    async def _read(self, fn: Callable[[Conn], Awaitable[T]], *, consistent: bool = False) -> T:
        """Run ``fn`` on a pooled connection; ``consistent``: every query sees one snapshot."""
        try:
            async with self._conn() as conn:
                if not consistent:
                    return await fn(conn)
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    return await fn(conn)
        except Exception as exc:
            if (refusal := _unavailable(exc)) is not None:
                raise refusal from exc
            raise

    # inbox -------------------------------------------------------------------------------
    async def accept(
        self, events: Sequence[NewEvent], now: datetime, *, notify: Notify | None = None
    ) -> list[Accepted]:
        async def run(conn: Conn) -> list[Accepted]:
            return [await _accept_one(conn, ev, now, notify=notify) for ev in events]

        return await self._tx(run)

    async def load_for_decision(
        self, conversation_id: str, limit: int = 100
    ) -> tuple[Conversation | None, list[Event]]:
        async def run(conn: Conn) -> tuple[Conversation | None, list[Event]]:
            conv = await _load_conversation(conn, conversation_id)
            rows = await conn.fetch(
                "SELECT * FROM events WHERE conversation_id = $1 AND status = 'pending' "
                "ORDER BY seq LIMIT $2",
                conversation_id,
                limit,
            )
            return conv, [_event_from_row(r) for r in rows]

        return await self._read(run, consistent=True)

    async def first_pending_events(self) -> list[tuple[str, str]]:
        async def run(conn: Conn) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT e.conversation_id, e.id FROM events e JOIN ("
                "SELECT conversation_id, MIN(seq) AS seq FROM events WHERE status = 'pending' "
                "GROUP BY conversation_id) h ON h.conversation_id = e.conversation_id "
                "AND h.seq = e.seq ORDER BY e.accepted_at, e.conversation_id"
            )
            return [(r[0], r[1]) for r in rows]

        return await self._read(run)

    async def event(self, event_id: str) -> Event | None:
        async def run(conn: Conn) -> Event | None:
            row = await conn.fetchrow("SELECT * FROM events WHERE id = $1", event_id)
            return _event_from_row(row) if row else None

        return await self._read(run)

    async def events(self, conversation_id: str) -> list[tuple[Event, str]]:
        async def run(conn: Conn) -> list[tuple[Event, str]]:
            rows = await conn.fetch(
                "SELECT * FROM events WHERE conversation_id = $1 ORDER BY seq", conversation_id
            )
            return [(_event_from_row(r), r["status"]) for r in rows]

        return await self._read(run)

    async def decisions(self, conversation_id: str) -> list[dict[str, Any]]:
        async def run(conn: Conn) -> list[dict[str, Any]]:
            rows = await conn.fetch(
                "SELECT d.*, e.type FROM decisions d JOIN events e ON e.id = d.event_id "
                "WHERE d.conversation_id = $1 ORDER BY d.seq",
                conversation_id,
            )
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
        async def run(conn: Conn) -> str | None:
            value = await conn.fetchval(
                "SELECT id FROM conversations WHERE instance = $1 AND endpoint = $2 "
                "AND identity = $3 ORDER BY closed ASC, created_at DESC LIMIT 1",
                instance,
                endpoint,
                identity,
            )
            return None if value is None else str(value)

        return await self._read(run)

    async def present_customers(self, instance: str) -> list[tuple[str, str, int]]:
        """Open conversations whose customer was last seen connected (undecided events count)."""

        async def run(conn: Conn) -> list[tuple[str, str, int]]:
            rows = await conn.fetch(
                "SELECT c.id, c.identity, l.seq FROM conversations c "
                "CROSS JOIN LATERAL (SELECT e.seq, e.type FROM events e "
                "WHERE e.conversation_id = c.id AND e.type IN ('customer.message', "
                "'customer.returned', 'customer.disconnected') ORDER BY e.seq DESC LIMIT 1) l "
                "WHERE c.instance = $1 AND NOT c.closed AND l.type <> 'customer.disconnected'",
                instance,
            )
            return [(r[0], r[1], int(r[2])) for r in rows]

        return await self._read(run)

    async def commit_decision(self, record: DecisionRecord, now: datetime) -> Committed:
        try:
            return await self._tx(lambda conn: _commit_decision(conn, record, now, self.process_id))
        except StoreUnavailable:
            # The connection may have ended after the server committed: the outcome is
            # unknown, and the rows the decision inserted are claimed by this process, which
            # nobody else delivers while it lives. Once the database answers, look.
            committed = await self._settle_commit(record.event.id)
            if committed is None:
                raise
            log.warning("decision_commit_confirmed_after_reconnect", rows=len(committed.outbox))
            return committed

    async def _settle_commit(self, event_id: str) -> Committed | None:
        """After a commit whose answer was lost: the decision's outbox rows still claimed by
        this process (to deliver as usual) if the decision is stored, None if it is not (or
        the database stays away for ``_SETTLE_TRIES`` half seconds). Its emitted events are
        pending in the store: the cluster's sweep wakes the workers for them."""

        async def run(conn: Conn) -> Committed | None:
            if not await conn.fetchval("SELECT 1 FROM decisions WHERE event_id = $1", event_id):
                return None
            rows = await conn.fetch(
                "SELECT * FROM outbox WHERE event_id = $1 AND status = 'pending' AND claimed "
                "AND claimed_by = $2 ORDER BY id",
                event_id,
                self.process_id,
            )
            return Committed([], [_outbox_row(r) for r in rows])

        for _ in range(_SETTLE_TRIES):
            await asyncio.sleep(0.5)
            try:
                return await self._read(run)
            except StoreUnavailable:
                continue
        log.error("decision_commit_unknown", event_id=event_id)
        return None

    async def messages(self, conversation_id: str, *, include_agent_only: bool) -> list[Message]:
        async def run(conn: Conn) -> list[Message]:
            sql = "SELECT * FROM messages WHERE conversation_id = $1"
            if not include_agent_only:
                sql += " AND visibility = 'all'"
            rows = await conn.fetch(sql + " ORDER BY created_at, ord", conversation_id)
            return [
                Message(
                    id=r["id"],
                    conversation_id=r["conversation_id"],
                    sender_role=r["sender_role"],
                    sender_id=r["sender_id"],
                    text=r["text"],
                    created_at=_dt(r["created_at"]),
                    visibility=r["visibility"],
                    content=json.loads(r["content"]) if r["content"] is not None else None,
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
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO provider_messages (instance, provider_id, conversation_id, "
                "message_id, sent_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                instance,
                provider_id,
                conversation_id,
                message_id,
                _ts(sent_at),
            )
        )

    async def provider_message(self, instance: str, provider_id: str) -> ProviderMessage | None:
        async def run(conn: Conn) -> ProviderMessage | None:
            row = await conn.fetchrow(
                "SELECT conversation_id, message_id, sent_at FROM provider_messages "
                "WHERE instance = $1 AND provider_id = $2",
                instance,
                provider_id,
            )
            if row is None:
                return None
            return ProviderMessage(instance, provider_id, row[0], row[1], _dt(row[2]))

        return await self._read(run)

    # outbox ------------------------------------------------------------------------------
    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxRow]:
        async def run(conn: Conn) -> list[OutboxRow]:
            # SKIP LOCKED: rows another claimer holds are left to it, nobody waits.
            rows = await conn.fetch(
                "WITH due AS (SELECT o.id FROM outbox o WHERE o.status = 'pending' "
                f"AND NOT o.claimed AND o.next_attempt_at <= $1 AND {_HEAD_OF_LANE} "
                "ORDER BY o.id LIMIT $2 FOR UPDATE OF o SKIP LOCKED) "
                "UPDATE outbox SET claimed = TRUE, claimed_by = $3 FROM due "
                "WHERE outbox.id = due.id RETURNING outbox.*",
                _ts(now),
                limit,
                self.process_id,
            )
            return sorted((_outbox_row(r) for r in rows), key=lambda r: r.id)

        return await self._tx(run)

    async def outbox_done(self, row_id: int) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE outbox SET status = 'done', claimed = FALSE, claimed_by = NULL, "
                "attempts = attempts + 1, done_at = $1 WHERE id = $2",
                datetime.now(UTC).timestamp(),
                row_id,
            )
        )

    # A row whose claim this process lost (it was thought dead and another process claimed
    # the row again) is not unclaimed or rescheduled by this process any more.
    _MINE = "(claimed_by = {} OR NOT claimed)"

    async def outbox_retry(self, row_id: int, at: datetime, error: str) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE outbox SET claimed = FALSE, claimed_by = NULL, attempts = attempts + 1, "
                "next_attempt_at = $1, last_error = $2 WHERE id = $3 AND "
                + self._MINE.format("$4"),
                _ts(at),
                _text(error[:1000]),
                row_id,
                self.process_id,
            )
        )

    async def outbox_release(self, row_ids: Sequence[int]) -> None:
        """Unclaim rows without counting an attempt (they waited behind a failed row)."""
        if row_ids:
            await self._tx(
                lambda conn: conn.execute(
                    "UPDATE outbox SET claimed = FALSE, claimed_by = NULL "
                    "WHERE id = ANY($1::bigint[]) AND " + self._MINE.format("$2"),
                    list(row_ids),
                    self.process_id,
                )
            )

    async def outbox_dead(self, row_id: int, error: str) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE outbox SET status = 'dead', claimed = FALSE, claimed_by = NULL, "
                "attempts = attempts + 1, last_error = $1 WHERE id = $2 AND "
                + self._MINE.format("$3"),
                _text(error[:1000]),
                row_id,
                self.process_id,
            )
        )

    async def outbox_hold(self, row_id: int, until: datetime, error: str | None = None) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE outbox SET claimed = FALSE, claimed_by = NULL, unsure = 2, "
                "attempts = attempts + $1, "
                "next_attempt_at = GREATEST(next_attempt_at, $2), "
                "last_error = COALESCE($3, last_error) WHERE id = $4",
                0 if error is None else 1,
                _ts(until),
                None if error is None else _text(error[:1000]),
                row_id,
            )
        )

    async def delivery_status_of(self, conversation_id: str, callback_data: str) -> str | None:
        async def run(conn: Conn) -> str | None:
            value = await conn.fetchval(
                "SELECT data->>'wamid' FROM events WHERE conversation_id = $1 "
                "AND type = 'delivery.status' AND data->>'callback_data' = $2 LIMIT 1",
                conversation_id,
                callback_data,
            )
            return str(value) if value else None

        return await self._read(run)

    async def outbox_held(self) -> list[OutboxRow]:
        async def run(conn: Conn) -> list[OutboxRow]:
            rows = await conn.fetch(
                "SELECT * FROM outbox WHERE status = 'pending' AND unsure = 2 ORDER BY id"
            )
            return [_outbox_row(r) for r in rows]

        return await self._read(run)

    async def outbox_confirm(self, row_id: int) -> OutboxRow | None:
        async def run(conn: Conn) -> OutboxRow | None:
            row = await conn.fetchrow(
                "UPDATE outbox SET status = 'done', unsure = 0, attempts = attempts + 1, "
                "done_at = $1 WHERE id = $2 AND status = 'pending' AND NOT claimed "
                "AND unsure = 2 RETURNING *",
                datetime.now(UTC).timestamp(),
                row_id,
            )
            return None if row is None else _outbox_row(row)

        return await self._tx(run)

    async def outbox_next_due(self) -> datetime | None:
        async def run(conn: Conn) -> datetime | None:
            value = await conn.fetchval(
                "SELECT MIN(o.next_attempt_at) FROM outbox o WHERE o.status = 'pending' "
                f"AND NOT o.claimed AND {_HEAD_OF_LANE}"
            )
            return None if value is None else _dt(value)

        return await self._read(run)

    async def outbox_pending_lanes(self) -> list[tuple[str, str]]:
        async def run(conn: Conn) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT DISTINCT conversation_id, destination FROM outbox WHERE status = 'pending'"
            )
            return [(r[0], r[1]) for r in rows]

        return await self._read(run)

    async def outbox_lane_pending(self, conversation_id: str, destination: str) -> int:
        async def run(conn: Conn) -> int:
            value = await conn.fetchval(
                "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND conversation_id = $1 "
                "AND destination = $2",
                conversation_id,
                destination,
            )
            return int(value)

        return await self._read(run)

    async def outbox_rows(self, status: str | None = None) -> list[dict[str, Any]]:
        async def run(conn: Conn) -> list[dict[str, Any]]:
            if status is None:
                rows = await conn.fetch("SELECT * FROM outbox ORDER BY id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM outbox WHERE status = $1 ORDER BY id", status
                )
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
        async def run(conn: Conn) -> list[TimerRow]:
            rows = await conn.fetch("SELECT conversation_id, name, generation, due_at FROM timers")
            return [TimerRow(r[0], r[1], r[2], _dt(r[3])) for r in rows]

        return await self._read(run)

    async def fire_timer(self, timer: TimerRow, now: datetime) -> Accepted | None:
        async def run(conn: Conn) -> Accepted | None:
            # The conversation first (the order a decision locks in: conversation, then its
            # timers); the delete locks the timer: of two processes firing one timer, the
            # second waits and then finds it gone (or of a newer generation) and fires nothing.
            await conn.execute(
                "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", timer.conversation_id
            )
            deleted = await conn.execute(
                "DELETE FROM timers WHERE conversation_id = $1 AND name = $2 AND generation = $3",
                timer.conversation_id,
                timer.name,
                timer.generation,
            )
            if not _rowcount(deleted):
                return None
            return await _accept_one(
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

        return await self._tx(run)

    # several processes (controller/cluster.py) ---------------------------------------------
    async def heartbeat(self) -> bool:
        """Tell the others this process lives. False when it had been taken for dead (its row
        was removed with its leases and claims): it is registered again, owning nothing."""

        async def run(conn: Conn) -> bool:
            updated = await conn.execute(
                f"UPDATE processes SET heartbeat_at = {_DB_NOW} WHERE id = $1", self.process_id
            )
            if _rowcount(updated):
                return True
            await _register(conn, self.process_id)
            return False

        return await self._tx(run)

    async def release_dead_processes(self, timeout: float) -> list[str]:
        """Processes whose heartbeat is older than ``timeout`` seconds (database time) are
        dead: remove them, hand their leases to the living (round robin, new fencing
        tokens), release their outbox and timer claims, and tell everybody. Of several
        processes noticing at once, one does it (the others skip the locked rows)."""

        async def run(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT id FROM processes WHERE id <> $1 AND heartbeat_at < "
                f"{_DB_NOW} - $2 ORDER BY id FOR UPDATE SKIP LOCKED",
                self.process_id,
                timeout,
            )
            dead = [r[0] for r in rows]
            if dead:
                await _remove_processes(conn, dead, self.channel, unsure=True)
            return dead

        return await self._tx(run)

    async def acquire_lease(self, conversation_id: str) -> tuple[str, int]:
        """The conversation's lease: (owner, fencing token). Taken by this process when
        nobody holds it; when another process does, that process is told (NOTIFY) that the
        conversation has work."""

        async def run(conn: Conn) -> tuple[str, int]:
            row = await conn.fetchrow(
                "INSERT INTO conversation_leases (conversation_id, owner, token, acquired_at) "
                f"VALUES ($1, $2, nextval('lease_tokens'), {_DB_NOW}) "
                "ON CONFLICT (conversation_id) DO NOTHING RETURNING owner, token",
                conversation_id,
                self.process_id,
            ) or await conn.fetchrow(
                "SELECT owner, token FROM conversation_leases WHERE conversation_id = $1",
                conversation_id,
            )
            if row is None:  # released between the two statements: try again
                raise _Race(conversation_id)
            owner, token = str(row[0]), int(row[1])
            if owner != self.process_id:
                await conn.execute(
                    "SELECT pg_notify($1, $2)",
                    self.channel,
                    json.dumps({"kind": "work", "to": owner, "conversation": conversation_id}),
                )
            return owner, token

        return await self._tx(run)

    async def release_lease(self, conversation_id: str) -> None:
        """Give up this process's lease of a conversation (if it still holds it)."""
        await self._tx(
            lambda conn: conn.execute(
                "DELETE FROM conversation_leases WHERE conversation_id = $1 AND owner = $2",
                conversation_id,
                self.process_id,
            )
        )

    async def hand_over(self) -> int:
        """Leaving cleanly (the decisions in flight are done): give up every lease of this
        process and its claims of timers not fired yet, and tell the others (``handover``)
        so they sweep for the work at once. Returns how many leases were given up. The
        process stays registered until ``close`` (its outbox deliveries finish first)."""

        async def run(conn: Conn) -> int:
            released = await conn.execute(
                "DELETE FROM conversation_leases WHERE owner = $1", self.process_id
            )
            await conn.execute(
                "UPDATE timers SET claimed_by = NULL WHERE claimed_by = $1", self.process_id
            )
            count = _rowcount(released)
            message = {"kind": "handover", "from": self.process_id, "leases": count}
            await conn.execute("SELECT pg_notify($1, $2)", self.channel, _json(message))
            return count

        return await self._tx(run)

    async def pending_work(self) -> list[tuple[str, str, int | None]]:
        """Conversations with undecided events that this process owns or nobody owns:
        (conversation, its first undecided event, this process's token or None)."""

        async def run(conn: Conn) -> list[tuple[str, str, int | None]]:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (e.conversation_id) e.conversation_id, e.id, l.token "
                "FROM events e LEFT JOIN conversation_leases l "
                "ON l.conversation_id = e.conversation_id "
                "WHERE e.status = 'pending' AND (l.owner IS NULL OR l.owner = $1) "
                "ORDER BY e.conversation_id, e.seq",
                self.process_id,
            )
            return [(r[0], r[1], None if r[2] is None else int(r[2])) for r in rows]

        return await self._read(run)

    async def claim_timers(self, now: datetime, limit: int) -> list[TimerRow]:
        """Due timers nobody has claimed (or this process claimed and did not fire), now
        claimed by this process; other claimers' rows are skipped, not waited for."""

        async def run(conn: Conn) -> list[TimerRow]:
            rows = await conn.fetch(
                "WITH due AS (SELECT conversation_id, name FROM timers WHERE due_at <= $1 "
                "AND (claimed_by IS NULL OR claimed_by = $3) ORDER BY due_at LIMIT $2 "
                "FOR UPDATE SKIP LOCKED) UPDATE timers t SET claimed_by = $3 FROM due "
                "WHERE t.conversation_id = due.conversation_id AND t.name = due.name "
                "RETURNING t.conversation_id, t.name, t.generation, t.due_at",
                _ts(now),
                limit,
                self.process_id,
            )
            return sorted(
                (TimerRow(r[0], r[1], r[2], _dt(r[3])) for r in rows), key=lambda t: t.due_at
            )

        return await self._tx(run)

    async def processes(self) -> list[dict[str, Any]]:
        """The registered processes with their heartbeat age (database time), oldest first."""

        async def run(conn: Conn) -> list[dict[str, Any]]:
            rows = await conn.fetch(
                f"SELECT id, host, pid, started_at, {_DB_NOW} - heartbeat_at AS age, "
                "(SELECT COUNT(*) FROM conversation_leases l WHERE l.owner = p.id) AS leases "
                "FROM processes p ORDER BY started_at, id"
            )
            return [
                {
                    "id": r["id"],
                    "host": r["host"],
                    "pid": r["pid"],
                    "started_at": _dt(r["started_at"]).isoformat(),
                    "heartbeat_age": float(r["age"]),
                    "leases": int(r["leases"]),
                }
                for r in rows
            ]

        return await self._read(run)

    async def publish(self, message: Mapping[str, Any]) -> None:
        """NOTIFY every process sharing the database (payloads stay under 8000 bytes)."""
        await self._read(
            lambda conn: conn.execute("SELECT pg_notify($1, $2)", self.channel, _json(message))
        )

    async def listen(self, on_message: Callable[[dict[str, Any]], None]) -> ClusterLink:
        """A connection of its own that LISTENs to the schema's channel (and can hold
        session advisory locks, released when it closes)."""
        settings = {"application_name": "convctl-listen"}
        if self._schema is not None:
            settings["search_path"] = self._schema
        conn = await asyncpg.connect(self._url, server_settings=settings)

        def received(_conn: Conn, _pid: int, _channel: str, payload: str) -> None:
            try:
                message = json.loads(payload)
            except ValueError:
                log.warning("cluster_message_unreadable", payload=payload[:200])
                return
            if isinstance(message, dict):
                on_message(message)

        await conn.add_listener(self.channel, received)
        return ClusterLink(conn, self.process_id)

    # agents and routing ------------------------------------------------------------------
    async def upsert_agent(self, agent: AgentRecord) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO agents (id, name, presence, capacity, skills, idle_since, channels, "
                "teams) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE "
                "SET name = excluded.name, capacity = excluded.capacity, skills = excluded.skills, "
                "channels = excluded.channels, teams = excluded.teams",
                agent.id,
                agent.name,
                agent.presence,
                agent.capacity,
                _json(dict(agent.skills)),
                _ts(agent.idle_since),
                _json(dict(agent.channels)),
                _json(list(agent.teams)),
            )
        )

    async def agent(self, agent_id: str) -> AgentRecord | None:
        async def run(conn: Conn) -> AgentRecord | None:
            row = await conn.fetchrow("SELECT * FROM agents WHERE id = $1", agent_id)
            return _agent_from_row(row) if row else None

        return await self._read(run)

    async def set_presence(self, agent_id: str, presence: str, now: datetime) -> None:
        async def run(conn: Conn) -> None:
            changed = await conn.execute(
                "UPDATE agents SET presence = $1 WHERE id = $2", presence, agent_id
            )
            if not _rowcount(changed):
                raise NotFound(f"unknown agent {agent_id!r}", code="unknown_agent")

        await self._tx(run)

    async def touch_agent_idle(self, agent_id: str, now: datetime) -> None:
        """Record that an agent became free, for longest-idle routing."""
        await self._tx(
            lambda conn: conn.execute(
                "UPDATE agents SET idle_since = $1 WHERE id = $2", _ts(now), agent_id
            )
        )

    async def router_snapshot(self) -> RouterSnapshot:
        async def run(conn: Conn) -> RouterSnapshot:
            agents = [_agent_from_row(r) for r in await conn.fetch("SELECT * FROM agents")]
            # Queued, and not already promised to an agent whose acceptance is being decided.
            queued = [
                QueuedConversation(
                    r["id"],
                    r["queue"] or "",
                    r["priority"],
                    tuple(json.loads(r["skills"]) or ()),
                    _dt(r["enqueued_at"] if r["enqueued_at"] is not None else r["created_at"]),
                )
                for r in await conn.fetch(
                    "SELECT c.id, c.queue, c.priority, c.enqueued_at, c.created_at, "
                    "COALESCE(c.snapshot -> 'skills', '[]'::jsonb) AS skills "
                    "FROM conversations c WHERE c.state = 'queued' AND NOT EXISTS "
                    "(SELECT 1 FROM offers o JOIN events e ON e.source = 'router' "
                    "AND e.dedupe_key = o.id || ':accepted' WHERE o.conversation_id = c.id "
                    "AND e.status = 'pending')"
                )
            ]
            offers = [
                _offer_from_row(r)
                for r in await conn.fetch("SELECT * FROM offers WHERE status = 'pending'")
            ]
            assignments = [
                (r[0], r[1])
                for r in await conn.fetch("SELECT agent_id, conversation_id FROM assignments")
            ]
            tried = [
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT o.conversation_id, o.agent_id FROM offers o JOIN conversations c "
                    "ON c.id = o.conversation_id WHERE c.state = 'queued' "
                    "AND o.status IN ('declined', 'expired') "
                    "AND o.created_at >= COALESCE(c.enqueued_at, 0)"
                )
            ]
            accepting = [
                r[0]
                for r in await conn.fetch(
                    "SELECT o.conversation_id FROM offers o JOIN events e ON e.source = 'router' "
                    "AND e.dedupe_key = o.id || ':accepted' WHERE e.status = 'pending'"
                )
            ]
            channels = {
                r[0]: r[1]
                for r in await conn.fetch(
                    "SELECT id, snapshot ->> 'channel' FROM conversations "
                    "WHERE state = 'queued' OR id IN "
                    "(SELECT conversation_id FROM assignments UNION SELECT conversation_id "
                    "FROM offers WHERE status = 'pending')"
                )
            }
            return RouterSnapshot(agents, queued, offers, assignments, tried, accepting, channels)

        return await self._read(run, consistent=True)

    async def create_offer(self, offer: OfferRecord, now: datetime) -> Accepted:
        async def run(conn: Conn) -> Accepted:
            await _insert_offer(conn, offer)
            return await _accept_one(conn, offered_event(offer), now)

        return await self._tx(run)

    async def create_offers(
        self, offers: Sequence[OfferRecord], now: datetime
    ) -> list[Accepted | None]:
        async def run(conn: Conn) -> list[Accepted | None]:
            # The conversations locked first, in one order (two batches never wait on each
            # other in a cycle); the closed ones get no offer.
            open_ids = {
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM conversations WHERE id = ANY($1::text[]) AND NOT closed "
                    "ORDER BY id FOR UPDATE",
                    sorted({o.conversation_id for o in offers}),
                )
            }
            results: list[Accepted | None] = []
            for offer in offers:
                if offer.conversation_id not in open_ids:
                    results.append(None)
                    continue
                await _insert_offer(conn, offer)
                results.append(await _accept_one(conn, offered_event(offer), now))
            return results

        return await self._tx(run)

    async def resolve_offer(
        self, offer_id: str, status: str, event_type: str, now: datetime
    ) -> Accepted | None:
        async def run(conn: Conn) -> Accepted | None:
            # Locks in a decision's order (conversation, then what hangs on it); the offer's
            # row lock makes one of two racing outcomes (accepted, expired) win.
            await conn.execute(
                "SELECT 1 FROM conversations c JOIN offers o ON o.conversation_id = c.id "
                "WHERE o.id = $1 FOR UPDATE OF c",
                offer_id,
            )
            row = await conn.fetchrow(
                "SELECT * FROM offers WHERE id = $1 AND status = 'pending' FOR UPDATE", offer_id
            )
            if row is None:
                return None
            await conn.execute(
                "UPDATE offers SET status = $1, resolved_at = $2 WHERE id = $3",
                status,
                _ts(now),
                offer_id,
            )
            if status == "accepted":
                await conn.execute(
                    "INSERT INTO assignments VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    row["agent_id"],
                    row["conversation_id"],
                    _ts(now),
                )
            if status == "cancelled":
                return None
            return await _accept_one(
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

        return await self._tx(run)

    async def offer(self, offer_id: str) -> OfferRecord | None:
        async def run(conn: Conn) -> OfferRecord | None:
            row = await conn.fetchrow("SELECT * FROM offers WHERE id = $1", offer_id)
            return _offer_from_row(row) if row else None

        return await self._read(run)

    async def put_token(self, token_hash: str, role: str, subject: str, now: datetime) -> None:
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO tokens (hash, role, subject, created_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING",
                token_hash,
                role,
                subject,
                _ts(now),
            )
        )

    async def token(self, token_hash: str) -> tuple[str, str] | None:
        async def run(conn: Conn) -> tuple[str, str] | None:
            row = await conn.fetchrow(
                "SELECT role, subject FROM tokens WHERE hash = $1 AND NOT revoked", token_hash
            )
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

        async def run(conn: Conn) -> int:
            return int(await conn.fetchval(f"SELECT COUNT(*) FROM {table}"))

        return await self._read(run)

    # rules versions ----------------------------------------------------------------------
    async def save_rules_version(self, record: RulesVersion) -> bool:
        files = _json(record.files)

        async def run(conn: Conn) -> bool:
            stored = await conn.fetchval(
                "INSERT INTO rules_versions (version, files, loaded_at, source) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                record.version,
                files,
                _ts(record.loaded_at),
                record.source,
            )
            return stored is not None

        return await self._tx(run)

    async def rules_versions(self) -> list[RulesVersion]:
        async def run(conn: Conn) -> list[RulesVersion]:
            rows = await conn.fetch(
                "SELECT version, loaded_at, source FROM rules_versions "
                "ORDER BY loaded_at DESC, ord DESC"
            )
            return [RulesVersion(r[0], {}, _dt(r[1]), r[2]) for r in rows]

        return await self._read(run)

    async def rules_version(self, version: str) -> RulesVersion | None:
        async def run(conn: Conn) -> RulesVersion | None:
            row = await conn.fetchrow(
                "SELECT version, files, loaded_at, source FROM rules_versions WHERE version = $1",
                version,
            )
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
        async def run(conn: Conn) -> CustomerRecord | Replay:
            replay = await _replay(conn, idempotency)
            if replay is not None:
                return replay
            record = await _create_customer(conn, profile, identities, now)
            await _remember(conn, idempotency, 201, record.as_dict(), now)
            change = CustomerChange("created", record.id, record.version, now, record)
            await _notify(conn, notify, change)
            return record

        return await self._tx(run)

    async def customer(self, customer_id: str) -> CustomerRecord | None:
        return await self._read(lambda conn: _customer(conn, customer_id), consistent=True)

    async def update_customer(
        self,
        customer_id: str,
        changes: Mapping[str, Any],
        now: datetime,
        *,
        expected_version: int | None,
        notify: Notify | None = None,
    ) -> CustomerRecord:
        async def run(conn: Conn) -> CustomerRecord:
            known = (await _current(conn, customer_id, expected_version, lock=True)).known
            record = await _update_customer(conn, customer_id, changes, now, expected_version)
            change = CustomerChange(
                change_kind(known, record), record.id, record.version, now, record
            )
            await _notify(conn, notify, change)
            return record

        return await self._tx(run)

    async def delete_customer(
        self,
        customer_id: str,
        now: datetime,
        *,
        expected_version: int | None = None,
        notify: Notify | None = None,
    ) -> int:
        async def run(conn: Conn) -> int:
            current = await _current(conn, customer_id, expected_version, lock=True)
            change = CustomerChange("deleted", customer_id, current.version + 1, now)
            await _notify(conn, notify, change)
            await conn.execute("DELETE FROM identities WHERE customer_id = $1", customer_id)
            used = await conn.fetchval(
                "SELECT 1 FROM conversations WHERE customer_id = $1 LIMIT 1", customer_id
            )
            if used is None:
                await conn.execute("DELETE FROM customers WHERE id = $1", customer_id)
            else:
                # The conversations keep their customer id: a tombstone without personal
                # fields, whose first-contact key is released (a new contact is a new customer).
                await conn.execute(
                    "UPDATE customers SET identity_key = $1, name = NULL, email = NULL, "
                    "phone = NULL, language = NULL, external_id = NULL, custom = '{}', "
                    "known = FALSE, version = version + 1, updated_at = $2, deleted_at = $2 "
                    "WHERE id = $3",
                    f"deleted:{customer_id}",
                    _ts(now),
                    customer_id,
                )
            return current.version + 1

        return await self._tx(run)

    async def list_customers(self, query: CustomerQuery) -> tuple[list[CustomerRecord], str | None]:
        async def run(conn: Conn) -> tuple[list[CustomerRecord], str | None]:
            args: list[Any] = []

            def arg(value: Any) -> str:
                args.append(value)
                return f"${len(args)}"

            where: list[str] = ["deleted_at IS NULL"]
            if query.cursor is not None:
                where.append(f"id > {arg(query.cursor)}")
            if query.known is not None:
                where.append(f"known = {arg(query.known)}")
            for column in ("email", "phone", "external_id"):
                value = getattr(query, column)
                if value is not None:
                    where.append(f"{column} = {arg(value)}")
            if query.name_prefix:
                low, high = query.name_prefix, query.name_prefix + "\U0010ffff"
                where.append(f"name >= {arg(low)} AND name < {arg(high)}")
            if query.updated_since is not None:
                where.append(f"updated_at >= {arg(_ts(query.updated_since))}")
            rows = await conn.fetch(
                f"SELECT * FROM customers WHERE {' AND '.join(where)} ORDER BY id "
                f"LIMIT {arg(query.limit + 1)}",
                *args,
            )
            records = await _customers_from_rows(conn, rows[: query.limit])
            more = len(rows) > query.limit
            return records, records[-1].id if more and records else None

        return await self._read(run, consistent=True)

    async def lookup_customer(self, identity: Identity) -> CustomerRecord | None:
        async def run(conn: Conn) -> CustomerRecord | None:
            customer_id = await conn.fetchval(
                "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2",
                identity.kind,
                identity.value,
            )
            return await _customer(conn, customer_id) if customer_id else None

        return await self._read(run, consistent=True)

    async def attach_identity(
        self,
        customer_id: str,
        identity: Identity,
        now: datetime,
        idempotency: IdempotencyKey | None = None,
        *,
        notify: Notify | None = None,
    ) -> CustomerRecord | Replay:
        async def run(conn: Conn) -> CustomerRecord | Replay:
            replay = await _replay(conn, idempotency)
            if replay is not None:
                return replay
            current = await _current(conn, customer_id, None, lock=True)
            added = await _add_identity(conn, customer_id, identity, now)
            field_name = next((f for f, k in IDENTITY_FIELDS.items() if k == identity.kind), None)
            fill = field_name is not None and current.profile[field_name] is None
            if added or fill or not current.known:
                await conn.execute(
                    f"UPDATE customers SET known = TRUE, version = version + 1, updated_at = $1"
                    f"{f', {field_name} = $3' if fill else ''} WHERE id = $2",
                    _ts(now),
                    customer_id,
                    *([identity.value] if fill else []),
                )
            record = await _customer(conn, customer_id)
            assert record is not None
            await _remember(conn, idempotency, 200, record.as_dict(), now)
            if record.version != current.version:
                change = CustomerChange("identified", record.id, record.version, now, record)
                await _notify(conn, notify, change)
            return record

        return await self._tx(run)

    async def customer_open_conversations(self, customer_id: str) -> list[str]:
        async def run(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT id FROM conversations WHERE customer_id = $1 AND NOT closed "
                "ORDER BY created_at",
                customer_id,
            )
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
        async def run(conn: Conn) -> list[BulkOutcome]:
            outcomes: list[BulkOutcome] = []
            for number, changes in lines:
                # each line atomic on its own inside the batch's transaction (a savepoint)
                try:
                    async with conn.transaction():
                        outcome, record = await _upsert_by_external_id(
                            conn, changes, now, required_custom
                        )
                        if outcome != "unchanged":
                            change = CustomerChange(outcome, record.id, record.version, now, record)
                            await _notify(conn, notify, change)
                except (ConvctlError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
                    code, message = (
                        (exc.code, exc.message)
                        if isinstance(exc, ConvctlError)
                        else ("conflict", str(exc))
                    )
                    outcomes.append(BulkOutcome(number, "failed", None, code, message))
                    continue
                outcomes.append(BulkOutcome(number, outcome, record))
            return await _with_open_conversations(conn, outcomes)

        return await self._tx(run)

    async def merge_customers(
        self, into_id: str, from_id: str, now: datetime, *, notify: Notify | None = None
    ) -> MergeResult:
        async def run(conn: Conn) -> MergeResult:
            if into_id == from_id:
                raise RequestError(
                    "a customer cannot be merged into itself", code="merge_self", status=422
                )
            # Both rows locked in one statement (a stable order), so two merges of the same
            # customers wait for each other instead of deadlocking.
            await conn.execute(
                "SELECT 1 FROM customers WHERE id IN ($1, $2) ORDER BY id FOR UPDATE",
                into_id,
                from_id,
            )
            done = await conn.fetchrow(
                "SELECT into_id, identities, conversations, merged_at FROM customer_merges "
                "WHERE from_id = $1",
                from_id,
            )
            if done is not None:
                if done[0] != into_id:
                    raise Conflict(
                        f"customer {from_id!r} was merged into {done[0]!r}",
                        code="already_merged",
                    )
                record = await _current(conn, into_id, None)
                version = await conn.fetchval(
                    "SELECT version FROM customers WHERE id = $1", from_id
                )
                return MergeResult(
                    into_id, from_id, done[1], done[2], _dt(done[3]), record, version, True
                )
            into = await _current(conn, into_id, None)
            source = await _current(conn, from_id, None)
            # Empty fields of the survivor are filled from the merged-away profile; the unique
            # external id is released first. Every identity moves as it is.
            fill = {
                f: source.profile[f]
                for f in PROFILE_FIELDS
                if into.profile[f] is None and source.profile[f] is not None
            }
            custom = {**source.custom, **into.custom}
            await conn.execute("UPDATE customers SET external_id = NULL WHERE id = $1", from_id)
            identities = _rowcount(
                await conn.execute(
                    "UPDATE identities SET customer_id = $1 WHERE customer_id = $2",
                    into_id,
                    from_id,
                )
            )
            # The conversations keep the identity they run on; their version moves so a
            # decision in flight on the old snapshot is retried on the new one.
            conversations = _rowcount(
                await conn.execute(
                    "UPDATE conversations SET customer_id = $1, "
                    "snapshot = jsonb_set(snapshot, '{customer_id}', to_jsonb($1::text)), "
                    "version = version + 1 WHERE customer_id = $2",
                    into_id,
                    from_id,
                )
            )
            assignments = "".join(f", {f} = ${i}" for i, f in enumerate(fill, start=5))
            await conn.execute(
                f"UPDATE customers SET version = version + 1, updated_at = $1, known = $2, "
                f"custom = $3{assignments} WHERE id = $4",
                _ts(now),
                into.known or source.known,
                _json(custom),
                into_id,
                *fill.values(),
            )
            await conn.execute(
                "UPDATE customers SET identity_key = $1, name = NULL, email = NULL, "
                "phone = NULL, language = NULL, external_id = NULL, custom = '{}', "
                "known = FALSE, version = version + 1, updated_at = $2, deleted_at = $2 "
                "WHERE id = $3",
                f"merged:{from_id}",
                _ts(now),
                from_id,
            )
            await conn.execute(
                "INSERT INTO customer_merges VALUES ($1, $2, $3, $4, $5)",
                from_id,
                into_id,
                identities,
                conversations,
                _ts(now),
            )
            merged = await _customer(conn, into_id)
            assert merged is not None
            change = CustomerChange("merged", into_id, merged.version, now, merged, from_id)
            await _notify(conn, notify, change)
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

        return await self._tx(run)

    async def merged_into(self, customer_id: str) -> str | None:
        async def run(conn: Conn) -> str | None:
            found: str | None = None
            current = customer_id
            for _ in range(100):  # merge chains are short; a bound guards against a cycle
                into = await conn.fetchval(
                    "SELECT into_id FROM customer_merges WHERE from_id = $1", current
                )
                if into is None:
                    break
                found = current = str(into)
            return found

        return await self._read(run, consistent=True)

    async def merged_from(self, customer_id: str) -> list[str]:
        async def run(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT from_id FROM customer_merges WHERE into_id = $1 "
                "ORDER BY merged_at, from_id",
                customer_id,
            )
            return [r[0] for r in rows]

        return await self._read(run)

    async def erase_customer(
        self, customer_id: str, now: datetime, marker: str, *, notify: Notify | None = None
    ) -> int:
        # Rewritten rows leave dead versions behind until (auto)vacuum reclaims them.
        async def run(conn: Conn) -> int:
            version = await _erase(conn, customer_id, now, marker)
            await _notify(conn, notify, CustomerChange("erased", customer_id, version, now))
            return version

        return await self._tx(run)

    async def customer_schema(self, version: int | None = None) -> CustomerSchema | None:
        return await self._read(lambda conn: _customer_schema(conn, version))

    async def save_customer_schema(
        self, document: Mapping[str, Any], now: datetime, *, expected_version: int | None
    ) -> tuple[CustomerSchema, bool]:
        async def run(conn: Conn) -> tuple[CustomerSchema, bool]:
            # Two saves at once both try the next version: the loser's primary key violation
            # runs it again, and it then sees the winner's version.
            current = await _customer_schema(conn, None)
            version = current.version if current else 0
            if expected_version is not None and expected_version != version:
                raise PreconditionFailed(
                    f"the customer schema is at version {version}, not {expected_version}"
                )
            if current is not None and current.document == document:
                return current, False
            await conn.execute(
                "INSERT INTO customer_schemas VALUES ($1, $2, $3)",
                version + 1,
                _json(dict(document)),
                _ts(now),
            )
            return CustomerSchema(version + 1, dict(document), now), True

        return await self._tx(run)

    async def customer_conversations(self, customer_id: str) -> list[dict[str, Any]]:
        async def run(conn: Conn) -> list[dict[str, Any]]:
            rows = await conn.fetch(
                "SELECT id, snapshot ->> 'channel' AS channel, instance, endpoint, identity, "
                "state, created_at FROM conversations WHERE customer_id = $1 "
                "ORDER BY created_at, id",
                customer_id,
            )
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
        async def run(conn: Conn) -> AppRecord:
            taken = await conn.fetchval(
                "SELECT 1 FROM apps WHERE name = $1 AND deleted_at IS NULL", app.name
            )
            if taken:
                raise Conflict(f"an app named {app.name!r} exists", code="name_taken")
            await conn.execute(
                "INSERT INTO apps (id, name, description, scopes, webhook_url, webhook_secret, "
                "enabled, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                app.id,
                app.name,
                app.description,
                _json(list(app.scopes)),
                app.webhook_url,
                app.webhook_secret,
                app.enabled,
                _ts(app.created_at),
                _ts(app.updated_at),
            )
            await conn.execute(
                "INSERT INTO tokens (hash, role, subject, created_at) VALUES ($1, 'app', $2, $3)",
                token_hash,
                app.id,
                _ts(app.created_at),
            )
            return await _app(conn, app.id)

        return await self._tx(run)

    async def app_record(self, app_id: str) -> AppRecord | None:
        async def run(conn: Conn) -> AppRecord | None:
            row = await conn.fetchrow("SELECT * FROM apps WHERE id = $1", app_id)
            return _app_from_row(row) if row else None

        return await self._read(run)

    async def app_records(self, *, include_deleted: bool = False) -> list[AppRecord]:
        async def run(conn: Conn) -> list[AppRecord]:
            where = "" if include_deleted else " WHERE deleted_at IS NULL"
            rows = await conn.fetch(f"SELECT * FROM apps{where} ORDER BY created_at, ord")
            return [_app_from_row(r) for r in rows]

        return await self._read(run)

    async def update_app(self, app_id: str, changes: Mapping[str, Any], now: datetime) -> AppRecord:
        columns = ("name", "description", "scopes", "webhook_url", "enabled", "webhook_secret")
        values = {k: v for k, v in changes.items() if k in columns}
        if "scopes" in values:
            values["scopes"] = _json(list(values["scopes"]))
        if "enabled" in values:
            values["enabled"] = bool(values["enabled"])

        async def run(conn: Conn) -> AppRecord:
            await _live_app(conn, app_id, lock=True)
            if "name" in values:
                taken = await conn.fetchval(
                    "SELECT 1 FROM apps WHERE name = $1 AND id <> $2 AND deleted_at IS NULL",
                    values["name"],
                    app_id,
                )
                if taken:
                    raise Conflict(f"an app named {values['name']!r} exists", code="name_taken")
            assignments = "".join(f", {c} = ${i}" for i, c in enumerate(values, start=3))
            await conn.execute(
                f"UPDATE apps SET updated_at = $1{assignments} WHERE id = $2",
                _ts(now),
                app_id,
                *values.values(),
            )
            return await _app(conn, app_id)

        return await self._tx(run)

    async def replace_app_token(self, app_id: str, token_hash: str, now: datetime) -> None:
        async def run(conn: Conn) -> None:
            await _live_app(conn, app_id, lock=True)
            await conn.execute(
                "UPDATE tokens SET revoked = TRUE WHERE role = 'app' AND subject = $1", app_id
            )
            await conn.execute(
                "INSERT INTO tokens (hash, role, subject, created_at) VALUES ($1, 'app', $2, $3)",
                token_hash,
                app_id,
                _ts(now),
            )
            await conn.execute("UPDATE apps SET updated_at = $1 WHERE id = $2", _ts(now), app_id)

        await self._tx(run)

    async def delete_app(self, app_id: str, now: datetime, reason: str) -> int:
        async def run(conn: Conn) -> int:
            await _live_app(conn, app_id, lock=True)
            await conn.execute(
                "UPDATE apps SET enabled = FALSE, deleted_at = $1, updated_at = $1 WHERE id = $2",
                _ts(now),
                app_id,
            )
            await conn.execute(
                "UPDATE tokens SET revoked = TRUE WHERE role = 'app' AND subject = $1", app_id
            )
            await conn.execute("DELETE FROM app_subscriptions WHERE app_id = $1", app_id)
            return _rowcount(
                await conn.execute(
                    "UPDATE outbox SET status = 'dead', claimed = FALSE, last_error = $1 "
                    "WHERE destination = $2 AND status = 'pending'",
                    _text(reason[:1000]),
                    f"app:{app_id}",
                )
            )

        return await self._tx(run)

    async def add_app_subscription(self, subscription: AppSubscription) -> None:
        async def run(conn: Conn) -> None:
            await _live_app(conn, subscription.app_id, share=True)
            await conn.execute(
                "INSERT INTO app_subscriptions (id, app_id, event_types, created_at) "
                "VALUES ($1, $2, $3, $4)",
                subscription.id,
                subscription.app_id,
                _json(list(subscription.event_types)),
                _ts(subscription.created_at),
            )

        await self._tx(run)

    async def app_subscriptions(self, app_id: str | None = None) -> list[AppSubscription]:
        async def run(conn: Conn) -> list[AppSubscription]:
            if app_id is None:
                rows = await conn.fetch("SELECT * FROM app_subscriptions ORDER BY created_at, ord")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM app_subscriptions WHERE app_id = $1 ORDER BY created_at, ord",
                    app_id,
                )
            return [
                AppSubscription(
                    r["id"], r["app_id"], tuple(json.loads(r["event_types"])), _dt(r["created_at"])
                )
                for r in rows
            ]

        return await self._read(run)

    async def delete_app_subscriptions(self, app_id: str, subscription_ids: Sequence[str]) -> int:
        async def run(conn: Conn) -> int:
            return _rowcount(
                await conn.execute(
                    "DELETE FROM app_subscriptions WHERE app_id = $1 AND id = ANY($2::text[])",
                    app_id,
                    list(dict.fromkeys(subscription_ids)),
                )
            )

        return await self._tx(run)

    async def outbox_entries(
        self,
        destination: str,
        *,
        status: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[OutboxEntry]:
        async def run(conn: Conn) -> list[OutboxEntry]:
            rows = await conn.fetch(
                "SELECT * FROM outbox WHERE destination = $1 "
                "AND ($2::text IS NULL OR status = $2) AND ($3::bigint IS NULL OR id < $3) "
                "ORDER BY id DESC LIMIT $4",
                destination,
                status,
                before_id,
                limit,
            )
            return [_outbox_entry(r) for r in rows]

        return await self._read(run)

    async def outbox_entry(self, destination: str, event_id: str, n: int) -> OutboxEntry | None:
        async def run(conn: Conn) -> OutboxEntry | None:
            row = await conn.fetchrow(
                "SELECT * FROM outbox WHERE event_id = $1 AND n = $2 AND destination = $3",
                event_id,
                n,
                destination,
            )
            return _outbox_entry(row) if row else None

        return await self._read(run)

    async def outbox_replay(self, row_id: int, now: datetime) -> bool:
        async def run(conn: Conn) -> bool:
            return bool(
                _rowcount(
                    await conn.execute(
                        "UPDATE outbox SET status = 'pending', claimed = FALSE, attempts = 0, "
                        "replays = replays + 1, next_attempt_at = $1, done_at = NULL "
                        "WHERE id = $2 AND status = 'dead'",
                        _ts(now),
                        row_id,
                    )
                )
            )

        return await self._tx(run)

    # campaigns ---------------------------------------------------------------------------
    async def create_campaign(
        self,
        campaign: CampaignRecord,
        recipients: Sequence[tuple[str, Mapping[str, Any]]],
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[CampaignRecord, bool]:
        first = _first_of_each(recipients)
        now = _ts(campaign.created_at)

        async def run(conn: Conn) -> tuple[CampaignRecord, bool]:
            replay = await _replay(conn, idempotency)
            if replay is not None:
                earlier = await _campaign(conn, str(replay.body["id"]))
                assert earlier is not None
                return earlier, False
            await conn.execute(
                "INSERT INTO campaigns (id, name, owner, channel, endpoint, template, text, "
                "audience, rate, starts_at, ends_at, hours_from, hours_to, status, "
                "created_at, updated_at, recipients) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                "$9, $10, $11, $12, $13, $14, $15, $16, $17)",
                campaign.id,
                _text(campaign.name),
                campaign.owner,
                campaign.channel,
                campaign.endpoint,
                _json(campaign.template),
                _text(campaign.text) if campaign.text is not None else None,
                _json(campaign.audience),
                campaign.rate,
                _ts(campaign.starts_at) if campaign.starts_at else None,
                _ts(campaign.ends_at) if campaign.ends_at else None,
                campaign.hours_from,
                campaign.hours_to,
                campaign.status,
                now,
                _ts(campaign.updated_at),
                len(first),
            )
            await conn.execute(
                "INSERT INTO campaign_recipients (campaign_id, customer_id, position, params, "
                "updated_at) SELECT $1, c, p, j::jsonb, $5 FROM unnest($2::text[], $3::int[], "
                "$4::text[]) AS r(c, p, j)",
                campaign.id,
                [customer_id for customer_id, _ in first],
                list(range(1, len(first) + 1)),
                [_json(dict(params)) for _, params in first],
                now,
            )
            await _remember(conn, idempotency, 201, {"id": campaign.id}, campaign.created_at)
            found = await _campaign(conn, campaign.id)
            assert found is not None
            return found, True

        return await self._tx(run)

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
        async def run(conn: Conn) -> list[CampaignRecord]:
            rows = await conn.fetch(
                "SELECT * FROM campaigns WHERE ($1::text IS NULL OR owner = $1) "
                "AND ($2::text[] IS NULL OR status = ANY($2)) "
                "AND ($3::text IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
                owner,
                list(statuses) if statuses is not None else None,
                before,
                limit,
            )
            return [_campaign_from_row(r) for r in rows]

        return await self._read(run)

    async def campaign_counts(self, campaign_id: str) -> dict[str, int]:
        async def run(conn: Conn) -> dict[str, int]:
            rows = await conn.fetch(
                "SELECT status, COUNT(*) FROM campaign_recipients WHERE campaign_id = $1 "
                "GROUP BY status",
                campaign_id,
            )
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

        async def run(conn: Conn) -> CampaignRecord | None:
            # Locked until commit: a send in flight (which holds the row shared) finishes
            # first, and no send starts on the old status afterwards.
            current = await _campaign(conn, campaign_id, lock="FOR UPDATE")
            if current is None:
                raise NotFound(f"unknown campaign {campaign_id!r}", code="unknown_campaign")
            if current.status not in allowed_from:
                return None
            await conn.execute(
                "UPDATE campaigns SET status = $1, updated_at = $2, finished_at = $3 WHERE id = $4",
                status,
                _ts(now),
                _ts(now) if final else None,
                campaign_id,
            )
            if skip_pending is not None:
                await conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', reason = $1, "
                    "updated_at = $2 WHERE campaign_id = $3 AND status = 'pending'",
                    skip_pending,
                    _ts(now),
                    campaign_id,
                )
            return await _campaign(conn, campaign_id)

        return await self._tx(run)

    async def campaign_batch(self, campaign_id: str, limit: int) -> list[CampaignWork]:
        async def run(conn: Conn) -> list[CampaignWork]:
            rows = await conn.fetch(
                "SELECT * FROM campaign_recipients WHERE campaign_id = $1 AND status = 'pending' "
                "ORDER BY position LIMIT $2",
                campaign_id,
                limit,
            )
            return [
                CampaignWork(_recipient_from_row(r), await _customer(conn, r["customer_id"]))
                for r in rows
            ]

        return await self._read(run, consistent=True)

    async def campaign_send(
        self, campaign_id: str, customer_id: str, event: NewEvent, now: datetime
    ) -> CampaignSend:
        async def run(conn: Conn) -> CampaignSend:
            status = await conn.fetchval(
                "SELECT status FROM campaigns WHERE id = $1 FOR SHARE", campaign_id
            )
            if status != "running":
                return CampaignSend("not_running")
            recipient = await conn.fetchval(
                "SELECT status FROM campaign_recipients WHERE campaign_id = $1 "
                "AND customer_id = $2 FOR UPDATE",
                campaign_id,
                customer_id,
            )
            if recipient != "pending":
                return CampaignSend("not_pending")
            opted_out = await conn.fetchval(
                "SELECT 1 FROM campaign_opt_outs WHERE customer_id = $1", customer_id
            )
            if opted_out:
                await conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', reason = 'opted_out', "
                    "updated_at = $1 WHERE campaign_id = $2 AND customer_id = $3",
                    _ts(now),
                    campaign_id,
                    customer_id,
                )
                return CampaignSend("opted_out")
            if not await _campaign_identity(conn, customer_id, event, now):
                await conn.execute(
                    "UPDATE campaign_recipients SET status = 'skipped', "
                    "reason = 'unknown_customer', updated_at = $1 WHERE campaign_id = $2 "
                    "AND customer_id = $3",
                    _ts(now),
                    campaign_id,
                    customer_id,
                )
                return CampaignSend("unknown_customer")
            accepted = await _accept_one(conn, event, now)
            await conn.execute(
                "UPDATE campaign_recipients SET status = 'sent', conversation_id = $1, "
                "event_id = $2, sent_at = $3, updated_at = $3 WHERE campaign_id = $4 "
                "AND customer_id = $5",
                accepted.conversation_id,
                accepted.event_id,
                _ts(now),
                campaign_id,
                customer_id,
            )
            return CampaignSend("sent", accepted)

        return await self._tx(run)

    async def campaign_skip(
        self, campaign_id: str, customer_id: str, reason: str, now: datetime
    ) -> bool:
        async def run(conn: Conn) -> bool:
            return bool(
                _rowcount(
                    await conn.execute(
                        "UPDATE campaign_recipients SET status = 'skipped', reason = $1, "
                        "updated_at = $2 WHERE campaign_id = $3 AND customer_id = $4 "
                        "AND status = 'pending'",
                        reason,
                        _ts(now),
                        campaign_id,
                        customer_id,
                    )
                )
            )

        return await self._tx(run)

    async def campaign_outcomes(self, outcomes: Sequence[CampaignOutcome], now: datetime) -> int:
        async def run(conn: Conn) -> int:
            changed = 0
            for outcome in outcomes:
                sql, args = _outcome_update(outcome, now, "$")
                changed += _rowcount(await conn.execute(sql, *args))
            return changed

        return await self._tx(run)

    async def campaign_recipients(
        self,
        campaign_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        after: int | None = None,
    ) -> list[CampaignRecipient]:
        async def run(conn: Conn) -> list[CampaignRecipient]:
            rows = await conn.fetch(
                "SELECT * FROM campaign_recipients WHERE campaign_id = $1 "
                "AND ($2::text IS NULL OR status = $2) AND ($3::int IS NULL OR position > $3) "
                "ORDER BY position LIMIT $4",
                campaign_id,
                status,
                after,
                limit,
            )
            return [_recipient_from_row(r) for r in rows]

        return await self._read(run)

    async def add_opt_out(self, customer_id: str, source: str, now: datetime) -> bool:
        async def run(conn: Conn) -> bool:
            return bool(
                _rowcount(
                    await conn.execute(
                        "INSERT INTO campaign_opt_outs (customer_id, source, created_at) "
                        "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        customer_id,
                        source,
                        _ts(now),
                    )
                )
            )

        return await self._tx(run)

    async def remove_opt_out(self, customer_id: str) -> bool:
        async def run(conn: Conn) -> bool:
            return bool(
                _rowcount(
                    await conn.execute(
                        "DELETE FROM campaign_opt_outs WHERE customer_id = $1", customer_id
                    )
                )
            )

        return await self._tx(run)

    async def opt_outs(self, *, limit: int = 50, after: str | None = None) -> list[OptOut]:
        async def run(conn: Conn) -> list[OptOut]:
            rows = await conn.fetch(
                "SELECT * FROM campaign_opt_outs WHERE customer_id > $1 "
                "ORDER BY customer_id LIMIT $2",
                after or "",
                limit,
            )
            return [OptOut(r["customer_id"], r["source"], _dt(r["created_at"])) for r in rows]

        return await self._read(run)


# campaigns --------------------------------------------------------------------------------
def _campaign_from_row(row: Row) -> CampaignRecord:
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


async def _campaign_identity(conn: Conn, customer_id: str, event: NewEvent, now: datetime) -> bool:
    """The customer (False if gone) gets the channel identity a campaign writes to when
    nobody has it yet, so the conversation, and every reply, is the customer's."""
    live = await conn.fetchval(
        "SELECT 1 FROM customers WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", customer_id
    )
    if not live:
        return False
    assert event.channel is not None and event.identity is not None
    ident = channel_identity(event.channel, event.identity)
    added = _rowcount(
        await conn.execute(
            "INSERT INTO identities (kind, value, customer_id, created_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            ident.kind,
            ident.value,
            customer_id,
            _ts(now),
        )
    )
    if added:
        await conn.execute(
            "UPDATE customers SET version = version + 1, updated_at = $1 WHERE id = $2",
            _ts(now),
            customer_id,
        )
    return True


async def _campaign(conn: Conn, campaign_id: str, *, lock: str = "") -> CampaignRecord | None:
    row = await conn.fetchrow(f"SELECT * FROM campaigns WHERE id = $1 {lock}", campaign_id)
    return _campaign_from_row(row) if row else None


def _recipient_from_row(row: Row) -> CampaignRecipient:
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


# rows -------------------------------------------------------------------------------------
def _outbox_row(row: Row) -> OutboxRow:
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


def _outbox_entry(row: Row) -> OutboxEntry:
    return OutboxEntry(
        row=_outbox_row(row),
        status=row["status"],
        replays=row["replays"],
        last_error=row["last_error"],
        created_at=_dt(row["created_at"]),
        next_attempt_at=_dt(row["next_attempt_at"]),
        done_at=_dt(row["done_at"]) if row["done_at"] is not None else None,
    )


def _agent_from_row(row: Row) -> AgentRecord:
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


async def _insert_offer(conn: Conn, offer: OfferRecord) -> None:
    await conn.execute(
        "INSERT INTO offers (id, conversation_id, agent_id, status, created_at, "
        "expires_at) VALUES ($1, $2, $3, 'pending', $4, $5)",
        offer.id,
        offer.conversation_id,
        offer.agent_id,
        _ts(offer.created_at),
        _ts(offer.expires_at),
    )


def _offer_from_row(row: Row) -> OfferRecord:
    return OfferRecord(
        id=row["id"],
        conversation_id=row["conversation_id"],
        agent_id=row["agent_id"],
        status=row["status"],
        created_at=_dt(row["created_at"]),
        expires_at=_dt(row["expires_at"]),
    )


def _app_from_row(row: Row) -> AppRecord:
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


async def _app(conn: Conn, app_id: str, *, lock: str = "") -> AppRecord:
    row = await conn.fetchrow(f"SELECT * FROM apps WHERE id = $1{lock}", app_id)
    if row is None:
        raise NotFound(f"unknown app {app_id!r}", code="unknown_app")
    return _app_from_row(row)


async def _live_app(
    conn: Conn, app_id: str, *, lock: bool = False, share: bool = False
) -> AppRecord:
    """The app, refused when deleted; ``lock`` holds its row until commit (``share``: shared,
    so a concurrent delete waits for this transaction)."""
    app = await _app(conn, app_id, lock=" FOR UPDATE" if lock else " FOR SHARE" if share else "")
    if app.deleted_at is not None:
        raise Conflict(f"app {app_id!r} was deleted", code="app_deleted")
    return app


# transaction bodies -------------------------------------------------------------------------
async def _load_conversation(conn: Conn, conversation_id: str) -> Conversation | None:
    row = await conn.fetchrow(
        "SELECT snapshot, version FROM conversations WHERE id = $1", conversation_id
    )
    if row is None:
        return None
    conv = Conversation.model_validate_json(row[0])
    conv.version = row[1]
    return conv


async def _accept_one(
    conn: Conn,
    ev: NewEvent,
    now: datetime,
    *,
    allow_closed: bool = False,
    notify: Notify | None = None,
) -> Accepted:
    found = await conn.fetchrow(
        "SELECT id, conversation_id, seq FROM events WHERE source = $1 AND dedupe_key = $2",
        ev.source,
        ev.dedupe_key,
    )
    if found is not None:
        return Accepted(found[0], found[1], found[2], duplicate=True)
    conversation_id = ev.conversation_id
    if conversation_id is not None:
        # Locked until commit: a decision closing the conversation cannot slip in between
        # this check and the event's insert.
        closed = await conn.fetchval(
            "SELECT closed FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
        )
        if closed is None:
            raise NotFound(f"unknown conversation {conversation_id!r}", code="unknown_conversation")
        if closed and not allow_closed:
            raise Conflict(
                f"conversation {conversation_id!r} is closed", code="conversation_closed"
            )
    else:
        if not (ev.channel and ev.instance and ev.endpoint and ev.identity):
            raise ValueError(
                "an event without conversation_id needs channel, instance, endpoint, identity"
            )
        open_id = await conn.fetchval(
            "SELECT id FROM conversations WHERE instance = $1 AND endpoint = $2 "
            "AND identity = $3 AND NOT closed FOR UPDATE",
            ev.instance,
            ev.endpoint,
            ev.identity,
        )
        conversation_id = open_id or await _open_conversation(conn, ev, now, notify)
    return await _insert_event(conn, conversation_id, ev, now)


async def _insert_event(conn: Conn, conversation_id: str, ev: NewEvent, now: datetime) -> Accepted:
    seq = await conn.fetchval(
        "UPDATE conversations SET next_seq = next_seq + 1 WHERE id = $1 RETURNING next_seq - 1",
        conversation_id,
    )
    event_id = new_id("ev")
    stored = await conn.fetchval(
        "INSERT INTO events (id, conversation_id, seq, type, source, dedupe_key, data, "
        "accepted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id",
        event_id,
        conversation_id,
        seq,
        ev.type,
        ev.source,
        ev.dedupe_key,
        _json(ev.data),
        _ts(now),
    )
    if stored is None:
        # A concurrent transaction stored this event first (it was not there when this one
        # looked). Start over: the run finds the event and answers "duplicate", and the
        # sequence number taken above is given back.
        raise _Race(f"{ev.source}:{ev.dedupe_key}")
    return Accepted(event_id, conversation_id, int(seq), duplicate=False)


async def _open_conversation(
    conn: Conn, ev: NewEvent, now: datetime, notify: Notify | None = None
) -> str:
    assert ev.instance and ev.endpoint and ev.identity and ev.channel
    identity_key = f"{ev.instance}:{ev.endpoint}:{ev.identity}"
    # The customer: by the first contact's key, else by the channel identity (a profile the
    # Customer API made or identified, or the same user on another endpoint), else a new
    # anonymous customer with that identity.
    ident = channel_identity(ev.channel, ev.identity)
    customer_id = await conn.fetchval(
        "SELECT id FROM customers WHERE identity_key = $1", identity_key
    ) or await conn.fetchval(
        "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2",
        ident.kind,
        ident.value,
    )
    if customer_id is None:
        customer_id = new_id("cu")
        # A concurrent first contact of the same identity makes this insert (or the
        # conversation's below) violate a unique index: the transaction runs again and finds
        # that customer and conversation.
        # Anonymous, with the name the channel gives (a WhatsApp profile name), if any.
        await conn.execute(
            "INSERT INTO customers (id, identity_key, name, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $4)",
            customer_id,
            identity_key,
            _profile_name(ev),
            _ts(now),
        )
        await conn.execute(
            "INSERT INTO identities (kind, value, customer_id, created_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            ident.kind,
            ident.value,
            customer_id,
            _ts(now),
        )
        if notify is not None:  # only when someone hears profile.created
            record = await _customer(conn, customer_id)
            assert record is not None
            change = CustomerChange("created", customer_id, record.version, now, record)
            await _notify(conn, notify, change)
    previous = await conn.fetchval(
        "SELECT id FROM conversations WHERE instance = $1 AND endpoint = $2 AND identity = $3 "
        "ORDER BY created_at DESC LIMIT 1",
        ev.instance,
        ev.endpoint,
        ev.identity,
    )
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
        previous_conversation_id=previous,
    )
    await conn.execute(
        "INSERT INTO conversations (id, instance, endpoint, identity, customer_id, state, "
        "snapshot, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'new', $6, $7, $7)",
        conv_id,
        ev.instance,
        ev.endpoint,
        ev.identity,
        customer_id,
        _snapshot_json(conv),
        _ts(now),
    )
    await _insert_event(
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


def _snapshot_json(conv: Conversation) -> str:
    text = conv.model_dump_json(exclude={"version"})
    if "\\u0000" in text:
        text = _JSON_NUL.sub(r"\1\\ufffd", text)
    return text


async def _commit_decision(
    conn: Conn, rec: DecisionRecord, now: datetime, process_id: str
) -> Committed:
    after = rec.after
    if rec.lease is not None:
        # Fencing: the decision was made under a lease; if that lease moved to another
        # process (this one was taken for dead), nothing of it may commit. FOR SHARE keeps a
        # takeover from moving the lease until this transaction ends.
        token = await conn.fetchval(
            "SELECT token FROM conversation_leases WHERE conversation_id = $1 AND owner = $2 "
            "FOR SHARE",
            after.id,
            process_id,
        )
        if token != rec.lease:
            raise Conflict(f"the lease of conversation {after.id} was lost", code="lease_lost")
    # The version check and the row lock in one statement: a decision committed meanwhile
    # (by this process or another) moved the version, and this one is refused whole.
    updated = await conn.execute(
        "UPDATE conversations SET snapshot = $1, state = $2, closed = $3, queue = $4, "
        "priority = $5, enqueued_at = $6, version = version + 1, updated_at = $7 "
        "WHERE id = $8 AND version = $9",
        _snapshot_json(after),
        after.state,
        after.state == "closed",
        after.queue,
        after.priority,
        _ts(after.enqueued_at) if after.enqueued_at else None,
        _ts(now),
        after.id,
        rec.before_version,
    )
    if not _rowcount(updated):
        raise Conflict(f"conversation {after.id} changed concurrently", code="version_conflict")
    marked = await conn.execute(
        "UPDATE events SET status = $1 WHERE id = $2 AND status = 'pending'",
        rec.outcome,
        rec.event.id,
    )
    if not _rowcount(marked):
        raise Conflict(f"event {rec.event.id} was already decided", code="already_decided")
    await conn.execute(
        "INSERT INTO decisions (event_id, conversation_id, seq, rules_version, matcher, "
        "outcome, state_after, fired, refused, decided_at, facts) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        rec.event.id,
        after.id,
        rec.event.seq,
        rec.rules_version,
        rec.matcher,
        rec.outcome,
        after.state,
        _json(rec.fired),
        _json(rec.refused),
        _ts(now),
        None if rec.facts is None else _json(rec.facts, default=str),
    )
    outbox: list[OutboxRow] = []
    for n, new in enumerate(rec.outbox):
        # Claimed at once (the dispatcher takes these rows from memory after the commit),
        # unless older rows of the lane wait in the store or another process holds them
        # (a retry, rows of a process that died): then the poller delivers it after them.
        row = await conn.fetchrow(
            "INSERT INTO outbox (conversation_id, event_id, n, destination, payload, claimed, "
            "claimed_by, next_attempt_at, created_at) SELECT $1, $2, $3, $4, $5, free, "
            "CASE WHEN free THEN $7 END, $6, $6 FROM (SELECT NOT EXISTS (SELECT 1 FROM outbox p "
            "WHERE p.status = 'pending' AND p.conversation_id = $1 AND p.destination = $4 "
            "AND p.claimed_by IS DISTINCT FROM $7) AS free) lane RETURNING id, claimed",
            after.id,
            rec.event.id,
            n,
            new.destination,
            _json(new.payload),
            _ts(now),
            process_id,
        )
        if row["claimed"]:
            outbox.append(
                OutboxRow(row["id"], after.id, rec.event.id, n, new.destination, new.payload, 0)
            )
    for op in rec.timers:
        if op.due_at is None:
            await conn.execute(
                "DELETE FROM timers WHERE conversation_id = $1 AND name = $2", after.id, op.name
            )
        else:
            await conn.execute(
                "INSERT INTO timers VALUES ($1, $2, $3, $4) ON CONFLICT (conversation_id, name) "
                "DO UPDATE SET generation = excluded.generation, due_at = excluded.due_at, "
                "claimed_by = NULL",
                after.id,
                op.name,
                op.generation,
                _ts(op.due_at),
            )
    if after.state == "closed":
        await conn.execute("DELETE FROM timers WHERE conversation_id = $1", after.id)
    if rec.messages:
        await conn.executemany(
            "INSERT INTO messages (id, conversation_id, sender_role, sender_id, text, "
            "visibility, created_at, content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [
                (
                    m.id,
                    m.conversation_id,
                    m.sender_role,
                    m.sender_id,
                    _text(m.text),
                    m.visibility,
                    _ts(m.created_at),
                    _json(m.content) if m.content else None,
                )
                for m in rec.messages
            ],
        )
    if rec.released_agents:
        await conn.execute(
            "DELETE FROM assignments WHERE agent_id = ANY($1::text[]) AND conversation_id = $2",
            list(rec.released_agents),
            after.id,
        )
    for agent_id in rec.assigned_agents:
        await conn.execute(
            "INSERT INTO assignments VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            agent_id,
            after.id,
            _ts(now),
        )
    accepted = [await _accept_one(conn, ev, now, allow_closed=True) for ev in rec.emitted]
    return Committed(accepted, outbox)


# customers ---------------------------------------------------------------------------------
async def _create_customer(
    conn: Conn, profile: Mapping[str, Any], identities: Sequence[Identity], now: datetime
) -> CustomerRecord:
    customer_id = new_id("cu")
    fields = {f: profile.get(f) for f in PROFILE_FIELDS}
    custom = {k: v for k, v in (profile.get("custom") or {}).items() if v is not None}
    await _external_id_free(conn, fields["external_id"])
    await conn.execute(
        "INSERT INTO customers (id, identity_key, created_at, updated_at, known, "
        "custom, name, email, phone, language, external_id) "
        "VALUES ($1, $2, $3, $3, TRUE, $4, $5, $6, $7, $8, $9)",
        customer_id,
        f"customer:{customer_id}",  # no channel contact yet; unique placeholder
        _ts(now),
        _json(custom),
        *fields.values(),
    )
    wanted = [Identity(k, str(fields[f])) for f, k in IDENTITY_FIELDS.items() if fields[f]]
    added = list(dict.fromkeys([*wanted, *identities]))
    for ident in added:
        await _add_identity(conn, customer_id, ident, now)
    return _new_record(customer_id, fields, custom, added, _dt(_ts(now)))


async def _external_id_free(conn: Conn, external_id: str | None) -> None:
    """Conflict if another customer has the external id (before the unique index refuses
    the insert with a UniqueViolationError)."""
    if external_id and await conn.fetchval(
        "SELECT 1 FROM customers WHERE external_id = $1", external_id
    ):
        raise Conflict(
            f"external id {external_id!r} belongs to another customer", code="identity_taken"
        )


async def _update_customer(
    conn: Conn,
    customer_id: str,
    changes: Mapping[str, Any],
    now: datetime,
    expected_version: int | None,
) -> CustomerRecord:
    current = await _current(conn, customer_id, expected_version, lock=True)
    fields = {f: changes[f] for f in PROFILE_FIELDS if f in changes}
    known = current.known
    for field_name, kind in IDENTITY_FIELDS.items():
        if field_name not in fields or fields[field_name] == current.profile[field_name]:
            continue
        old, new = current.profile[field_name], fields[field_name]
        if old is not None:
            await conn.execute(
                "DELETE FROM identities WHERE kind = $1 AND value = $2 AND customer_id = $3",
                kind,
                old,
                customer_id,
            )
        if new is not None:
            await _add_identity(conn, customer_id, Identity(kind, new), now)
            known = True
    custom = dict(current.custom)
    for key, value in (changes.get("custom") or {}).items():
        if value is None:
            custom.pop(key, None)
        else:
            custom[key] = value
    assignments = "".join(f", {f} = ${i}" for i, f in enumerate(fields, start=5))
    await conn.execute(
        f"UPDATE customers SET version = version + 1, updated_at = $1, known = $2, "
        f"custom = $3{assignments} WHERE id = $4",
        _ts(now),
        known,
        _json(custom),
        customer_id,
        *fields.values(),
    )
    record = await _customer(conn, customer_id)
    assert record is not None
    return record


async def _upsert_by_external_id(
    conn: Conn, changes: Mapping[str, Any], now: datetime, required_custom: Collection[str] = ()
) -> tuple[str, CustomerRecord]:
    """One bulk line: ("created" | "updated" | "unchanged", the record)."""
    customer_id = await conn.fetchval(
        "SELECT id FROM customers WHERE external_id = $1 AND deleted_at IS NULL",
        changes["external_id"],
    )
    if customer_id is None:
        _check_required(changes, required_custom)
        return "created", await _create_customer(conn, changes, (), now)
    current = await _current(conn, customer_id, None, lock=True)
    same_fields = all(current.profile[f] == changes[f] for f in PROFILE_FIELDS if f in changes)
    custom = changes.get("custom") or {}
    same_custom = all(
        (k not in current.custom) if v is None else current.custom.get(k) == v
        for k, v in custom.items()
    )
    if same_fields and same_custom and current.known:
        return "unchanged", current
    return "updated", await _update_customer(conn, current.id, changes, now, None)


async def _customer_schema(conn: Conn, version: int | None) -> CustomerSchema | None:
    if version is None:
        row = await conn.fetchrow(
            "SELECT version, document, created_at FROM customer_schemas "
            "ORDER BY version DESC LIMIT 1"
        )
    else:
        row = await conn.fetchrow(
            "SELECT version, document, created_at FROM customer_schemas WHERE version = $1",
            version,
        )
    return CustomerSchema(row[0], json.loads(row[1]), _dt(row[2])) if row else None


async def _with_open_conversations(conn: Conn, outcomes: list[BulkOutcome]) -> list[BulkOutcome]:
    """Updated lines with their customers' open conversations: one query per batch, none
    when no line changed a customer."""
    updated = {o.record.id for o in outcomes if o.outcome == "updated" and o.record is not None}
    if not updated:
        return outcomes
    found: dict[str, list[str]] = {}
    for row in await conn.fetch(
        "SELECT customer_id, id FROM conversations WHERE NOT closed "
        "AND customer_id = ANY($1::text[]) ORDER BY created_at",
        sorted(updated),
    ):
        found.setdefault(row[0], []).append(row[1])
    return [
        replace(o, conversations=tuple(found[o.record.id]))
        if o.outcome == "updated" and o.record is not None and o.record.id in found
        else o
        for o in outcomes
    ]


async def _notify(conn: Conn, notify: Notify | None, change: CustomerChange) -> None:
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
            _json(new.payload),
            _ts(change.at),
        )
        for n, new in enumerate(notify(change))
    ]
    if rows:
        await conn.executemany(
            "INSERT INTO outbox (conversation_id, event_id, n, destination, payload, claimed, "
            "next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, FALSE, $6, $6)",
            rows,
        )


async def _notice_lanes(conn: Conn, customer_id: str) -> list[str]:
    """The customer and everyone merged into it (through chains): their notification lanes."""
    lanes, todo = [customer_id], [customer_id]
    while todo and len(lanes) < 10_000:
        rows = await conn.fetch(
            "SELECT from_id FROM customer_merges WHERE into_id = ANY($1::text[])", todo
        )
        todo = [r[0] for r in rows if r[0] not in lanes]
        lanes += todo
    return lanes


async def _customers_from_rows(conn: Conn, rows: Sequence[Row]) -> list[CustomerRecord]:
    """Records of a page of customer rows, their identities read in one query."""
    if not rows:
        return []
    found: dict[str, list[Row]] = {r["id"]: [] for r in rows}
    for ident in await conn.fetch(
        "SELECT customer_id, kind, value FROM identities WHERE customer_id = ANY($1::text[]) "
        "ORDER BY created_at, kind, value",
        list(found),
    ):
        found[ident["customer_id"]].append(ident)
    return [_customer_record(r, found[r["id"]]) for r in rows]


def _customer_record(row: Row, idents: Sequence[Row]) -> CustomerRecord:
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


async def _customer_from_row(conn: Conn, row: Row) -> CustomerRecord:
    idents = await conn.fetch(
        "SELECT kind, value FROM identities WHERE customer_id = $1 "
        "ORDER BY created_at, kind, value",
        row["id"],
    )
    return _customer_record(row, idents)


async def _customer(conn: Conn, customer_id: str, *, lock: bool = False) -> CustomerRecord | None:
    row = await conn.fetchrow(
        "SELECT * FROM customers WHERE id = $1 AND deleted_at IS NULL"
        + (" FOR UPDATE" if lock else ""),
        customer_id,
    )
    return await _customer_from_row(conn, row) if row else None


async def _current(
    conn: Conn, customer_id: str, expected_version: int | None, *, lock: bool = False
) -> CustomerRecord:
    """The live customer (``lock``: its row held until commit, so a concurrent write of the
    same customer waits and then sees this one's version)."""
    record = await _customer(conn, customer_id, lock=lock)
    if record is None:
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    if expected_version is not None and record.version != expected_version:
        raise PreconditionFailed(
            f"customer {customer_id!r} is at version {record.version}, not {expected_version}"
        )
    return record


async def _add_identity(conn: Conn, customer_id: str, identity: Identity, now: datetime) -> bool:
    """Give the customer an identity; False if it had it already, Conflict if another has."""
    owner = await conn.fetchval(
        "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2",
        identity.kind,
        identity.value,
    )
    if owner is not None:
        if owner != customer_id:
            raise Conflict(
                f"identity {identity} belongs to another customer", code="identity_taken"
            )
        return False
    if identity.kind == "external":
        taken = await conn.fetchval(
            "SELECT 1 FROM customers WHERE external_id = $1 AND id <> $2",
            identity.value,
            customer_id,
        )
        if taken:
            raise Conflict(
                f"external id {identity.value!r} belongs to another customer",
                code="identity_taken",
            )
    await conn.execute(
        "INSERT INTO identities (kind, value, customer_id, created_at) VALUES ($1, $2, $3, $4)",
        identity.kind,
        identity.value,
        customer_id,
        _ts(now),
    )
    return True


async def _rewrite_json(
    conn: Conn,
    table: str,
    key: str,
    column: str,
    conversation_ids: list[str],
    secrets: Sequence[str],
    marker: str,
) -> None:
    rows = await conn.fetch(
        f"SELECT {key}, {column} FROM {table} WHERE conversation_id = ANY($1::text[]) "
        f"AND {column} IS NOT NULL",
        conversation_ids,
    )
    changed = []
    for row_key, raw in rows:
        value = json.loads(raw)
        redacted = _redact(value, secrets, marker)
        if redacted != value:
            changed.append((_json(redacted, default=str), row_key))
    if changed:
        await conn.executemany(f"UPDATE {table} SET {column} = $1 WHERE {key} = $2", changed)


async def _erase(conn: Conn, customer_id: str, now: datetime, marker: str) -> int:
    """Erasure in one transaction (see ``Store.erase_customer``)."""
    row = await conn.fetchrow("SELECT * FROM customers WHERE id = $1 FOR UPDATE", customer_id)
    # A deleted customer's tombstone can still be erased (its message history stays on
    # delete); an erased or merged-away one is gone.
    if row is None or row["identity_key"].startswith(("erased:", "merged:")):
        raise NotFound(f"unknown customer {customer_id!r}", code="unknown_customer")
    conversations = await conn.fetch(
        "SELECT id, identity, snapshot FROM conversations WHERE customer_id = $1 "
        "ORDER BY id FOR UPDATE",
        customer_id,
    )
    idents = await conn.fetch("SELECT value FROM identities WHERE customer_id = $1", customer_id)
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
    if ids:
        await conn.execute(
            "UPDATE messages SET text = $1 WHERE conversation_id = ANY($2::text[])",
            _text(marker),
            ids,
        )
        for table, key, column in (
            ("events", "id", "data"),
            ("decisions", "event_id", "facts"),
            ("outbox", "id", "payload"),
        ):
            await _rewrite_json(conn, table, key, column, ids, secrets, marker)
        await conn.execute(
            "UPDATE outbox SET last_error = NULL WHERE conversation_id = ANY($1::text[])", ids
        )
    for conv in conversations:
        # The conversation no longer answers to the person's channel id: whoever writes from
        # it again starts a new conversation with a new anonymous customer.
        identity = f"erased:{conv['id']}"
        data = _redact(json.loads(conv["snapshot"]), secrets, marker)
        data["identity"] = identity
        await conn.execute(
            "UPDATE conversations SET identity = $1, snapshot = $2, version = version + 1 "
            "WHERE id = $3",
            identity,
            _json(data),
            conv["id"],
        )
    # Profile notifications (pending, delivered or dead) keep only the customer's id.
    notices = await conn.fetch(
        "SELECT id, payload FROM outbox WHERE conversation_id = ANY($1::text[])",
        await _notice_lanes(conn, customer_id),
    )
    if notices:
        await conn.executemany(
            "UPDATE outbox SET payload = $1, last_error = NULL WHERE id = $2",
            [
                (_json(_strip_notice(json.loads(r["payload"]), secrets, marker)), r["id"])
                for r in notices
            ],
        )
    await conn.execute("DELETE FROM identities WHERE customer_id = $1", customer_id)
    # literal campaign parameters given for the customer (an order number, a name...)
    await conn.execute(
        "UPDATE campaign_recipients SET params = '{}' WHERE customer_id = $1", customer_id
    )
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE strpos(response::text, $1) > 0",
        f'"id": "{customer_id}"',
    )
    merges = await conn.fetchval(
        "SELECT 1 FROM customer_merges WHERE from_id = $1 OR into_id = $1", customer_id
    )
    if not conversations and not merges:
        await conn.execute("DELETE FROM customers WHERE id = $1", customer_id)
        return int(row["version"]) + 1
    await conn.execute(
        "UPDATE customers SET identity_key = $1, name = NULL, email = NULL, phone = NULL, "
        "language = NULL, external_id = NULL, custom = '{}', known = FALSE, "
        "version = version + 1, updated_at = $2, deleted_at = $2 WHERE id = $3",
        f"erased:{customer_id}",
        _ts(now),
        customer_id,
    )
    return int(row["version"]) + 1


async def _replay(conn: Conn, key: IdempotencyKey | None) -> Replay | None:
    if key is None:
        return None
    row = await conn.fetchrow(
        "SELECT request_hash, status, response FROM idempotency_keys WHERE scope = $1 AND key = $2",
        key.scope,
        key.key,
    )
    if row is None:
        return None
    if row[0] != key.request_hash:
        raise RequestError(
            "this idempotency key was used with a different request",
            code="idempotency_key_reused",
            status=422,
        )
    return Replay(row[1], json.loads(row[2]))


async def _remember(
    conn: Conn, key: IdempotencyKey | None, status: int, body: dict[str, Any], now: datetime
) -> None:
    # A concurrent request with the same key violates the primary key: the transaction runs
    # again and answers with the first one's response.
    if key is not None:
        await conn.execute(
            "INSERT INTO idempotency_keys VALUES ($1, $2, $3, $4, $5, $6)",
            key.scope,
            key.key,
            key.request_hash,
            status,
            _json(body),
            _ts(now),
        )


__all__ = ["PostgresStore", "redact_url"]
