"""Hot reload and versions of the rules: the folder watcher, the reload API, stored versions
and rollback, a bad file never replacing good rules, and reloads under load.

Size knobs: CONVCTL_RELOAD_CONVERSATIONS (default 200), CONVCTL_RELOAD_CHANGES (default 20).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.keys import RULES, WORKERS
from controller.rulebook import Rulebook
from controller.rules import RulebookHolder
from controller.testing import RULES_DIR, Service, WebChatClient
from controller.testing import test_settings as settings_for

CONVERSATIONS = int(os.environ.get("CONVCTL_RELOAD_CONVERSATIONS", "200"))
CHANGES = int(os.environ.get("CONVCTL_RELOAD_CHANGES", "20"))
MAX_MESSAGES = 12  # per customer, while the rules keep changing

CONNECTORS = [
    {
        "name": "webchat",
        "type": "webchat",
        "settings": {"sessions_per_ip_per_minute": 100000, "messages_per_window": 1000},
    },
    {"name": "demo", "type": "demo_bot"},
]


def good_rule(n: int) -> str:
    return (
        f"- name: extra-{n}\n"
        f"  description: version {n} of a rule that never fires\n"
        "  when:\n"
        "    event: customer.message\n"
        f'    event.text: {{ contains: "never-{n}-xyz" }}\n'
        "  then:\n"
        f"    - label: extra{n}\n"
    )


def bad_rule(n: int) -> str:
    return (
        f"- name: broken-{n}\n"
        "  when:\n"
        "    event: customer.message\n"
        "  then:\n"
        "    - no_such_action: 1\n"
    )


def rules_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", folder / "default.yaml")
    return folder


def write(path: Path, text: str) -> None:
    """Replace a file in one step, as an editor that saves atomically does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def version_of(folder: Path) -> str:
    """The version hash of the folder's files (it depends on names and contents only)."""
    files = [(str(p), p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.yaml"))]
    settings = settings_for(folder).rule_settings()
    with Rulebook.from_sources(files, settings=settings, matcher="reference") as book:
        return book.version


async def wait_until(holder: RulebookHolder, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(15):
        await holder.wait_for(predicate)


async def metric(svc: Service, name: str) -> float:
    assert svc.http is not None
    async with svc.http.get(svc.base_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def api(svc: Service, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    assert svc.http is not None
    headers = kw.pop("headers", svc.admin_headers())
    async with svc.http.request(method, svc.base_url + path, headers=headers, **kw) as r:
        return r.status, await r.json()


async def test_watcher_picks_up_a_changed_folder(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path)
    svc: Service = await make_service(clock=clock, rules_dir=folder, rules_watch_interval=0.01)
    holder = svc.app[RULES]
    first = holder.current().version
    write(folder / "extra.yaml", good_rule(1))
    await wait_until(holder, lambda: holder.current().version != first)
    assert holder.current().version == version_of(folder)

    status, body = await api(svc, "GET", "/api/v1/rules")
    assert status == 200
    assert body["version"] == version_of(folder)
    assert body["source"] == "watch"
    assert body["files"] == [str(folder / "default.yaml"), str(folder / "extra.yaml")]
    assert body["last_error"] is None and body["watching"] is True

    status, body = await api(svc, "GET", "/api/v1/rules/versions")
    assert [(v["version"], v["source"], v["current"]) for v in body["versions"]] == [
        (version_of(folder), "watch", True),
        (first, "start", False),
    ]
    # A removed file is a change too.
    (folder / "extra.yaml").unlink()
    await wait_until(holder, lambda: holder.current().version == first)


async def test_bad_file_keeps_the_running_rules_and_reports_every_error(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path)
    svc: Service = await make_service(clock=clock, rules_dir=folder, rules_watch_interval=0.01)
    holder = svc.app[RULES]
    good = holder.current().version
    tries = holder.attempts
    write(folder / "extra.yaml", bad_rule(1) + bad_rule(2))
    await wait_until(holder, lambda: holder.attempts > tries)
    assert holder.current().version == good

    status, body = await api(svc, "GET", "/api/v1/rules")
    assert body["version"] == good
    error = body["last_error"]
    assert error["source"] == "watch"
    assert error["files"] == [str(folder / "default.yaml"), str(folder / "extra.yaml")]
    assert len(error["errors"]) == 2
    assert all(e.startswith(f"{folder / 'extra.yaml'}:") for e in error["errors"])
    assert "unknown action 'no_such_action'" in error["errors"][0]
    assert await metric(svc, "convctl_rules_reload_failures_total") == 1
    assert await metric(svc, f'convctl_rules_version_info{{version="{good}"}}') == 1

    # The API reload says the same, with a 422 listing every problem.
    status, body = await api(svc, "POST", "/api/v1/rules/reload")
    assert status == 422 and body["error"]["code"] == "rule_error"
    assert len(body["error"]["errors"]) == 2
    assert await metric(svc, "convctl_rules_reload_failures_total") == 2

    # The running rules still answer customers, with the good version recorded.
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    assert {d["rules_version"] for d in await svc.store.decisions(cid)} == {good}

    # Fixing the file clears the error and loads the new version.
    write(folder / "extra.yaml", good_rule(3))
    await wait_until(holder, lambda: holder.current().version != good)
    status, body = await api(svc, "GET", "/api/v1/rules")
    assert body["last_error"] is None and body["version"] == version_of(folder)


async def test_reload_api_versions_and_rollback(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path)
    svc: Service = await make_service(clock=clock, rules_dir=folder, rules_watch=False)
    first = svc.app[RULES].current().version
    status, body = await api(svc, "GET", "/api/v1/rules")
    assert body["watching"] is False

    write(folder / "extra.yaml", good_rule(1))
    clock.advance(5)
    status, body = await api(svc, "POST", "/api/v1/rules/reload")
    assert status == 200, body
    second = body["version"]
    assert second == version_of(folder) != first
    # The same folder again changes nothing and stores nothing twice.
    status, body = await api(svc, "POST", "/api/v1/rules/reload")
    assert status == 200 and body["version"] == second

    status, body = await api(svc, "GET", "/api/v1/rules/versions")
    versions = body["versions"]
    assert [(v["version"], v["current"], v["source"]) for v in versions] == [
        (second, True, "api"),
        (first, False, "start"),
    ]
    assert versions[0]["loaded_at"] > versions[1]["loaded_at"]

    status, body = await api(svc, "POST", "/api/v1/rules/rollback", json={"version": first})
    assert status == 200 and body["version"] == first
    assert svc.app[RULES].current().version == first
    assert await metric(svc, f'convctl_rules_version_info{{version="{first}"}}') == 1
    assert await metric(svc, f'convctl_rules_version_info{{version="{second}"}}') == 0
    status, body = await api(svc, "GET", "/api/v1/rules/versions")
    assert [(v["version"], v["current"]) for v in body["versions"]] == [
        (second, False),
        (first, True),
    ]
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    assert {d["rules_version"] for d in await svc.store.decisions(cid)} == {first}

    status, body = await api(svc, "POST", "/api/v1/rules/rollback", json={"version": "nope"})
    assert status == 404 and body["error"]["code"] == "unknown_rules_version"
    status, body = await api(svc, "POST", "/api/v1/rules/rollback", json={})
    assert status == 422
    for method, path in (
        ("GET", "/api/v1/rules"),
        ("GET", "/api/v1/rules/versions"),
        ("POST", "/api/v1/rules/rollback"),
    ):
        status, body = await api(svc, method, path, headers={})
        assert status == 401, (path, body)


async def test_a_replaced_version_is_closed_only_when_nothing_uses_it(
    make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path)
    svc: Service = await make_service(clock=clock, rules_dir=folder, rules_watch=False)
    holder = svc.app[RULES]

    def closed(book: Rulebook) -> bool:
        return bool(book._closed)

    with holder.lease() as leased:
        for n in range(3):
            write(folder / "extra.yaml", good_rule(n))
            await holder.reload("api")
        # Replaced three times, but a lease still holds it.
        assert holder.current() is not leased and not closed(leased)
    assert closed(leased)
    # The version just replaced stays open until the next swap (a caller of current() may
    # still be deciding with it); older ones are freed.
    previous = holder.current()
    write(folder / "extra.yaml", good_rule(10))
    await holder.reload("api")
    assert not closed(previous)
    write(folder / "extra.yaml", good_rule(11))
    await holder.reload("api")
    assert closed(previous)
    assert not closed(holder.current())


# under load ----------------------------------------------------------------------------------
class Customer:
    """A web chat visitor who writes, waits for the bot's answer, and writes again until the
    rule changes are over (at least twice, at most MAX_MESSAGES times)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.acked: list[tuple[str, str]] = []  # (conversation id, client id)

    async def run(self, svc: Service, stop: asyncio.Event) -> None:
        client: WebChatClient = await svc.customer()
        for i in range(MAX_MESSAGES):
            if i >= 2 and stop.is_set():
                break
            client_id = f"c{self.n}m{i}"
            seen = len(client.frames)
            ack = await client.say(f"hello #{self.n}.{i}", client_id=client_id)
            assert ack["type"] == "ack" and not ack["duplicate"], ack
            self.acked.append((str(ack["conversation_id"]), client_id))
            await client.wait_for(
                lambda f: f["type"] == "message" and f["from"] == "bot", after=seen, timeout=60
            )


async def _change_rules(svc: Service, folder: Path, changes: int) -> tuple[int, int]:
    """Change the rules ``changes`` times while the customers write: one change in five is
    invalid; half go through the watcher, half through the API (the watcher may see those
    too). Returns (valid, invalid)."""
    holder, workers = svc.app[RULES], svc.app[WORKERS]
    valid = invalid = 0
    for n in range(changes):
        # Let the load move on between changes (a condition, not a pause).
        decided = workers.decided
        async with asyncio.timeout(60):
            while workers.decided < decided + 20:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        bad = n % 5 == 3
        running = holder.current().version
        write(folder / "extra.yaml", bad_rule(n) if bad else good_rule(n))
        if n % 2 == 0:
            await wait_until(holder, _attempted(holder, holder.attempts))
        else:
            status, body = await api(svc, "POST", "/api/v1/rules/reload")
            assert status == (422 if bad else 200), body
        if bad:
            invalid += 1
            assert holder.current().version == running
            assert holder.last_error is not None
        else:
            valid += 1
            assert holder.current().version == version_of(folder)
            assert holder.last_error is None
    return valid, invalid


def _attempted(holder: RulebookHolder, tries: int) -> Callable[[], bool]:
    """True once the holder tried one more reload than ``tries``."""
    return lambda: holder.attempts > tries


@pytest.mark.timeout(600)
async def test_hot_reload_under_load_loses_and_doubles_nothing(
    make_service: Callable[..., Any], tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path)
    svc: Service = await make_service(
        rules_dir=folder,
        rules_watch_interval=0.01,
        connectors=CONNECTORS,
        timeouts={"idle_reminder": 3600, "customer_grace": 3600},
    )
    customers = [Customer(n) for n in range(CONVERSATIONS)]
    stop = asyncio.Event()
    random.shuffle(customers)
    load = asyncio.gather(*(c.run(svc, stop) for c in customers))
    try:
        valid, invalid = await _change_rules(svc, folder, CHANGES)
    finally:
        stop.set()
        await load
    await svc.settle()

    db = sqlite3.connect(tmp_path / "convctl.db")
    try:
        stored_versions = {r[0] for r in db.execute("SELECT version FROM rules_versions")}
        # Every valid change became a stored version; no invalid one did.
        assert len(stored_versions) == 1 + valid
        # An invalid folder is reported once per attempt: an API reload and a poll of the
        # watcher may both try the same files.
        failures = await metric(svc, "convctl_rules_reload_failures_total")
        assert invalid <= failures <= 2 * invalid
        # Every acknowledged message is stored once and decided.
        for c in customers:
            for conversation_id, client_id in c.acked:
                rows = db.execute(
                    "SELECT status FROM events WHERE conversation_id = ? "
                    "AND type = 'customer.message' AND dedupe_key LIKE ?",
                    (conversation_id, f"%:{client_id}"),
                ).fetchall()
                assert rows == [("decided",)], (conversation_id, client_id, rows)
        # Every event decided exactly once, nothing pending.
        events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        decisions = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM events WHERE status = 'pending'").fetchone()[0]
        assert (pending, decisions) == (0, events)
        outcomes = {r[0] for r in db.execute("SELECT DISTINCT outcome FROM decisions")}
        assert "error" not in outcomes, outcomes
        # Each decision names a valid, stored version; several versions decided the load.
        used = {r[0] for r in db.execute("SELECT DISTINCT rules_version FROM decisions")}
        assert used <= stored_versions, used - stored_versions
        assert len(used) >= 2, used
        # Decisions of each conversation follow its sequence without gap or repeat.
        seqs: dict[str, list[int]] = defaultdict(list)
        for cid, seq in db.execute("SELECT conversation_id, seq FROM decisions ORDER BY rowid"):
            seqs[cid].append(seq)
        assert len(seqs) == CONVERSATIONS
        for cid, order in seqs.items():
            assert order == list(range(1, len(order) + 1)), (cid, order)
        # One bot answer per customer message.
        for cid, said, answered in db.execute(
            "SELECT c.id, "
            "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
            " AND m.sender_role = 'customer'), "
            "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
            " AND m.sender_role = 'bot') FROM conversations c"
        ):
            assert said == answered, cid
    finally:
        db.close()
