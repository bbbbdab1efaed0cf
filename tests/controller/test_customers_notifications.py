"""Profile notifications to subscribed apps: every kind of customer change reaches a fake app
on 127.0.0.1 as a signed webhook, in the customer's order, with or without conversations;
bulk upserts notify once per changed line; subscribing needs ``customers:read``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from controller.clock import ManualClock
from controller.testing import Service
from tests.controller.test_app_webhooks import RETRIES, Receiver, api, receiver

__all__ = ["receiver"]  # the fake app's fixture

API = "/api/v1/customers"
PROFILE_EVENTS = [
    "profile.created",
    "profile.updated",
    "profile.identified",
    "profile.merged",
    "profile.deleted",
    "profile.erased",
]


async def crm_app(
    svc: Service,
    receiver: Receiver,
    event_types: list[str] = PROFILE_EVENTS,
    scopes: tuple[str, ...] = ("events:subscribe", "customers:read"),
) -> dict[str, Any]:
    status, app = await api(
        svc,
        "POST",
        "/api/v1/apps",
        body={
            "name": f"crm-{len(receiver.secrets)}",
            "scopes": list(scopes),
            "webhook_url": receiver.url,
        },
    )
    assert status == 201, app
    receiver.secrets.append(app["webhook_secret"])
    status, sub = await api(
        svc, "POST", "/api/v1/apps/me/subscriptions", app["token"], {"event_types": event_types}
    )
    assert status == 201, sub
    return dict(app)


async def call(
    svc: Service, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    assert svc.http is not None
    async with svc.http.request(
        method, svc.base_url + path, json=body, headers={**svc.admin_headers(), **(headers or {})}
    ) as r:
        return r.status, await r.json() if r.content_type == "application/json" else None, r.headers


async def bulk(svc: Service, lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert svc.http is not None
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    async with svc.http.post(
        svc.base_url + API + "/bulk",
        data=data,
        headers={**svc.admin_headers(), "Content-Type": "application/x-ndjson"},
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def test_every_kind_of_change_is_a_signed_notification(
    service: Service, receiver: Receiver
) -> None:
    app = await crm_app(service, receiver)
    # created and updated: a customer without any conversation
    status, ann, headers = await call(
        service, "POST", API, {"name": "Ann Lee", "email": "ann@example.com"}
    )
    assert status == 201
    status, ann, _ = await call(
        service,
        "PATCH",
        f"{API}/{ann['id']}",
        {"custom": {"tier": "gold"}},
        {"If-Match": headers["ETag"]},
    )
    assert status == 200
    # identified: the anonymous customer of a web chat conversation gets an email
    web = await service.customer()
    conversation_id = await web.start_with_bot()
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None
    status, visitor, _ = await call(
        service,
        "POST",
        f"{API}/{conv.customer_id}/identities",
        {"kind": "email", "value": "visitor@example.com"},
    )
    assert status == 200 and visitor["known"] is True
    # merged: the visitor goes into Ann
    status, merged, _ = await call(
        service, "POST", f"{API}/{ann['id']}/merge", {"from": conv.customer_id}
    )
    assert status == 200
    # deleted and erased
    status, bob, _ = await call(service, "POST", API, {"name": "Bob Example"})
    assert (await call(service, "DELETE", f"{API}/{bob['id']}"))[0] == 204
    assert (await call(service, "DELETE", f"{API}/{ann['id']}?erase=true"))[0] == 204
    await service.settle()

    kinds = [(d.body["type"], d.body["customer_id"]) for d in receiver.deliveries]
    assert sorted(kinds) == sorted(
        [
            ("profile.created", ann["id"]),
            ("profile.updated", ann["id"]),
            ("profile.created", conv.customer_id),  # the first contact's anonymous customer
            ("profile.identified", conv.customer_id),
            ("profile.merged", ann["id"]),
            ("profile.created", bob["id"]),
            ("profile.deleted", bob["id"]),
            ("profile.erased", ann["id"]),
        ]
    )
    for d in receiver.deliveries:
        assert d.refused is None  # signed with the app's secret
        assert d.headers["Convctl-Delivery-Id"] == d.body["id"]
        assert d.body["id"] == f"{d.body['customer_id']}:v{d.body['version']}:0"
        assert d.body["app_id"] == app["id"] and d.body["conversation_id"] is None
    # one customer's notifications arrive in its order
    anns = [d.body for d in receiver.deliveries if d.body["customer_id"] == ann["id"]]
    assert [b["type"] for b in anns] == [
        "profile.created",
        "profile.updated",
        "profile.merged",
        "profile.erased",
    ]
    versions = [b["version"] for b in anns]
    assert versions == sorted(versions)
    updated = receiver.of_type("profile.updated")[0].body
    assert (
        updated["customer"]["custom"] == {"tier": "gold"} and updated["version"] == ann["version"]
    )
    identified = receiver.of_type("profile.identified")[0].body
    assert identified["customer"]["email"] == "visitor@example.com"
    merge = receiver.of_type("profile.merged")[0].body
    assert merge["merged_from"] == conv.customer_id
    assert merge["customer"]["version"] == merged["customer"]["version"]
    # deleted and erased carry only the id; erasure also stripped the delivered ones
    for kind in ("profile.deleted", "profile.erased"):
        body = receiver.of_type(kind)[0].body
        assert "customer" not in body
        assert set(body) == {
            "id",
            "type",
            "conversation_id",
            "customer_id",
            "version",
            "changed_at",
            "app_id",
            "as",
        }
    status, listed = await api(service, "GET", "/api/v1/apps/me/deliveries?limit=50", app["token"])
    assert status == 200
    kept = json.dumps(
        [
            (await api(service, "GET", f"/api/v1/apps/me/deliveries/{d['id']}", app["token"]))[1]
            for d in listed["deliveries"]
        ]
    )
    for personal in ("Ann Lee", "ann@example.com", "visitor@example.com"):
        assert personal not in kept
    assert "Bob Example" in kept  # a plain delete is not an erasure


async def test_profile_notifications_need_customers_read(
    service: Service, receiver: Receiver
) -> None:
    status, app = await api(
        service,
        "POST",
        "/api/v1/apps",
        body={"name": "no-crm", "scopes": ["events:subscribe"], "webhook_url": receiver.url},
    )
    assert status == 201
    status, err = await api(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["profile.updated"]},
    )
    assert status == 403 and err["error"]["code"] == "missing_scope"
    assert err["error"]["scope"] == "customers:read"
    status, err = await api(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["profile.nope"]},
    )
    assert status == 422 and err["error"]["code"] == "unknown_event_type"
    # the conversation event of the same name is not a profile notification
    status, _ = await api(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["customer.updated"]},
    )
    assert status == 201
    await call(service, "POST", API, {"name": "Nobody Hears"})
    await service.settle()
    assert receiver.deliveries == []


async def test_an_app_that_loses_the_scope_gets_no_more(
    make_service: Callable[..., Any], clock: ManualClock, receiver: Receiver
) -> None:
    service: Service = await make_service(clock=clock, apps=RETRIES)
    app = await crm_app(service, receiver, ["profile.created"])
    receiver.default = 503  # the first delivery waits for a retry
    await call(service, "POST", API, {"name": "First"})
    await service.settle()
    assert len(receiver.deliveries) == 1
    status, _ = await api(
        service, "PATCH", f"/api/v1/apps/{app['id']}", body={"scopes": ["events:subscribe"]}
    )
    assert status == 200
    await call(service, "POST", API, {"name": "Second"})  # not written: the app cannot hear it
    receiver.default = 200
    for _ in range(10):  # the retry finds the scope gone: a dead letter, nothing sent
        await service.settle()
        if await service.store.outbox_rows("dead"):
            break
        clock.advance(RETRIES["backoff_max"])
    status, dead = await api(service, "GET", "/api/v1/apps/me/deliveries?status=dead", app["token"])
    assert status == 200
    assert len(dead["deliveries"]) == 1
    assert "missing_scope: the app lost customers:read" in dead["deliveries"][0]["last_error"]
    assert len(receiver.deliveries) == 1


async def test_bulk_upsert_notifies_each_changed_line_once(
    service: Service, receiver: Receiver
) -> None:
    await crm_app(service, receiver, ["profile.created", "profile.updated"])
    lines = [{"external_id": f"crm-{i}", "name": f"Person {i}"} for i in range(120)]
    first = await bulk(service, lines)
    assert first["created"] == 120
    await service.settle()
    assert len(receiver.of_type("profile.created")) == 120
    again = await bulk(service, lines)  # the same file twice
    assert again["unchanged"] == 120
    changed = await bulk(
        service, [{**lines[0], "name": "Renamed"}, lines[1], {"external_id": "bad", "email": "x"}]
    )
    assert (changed["updated"], changed["unchanged"], changed["failed"]) == (1, 1, 1)
    await service.settle()
    assert len(receiver.deliveries) == 121
    assert [d.body["customer"]["name"] for d in receiver.of_type("profile.updated")] == ["Renamed"]
    assert len({d.body["id"] for d in receiver.deliveries}) == 121
    assert all(d.refused is None for d in receiver.deliveries)


async def test_a_customers_notifications_follow_each_other_without_help(
    service: Service, receiver: Receiver
) -> None:
    """Rows of one customer's lane wait in the store behind each other: when one is
    delivered the next is claimed at once (nothing else wakes the dispatcher here, and the
    service clock does not move)."""
    await crm_app(service, receiver, ["profile.created", "profile.updated"])
    receiver.hold = True  # the first delivery stays in flight while the others are written
    status, made, headers = await call(service, "POST", API, {"name": "First"})
    assert status == 201
    await receiver.wait_for(1)
    etag = headers["ETag"]
    for n in range(3):
        status, made, headers = await call(
            service, "PATCH", f"{API}/{made['id']}", {"name": f"Name {n}"}, {"If-Match": etag}
        )
        assert status == 200
        etag = headers["ETag"]
    receiver.release.set()
    await receiver.wait_for(4)  # no settle(): it would wake the dispatcher itself
    assert [d.body["version"] for d in receiver.deliveries] == [1, 2, 3, 4]
