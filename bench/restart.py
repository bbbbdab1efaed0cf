#!/usr/bin/env python3
"""Start-up time of ``convctl serve`` with N open conversations, each with a pending timer.

What it measures
----------------
Seconds from launching ``python -m controller.cli serve`` until ``/readyz`` answers 200
(``ServiceProcess.wait_ready``, polling every 50 ms), on a database holding N open
conversations (``--conversations``, default 100000), each with one timer due far in the
future (``--timer-days``, default 30) — against the same start on an empty data folder (the
baseline: imports, schema creation, rules compilation, demo agents). Both are pinned to the
same single core with ``taskset -c N`` (``--core``, default the last core) and repeated
``--repeat`` times, alternating; the medians and their ratio are printed (aim: < 5 s).
``/readyz`` reports how many timers were loaded and how many conversations were recovered
(0 expected: the generated conversations have no undecided event and no due outbox row).

How the database is made (once, before timing; on the load generator's cores)
------------------------------------------------------------------------------
Through the store API, with the real rules and machine, in batches of ``--batch``:
``SqliteStore.accept`` of one web chat ``customer.message`` per new visitor (opens the
conversation and its ``conversation.created`` event), then both events are decided with the
default rulebook (reference matcher) and ``Decider.apply`` exactly as the worker does, and
committed with ``commit_decision``. The second decision also starts the ``idle_reminder``
timer (next generation, due in ``--timer-days``): the ``TimerOp`` writes the ``timers`` row and
the snapshot's ``timers`` / ``timer_generations`` maps agree with it. The outbox rows of those
decisions (asking the demo bot) are then marked done, as if delivered, so the started service
has no backlog. Result: N conversations in state ``bot``, N timer rows, nothing pending.

It prints numbers; it never passes or fails.

    python bench/restart.py --conversations 100000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from controller.facts import build_facts
from controller.machine import Decider
from controller.models import Conversation, Event, NewEvent
from controller.models.conversation import TimerRef
from controller.rulebook import Rulebook
from controller.settings import Settings
from controller.store.base import DecisionRecord, TimerOp
from controller.store.sqlite import SqliteStore
from controller.testing import RULES_DIR

TIMER = "idle_reminder"


async def populate(db: Path, n: int, batch: int, timer_days: float) -> dict[str, Any]:
    started = time.monotonic()
    store = SqliteStore(db)
    await store.open()
    settings = Settings(data_dir=db.parent)
    book = Rulebook.load(
        RULES_DIR, settings=settings.rule_settings(), matcher="reference", default_language="en"
    )
    decider = Decider()
    tz = ZoneInfo("UTC")

    def decide(conv: Conversation, event: Event) -> DecisionRecord:
        fired = book.decide(build_facts(conv, event, tz), matcher="reference")
        return decider.apply(conv, event, fired, rules_version=book.version, matcher="reference")

    done = 0
    try:
        while done < n:
            size = min(batch, n - done)
            now = datetime.now(UTC)
            new = []
            for _ in range(size):
                visitor = "v_" + secrets.token_urlsafe(16)
                client_id = secrets.token_hex(8)
                new.append(
                    NewEvent(
                        type="customer.message",
                        source="webchat:webchat",
                        dedupe_key=f"{visitor}:{client_id}",
                        channel="webchat",
                        instance="webchat",
                        endpoint="web",
                        identity=visitor,
                        data={"text": "what are your opening hours?", "client_id": client_id},
                    )
                )
            accepted = await store.accept(new, now)
            loaded = [await store.load_for_decision(a.conversation_id) for a in accepted]
            firsts: list[DecisionRecord] = []
            for conv, events in loaded:
                assert conv is not None and len(events) == 2, (conv, events)
                firsts.append(decide(conv, events[0]))
            await asyncio.gather(*(store.commit_decision(r, r.event.accepted_at) for r in firsts))
            seconds: list[DecisionRecord] = []
            for rec, (_, events) in zip(firsts, loaded, strict=True):
                conv = rec.after
                conv.version = rec.before_version + 1
                rec2 = decide(conv, events[1])
                after = rec2.after
                generation = after.timer_generations.get(TIMER, 0) + 1
                due = events[1].accepted_at + timedelta(days=timer_days)
                after.timers[TIMER] = TimerRef(generation=generation, due_at=due)
                after.timer_generations[TIMER] = generation
                rec2.timers.append(TimerOp(TIMER, generation, due))
                seconds.append(rec2)
            await asyncio.gather(*(store.commit_decision(r, r.event.accepted_at) for r in seconds))
            done += size
            if done % (batch * 20) == 0:
                print(
                    f"  populated {done:,}/{n:,} ({done / (time.monotonic() - started):,.0f}/s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await store.close()
        book.close()
    conn = sqlite3.connect(db)
    try:
        conn.execute(
            "UPDATE outbox SET status = 'done', done_at = ? WHERE status = 'pending'",
            (time.time(),),
        )
        conn.commit()
        counts = {
            "conversations_open": conn.execute(
                "SELECT COUNT(*) FROM conversations WHERE closed = 0"
            ).fetchone()[0],
            "timer_rows": conn.execute("SELECT COUNT(*) FROM timers").fetchone()[0],
            "pending_events": conn.execute(
                "SELECT COUNT(*) FROM events WHERE status = 'pending'"
            ).fetchone()[0],
            "states": dict(
                conn.execute("SELECT state, COUNT(*) FROM conversations GROUP BY state").fetchall()
            ),
        }
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    size_mb = os.path.getsize(db) / 2**20  # noqa: ASYNC240 (one stat call)
    return {"seconds": time.monotonic() - started, **counts, "db_mb": size_mb}


async def timed_start(data: Path, core: int) -> dict[str, Any]:
    service = C.PinnedService(data, core, env=C.bench_env())
    service.start()
    try:
        ready = await service.wait_ready(timeout=600)
        async with aiohttp.ClientSession() as http, http.get(service.base_url + "/readyz") as r:
            body = await r.json()
        return {
            "ready_s": ready,
            "rss_mb": C.rss_kb(service.pid) / 1024,
            "timers": body.get("timers"),
            "recovered_conversations": body.get("recovered_conversations"),
            "log_levels": C.count_log_levels(service),
        }
    except BaseException:
        print("service log tail:\n" + service.log_tail(), file=sys.stderr)
        raise
    finally:
        service.terminate()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    core, others = C.choose_cores(args.core)
    C.pin_self(others)
    root = C.work_dir(args.data_dir, "convctl-bench-restart-")
    full = root / "full"
    full.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "server_core": core,
        "loadgen_cores": sorted(others),
        "conversations": args.conversations,
        "data_dir": str(root),
    }
    db = full / "convctl.db"
    if db.exists() and args.reuse:
        out["populate"] = {"reused": True}
    else:
        out["populate"] = await populate(db, args.conversations, args.batch, args.timer_days)
    if args.populate_only:
        return out
    empty_runs, full_runs = [], []
    for i in range(args.repeat):
        empty = root / f"empty-{i}"
        empty_runs.append(await timed_start(empty, core))
        full_runs.append(await timed_start(full, core))
    out["empty_runs"], out["full_runs"] = empty_runs, full_runs
    out["empty_ready_s"] = statistics.median(r["ready_s"] for r in empty_runs)
    out["full_ready_s"] = statistics.median(r["ready_s"] for r in full_runs)
    out["ratio"] = out["full_ready_s"] / out["empty_ready_s"]
    return out


def report(out: dict[str, Any]) -> None:
    p = out["populate"]
    print(
        f"server core {out['server_core']}, load generator cores {out['loadgen_cores']}; "
        f"data in {out['data_dir']}"
    )
    if not p.get("reused"):
        print(
            f"populated in {p['seconds']:.1f} s: {p['conversations_open']:,} open conversations, "
            f"{p['timer_rows']:,} timer rows, {p['pending_events']} pending events, "
            f"states {p['states']}, db {p['db_mb']:.0f} MB"
        )
    print(
        "\nstart to /readyz 200 (s)      "
        + "  ".join(f"run {i + 1:<5}" for i in range(len(out["empty_runs"])))
    )
    for label, runs in (
        ("empty db (baseline)", out["empty_runs"]),
        (f"{out['conversations']:,} conversations", out["full_runs"]),
    ):
        print(f"{label:<30}" + "  ".join(f"{r['ready_s']:9.2f}" for r in runs))
    last = out["full_runs"][-1]
    rows = [
        ("median, empty db (s)", out["empty_ready_s"]),
        ("median, with conversations + timers (s)", out["full_ready_s"]),
        ("ratio full/empty", out["ratio"]),
        ("timers loaded (readyz)", last["timers"]),
        ("recovered conversations (readyz)", last["recovered_conversations"]),
        ("RSS at ready, empty (MB)", out["empty_runs"][-1]["rss_mb"]),
        ("RSS at ready, full (MB)", last["rss_mb"]),
    ]
    C.print_table("restart (aim: < 5 s with the conversations)", rows, 2)
    problems = {
        k: v for k, v in last["log_levels"].items() if not k.startswith(("info:", "debug:"))
    }
    print(f"service log (non-info lines by level:event): {problems or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", "-n", type=int, default=100_000)
    parser.add_argument("--timer-days", type=float, default=30.0, help="timers due in N days")
    parser.add_argument("--batch", type=int, default=1000, help="conversations per store batch")
    parser.add_argument("--repeat", type=int, default=3, help="starts of each kind")
    parser.add_argument("--core", type=int, default=None, help="core for the service")
    parser.add_argument("--data-dir", help="keep the data here (default: a temp dir)")
    parser.add_argument(
        "--reuse", action="store_true", help="with --data-dir: reuse an already populated database"
    )
    parser.add_argument(
        "--populate-only",
        action="store_true",
        help="with --data-dir: only make the database (time it later with --reuse)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    if args.json or args.populate_only:
        C.emit_json(out)
    else:
        report(out)


if __name__ == "__main__":
    main()
