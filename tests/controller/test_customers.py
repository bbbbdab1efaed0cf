"""The Customer API: profiles, ETags, lookup, identification seen by rules, roles, idempotency."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.clock import ManualClock
from controller.keys import CLOCK
from controller.models import NewEvent
from controller.testing import RULES_DIR, Service

API = "/api/v1/customers"


async def _token(service: Service, role: str, subject: str) -> dict[str, str]:
    assert service.http is not None
    r = await service.http.post(
        service.base_url + "/api/v1/tokens",
        json={"role": role, "subject": subject},
        headers=service.admin_headers(),
    )
    assert r.status == 201, await r.text()
    return {"Authorization": f"Bearer {(await r.json())['token']}"}


async def _call(
    service: Service, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    assert service.http is not None
    async with service.http.request(
        method, service.base_url + path, headers=headers or service.admin_headers(), **kw
    ) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body, r.headers


async def test_crud_with_etags(service: Service) -> None:
    status, made, headers = await _call(
        service,
        "POST",
        API,
        json={"name": "Ada", "email": " Ada@Example.COM ", "custom": {"tier": "gold", "vip": True}},
    )
    assert status == 201, made
    assert made["email"] == "ada@example.com" and made["known"] is True
    assert {"kind": "email", "value": "ada@example.com"} in made["identities"]
    assert headers["ETag"] == f'"{made["version"]}"'
    assert headers["Location"] == f"{API}/{made['id']}"
    path = f"{API}/{made['id']}"

    status, got, headers = await _call(service, "GET", path)
    assert status == 200 and got == made and headers["ETag"] == f'"{made["version"]}"'

    etag = headers["ETag"]
    status, changed, headers = await _call(
        service,
        "PATCH",
        path,
        json={"name": "Ada L.", "custom": {"vip": None, "orders": 3}},
        headers={**service.admin_headers(), "If-Match": etag},
    )
    assert status == 200, changed
    assert changed["name"] == "Ada L." and changed["email"] == "ada@example.com"
    assert changed["custom"] == {"tier": "gold", "orders": 3}
    assert headers["ETag"] != etag

    status, err, _ = await _call(service, "PATCH", path, json={"name": "X"})
    assert status == 428 and err["error"]["code"] == "precondition_required"

    status, _, _ = await _call(service, "DELETE", path)
    assert status == 204
    status, err, _ = await _call(service, "GET", path)
    assert status == 404 and err["error"]["code"] == "unknown_customer"
    status, _, _ = await _call(service, "GET", f"{API}/lookup?identity=email:ada@example.com")
    assert status == 404


async def test_two_updates_with_one_etag_one_wins(service: Service) -> None:
    _, made, headers = await _call(service, "POST", API, json={"name": "Bo"})
    path, etag = f"{API}/{made['id']}", headers["ETag"]
    results = await asyncio.gather(
        *(
            _call(
                service,
                "PATCH",
                path,
                json={"name": name},
                headers={**service.admin_headers(), "If-Match": etag},
            )
            for name in ("One", "Two")
        )
    )
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 412]
    loser = next(r for r in results if r[0] == 412)
    assert loser[1]["error"]["code"] == "precondition_failed"
    winner = next(r for r in results if r[0] == 200)
    _, now, _ = await _call(service, "GET", path)
    assert now["name"] == winner[1]["name"] and now["version"] == made["version"] + 1


async def test_list_pages_and_filters(service: Service) -> None:
    for n in range(5):
        status, _, _ = await _call(
            service,
            "POST",
            API,
            json={"name": f"Person {n}", "external_id": f"crm-{n}", "phone": f"+4915123456{n:03d}"},
        )
        assert status == 201
    web = await service.customer()
    await web.start_with_bot()  # one anonymous customer

    seen: list[str] = []
    cursor = None
    while True:
        query = f"?limit=2{f'&cursor={cursor}' if cursor else ''}"
        status, page, _ = await _call(service, "GET", API + query)
        assert status == 200 and len(page["customers"]) <= 2
        seen += [c["id"] for c in page["customers"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6

    _, known, _ = await _call(service, "GET", API + "?known=true&limit=100")
    assert len(known["customers"]) == 5
    _, anonymous, _ = await _call(service, "GET", API + "?known=false")
    assert len(anonymous["customers"]) == 1 and anonymous["customers"][0]["name"] is None
    _, one, _ = await _call(service, "GET", API + "?external_id=crm-3")
    assert [c["name"] for c in one["customers"]] == ["Person 3"]
    _, one, _ = await _call(service, "GET", API, params={"phone": "+49 151 23456004"})
    assert [c["external_id"] for c in one["customers"]] == ["crm-4"]
    _, named, _ = await _call(service, "GET", API + "?name=Person")
    assert len(named["customers"]) == 5
    status, err, _ = await _call(service, "GET", API + "?limit=0")
    assert status == 422 and err["error"]["code"] == "invalid_query"


async def test_phones_are_e164(make_service: Callable[..., Any], clock: ManualClock) -> None:
    service: Service = await make_service(clock=clock, default_phone_region="DE")
    status, made, _ = await _call(service, "POST", API, json={"phone": "0151 23456789"})
    assert status == 201, made
    assert made["phone"] == "+4915123456789"
    status, found, _ = await _call(
        service, "GET", API + "/lookup", params={"identity": "phone:+49 (151) 234-56789"}
    )
    assert status == 200 and found["id"] == made["id"]
    status, err, _ = await _call(service, "POST", API, json={"phone": "12"})
    assert status == 422 and err["error"]["code"] == "invalid_phone"


async def test_a_national_number_needs_a_region(service: Service) -> None:
    status, err, _ = await _call(service, "POST", API, json={"phone": "0151 23456789"})
    assert status == 422 and err["error"]["code"] == "invalid_phone"
    status, err, _ = await _call(service, "POST", API, json={"email": "not-an-email"})
    assert status == 422 and err["error"]["code"] == "invalid_email"
    status, err, _ = await _call(service, "GET", API + "/lookup?identity=fax:123")
    assert status == 422 and err["error"]["code"] == "invalid_identity"


async def test_a_web_chat_visitor_is_anonymous_until_identified(service: Service) -> None:
    web = await service.customer()
    cid = await web.start_with_bot()
    conv = await service.store.load_conversation(cid)
    assert conv is not None
    status, found, _ = await _call(
        service, "GET", API + "/lookup", params={"identity": f"webchat:{conv.identity}"}
    )
    assert status == 200, found
    assert found["id"] == conv.customer_id and found["known"] is False
    assert found["identities"] == [{"kind": "webchat", "value": conv.identity}]

    status, identified, _ = await _call(
        service,
        "POST",
        f"{API}/{found['id']}/identities",
        json={"kind": "email", "value": "Visitor@Example.com"},
    )
    assert status == 200, identified
    assert identified["known"] is True and identified["email"] == "visitor@example.com"
    status, again, _ = await _call(
        service, "GET", API + "/lookup", params={"identity": "email:visitor@example.com"}
    )
    assert status == 200 and again["id"] == conv.customer_id

    # Another customer cannot take that identity (merging is the way).
    _, other, _ = await _call(service, "POST", API, json={"name": "Other"})
    status, err, _ = await _call(
        service,
        "POST",
        f"{API}/{other['id']}/identities",
        json={"kind": "webchat", "value": conv.identity},
    )
    assert status == 409 and err["error"]["code"] == "identity_taken"


async def test_a_known_whatsapp_customer_is_linked_at_first_contact(service: Service) -> None:
    """A profile claiming a WhatsApp number owns the conversation that number starts."""
    _, made, _ = await _call(
        service,
        "POST",
        API,
        json={"name": "Wa", "identities": [{"kind": "whatsapp", "value": "+4915111122233"}]},
    )
    accepted = await service.store.accept(
        [
            NewEvent(
                type="customer.message",
                source="test",
                dedupe_key="wamid.1",
                channel="whatsapp",
                instance="whatsapp",
                endpoint="1234",
                identity="4915111122233",
                data={"text": "hi"},
            )
        ],
        service.app[CLOCK].now(),
    )
    conv = await service.store.load_conversation(accepted[0].conversation_id)
    assert conv is not None and conv.customer_id == made["id"]


_CUSTOMER_RULES = """
- name: greet-known-customer
  when:
    event: customer.message
    all:
      - customer.known: true
      - customer.profile.name: { exists: true }
  then:
    - send:
        to: customer
        text: "Hello {{ customer.profile.name }} ({{ customer.profile.tier }})"
- name: tell-identified
  when:
    event: customer.identified
    customer.known: true
  then:
    - send: { to: customer, text: "Identified as {{ customer.profile.email }}" }
"""


async def test_rules_see_identification_in_a_live_conversation(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", rules / "default.yaml")
    (rules / "customers.yaml").write_text(_CUSTOMER_RULES)
    service: Service = await make_service(clock=clock, rules_dir=rules)
    web = await service.customer()
    cid = await web.start_with_bot("hello")
    await web.say("anyone?")
    await service.settle()
    assert not any(t.startswith("Hello") for t in web.texts("controller"))

    conv = await service.store.load_conversation(cid)
    assert conv is not None
    path = f"{API}/{conv.customer_id}"
    _, _, headers = await _call(service, "GET", path)
    status, _, _ = await _call(
        service,
        "PATCH",
        path,
        json={"name": "Ada", "custom": {"tier": "gold"}},
        headers={**service.admin_headers(), "If-Match": headers["ETag"]},
    )
    assert status == 200
    status, _, _ = await _call(
        service, "POST", f"{path}/identities", json={"kind": "email", "value": "ada@example.com"}
    )
    assert status == 200
    told = await web.wait_message("controller", "Identified as")
    assert told["text"] == "Identified as ada@example.com"

    await web.say("I am back")
    greeted = await web.wait_message("controller", "Hello")
    assert greeted["text"] == "Hello Ada (gold)"
    decisions = await service.store.decisions(cid)
    facts = [
        d["facts"] for d in decisions if (d["facts"] or {})["event"].get("text") == "I am back"
    ]
    assert facts[0]["customer"]["known"] is True
    assert facts[0]["customer"]["profile"]["name"] == "Ada"


async def test_roles(service: Service) -> None:
    agent = {"Authorization": f"Bearer {service.settings.agent_token}"}
    crm = await _token(service, "crm", "the-crm")
    status, made, _ = await _call(service, "POST", API, headers=crm, json={"name": "Crm"})
    assert status == 201
    status, _, _ = await _call(service, "GET", f"{API}/{made['id']}", headers=agent)
    assert status == 200
    status, _, _ = await _call(service, "GET", API, headers=agent)
    assert status == 200
    status, err, _ = await _call(service, "POST", API, headers=agent, json={"name": "No"})
    assert status == 403 and err["error"]["code"] == "wrong_role"
    status, _, _ = await _call(
        service,
        "PATCH",
        f"{API}/{made['id']}",
        headers={**agent, "If-Match": "*"},
        json={"name": "No"},
    )
    assert status == 403
    status, _, _ = await _call(service, "DELETE", f"{API}/{made['id']}", headers=agent)
    assert status == 403

    web = await service.customer()
    cid = await web.start_with_bot()
    status, _, _ = await _call(service, "GET", f"/api/v1/conversations/{cid}", headers=crm)
    assert status == 403
    status, _, _ = await _call(service, "GET", f"/api/v1/conversations/{cid}/events", headers=crm)
    assert status == 403
    status, err, _ = await _call(service, "GET", API, headers={"X": "none"})
    assert status == 401 and err["error"]["code"] == "unauthorized"


async def test_idempotency_key_replays_and_refuses_another_body(service: Service) -> None:
    crm = await _token(service, "crm", "the-crm")
    key = {**crm, "Idempotency-Key": "create-1"}
    first = await _call(
        service, "POST", API, headers=key, json={"name": "Once", "external_id": "e1"}
    )
    assert first[0] == 201
    again = await _call(
        service, "POST", API, headers=key, json={"name": "Once", "external_id": "e1"}
    )
    assert again[0] == 201 and again[1] == first[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    _, listed, _ = await _call(service, "GET", API + "?external_id=e1")
    assert len(listed["customers"]) == 1

    status, err, _ = await _call(service, "POST", API, headers=key, json={"name": "Twice"})
    assert status == 422 and err["error"]["code"] == "idempotency_key_reused"

    # Scoped by principal: another principal may use the same key for its own request.
    status, _, _ = await _call(
        service,
        "POST",
        API,
        headers={**service.admin_headers(), "Idempotency-Key": "create-1"},
        json={"name": "Admin's"},
    )
    assert status == 201

    # The replay is the original answer even after the customer changed.
    path = f"{API}/{first[1]['id']}"
    status, _, _ = await _call(
        service, "PATCH", path, headers={**crm, "If-Match": first[2]["ETag"]}, json={"name": "New"}
    )
    assert status == 200
    replay = await _call(
        service, "POST", API, headers=key, json={"name": "Once", "external_id": "e1"}
    )
    assert replay[1]["name"] == "Once"

    attach = {**crm, "Idempotency-Key": "attach-1"}
    body = {"kind": "phone", "value": "+4915123456789"}
    one = await _call(service, "POST", f"{path}/identities", headers=attach, json=body)
    two = await _call(service, "POST", f"{path}/identities", headers=attach, json=body)
    assert one[0] == two[0] == 200 and one[1] == two[1]
