"""Read-only access to a SQLite database, for offline tools (``rules explain``, ``backtest``).

The connection is opened with ``mode=ro``: it never migrates, never resets claims and cannot
write, so a tool run next to a live service changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from controller.errors import ConfigError
from controller.models import Conversation
from controller.store.sqlite import _dt, _load_conversation, _ts


@dataclass(frozen=True, slots=True)
class RecordedDecision:
    """A stored decision with the facts it was made on."""

    event_id: str
    conversation_id: str
    seq: int
    event_type: str
    rules_version: str
    matcher: str
    outcome: str
    fired: list[dict[str, Any]]
    facts: dict[str, Any]
    decided_at: datetime


class ReadOnlyStore:
    """A read-only SQLite connection with the few queries the offline tools need."""

    def __init__(self, path: str | Path) -> None:
        if not Path(path).is_file():
            raise ConfigError(f"no database at {path}")
        self._conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def conversation(self, conversation_id: str) -> Conversation | None:
        """The conversation's current snapshot."""
        return _load_conversation(self._conn, conversation_id)

    def has_facts(self) -> bool:
        """Whether the schema records facts (migration 2 applied)."""
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(decisions)")}
        return "facts" in columns

    def count_decisions(self, since: datetime) -> tuple[int, int]:
        """(decisions with facts, decisions without) decided at or after ``since``."""
        if not self.has_facts():
            total = self._conn.execute(
                "SELECT COUNT(*) FROM decisions WHERE decided_at >= ?", (_ts(since),)
            ).fetchone()[0]
            return 0, int(total)
        row = self._conn.execute(
            "SELECT COUNT(facts), COUNT(*) - COUNT(facts) FROM decisions WHERE decided_at >= ?",
            (_ts(since),),
        ).fetchone()
        return int(row[0]), int(row[1])

    def decisions(self, since: datetime, limit: int | None = None) -> Iterator[RecordedDecision]:
        """Decisions with facts decided at or after ``since``, oldest first."""
        if not self.has_facts():
            return
        rows = self._conn.execute(
            "SELECT d.event_id, d.conversation_id, d.seq, e.type, d.rules_version, d.matcher, "
            "d.outcome, d.fired, d.facts, d.decided_at FROM decisions d "
            "JOIN events e ON e.id = d.event_id "
            "WHERE d.decided_at >= ? AND d.facts IS NOT NULL "
            "ORDER BY d.decided_at, d.rowid LIMIT ?",
            (_ts(since), -1 if limit is None else limit),
        )
        for row in rows:
            yield RecordedDecision(
                event_id=row[0],
                conversation_id=row[1],
                seq=row[2],
                event_type=row[3],
                rules_version=row[4],
                matcher=row[5],
                outcome=row[6],
                fired=json.loads(row[7]),
                facts=json.loads(row[8]),
                decided_at=_dt(row[9]),
            )
