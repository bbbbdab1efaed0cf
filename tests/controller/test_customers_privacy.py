"""The Customer API's merge, erasure and export."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.clock import ManualClock
from controller.keys import CLOCK
from controller.models import NewEvent
from controller.testing import RULES_DIR, Service, free_port

API = "/api/v1/customers"

_MERGE_RULES = """
- name: tell-merged
  when:
    event: customer.merged
  then:
    - send:
        to: customer
        text: "Merged: {{ customer.profile.name }} <{{ customer.profile.email }}>"
"""


async def _call(
    service: Service, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    assert service.http is not None
    async with service.http.request(
        method,
        service.base_url + path,
        headers=headers or service.admin_headers(),
        allow_redirects=False,
        **kw,
    ) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body, r.headers


async def _whatsapp_message(service: Service, number: str, text: str, key: str) -> str:
    accepted = await service.store.accept(
        [
            NewEvent(
                type="customer.message",
                source="test",
                dedupe_key=key,
                channel="whatsapp",
                instance="whatsapp",
                endpoint="1234",
                identity=number,
                data={"text": text},
            )
        ],
        service.app[CLOCK].now(),
    )
    return accepted[0].conversation_id


async def test_merge_with_conversations_on_both_sides(
    make_service: Callable[..., Any], tmp_path: Path, clock: ManualClock
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES_DIR / "default.yaml", rules / "default.yaml")
    (rules / "merge.yaml").write_text(_MERGE_RULES)
    service: Service = await make_service(clock=clock, rules_dir=rules)

    # An anonymous web chat visitor, named by an agent ...
    web = await service.customer()
    web_cid = await web.start_with_bot("hello")
    web_conv = await service.store.load_conversation(web_cid)
    assert web_conv is not None
    visitor = web_conv.customer_id
    _, _, headers = await _call(service, "GET", f"{API}/{visitor}")
    status, _, _ = await _call(
        service,
        "PATCH",
        f"{API}/{visitor}",
        json={"name": "Ada", "custom": {"tier": "gold"}},
        headers={**service.admin_headers(), "If-Match": headers["ETag"]},
    )
    assert status == 200
    # ... and a CRM profile with a WhatsApp number that wrote too.
    _, crm, _ = await _call(
        service,
        "POST",
        API,
        json={
            "email": "ada@example.com",
            "custom": {"tier": "silver", "orders": 3},
            "identities": [{"kind": "whatsapp", "value": "+4915111122233"}],
        },
    )
    wa_cid = await _whatsapp_message(service, "4915111122233", "hi there", "wamid.m1")
    await service.settle()

    status, merged, headers = await _call(
        service, "POST", f"{API}/{visitor}/merge", json={"from": crm["id"]}
    )
    assert status == 200, merged
    assert merged["merge"]["from"] == crm["id"] and merged["merge"]["into"] == visitor
    assert merged["merge"]["conversations"] == 1 and merged["merge"]["identities"] == 2
    survivor = merged["customer"]
    assert survivor["name"] == "Ada" and survivor["email"] == "ada@example.com"
    assert survivor["known"] is True
    assert survivor["custom"] == {"tier": "gold", "orders": 3}  # the survivor's value wins
    kinds = {(i["kind"], i["value"]) for i in survivor["identities"]}
    assert ("whatsapp", "+4915111122233") in kinds and ("email", "ada@example.com") in kinds
    assert headers["ETag"] == f'"{survivor["version"]}"'

    # Both conversations belong to the survivor and still run on their own identity.
    wa_conv = await service.store.load_conversation(wa_cid)
    assert wa_conv is not None and wa_conv.customer_id == visitor
    assert wa_conv.identity == "4915111122233" and wa_conv.channel == "whatsapp"
    web_after = await service.store.load_conversation(web_cid)
    assert web_after is not None and web_after.customer_id == visitor
    assert web_after.identity == web_conv.identity

    # The merged-away profile is a tombstone pointing to the survivor.
    status, gone, headers = await _call(service, "GET", f"{API}/{crm['id']}")
    assert status == 308 and gone["merged_into"] == visitor
    assert headers["Location"] == f"{API}/{visitor}"
    status, found, _ = await _call(
        service, "GET", f"{API}/lookup", params={"identity": "whatsapp:+4915111122233"}
    )
    assert status == 200 and found["id"] == visitor

    # Rules of both open conversations hear of it and see the merged profile.
    told = await web.wait_message("controller", "Merged:")
    assert told["text"] == "Merged: Ada <ada@example.com>"
    await service.settle()
    for cid in (web_cid, wa_cid):
        events = [e for e, _ in await service.store.events(cid) if e.type == "customer.merged"]
        assert len(events) == 1 and events[0].data["merged_from"] == crm["id"]
        decided = [d for d in await service.store.decisions(cid) if d["event_id"] == events[0].id]
        facts = decided[0]["facts"]["customer"]
        assert facts["known"] is True
        assert facts["profile"]["name"] == "Ada"
        assert facts["profile"]["email"] == "ada@example.com"

    # Idempotent: the same merge again changes nothing and answers the same.
    status, again, headers = await _call(
        service, "POST", f"{API}/{visitor}/merge", json={"from": crm["id"]}
    )
    assert status == 200 and again == merged and headers["Idempotent-Replayed"] == "true"
    await service.settle()
    for cid in (web_cid, wa_cid):
        events = [e for e, _ in await service.store.events(cid) if e.type == "customer.merged"]
        assert len(events) == 1

    # A customer merged elsewhere, or into itself, is refused.
    _, other, _ = await _call(service, "POST", API, json={"name": "Other"})
    status, err, _ = await _call(
        service, "POST", f"{API}/{other['id']}/merge", json={"from": crm["id"]}
    )
    assert status == 409 and err["error"]["code"] == "already_merged"
    status, err, _ = await _call(
        service, "POST", f"{API}/{other['id']}/merge", json={"from": other["id"]}
    )
    assert status == 422 and err["error"]["code"] == "merge_self"

    # The next message on WhatsApp still goes to the same number's conversation.
    again_cid = await _whatsapp_message(service, "4915111122233", "still me", "wamid.m2")
    assert again_cid == wa_cid


async def _stored_bytes(service: Service) -> bytes:
    """Everything the database holds: the SQLite file and its WAL, or on PostgreSQL every
    row of every table of the service's schema as text."""
    settings = service.settings
    if not settings.database_url:
        db = Path(settings.database_path)
        return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        schema = settings.database_schema
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        parts = [
            await conn.fetchval(f'SELECT string_agg(t::text, chr(10)) FROM "{schema}"."{r[0]}" t')
            for r in tables
        ]
    finally:
        await conn.close()
    return "\n".join(p or "" for p in parts).encode()


async def test_erase_leaves_nothing_personal_in_the_database(service: Service) -> None:
    # an app hears profile changes, but its webhook is down: the notifications wait
    status, app, _ = await _call(
        service,
        "POST",
        "/api/v1/apps",
        json={
            "name": "crm-down",
            "scopes": ["events:subscribe", "customers:read"],
            "webhook_url": f"http://127.0.0.1:{free_port()}/down",
        },
    )
    assert status == 201, app
    status, _, _ = await _call(
        service,
        "POST",
        f"/api/v1/apps/{app['id']}/subscriptions",
        json={"event_types": ["profile.updated", "profile.identified"]},
    )
    assert status == 201
    web = await service.customer()
    cid = await web.start_with_bot("hello")
    await web.say("my secret word is Zanzibar-4711")
    conv = await service.store.load_conversation(cid)
    assert conv is not None
    path = f"{API}/{conv.customer_id}"
    _, _, headers = await _call(service, "GET", path)
    status, _, _ = await _call(
        service,
        "PATCH",
        path,
        json={
            "name": "Adelheid Quarkmann",
            "email": "adelheid.q@example.com",
            "phone": "+4915123450001",
            "custom": {"note": "Lives at Birkenweg 17"},
        },
        headers={**service.admin_headers(), "If-Match": headers["ETag"]},
    )
    assert status == 200
    status, _, _ = await _call(
        service, "POST", f"{path}/identities", json={"kind": "whatsapp", "value": "+4915123450001"}
    )
    assert status == 200
    await web.say("I am Adelheid Quarkmann")
    wa_cid = await _whatsapp_message(service, "4915123450001", "Quixotic-998 here", "wamid.e1")
    await service.settle()
    wa_conv = await service.store.load_conversation(wa_cid)
    assert wa_conv is not None and wa_conv.customer_id == conv.customer_id

    secrets = [
        "Adelheid Quarkmann",
        "adelheid.q@example.com",
        "+4915123450001",
        "4915123450001",
        "Birkenweg 17",
        "Zanzibar-4711",
        "Quixotic-998",
    ]

    async def found() -> set[str]:
        data = await _stored_bytes(service)
        return {s for s in secrets if s.encode() in data}

    assert "Zanzibar-4711" in await found()  # the search does see stored values
    notices = [
        r for r in await service.store.outbox_rows() if r["conversation_id"] == conv.customer_id
    ]
    assert "Birkenweg 17" in str([r["payload"] for r in notices])  # held for the app
    counts = {t: await service.store.count(t) for t in ("messages", "events", "decisions")}
    transcript = await service.store.messages(cid, include_agent_only=True)

    crm_token = await _token(service, "crm")
    status, _, _ = await _call(service, "DELETE", f"{path}?erase=true", headers=crm_token)
    assert status == 403  # erasure is for admins
    status, _, _ = await _call(service, "DELETE", f"{path}?erase=true")
    assert status == 204

    assert await found() == set()
    # Aggregates stay: the same rows, the same states, the same senders.
    assert counts == {t: await service.store.count(t) for t in ("messages", "events", "decisions")}
    after = await service.store.messages(cid, include_agent_only=True)
    assert [m.sender_role for m in after] == [m.sender_role for m in transcript]
    assert {m.text for m in after} == {"[erased]"}
    status, _, _ = await _call(service, "GET", path)
    assert status == 404
    status, _, _ = await _call(
        service, "GET", f"{API}/lookup", params={"identity": "whatsapp:+4915123450001"}
    )
    assert status == 404
    status, _, _ = await _call(service, "DELETE", f"{path}?erase=true")
    assert status == 404


async def test_export_holds_profile_identities_and_transcripts(service: Service) -> None:
    web = await service.customer()
    cid = await web.start_with_bot("hello")
    await web.say("where is my order?")
    await service.settle()
    conv = await service.store.load_conversation(cid)
    assert conv is not None
    status, _, _ = await _call(
        service,
        "POST",
        f"{API}/{conv.customer_id}/identities",
        json={"kind": "email", "value": "exp@example.com"},
    )
    assert status == 200
    status, data, _ = await _call(service, "GET", f"{API}/{conv.customer_id}/export")
    assert status == 200, data
    assert data["customer"]["email"] == "exp@example.com"
    assert {"kind": "email", "value": "exp@example.com"} in data["customer"]["identities"]
    assert [c["id"] for c in data["conversations"]] == [cid]
    texts = [m["text"] for m in data["conversations"][0]["transcript"]]
    assert "hello" in texts and "where is my order?" in texts
    assert data["conversations"][0]["channel"] == "webchat"

    crm_token = await _token(service, "crm")
    status, _, _ = await _call(
        service, "GET", f"{API}/{conv.customer_id}/export", headers=crm_token
    )
    assert status == 403
    status, _, _ = await _call(service, "GET", f"{API}/cu_nobody/export")
    assert status == 404


async def _token(service: Service, role: str) -> dict[str, str]:
    status, body, _ = await _call(
        service, "POST", "/api/v1/tokens", json={"role": role, "subject": f"the-{role}"}
    )
    assert status == 201, body
    return {"Authorization": f"Bearer {body['token']}"}


_BULK = b"""{"external_id": "crm-1", "name": "One", "email": "one@example.com"}
{"external_id": "crm-2", "name": "Two", "phone": "+4915123450002", "custom": {"tier": "gold"}}

not json
{"external_id": "crm-3", "email": "no-at-sign"}
{"name": "no external id"}
{"external_id": "crm-4", "email": "one@example.com"}
{"external_id": "crm-5", "name": "Five", "unknown": 1}
{"external_id": "crm-1", "language": "de"}
"""


async def test_bulk_upsert_reports_lines_and_is_idempotent(service: Service) -> None:
    async def send(body: bytes, **headers: str) -> tuple[int, Any]:
        status, report, _ = await _call(
            service,
            "POST",
            f"{API}/bulk",
            data=body,
            headers={**service.admin_headers(), "Content-Type": "application/x-ndjson", **headers},
        )
        return status, report

    status, first = await send(_BULK)
    assert status == 200, first
    assert (first["lines"], first["created"], first["updated"], first["failed"]) == (8, 2, 1, 5)
    assert [(f["line"], f["code"]) for f in first["failures"]] == [
        (4, "malformed_json"),
        (5, "invalid_email"),
        (6, "invalid_line"),
        (7, "identity_taken"),  # nothing of that line is applied
        (8, "invalid_line"),
    ]
    _, one, _ = await _call(service, "GET", f"{API}?external_id=crm-1")
    assert one["customers"][0]["language"] == "de"
    assert one["customers"][0]["email"] == "one@example.com"
    _, none, _ = await _call(service, "GET", f"{API}?external_id=crm-4")
    assert none["customers"] == []
    status, two, _ = await _call(
        service, "GET", f"{API}/lookup", params={"identity": "phone:+4915123450002"}
    )
    assert status == 200 and two["external_id"] == "crm-2" and two["custom"] == {"tier": "gold"}

    # The same file again changes nothing.
    status, again = await send(_BULK)
    assert status == 200
    assert (again["created"], again["updated"], again["unchanged"], again["failed"]) == (0, 0, 3, 5)
    _, after, _ = await _call(service, "GET", f"{API}/{two['id']}")
    assert after["version"] == two["version"]

    # Larger than the app's body limit: streamed, so accepted.
    many = b"".join(
        b'{"external_id": "bulk-%d", "name": "Person %d", "custom": {"n": %d}}\n' % (n, n, n)
        for n in range(2000)
    )
    assert len(many) > service.settings.max_body_bytes
    status, big = await send(many)
    assert status == 200 and big["created"] == 2000 and big["failed"] == 0

    status, _ = await send(_BULK, **{"Content-Type": "application/json"})
    assert status == 415
    agent = {"Authorization": f"Bearer {service.settings.agent_token}"}
    status, _, _ = await _call(
        service,
        "POST",
        f"{API}/bulk",
        data=_BULK,
        headers={**agent, "Content-Type": "application/x-ndjson"},
    )
    assert status == 403
