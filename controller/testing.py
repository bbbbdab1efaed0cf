"""Reusable test helpers: run the service on 127.0.0.1, talk to it as a customer and an agent.

Connector packages by others can use these too. Everything waits on frames and conditions,
never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controller.app import create_app
from controller.clock import Clock
from controller.errors import ConfigError
from controller.keys import DISPATCHER, STORE, WORKERS
from controller.models import Conversation
from controller.settings import Settings
from controller.store.base import Store

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
Frame = dict[str, Any]


def test_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test service: its own folder, fixed secrets, no demo surprises.

    With ``CONVCTL_TEST_STORE=postgres`` the service keeps its data in PostgreSQL
    (``CONVCTL_TEST_DATABASE_URL``), in a schema of its own for each ``tmp_path``: a service
    restarted on the same folder finds its data again, as it would in the SQLite file.
    """
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "rules_dir": RULES_DIR if RULES_DIR.is_dir() else None,
        "session_secret": "test-session-secret",
        "admin_token": "test-admin-token",
        "agent_token": "test-agent-token",
        "port": 0,
    }
    if os.environ.get("CONVCTL_TEST_STORE") == "postgres":
        values["database_url"] = postgres_test_url()
        values["database_schema"] = postgres_test_schema(tmp_path)
    values.update(overrides)
    return Settings(**values)


# PostgreSQL for tests: a schema per test folder, dropped when the session ends --------------
_SCHEMA_SALT = secrets.token_hex(4)  # schemas of two test sessions never collide
_test_schemas: set[str] = set()


def postgres_test_url() -> str:
    """The PostgreSQL database tests may use (``CONVCTL_TEST_DATABASE_URL``)."""
    url = os.environ.get("CONVCTL_TEST_DATABASE_URL", "")
    if not url:
        raise ConfigError("PostgreSQL tests need CONVCTL_TEST_DATABASE_URL (see scripts/test)")
    return url


def postgres_test_schema(tmp_path: Path) -> str:
    """The schema of the services of one test folder (the same one for a restart)."""
    digest = hashlib.sha256(f"{_SCHEMA_SALT}:{tmp_path.resolve()}".encode()).hexdigest()
    schema = f"convctl_t_{digest[:20]}"
    _test_schemas.add(schema)
    return schema


def postgres_url_or_skip() -> str:
    """``CONVCTL_TEST_DATABASE_URL`` for a PostgreSQL test; without it the test is skipped,
    or fails when ``CI=true`` (CI must run them)."""
    import pytest  # a test dependency: only tests call this

    url = os.environ.get("CONVCTL_TEST_DATABASE_URL", "")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CONVCTL_TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI")
        pytest.skip("CONVCTL_TEST_DATABASE_URL is not set (scripts/test sets up PostgreSQL)")
    return url


async def drop_postgres_test_schemas(schemas: Collection[str] | None = None) -> None:
    """Drop the schemas tests made (all of them, or ``schemas``)."""
    names = sorted(_test_schemas if schemas is None else set(schemas) & _test_schemas)
    if not names:
        return
    import asyncpg

    conn = await asyncpg.connect(postgres_test_url())
    try:
        for name in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            _test_schemas.discard(name)
    finally:
        await conn.close()


def rules_with_assisting_bot(folder: Path) -> Path:
    """The default rules, changed so the bot stays on as the agent's assistant at handoff."""
    folder.mkdir(parents=True, exist_ok=True)
    handoff = "    - route: { queue: support, priority: normal }\n"
    text = (RULES_DIR / "default.yaml").read_text()
    if handoff not in text:
        raise AssertionError("the default rules no longer route a handoff as expected")
    (folder / "default.yaml").write_text(
        text.replace(handoff, "    - set_bot_mode: assist\n" + handoff, 1)
    )
    return folder


class Service:
    """The app served on an ephemeral 127.0.0.1 port, in this process."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, clock=clock)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        self.base_url = ""
        self.http: aiohttp.ClientSession | None = None
        self._clients: list[FrameReader] = []

    async def start(self) -> Service:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        if self.http is not None:
            await self.http.close()
        await self._runner.cleanup()

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def settle(self) -> None:
        """Wait until no conversation has work in progress and the outbox has nothing due."""
        workers, dispatcher = self.app[WORKERS], self.app[DISPATCHER]
        while True:
            await workers.wait_idle()
            if await dispatcher.wait_quiet() and workers.idle:
                return

    async def until(
        self,
        conversation_id: str,
        predicate: Callable[[Conversation], bool],
        *,
        timeout: float = 10.0,
    ) -> Conversation:
        """Wait until the stored conversation satisfies ``predicate``; return it."""
        async with asyncio.timeout(timeout):
            while True:
                await self.settle()
                conv = await self.store.load_conversation(conversation_id)
                if conv is not None and predicate(conv):
                    return conv
                await asyncio.sleep(0.005)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    async def agent(self, agent_id: str, *, capacity: int = 3) -> AgentClient:
        """Create (or update) an agent, give it a token, connect its desk socket."""
        assert self.http is not None
        r = await self.http.post(
            self.base_url + "/api/v1/agents",
            json={"id": agent_id, "name": agent_id.title(), "capacity": capacity},
            headers=self.admin_headers(),
        )
        assert r.status == 200, await r.text()
        r = await self.http.post(
            self.base_url + "/api/v1/tokens",
            json={"role": "agent", "subject": agent_id},
            headers=self.admin_headers(),
        )
        assert r.status == 201, await r.text()
        token = (await r.json())["token"]
        client = AgentClient(self, agent_id, token)
        self._clients.append(client)
        await client.connect()
        return client

    async def customer(self, token: str | None = None) -> WebChatClient:
        """A web chat visitor; pass an earlier visitor's token to come back as them."""
        client = WebChatClient(self.base_url, token)
        self._clients.append(client)
        await client.connect()
        return client


class FrameReader:
    """Collects JSON frames of a WebSocket and waits for one that matches."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    def start(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._task = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                async with self._changed:
                    self.frames.append(msg.json())
                    self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, match: Callable[[Frame], bool], *, timeout: float = 10.0, after: int = 0
    ) -> Frame:
        """The first frame (from index ``after``) for which ``match`` is true."""

        def found() -> Frame | None:
            for frame in self.frames[after:]:
                if match(frame):
                    return frame
            return None

        async with asyncio.timeout(timeout), self._changed:
            while (frame := found()) is None:
                if self.ws is not None and self.ws.closed and self._task and self._task.done():
                    raise AssertionError(f"socket closed; frames so far: {self.frames}")
                await self._changed.wait()
            return frame

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


class WebChatClient(FrameReader):
    """A web chat visitor: a session token and a socket."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        super().__init__()
        self.base_url = base_url
        self.token = token
        self.http = aiohttp.ClientSession()

    async def connect(self) -> None:
        if self.token is None:
            r = await self.http.post(self.base_url + "/webchat/session")
            assert r.status == 200, await r.text()
            self.token = (await r.json())["token"]
        ws = await self.http.ws_connect(
            f"{self.base_url}/webchat/ws?token={self.token}&connection={secrets.token_hex(6)}"
        )
        self.frames = []
        self.start(ws)
        await self.wait_for(lambda f: f["type"] == "history")

    async def say(
        self, text: str, client_id: str | None = None, *, payload: str | None = None
    ) -> Frame:
        """Write ``text`` (with ``payload``: tap the button of that payload and title)."""
        cid = client_id or secrets.token_hex(8)
        assert self.ws is not None
        seen = len(self.frames)
        frame = {"type": "message", "client_id": cid, "text": text}
        if payload is not None:
            frame["payload"] = payload
        await self.ws.send_json(frame)
        return await self.wait_for(
            lambda f: f.get("client_id") == cid and f["type"] in ("ack", "error"), after=seen
        )

    async def start_with_bot(self, text: str = "hi") -> str:
        """Write ``text``, wait for the bot's answer; return the conversation id."""
        ack = await self.say(text)
        assert ack["type"] == "ack", ack
        await self.wait_message("bot")
        return str(ack["conversation_id"])

    async def wait_message(self, sender: str, contains: str = "", **kw: Any) -> Frame:
        return await self.wait_for(
            lambda f: f["type"] == "message" and f["from"] == sender and contains in f["text"], **kw
        )

    def texts(self, sender: str | None = None) -> list[str]:
        return [
            f["text"]
            for f in self.frames
            if f["type"] == "message" and (sender is None or f["from"] == sender)
        ]

    async def close(self) -> None:
        await super().close()
        if not self.http.closed:
            await self.http.close()


class AgentClient(FrameReader):
    """An agent: token, desk socket, and the agent API."""

    def __init__(self, service: Service, agent_id: str, token: str) -> None:
        super().__init__()
        self.service = service
        self.id = agent_id
        self.token = token
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})

    async def connect(self) -> None:
        ws = await self.http.ws_connect(
            f"{self.service.base_url}/api/v1/agents/ws?token={self.token}"
        )
        self.start(ws)
        await self.wait_for(lambda f: f["type"] == "hello")

    async def command(self, frame: Frame) -> Frame:
        cid = secrets.token_hex(8)
        assert self.ws is not None
        seen = len(self.frames)
        await self.ws.send_json({**frame, "client_id": cid})
        return await self.wait_for(
            lambda f: f.get("client_id") == cid and f["type"] in ("ack", "error"), after=seen
        )

    async def available(self) -> None:
        r = await self.http.put(
            self.service.base_url + "/api/v1/agents/me/presence", json={"presence": "available"}
        )
        assert r.status == 200, await r.text()

    async def wait_offer(self, conversation_id: str | None = None, **kw: Any) -> Frame:
        return await self.wait_for(
            lambda f: (
                f["type"] == "offer"
                and (conversation_id is None or f["conversation_id"] == conversation_id)
            ),
            **kw,
        )

    async def take(self, conversation_id: str) -> Frame:
        """Wait for the conversation's offer and accept it."""
        offer = await self.wait_offer(conversation_id)
        ack = await self.accept(offer["offer_id"])
        assert ack["type"] == "ack", ack
        return ack

    async def accept(self, offer_id: str) -> Frame:
        return await self.command({"type": "accept", "offer_id": offer_id})

    async def say(self, conversation_id: str, text: str) -> Frame:
        return await self.command(
            {"type": "message", "conversation_id": conversation_id, "text": text}
        )

    async def close(self) -> None:
        await super().close()
        if not self.http.closed:
            await self.http.close()


# the service as a separate process (crash tests, the console script) -------------------------
async def serve_on_loopback(runner: web.AppRunner) -> str:
    """Serve a fake provider's app on 127.0.0.1, on a free port; return its base URL."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


class ExampleProcess:
    """A script of ``examples/`` in a subprocess on a free 127.0.0.1 port (``--port`` is
    added to its arguments); ready once its ``/healthz`` answers."""

    def __init__(self, script: Path, log_path: Path, *args: str) -> None:
        self.script = script
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ExampleProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.script), "--port", str(self.port), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def answered(self) -> bool:
        """Whether it answers its health check (False while it starts)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.script.name} exited with {self.proc.returncode}: "
                + self.log_path.read_text(errors="replace")[-2000:]
            )
        try:
            with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.answered():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.script.name} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``convctl serve`` in a subprocess, for tests that kill it."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ,
            "CONVCTL_DATA_DIR": str(data_dir),
            "CONVCTL_PORT": str(self.port),
            "CONVCTL_SESSION_SECRET": "proc-session-secret",
            "CONVCTL_ADMIN_TOKEN": "proc-admin-token",
            "CONVCTL_AGENT_TOKEN": "proc-agent-token",
            "CONVCTL_LOG_LEVEL": "warning",
            **({"CONVCTL_RULES_DIR": str(RULES_DIR)} if RULES_DIR.is_dir() else {}),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "service.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=log,
        )

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until /readyz answered 200."""
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"service exited with {self.proc.returncode}: "
                        + self.log_path.read_text(errors="replace")[-3000:]
                    )
                try:
                    async with http.get(self.base_url + "/readyz") as r:
                        if r.status == 200:
                            return time.monotonic() - started
                except aiohttp.ClientError:
                    pass
                if time.monotonic() - started > timeout:
                    raise AssertionError("service did not become ready")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


# a web chat visitor that survives restarts and kills ------------------------------------------
async def next_frame(
    ws: aiohttp.ClientWebSocketResponse, kind: str, client_id: str | None = None
) -> dict[str, Any]:
    """The next frame of ``kind`` (and ``client_id``, for acks); a closed socket raises
    ConnectionError, an error frame fails the test."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {msg.type}")
        frame = json.loads(msg.data)
        assert frame["type"] != "error", frame
        if frame["type"] == kind and (client_id is None or frame.get("client_id") == client_id):
            return dict(frame)


class ResendingVisitor:
    """A web chat visitor who sends ``texts`` one by one, pausing ``pause`` seconds between
    them like a person typing, and on every reconnect (to whatever address ``url`` gives)
    resends what was not acknowledged yet, with the same client ids, in order — as the page
    does. Used by the tests that kill the service under load."""

    def __init__(self, texts: list[str], pause: float) -> None:
        self.texts = texts
        self.client_ids = [secrets.token_hex(8) for _ in texts]
        self.acked: list[str] = []
        self.token: str | None = None
        self.visitor: str | None = None
        self.pause = pause

    async def send_all(self, url: Callable[[], str], http: aiohttp.ClientSession) -> None:
        while len(self.acked) < len(self.texts):
            try:
                await self._attempt(url(), http)
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                await asyncio.sleep(0.05)

    async def _attempt(self, base_url: str, http: aiohttp.ClientSession) -> None:
        if self.token is None:
            async with http.post(base_url + "/webchat/session") as r:
                if r.status != 200:
                    raise aiohttp.ClientError(f"session {r.status}")
                body = await r.json()
                self.token, self.visitor = body["token"], body["visitor_id"]
        ws = await http.ws_connect(f"{base_url}/webchat/ws?token={self.token}")
        try:
            await next_frame(ws, "history")
            for cid, text in list(zip(self.client_ids, self.texts, strict=True))[len(self.acked) :]:
                await ws.send_json({"type": "message", "client_id": cid, "text": text})
                ack = await next_frame(ws, "ack", cid)
                assert ack["client_id"] == cid
                self.acked.append(cid)
                await asyncio.sleep(self.pause)
        finally:
            await ws.close()
