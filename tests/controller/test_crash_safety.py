"""Crash safety: ``convctl serve`` as a subprocess, killed with SIGKILL at random moments.

Web chat customers keep writing through the kills, reconnecting and resending unacknowledged
messages with the same client id (as the page does). Afterwards the database must show every
acknowledged message decided exactly once, in order, one bot answer each, and the grace
timers pending at the last kill fired after the restart.

Size knobs: CONVCTL_CRASH_CONVERSATIONS (default 200), CONVCTL_CRASH_KILLS (default 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from controller.testing import ResendingVisitor, ServiceProcess

CONVERSATIONS = int(os.environ.get("CONVCTL_CRASH_CONVERSATIONS", "200"))
KILLS = int(os.environ.get("CONVCTL_CRASH_KILLS", "3"))
WORDS = ("hi", "hours", "prices", "hello")
GRACE = 8.0  # longer than a restart plus a reconnect, so no visitor is closed early

CONNECTORS = json.dumps(
    [
        {
            "name": "webchat",
            "type": "webchat",
            "settings": {"sessions_per_ip_per_minute": 100000, "messages_per_window": 1000},
        },
        {"name": "demo", "type": "demo_bot"},
    ]
)


class Customer(ResendingVisitor):
    """A visitor who sends a fixed list of messages, surviving restarts like the page does."""

    def __init__(self, n: int) -> None:
        texts = [f"{WORDS[(n + i) % len(WORDS)]} #{n}.{i}" for i in range(3)]
        super().__init__(texts, pause=random.uniform(0.0, 0.6))

    async def run(self, base_url: str, http: aiohttp.ClientSession) -> None:
        await self.send_all(lambda: base_url, http)


async def _kill_loop(proc: ServiceProcess, kills: int, done: asyncio.Event) -> int:
    rng = random.Random()
    killed = 0
    for _ in range(kills):
        try:
            await asyncio.wait_for(done.wait(), timeout=rng.uniform(0.1, 0.5))
            break  # the customers finished before this kill
        except TimeoutError:
            pass
        proc.kill()
        killed += 1
        proc.start()
        await proc.wait_ready()
    return killed


@pytest.mark.timeout(600)
async def test_sigkill_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    proc = ServiceProcess(
        tmp_path,
        env={
            "CONVCTL_CONNECTORS": CONNECTORS,
            "CONVCTL_TIMEOUTS__CUSTOMER_GRACE": str(GRACE),
            "CONVCTL_TIMEOUTS__IDLE_REMINDER": "3600",
        },
    )
    proc.start()
    await proc.wait_ready()
    customers = [Customer(n) for n in range(CONVERSATIONS)]
    done = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as http:
            killer = asyncio.create_task(_kill_loop(proc, KILLS, done))
            await asyncio.gather(*(c.run(proc.base_url, http) for c in customers))
            done.set()
            kills = await killer
        # Every socket is closed now: the service records the disconnects and starts a grace
        # timer per conversation. Kill it while those timers are pending, then restart.
        await _wait_db(
            tmp_path,
            "SELECT COUNT(*) FROM conversations "
            "WHERE closed = 0 AND json_extract(snapshot, '$.customer_present') = 1",
            0,
        )
        proc.kill()
        pending_at_kill = _query(tmp_path, "SELECT COUNT(*) FROM timers")
        proc.start()
        await proc.wait_ready()
        await _wait_db(
            tmp_path, "SELECT COUNT(*) FROM conversations WHERE state != 'closed'", 0, timeout=60
        )
        await _wait_db(tmp_path, "SELECT COUNT(*) FROM events WHERE status = 'pending'", 0)
    finally:
        proc.terminate()

    assert kills == KILLS, f"only {kills} kills happened before the customers finished"
    assert pending_at_kill > 0, "no timer was pending at the last kill"
    db = sqlite3.connect(tmp_path / "convctl.db")
    # 1. Every acknowledged message is stored once and decided once.
    for c in customers:
        rows = db.execute(
            "SELECT e.dedupe_key, e.status, e.conversation_id, e.seq FROM events e "
            "WHERE e.source = 'webchat:webchat' AND e.type = 'customer.message' "
            "AND e.dedupe_key LIKE ? ORDER BY e.accepted_at, e.seq",
            (f"{c.visitor}:%",),
        ).fetchall()
        assert [r[0] for r in rows] == [f"{c.visitor}:{cid}" for cid in c.client_ids]
        assert {r[1] for r in rows} == {"decided"}
    # A visitor whose reconnect took longer than the grace period (a loaded machine) had
    # that conversation closed and went on in a new one: allowed, as long as nothing is lost.
    conversations = db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
    assert conversations >= CONVERSATIONS
    decided = db.execute("SELECT COUNT(*) FROM events WHERE status != 'pending'").fetchone()[0]
    decisions = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert decided == decisions
    # 2. Per conversation, decisions follow the sequence with no gap and no repeat.
    seqs: dict[str, list[int]] = defaultdict(list)
    for cid, seq in db.execute("SELECT conversation_id, seq FROM decisions ORDER BY rowid"):
        seqs[cid].append(seq)
    for cid, order in seqs.items():
        assert order == list(range(1, len(order) + 1)), (cid, order)
    # 3. One bot request and one bot answer per customer message: nothing doubled in effect.
    per_conv = db.execute(
        "SELECT c.id, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
        " AND m.sender_role = 'customer'), "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
        " AND m.sender_role = 'bot'), "
        "(SELECT COUNT(*) FROM outbox o WHERE o.conversation_id = c.id "
        " AND o.destination = 'bot:demo') FROM conversations c"
    ).fetchall()
    assert sum(row[1] for row in per_conv) == 3 * CONVERSATIONS
    for cid, from_customer, from_bot, bot_requests in per_conv:
        assert from_customer == from_bot == bot_requests, cid
    # Customer messages in the transcript are in the order they were sent.
    for c in customers:
        texts = [
            r[0]
            for r in db.execute(
                "SELECT m.text FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE c.identity = ? AND m.sender_role = 'customer' "
                "ORDER BY m.created_at, m.rowid",
                (c.visitor,),
            )
        ]
        assert texts == c.texts
    # 4. The grace timers pending at the last kill fired after the restart.
    reasons = {r[0] for r in db.execute("SELECT snapshot FROM conversations")}
    assert all(json.loads(s)["close_reason"] == "customer_left" for s in reasons)
    fired = db.execute(
        "SELECT COUNT(*) FROM events WHERE type = 'timer.fired' AND status = 'decided'"
    ).fetchone()[0]
    assert fired == conversations
    assert db.execute("SELECT COUNT(*) FROM outbox WHERE status != 'done'").fetchone()[0] == 0


def _query(data_dir: Path, sql: str) -> int:
    db = sqlite3.connect(data_dir / "convctl.db", timeout=5)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


async def _wait_db(data_dir: Path, sql: str, want: int, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        # Another process writes the database: there is no event to wait on, only its state.
        while _query(data_dir, sql) != want:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
