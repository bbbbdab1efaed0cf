"""The console script, as the README and the Dockerfile run it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from controller.testing import RULES_DIR, free_port

CONVCTL = str(Path(sys.executable).parent / "convctl")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVCTL_")}
    env.update({"CONVCTL_DATA_DIR": str(tmp_path / "data"), **extra})
    return env


async def test_serve_in_the_dev_profile_generates_secrets_and_serves(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the service is waited on below)
        [CONVCTL, "serve", "--port", str(port)],
        env=_env(tmp_path),
        cwd=RULES_DIR.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with http.get(base + "/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert proc.poll() is None, "convctl serve exited"
                    await asyncio.sleep(0.1)
            async with http.get(base + "/webchat") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
            async with http.get(base + "/healthz") as r:
                assert (await r.json()) == {"status": "ok"}
            async with http.get(base + "/metrics") as r:
                assert "convctl_events_accepted" in await r.text()
        secrets_file = tmp_path / "data" / "secrets.json"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    text = out.decode()
    assert "admin token:" in text and "/webchat" in text


def test_prod_profile_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    result = subprocess.run(
        [CONVCTL, "serve"],
        env=_env(tmp_path, CONVCTL_PROFILE="prod", CONVCTL_ADMIN_TOKEN="change-me"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CONVCTL_SESSION_SECRET" in result.stderr and "CONVCTL_ADMIN_TOKEN" in result.stderr
    assert not (tmp_path / "data" / "secrets.json").exists()


def test_rules_check_reports_every_error_with_its_line(tmp_path: Path) -> None:
    ok = subprocess.run(
        [CONVCTL, "rules", "check", str(RULES_DIR)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- name: one\n  when:\n    event: customer.mesage\n  then:\n    - close: idle\n"
        "- name: two\n  when:\n    event: customer.message\n  then:\n    - clos: idle\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [CONVCTL, "rules", "check", str(bad)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{bad}:3:" in result.stderr and "customer.message" in result.stderr
    assert f"{bad}:10:" in result.stderr and "close" in result.stderr


def test_rules_check_lints_bots_queues_and_dead_rules(tmp_path: Path) -> None:
    rules = tmp_path / "lint.yaml"
    rules.write_text(
        "- name: one\n  when:\n    event: conversation.created\n  then:\n"
        "    - invite_bot: rasa\n    - route: { queue: billing }\n    - stop\n"
        "- name: two\n  when:\n    event: conversation.created\n  then:\n"
        "    - route: { queue: sales }\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [CONVCTL, "rules", "check", str(rules)],
        env=_env(tmp_path, CONVCTL_QUEUES='["support", "billing"]'),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        f"{rules}:5:7: rule 'one': unknown bot 'rasa' (configured: demo)",
        f"{rules}:12:7: rule 'two': unknown queue 'sales' (setting 'queues': billing, support)",
        f"{rules}:8:3: rule 'two': never fires for 'conversation.created': rule 'one' "
        f"({rules}:1:3) comes first, has no conditions and stops",
    ]


def test_rules_schema_and_reference_commands(tmp_path: Path) -> None:
    from controller.rulebook.reference import END, START, render_reference
    from controller.rulebook.schema import schema_text

    schema = subprocess.run(
        [CONVCTL, "rules", "schema"], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert schema.returncode == 0 and schema.stdout == schema_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Rules\n\nprose\n\n{START}\nstale\n{END}\n\nmore prose\n")
    written = subprocess.run(
        [CONVCTL, "rules", "reference", "--write", str(readme)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode == 0, written.stderr
    expected = f"# Rules\n\nprose\n\n{START}\n{render_reference()}{END}\n\nmore prose\n"
    assert readme.read_text() == expected


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    for _ in range(2):
        result = subprocess.run(
            [CONVCTL, "migrate"], env=_env(tmp_path), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    db = sqlite3.connect(tmp_path / "data" / "convctl.db")
    scripts = (RULES_DIR.parent / "controller" / "store" / "migrations").glob("sqlite_*.sql")
    every = sorted(int(script.name.split("_")[1]) for script in scripts)
    assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == every
