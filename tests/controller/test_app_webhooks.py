"""Signed webhook deliveries to subscribed apps: format, order, retries, dead letters and
replay, 410 Gone, revocation, and no effect on conversations while an app is slow or down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from controller.clock import ManualClock
from controller.keys import WORKERS
from controller.signing import DELIVERY_ID, SIGNATURE, TIMESTAMP, SignatureError, verify
from controller.testing import Service, free_port

RETRIES = {"max_attempts": 3, "backoff_base": 1.0, "backoff_max": 4.0, "timeout": 5.0}


@dataclass
class Delivery:
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any]
    refused: str | None  # the signature check's error code, None when valid


class Receiver:
    """A fake app: verifies each delivery's signature, records it, answers with scripted
    statuses (then ``default``), and can hold every answer until released."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.secrets: list[str] = []
        self.deliveries: list[Delivery] = []
        self.statuses: list[int] = []
        self.retry_after: str | None = None  # sent with a 429
        self.default = 200
        self.hold = False
        self.release = asyncio.Event()
        self.arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/convctl", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hooks/convctl"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = None
        try:
            verify(self.secrets, raw, request.headers, now=self.clock.now().timestamp())
        except SignatureError as exc:
            refused = exc.code
        async with self.arrived:
            self.deliveries.append(Delivery(dict(request.headers), raw, json.loads(raw), refused))
            self.arrived.notify_all()
        if self.hold:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else self.default
        headers = {"Retry-After": self.retry_after} if self.retry_after and status == 429 else None
        return web.json_response({"received": status < 300}, status=status, headers=headers)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10), self.arrived:
            await self.arrived.wait_for(lambda: len(self.deliveries) >= count)

    def of_type(self, kind: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.body["type"] == kind]


@pytest.fixture
async def receiver(clock: ManualClock) -> AsyncIterator[Receiver]:
    fake = Receiver(clock)
    await fake.start()
    yield fake
    await fake.stop()


async def api(
    svc: Service, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    assert svc.http is not None
    headers = {"Authorization": f"Bearer {token or svc.settings.admin_token}"}
    async with svc.http.request(method, svc.base_url + path, json=body, headers=headers) as r:
        return r.status, await r.json() if r.content_type == "application/json" else None


async def subscribed_app(
    svc: Service, receiver: Receiver, event_types: list[str], *, url: str | None = None
) -> dict[str, Any]:
    """Register an app whose webhook is the receiver, subscribed to ``event_types``."""
    status, app = await api(
        svc,
        "POST",
        "/api/v1/apps",
        body={
            "name": f"app-{len(receiver.secrets)}-{url or ''}",
            "scopes": ["events:subscribe", "conversations:read"],
            "webhook_url": url or receiver.url,
        },
    )
    assert status == 201, app
    receiver.secrets.append(app["webhook_secret"])
    status, sub = await api(
        svc, "POST", "/api/v1/apps/me/subscriptions", app["token"], {"event_types": event_types}
    )
    assert status == 201, sub
    return dict(app)


async def deliveries(svc: Service, app: dict[str, Any], query: str = "") -> list[dict[str, Any]]:
    status, body = await api(svc, "GET", f"/api/v1/apps/me/deliveries{query}", app["token"])
    assert status == 200, body
    return list(body["deliveries"])


async def retry_until(svc: Service, clock: ManualClock, done: Callable[[], bool]) -> None:
    """Move the clock past the longest backoff and settle, until ``done`` (a few rounds)."""
    for _ in range(10):
        await svc.settle()
        if done():
            return
        clock.advance(RETRIES["backoff_max"])
    raise AssertionError("the condition never held")


async def test_a_subscribed_app_receives_signed_events_in_order(
    service: Service, receiver: Receiver, clock: ManualClock
) -> None:
    app = await subscribed_app(
        service, receiver, ["conversation.created", "customer.message", "bot.message"]
    )
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    await service.settle()

    got = receiver.deliveries
    assert [d.body["type"] for d in got] == [
        "conversation.created",
        "customer.message",
        "bot.message",
        "customer.message",
        "bot.message",
    ]
    seqs = [d.body["event"]["seq"] for d in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # the conversation's order
    for d in got:
        assert d.refused is None  # the signature verifies with the app's secret
        assert d.headers["Content-Type"] == "application/json"
        assert (
            d.headers[DELIVERY_ID]
            == d.body["id"]
            == f"{d.body['event']['id']}:" + (d.body["id"].rsplit(":", 1)[1])
        )
        assert d.headers[TIMESTAMP] == str(int(clock.now().timestamp()))
        assert d.headers[SIGNATURE].startswith("v1=")
        assert d.body["app_id"] == app["id"] and d.body["conversation_id"] == conversation_id
        assert set(d.body["event"]) == {"id", "type", "seq", "data", "accepted_at"}
    first = receiver.of_type("customer.message")[0]
    assert first.body["event"]["data"]["text"] == "hi"
    assert receiver.of_type("bot.message")[1].body["event"]["data"]["text"].startswith("Hello!")
    # a wrong secret does not verify the same bytes
    with pytest.raises(SignatureError):
        verify("cvs_wrong", first.raw, first.headers, now=clock.now().timestamp())

    listed = await deliveries(service, app)
    assert [d["id"] for d in listed] == [d.body["id"] for d in reversed(got)]  # newest first
    assert {d["status"] for d in listed} == {"done"} and {d["attempts"] for d in listed} == {1}
    status, one = await api(
        service, "GET", f"/api/v1/apps/me/deliveries/{first.body['id']}", app["token"]
    )
    assert (
        status == 200 and one["payload"] == first.body and one["event_type"] == "customer.message"
    )
    page = await deliveries(service, app, "?limit=2")
    assert len(page) == 2
    status, body = await api(service, "GET", "/api/v1/apps/me/deliveries?limit=2", app["token"])
    status, rest = await api(
        service,
        "GET",
        f"/api/v1/apps/me/deliveries?limit=10&cursor={body['next_cursor']}",
        app["token"],
    )
    assert [d["id"] for d in body["deliveries"] + rest["deliveries"]] == [d["id"] for d in listed]
    status, body = await api(service, "GET", "/api/v1/apps/me/deliveries?status=lost", app["token"])
    assert status == 422


async def test_failed_deliveries_are_retried_and_later_events_wait_behind(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    app = await subscribed_app(service, receiver, ["customer.message"])
    receiver.statuses = [500, 502]
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    await service.settle()
    assert len(receiver.deliveries) == 1  # "hello" waits behind the failed "hi"
    pending = await deliveries(service, app, "?status=pending")
    assert [d["attempts"] for d in pending] == [0, 1]
    assert "http_500" in pending[1]["last_error"]

    await retry_until(service, clock, lambda: len(receiver.deliveries) == 4)
    texts = [d.body["event"]["data"]["text"] for d in receiver.deliveries]
    assert texts == ["hi", "hi", "hi", "hello"]
    ids = [d.headers[DELIVERY_ID] for d in receiver.deliveries]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # one delivery id across its retries
    assert all(d.refused is None for d in receiver.deliveries)
    done = await deliveries(service, app, "?status=done")
    assert [d["attempts"] for d in done] == [1, 3]
    assert service.http is not None
    metrics = await (await service.http.get(service.base_url + "/metrics")).text()
    assert f'convctl_app_deliveries_total{{app="{app["id"]}",outcome="delivered"}} 2.0' in metrics
    assert f'convctl_app_deliveries_total{{app="{app["id"]}",outcome="failed"}} 2.0' in metrics


async def test_a_dead_delivery_is_replayed_with_the_same_delivery_id(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    app = await subscribed_app(service, receiver, ["customer.message"])
    receiver.default = 503
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await retry_until(service, clock, lambda: len(receiver.deliveries) == 3)
    await service.settle()
    dead = await deliveries(service, app, "?status=dead")
    assert len(dead) == 1 and dead[0]["attempts"] == 3 and "http_503" in dead[0]["last_error"]
    delivery_id = dead[0]["id"]

    receiver.default = 200
    status, body = await api(
        service, "POST", f"/api/v1/apps/me/deliveries/{delivery_id}/replay", app["token"]
    )
    assert status == 202 and body["status"] == "pending" and body["replays"] == 1
    await service.settle()
    assert len(receiver.deliveries) == 4
    replayed = receiver.deliveries[-1]
    assert replayed.headers[DELIVERY_ID] == delivery_id and replayed.refused is None
    assert replayed.body == receiver.deliveries[0].body  # the same body, so receivers dedupe
    status, one = await api(
        service, "GET", f"/api/v1/apps/me/deliveries/{delivery_id}", app["token"]
    )
    assert one["status"] == "done" and one["replays"] == 1 and one["attempts"] == 1

    status, body = await api(
        service, "POST", f"/api/v1/apps/me/deliveries/{delivery_id}/replay", app["token"]
    )
    assert status == 409 and body["error"]["code"] == "not_dead"
    status, body = await api(
        service, "POST", "/api/v1/apps/me/deliveries/ev_nope:0/replay", app["token"]
    )
    assert status == 404 and body["error"]["code"] == "unknown_delivery"
    # another app cannot see it; an admin can, under the app's id
    other = await subscribed_app(service, receiver, ["agent.left"])
    status, _ = await api(
        service, "GET", f"/api/v1/apps/me/deliveries/{delivery_id}", other["token"]
    )
    assert status == 404
    status, _ = await api(service, "GET", f"/api/v1/apps/{app['id']}/deliveries/{delivery_id}")
    assert status == 200

    # a client error is not retried: dead at the first answer
    receiver.statuses = [400]
    await customer.say("again")
    await service.settle()
    dead = await deliveries(service, app, "?status=dead")
    assert len(dead) == 1 and dead[0]["attempts"] == 1 and "http_400" in dead[0]["last_error"]


async def test_410_gone_drops_the_subscription(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    app = await subscribed_app(service, receiver, ["customer.message"])
    receiver.statuses = [410]
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    [dead] = await deliveries(service, app, "?status=dead")
    assert dead["attempts"] == 1 and "gone" in dead["last_error"]
    _, body = await api(service, "GET", "/api/v1/apps/me/subscriptions", app["token"])
    assert body["subscriptions"] == []
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    await service.settle()
    assert len(receiver.deliveries) == 1
    assert len(await deliveries(service, app)) == 1


async def test_an_app_that_never_answers_does_not_delay_conversations(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps={**RETRIES, "timeout": 30.0})
    app = await subscribed_app(service, receiver, ["customer.message", "bot.message"])
    receiver.hold = True  # every delivery hangs until released
    first, second = await service.customer(), await service.customer()
    one = await first.start_with_bot("hi")
    two = await second.start_with_bot("hi")
    for text, answer in (("hello", "Hello!"), ("hours", "We are open"), ("bye", "Goodbye!")):
        await first.say(text)
        await first.wait_message("bot", answer)
    # Every event of both conversations is decided, while the app holds its first delivery of
    # each conversation unanswered.
    await service.app[WORKERS].wait_idle()
    for cid in (one, two):
        assert {status for _, status in await service.store.events(cid)} <= {"decided", "stale"}
    assert (await service.store.load_conversation(one)).state == "closed"  # type: ignore[union-attr]
    await receiver.wait_for(2)
    assert len(receiver.deliveries) == 2  # one in flight per (conversation, app) lane
    assert {d.body["conversation_id"] for d in receiver.deliveries} == {one, two}
    assert all(d["status"] == "pending" for d in await deliveries(service, app))

    receiver.release.set()
    await service.settle()
    listed = await deliveries(service, app)
    assert {d["status"] for d in listed} == {"done"}
    for cid in (one, two):
        seqs = [
            d.body["event"]["seq"] for d in receiver.deliveries if d.body["conversation_id"] == cid
        ]
        assert seqs == sorted(seqs)
    assert len(receiver.of_type("customer.message")) == 5  # hi, hello, hours, bye; hi


async def test_an_app_that_is_down_does_not_delay_conversations(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    down = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    app = await subscribed_app(service, receiver, ["customer.message"], url=down)
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    await service.settle()
    pending = await deliveries(service, app, "?status=pending")
    assert len(pending) == 2
    assert pending[1]["attempts"] == 1 and "connection" in pending[1]["last_error"]
    transcript = await service.store.messages(conversation_id, include_agent_only=False)
    assert [m.sender_role for m in transcript] == ["customer", "bot", "customer", "bot"]
    for _ in range(5):  # each row's retries, one row after the other
        clock.advance(RETRIES["backoff_max"])
        await service.settle()
    dead = await deliveries(service, app, "?status=dead")
    assert len(dead) == 2 and all(d["attempts"] == 3 for d in dead)


async def test_deleting_an_app_stops_its_deliveries(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    app = await subscribed_app(service, receiver, ["customer.message"])
    receiver.default = 503
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    assert len(receiver.deliveries) == 1
    status, body = await api(service, "DELETE", f"/api/v1/apps/{app['id']}")
    assert status == 200 and body["cancelled_deliveries"] == 1
    status, listed = await api(service, "GET", f"/api/v1/apps/{app['id']}/deliveries?status=dead")
    assert "revoked" in listed["deliveries"][0]["last_error"]
    status, body = await api(
        service,
        "POST",
        f"/api/v1/apps/{app['id']}/deliveries/{listed['deliveries'][0]['id']}/replay",
    )
    assert status == 409 and body["error"]["code"] == "app_deleted"
    receiver.default = 200
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    for _ in range(3):
        clock.advance(RETRIES["backoff_max"])
        await service.settle()
    assert len(receiver.deliveries) == 1
    rows = [r for r in await service.store.outbox_rows() if r["destination"] == f"app:{app['id']}"]
    assert len(rows) == 1


async def test_emitted_events_are_delivered_when_they_are_decided(
    service: Service, receiver: Receiver
) -> None:
    app = await subscribed_app(service, receiver, ["conversation.closed", "bot.ended"])
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    await customer.say("bye")
    await service.until(conversation_id, lambda c: c.state == "closed")
    await service.settle()
    assert [d.body["type"] for d in receiver.deliveries] == ["bot.ended", "conversation.closed"]
    closed = receiver.deliveries[1]
    assert closed.body["conversation_id"] == conversation_id and closed.refused is None
    assert closed.body["app_id"] == app["id"]


async def test_a_rotated_secret_signs_the_next_deliveries(
    service: Service, receiver: Receiver, clock: ManualClock
) -> None:
    app = await subscribed_app(service, receiver, ["customer.message"])
    status, body = await api(service, "POST", f"/api/v1/apps/{app['id']}/secret")
    assert status == 200
    receiver.secrets = [body["webhook_secret"]]
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    [delivery] = receiver.deliveries
    assert delivery.refused is None
    with pytest.raises(SignatureError):
        verify(app["webhook_secret"], delivery.raw, delivery.headers, now=clock.now().timestamp())


async def test_a_disabled_app_gets_no_deliveries_until_enabled(
    service: Service, receiver: Receiver
) -> None:
    app = await subscribed_app(service, receiver, ["customer.message"])
    await api(service, "PATCH", f"/api/v1/apps/{app['id']}", body={"enabled": False})
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    assert receiver.deliveries == []
    await api(service, "PATCH", f"/api/v1/apps/{app['id']}", body={"enabled": True})
    await customer.say("hello")
    await customer.wait_message("bot", "Hello!")
    await service.settle()
    assert [d.body["event"]["data"]["text"] for d in receiver.deliveries] == ["hello"]


async def test_a_429_with_retry_after_waits_at_least_that_long(
    make_service: Any, receiver: Receiver, clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    await subscribed_app(service, receiver, ["customer.message"])
    receiver.statuses, receiver.retry_after = [429], "60"
    customer = await service.customer()
    await customer.start_with_bot("hi")
    await service.settle()
    assert len(receiver.deliveries) == 1
    clock.advance(59)  # past every backoff of the policy (at most 4 s), not past the 60 s asked
    await service.settle()
    assert len(receiver.deliveries) == 1
    clock.advance(2)
    await receiver.wait_for(2)
    assert (
        receiver.deliveries[1].headers[DELIVERY_ID] == receiver.deliveries[0].headers[DELIVERY_ID]
    )
