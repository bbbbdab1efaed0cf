"""CRM sync through the Customer API: the streamed export of all profiles, the custom field
schema, and bulk upserts racing API updates of the same customers."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from controller.clock import ManualClock
from controller.testing import Service
from tests.controller.test_app_webhooks import Receiver, receiver
from tests.controller.test_customers_notifications import bulk, call, crm_app

__all__ = ["receiver"]

API = "/api/v1/customers"
EXPORT_PROFILES = 3000


async def export(svc: Service, query: str = "") -> tuple[list[dict[str, Any]], Any]:
    assert svc.http is not None
    async with svc.http.get(f"{svc.base_url}{API}/export{query}", headers=svc.admin_headers()) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.content]
        return lines, r.headers


# the streamed export ------------------------------------------------------------------------
async def test_export_streams_every_profile_exactly_once(
    service: Service, clock: ManualClock
) -> None:
    lines = [
        {"external_id": f"crm-{i}", "name": f"P{i}", "email": f"p{i}@example.com"}
        for i in range(EXPORT_PROFILES)
    ]
    assert (await bulk(service, lines))["created"] == EXPORT_PROFILES
    web = await service.customer()
    await web.start_with_bot()  # one anonymous customer too
    await service.settle()

    got, headers = await export(service)
    assert headers["Transfer-Encoding"] == "chunked"  # streamed, not one body
    assert headers["Convctl-Export-Started-At"] == clock.now().isoformat()
    ids = [c["id"] for c in got]
    assert len(ids) == len(set(ids)) == EXPORT_PROFILES + 1
    assert ids == sorted(ids)
    assert {c["external_id"] for c in got} == {line["external_id"] for line in lines} | {None}
    assert all({"kind": "email", "value": c["email"]} in c["identities"] for c in got if c["email"])

    anonymous, _ = await export(service, "?known=false")
    assert [c["known"] for c in anonymous] == [False]
    assert len((await export(service, "?known=true"))[0]) == EXPORT_PROFILES

    # an incremental sync: only what changed since the last export started
    clock.advance(60)
    since = clock.now().isoformat()
    changed = [{"external_id": f"crm-{i}", "name": f"Changed {i}"} for i in (5, 500, 2999)]
    assert (await bulk(service, changed))["updated"] == 3
    recent, _ = await export(service, "?updated_since=" + since.replace("+", "%2B"))
    assert sorted(c["name"] for c in recent) == ["Changed 2999", "Changed 5", "Changed 500"]
    naive = (clock.now() - timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    assert len((await export(service, f"?updated_since={naive}"))[0]) == 3  # read as UTC
    status, err, _ = await call(service, "GET", f"{API}/export?updated_since=yesterday")
    assert status == 422 and err["error"]["code"] == "invalid_query"
    status, err, _ = await call(service, "GET", f"{API}/export?known=maybe")
    assert status == 422


async def test_export_while_profiles_change_sends_each_once(service: Service) -> None:
    lines = [{"external_id": f"crm-{i}", "name": f"P{i}"} for i in range(EXPORT_PROFILES)]
    await bulk(service, lines)
    assert service.http is not None
    async with service.http.get(
        f"{service.base_url}{API}/export", headers=service.admin_headers()
    ) as r:
        first = [json.loads(await r.content.readline())]
        # while the export runs: changes of profiles on both sides of the cursor, new ones
        await bulk(
            service, [{"external_id": f"crm-{i}", "name": "Moved"} for i in range(0, 3000, 7)]
        )
        await bulk(service, [{"external_id": f"new-{i}", "name": "New"} for i in range(50)])
        rest = [json.loads(line) async for line in r.content]
    ids = [c["id"] for c in first + rest]
    assert len(ids) == len(set(ids))  # nobody twice
    assert {c["external_id"] for c in first + rest} >= {line["external_id"] for line in lines}


# the custom field schema --------------------------------------------------------------------
SCHEMA = {
    "fields": [
        {"name": "tier", "type": "enum", "values": ["gold", "silver"], "required": True},
        {"name": "orders", "type": "integer"},
        {"name": "balance", "type": "number"},
        {"name": "vip", "type": "boolean"},
        {"name": "birthday", "type": "date"},
        {"name": "note", "type": "string", "max_length": 10},
    ]
}


async def test_schema_is_versioned_and_checks_writes(service: Service) -> None:
    status, none, headers = await call(service, "GET", f"{API}/schema")
    assert status == 200 and none["version"] == 0 and none["allow_unknown"] is True
    # without a schema any scalar goes
    status, _, _ = await call(service, "POST", API, {"custom": {"anything": 1.5}})
    assert status == 201

    status, saved, headers = await call(
        service, "PUT", f"{API}/schema", SCHEMA, {"If-Match": '"0"'}
    )
    assert status == 200, saved
    assert saved["version"] == 1 and headers["ETag"] == '"1"'
    assert saved["fields"][0] == {
        "name": "tier",
        "type": "enum",
        "values": ["gold", "silver"],
        "required": True,
    }
    status, same, _ = await call(service, "PUT", f"{API}/schema", SCHEMA)
    assert status == 200 and same["version"] == 1  # the same schema is no new version
    status, err, _ = await call(
        service, "PUT", f"{API}/schema", SCHEMA | {"allow_unknown": True}, {"If-Match": '"0"'}
    )
    assert status == 412
    for bad in (
        {"fields": [{"name": "x", "type": "enum"}]},  # an enum without values
        {"fields": [{"name": "x", "type": "integer", "max_length": 3}]},
        {"fields": [{"name": "x", "type": "string"}, {"name": "x", "type": "date"}]},
        {"fields": [{"name": "Bad Name", "type": "string"}]},
        {"fields": [{"name": "x", "type": "money"}]},
    ):
        status, err, _ = await call(service, "PUT", f"{API}/schema", bad)
        assert status == 422, (bad, err)

    good = {
        "tier": "gold",
        "orders": 3,
        "balance": 2.5,
        "vip": True,
        "birthday": "1990-04-01",
        "note": "short",
    }
    status, made, headers = await call(service, "POST", API, {"custom": good})
    assert status == 201, made
    for custom, field in (
        ({"tier": "bronze"}, "tier"),
        ({"tier": "gold", "orders": 1.5}, "orders"),
        ({"tier": "gold", "orders": True}, "orders"),
        ({"tier": "gold", "balance": "1"}, "balance"),
        ({"tier": "gold", "vip": 1}, "vip"),
        ({"tier": "gold", "birthday": "01.04.1990"}, "birthday"),
        ({"tier": "gold", "note": "far too long"}, "note"),
        ({"tier": "gold", "other": 1}, "other"),
        ({"orders": 1}, "tier"),  # required
    ):
        status, err, _ = await call(service, "POST", API, {"custom": custom})
        assert status == 422 and err["error"]["code"] == "invalid_custom", (custom, err)
        assert err["error"]["field"] == field, (custom, err)
    path, etag = f"{API}/{made['id']}", headers["ETag"]
    status, err, _ = await call(
        service, "PATCH", path, {"custom": {"tier": None}}, {"If-Match": etag}
    )
    assert status == 422 and err["error"]["field"] == "tier"
    status, ok, _ = await call(
        service, "PATCH", path, {"custom": {"note": None, "orders": 4}}, {"If-Match": etag}
    )
    assert status == 200 and ok["custom"]["orders"] == 4 and "note" not in ok["custom"]

    report = await bulk(
        service,
        [
            {"external_id": "b1", "custom": {"tier": "silver"}},
            {"external_id": "b2", "custom": {"orders": 2}},  # new without the required tier
            {"external_id": "b3", "custom": {"tier": "gold", "vip": "yes"}},
            {"external_id": "b1", "custom": {"orders": 7}},  # an update needs no tier
        ],
    )
    assert (report["created"], report["updated"], report["failed"]) == (1, 1, 2)
    assert [(f["line"], f["code"]) for f in report["failures"]] == [
        (2, "invalid_custom"),
        (3, "invalid_custom"),
    ]
    assert "tier" in report["failures"][0]["message"] and "vip" in report["failures"][1]["message"]

    # a new version, and the old one is still there
    status, v2, _ = await call(
        service, "PUT", f"{API}/schema", {"fields": [], "allow_unknown": True}, {"If-Match": '"1"'}
    )
    assert status == 200 and v2["version"] == 2
    status, v1, _ = await call(service, "GET", f"{API}/schema?version=1")
    assert status == 200 and v1["fields"] == saved["fields"]
    status, _, _ = await call(service, "GET", f"{API}/schema?version=9")
    assert status == 404
    status, _, _ = await call(service, "POST", API, {"custom": {"tier": "anything"}})
    assert status == 201  # version 2 allows what it does not declare


# bulk upserts racing API updates -----------------------------------------------------------
RACE = 150


async def test_bulk_upsert_concurrent_with_patches_loses_nothing(
    service: Service, receiver: Receiver
) -> None:
    await crm_app(service, receiver, ["profile.created", "profile.updated"])
    base = [{"external_id": f"crm-{i}", "name": f"P{i}"} for i in range(RACE)]
    assert (await bulk(service, base))["created"] == RACE
    status, page, _ = await call(service, "GET", f"{API}?limit=200")
    ids = {c["external_id"]: c["id"] for c in page["customers"]}

    async def patch_until_applied(i: int) -> int:
        """PATCH with the ETag just read; on 412 read again (someone else wrote first)."""
        path = f"{API}/{ids[f'crm-{i}']}"
        for attempt in range(50):
            _, _, headers = await call(service, "GET", path)
            status, body, _ = await call(
                service, "PATCH", path, {"custom": {"p": i}}, {"If-Match": headers["ETag"]}
            )
            if status == 200:
                return attempt
            assert status == 412, body
        raise AssertionError("never applied")

    lines = [
        {"external_id": f"crm-{i}", "name": f"Bulk {i}", "custom": {"b": i}} for i in range(RACE)
    ]
    report, *_ = await asyncio.gather(
        bulk(service, lines), *(patch_until_applied(i) for i in range(RACE))
    )
    # every line applied or reported: here all applied (PATCHes touch no identity)
    assert report["lines"] == RACE and report["failed"] == 0
    assert report["updated"] + report["unchanged"] == RACE and report["updated"] == RACE

    await service.settle()
    delivered: dict[str, set[int]] = {}
    for d in receiver.deliveries:
        delivered.setdefault(d.body["customer_id"], set()).add(d.body["version"])
    for i in range(RACE):
        status, c, headers = await call(service, "GET", f"{API}/{ids[f'crm-{i}']}")
        assert status == 200
        # both writes are there: no lost update
        assert c["name"] == f"Bulk {i}" and c["custom"] == {"b": i, "p": i}, c
        # created, the bulk line and the PATCH: three versions, the ETag is the last
        assert c["version"] == 3 and headers["ETag"] == '"3"'
        assert delivered[c["id"]] == {1, 2, 3}  # one notification per version


async def test_the_same_file_twice_changes_nothing(service: Service, receiver: Receiver) -> None:
    await crm_app(service, receiver, ["profile.created", "profile.updated"])
    lines = [
        {"external_id": f"crm-{i}", "name": f"P{i}", "phone": f"+49151{i:08d}", "custom": {"n": i}}
        for i in range(500)
    ]
    first = await bulk(service, lines)
    assert first["created"] == 500 and first["failed"] == 0
    await service.settle()
    before, _ = await export(service)
    second = await bulk(service, lines)
    assert (second["unchanged"], second["created"], second["updated"]) == (500, 0, 0)
    await service.settle()
    after, _ = await export(service)
    assert after == before  # the same versions and timestamps
    assert len(receiver.deliveries) == 500
