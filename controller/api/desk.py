"""The agent desk hub: each agent's open WebSockets, and pushes to them.

It also remembers which agents lost their last socket (``agent.disconnected`` was submitted
for them), so their next connection submits ``agent.reconnected``; a per-agent lock keeps a
close and a quick reconnect of the same agent from submitting out of order.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


class DeskHub:
    def __init__(self) -> None:
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
        self._gone: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def presence_lock(self, agent_id: str) -> asyncio.Lock:
        """Held while submitting an agent's disconnect or reconnect events, to keep order."""
        return self._locks[agent_id]

    def mark_gone(self, agent_id: str) -> None:
        """``agent.disconnected`` was submitted for the agent's conversations."""
        self._gone.add(agent_id)

    def take_gone(self, agent_id: str) -> bool:
        """True (once) if the agent was marked gone since its last connection."""
        if agent_id in self._gone:
            self._gone.discard(agent_id)
            return True
        return False

    def add(self, agent_id: str, ws: web.WebSocketResponse) -> None:
        self._sockets[agent_id].add(ws)

    def remove(self, agent_id: str, ws: web.WebSocketResponse) -> bool:
        """Forget a socket; True when it was the agent's last one."""
        sockets = self._sockets.get(agent_id)
        if sockets is None:
            return True
        sockets.discard(ws)
        if not sockets:
            del self._sockets[agent_id]
            return True
        return False

    def connected(self, agent_id: str) -> bool:
        return bool(self._sockets.get(agent_id))

    def count(self, agent_id: str) -> int:
        """How many desk sockets the agent has open."""
        return len(self._sockets.get(agent_id, ()))

    async def push(self, agent_id: str, frame: dict[str, Any]) -> int:
        sent = 0
        for ws in list(self._sockets.get(agent_id, ())):
            if ws.closed:
                continue
            try:
                await ws.send_json(frame)
                sent += 1
            except ConnectionError:
                log.info("desk_push_failed", agent_id=agent_id)
        return sent

    async def close_all(self) -> None:
        for sockets in list(self._sockets.values()):
            for ws in list(sockets):
                await ws.close()
