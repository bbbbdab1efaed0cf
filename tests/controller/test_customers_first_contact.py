"""``profile.created`` for the anonymous customer a channel's first contact makes: a fake app
on 127.0.0.1 (signature verified) hears it once per new customer — a web chat visitor, a
WhatsApp user through the real webhook format — and never when nobody subscribed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controller.clock import ManualClock
from controller.keys import APPS
from controller.settings import ConnectorInstance
from controller.store.base import Identity
from controller.testing import Service
from controller.testing_graph import FakeGraph, WhatsAppSender, change, envelope, text_message
from tests.connectors.test_whatsapp import NUMBER_A, SECRET, USER, graph, whatsapp_settings
from tests.controller.test_app_webhooks import Receiver, receiver
from tests.controller.test_customers_notifications import crm_app

__all__ = ["graph", "receiver"]  # the fakes' fixtures


async def test_a_new_customer_on_each_channel_is_announced_once(
    make_service: Callable[..., Any], clock: ManualClock, graph: FakeGraph, receiver: Receiver
) -> None:
    svc: Service = await make_service(
        clock=clock,
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(name="whatsapp", type="whatsapp", settings=whatsapp_settings(graph)),
            ConnectorInstance(name="demo", type="demo_bot"),
        ],
    )
    assert svc.http is not None
    sender = WhatsAppSender(svc.http, svc.base_url + "/webhooks/whatsapp", SECRET)
    app = await crm_app(svc, receiver, ["profile.created"])

    web = await svc.customer()
    cid = await web.start_with_bot()
    await web.say("a second message")
    await svc.settle()
    conv = await svc.store.load_conversation(cid)
    assert conv is not None
    [visitor] = receiver.deliveries
    assert visitor.refused is None  # signed with the app's secret
    body = visitor.body
    assert (body["type"], body["customer_id"], body["app_id"]) == (
        "profile.created",
        conv.customer_id,
        app["id"],
    )
    assert body["conversation_id"] is None
    assert body["id"] == f"{conv.customer_id}:v{body['version']}:0"
    assert visitor.headers["Convctl-Delivery-Id"] == body["id"]
    assert body["customer"]["known"] is False
    assert body["customer"]["identities"] == [{"kind": "webchat", "value": conv.identity}]
    assert body["customer"]["version"] == body["version"]

    # a WhatsApp user: the first message announces them, the second does not
    first = envelope(
        [change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.F1")], names={USER: "Ana"})]
    )
    assert (await sender.post(first))[0] == 200
    second = envelope([change(NUMBER_A, messages=[text_message(USER, "again", "wamid.F2")])])
    assert (await sender.post(second))[0] == 200
    assert (await sender.post(first))[0] == 200  # a redelivery
    await svc.settle()
    assert len(receiver.deliveries) == 2
    wa = receiver.deliveries[1]
    assert wa.refused is None
    assert wa.body["type"] == "profile.created"
    customer = wa.body["customer"]
    assert customer["known"] is False and customer["name"] == "Ana"
    assert customer["identities"] == [{"kind": "whatsapp", "value": "+" + USER}]
    stored = await svc.store.lookup_customer(Identity("whatsapp", "+" + USER))
    assert stored is not None and stored.id == wa.body["customer_id"]

    # more messages of known visitors create nobody: nothing more
    await web.say("still here")
    await svc.settle()
    assert len(receiver.deliveries) == 2


async def test_nobody_subscribed_nothing_is_written(service: Service, receiver: Receiver) -> None:
    # subscribed to other profile notifications, not to profile.created
    await crm_app(service, receiver, ["profile.updated", "profile.identified"])
    assert service.app[APPS].first_contact_notices() is None
    web = await service.customer()
    await web.start_with_bot()
    await service.settle()
    assert receiver.deliveries == []
    rows = await service.store.outbox_rows()
    assert not [r for r in rows if str(r["destination"]).startswith("app:")]
