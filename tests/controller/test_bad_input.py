"""Bad input on every endpoint: a 4xx JSON error with a code, never a 500, nothing stored."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from controller.testing import Service

ADMIN = {"Authorization": "Bearer test-admin-token"}
AGENT = {"Authorization": "Bearer test-agent-token"}  # the seeded agent "alice"
HUGE = "x" * (70 * 1024)

# (method, path, headers, body (str = raw, dict = JSON), expected status, expected code)
CASES: list[tuple[str, str, dict[str, str], Any, int, str]] = [
    ("GET", "/nope", {}, None, 404, "not_found"),
    ("DELETE", "/healthz", {}, None, 405, "method_not_allowed"),
    ("PUT", "/api/v1/agents/me/presence", {}, {"presence": "available"}, 401, "unauthorized"),
    (
        "PUT",
        "/api/v1/agents/me/presence",
        {"Authorization": "Bearer wrong"},
        {"presence": "available"},
        401,
        "unauthorized",
    ),
    ("PUT", "/api/v1/agents/me/presence", ADMIN, {"presence": "available"}, 403, "wrong_role"),
    ("PUT", "/api/v1/agents/me/presence", AGENT, "{not json", 400, "malformed_json"),
    ("PUT", "/api/v1/agents/me/presence", AGENT, {"presence": 3}, 422, "invalid_body"),
    ("PUT", "/api/v1/agents/me/presence", AGENT, {"presence": "asleep"}, 422, "invalid_body"),
    ("PUT", "/api/v1/agents/me/presence", AGENT, [1, 2], 422, "invalid_body"),
    ("PUT", "/api/v1/agents/me/presence", AGENT, {"presence": HUGE}, 413, "too_large"),
    ("POST", "/api/v1/offers/of_unknown/accept", AGENT, None, 404, "unknown_offer"),
    ("POST", "/api/v1/offers/of_unknown/decline", AGENT, None, 404, "unknown_offer"),
    (
        "POST",
        "/api/v1/conversations/cv_unknown/messages",
        AGENT,
        {"text": "hi"},
        404,
        "unknown_conversation",
    ),
    ("POST", "/api/v1/conversations/cv_unknown/messages", AGENT, {"text": ""}, 422, "invalid_body"),
    (
        "POST",
        "/api/v1/conversations/cv_unknown/messages",
        AGENT,
        {"text": ["a"]},
        422,
        "invalid_body",
    ),
    (
        "POST",
        "/api/v1/conversations/cv_unknown/messages",
        AGENT,
        {"text": "a", "x": 1},
        422,
        "invalid_body",
    ),
    ("POST", "/api/v1/conversations/cv_unknown/messages", AGENT, "[[[", 400, "malformed_json"),
    ("POST", "/api/v1/conversations/cv_unknown/messages", AGENT, {"text": HUGE}, 413, "too_large"),
    ("POST", "/api/v1/conversations/cv_unknown/leave", AGENT, {}, 404, "unknown_conversation"),
    (
        "POST",
        "/api/v1/conversations/cv_unknown/wrap-up",
        AGENT,
        {"disposition": 5},
        422,
        "invalid_body",
    ),
    ("GET", "/api/v1/conversations/cv_unknown", ADMIN, None, 404, "unknown_conversation"),
    ("GET", "/api/v1/conversations/cv_unknown/messages", AGENT, None, 404, "unknown_conversation"),
    ("GET", "/api/v1/conversations/cv_unknown/events", ADMIN, None, 404, "unknown_conversation"),
    ("GET", "/api/v1/conversations/cv_unknown/events", AGENT, None, 403, "wrong_role"),
    ("POST", "/api/v1/agents", ADMIN, {"id": "bad id!", "name": "x"}, 422, "invalid_body"),
    ("POST", "/api/v1/agents", AGENT, {"id": "carol", "name": "Carol"}, 403, "wrong_role"),
    ("POST", "/api/v1/tokens", ADMIN, {"role": "root", "subject": "x"}, 422, "invalid_body"),
    ("POST", "/api/v1/tokens", ADMIN, {"role": "agent", "subject": "nobody"}, 404, "unknown_agent"),
    ("POST", "/api/v1/rules/reload", {}, None, 401, "unauthorized"),
    ("GET", "/webchat/ws?token=v_forged.abc", {}, None, 401, "unauthorized"),
    ("GET", "/webchat/ws", {}, None, 401, "unauthorized"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), CASES)
async def test_bad_request_gets_a_json_4xx_and_stores_nothing(
    service: Service,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    code: str,
) -> None:
    before = await _counts(service)
    kwargs: dict[str, Any] = {"headers": dict(headers)}
    if isinstance(body, str):
        kwargs["data"] = body
        kwargs["headers"]["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["data"] = json.dumps(body)
        kwargs["headers"]["Content-Type"] = "application/json"
    assert service.http is not None
    async with service.http.request(method, service.base_url + path, **kwargs) as r:
        assert r.status == status, await r.text()
        assert r.content_type == "application/json"
        payload = await r.json()
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    assert await _counts(service) == before


async def test_bad_web_chat_frames_get_an_error_frame_and_store_nothing(service: Service) -> None:
    customer = await service.customer()
    assert customer.ws is not None
    before = await _counts(service)
    bad_frames = [
        "not json",
        json.dumps([1, 2, 3]),
        json.dumps({"type": "message", "client_id": "a", "text": ""}),
        json.dumps({"type": "message", "client_id": "a", "text": 5}),
        json.dumps({"type": "message", "client_id": "bad id with spaces", "text": "hi"}),
        json.dumps({"type": "typing", "client_id": "a", "text": "hi"}),
        json.dumps({"type": "message", "client_id": "a", "text": "x" * 5000}),
        json.dumps({"type": "message", "client_id": "a", "text": "hi", "extra": 1}),
    ]
    for frame in bad_frames:
        seen = len(customer.frames)
        await customer.ws.send_str(frame)
        got = await customer.wait_for(lambda f: f["type"] == "error", after=seen)
        assert got["code"] in {"bad_frame", "unknown_frame", "too_long"}, got
    await service.settle()
    assert await _counts(service) == before
    ack = await customer.say("hi")  # the socket still works
    assert ack["type"] == "ack"


async def test_bad_desk_frames_get_an_error_frame(service: Service) -> None:
    alice = await service.agent("alice")
    before = await _counts(service)
    for frame in (
        {"type": "explode"},
        {"type": "message", "conversation_id": "cv_unknown", "text": "hi"},
        {"type": "accept", "offer_id": "of_unknown"},
        {"type": "presence", "presence": "sleeping"},
    ):
        got = await alice.command(frame)
        assert got["type"] == "error", got
        assert got["code"] in {"bad_frame", "unknown_conversation", "unknown_offer"}
    assert await _counts(service) == before


async def test_other_origins_are_refused_on_the_web_chat_socket(service: Service) -> None:
    customer = await service.customer()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(
                f"{service.base_url}/webchat/ws?token={customer.token}",
                headers={"Origin": "https://evil.example"},
            )
    assert err.value.status == 403


async def _counts(service: Service) -> tuple[int, ...]:
    return tuple(
        [await service.store.count(t) for t in ("events", "conversations", "outbox", "messages")]
    )
