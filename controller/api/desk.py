"""The agent desk hub: each agent's open WebSockets, and pushes to them."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


class DeskHub:
    def __init__(self) -> None:
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)

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
