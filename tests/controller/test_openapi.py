"""The OpenAPI document of the JSON APIs: valid OpenAPI 3.1, served without a token, and
naming exactly the routes the service serves (so it cannot drift from the router), each
with the callers the security table names and the one error body.

Requests the service once answered with a 500 (found by test_openapi_fuzz.py, or while
writing the document) are kept at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from controller.api.common import has_bad_text
from controller.api.openapi import BODY_EXAMPLES, OPERATIONS, PATH, document, documented
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing_graph import FakeGraph
from tests.controller.test_security import ACCESS, PUBLIC


def _error_validator(doc: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Error", "components": doc["components"]}
    )


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    validate(doc)  # raises on the first problem
    assert doc["openapi"] == "3.1.0"
    operations = [(m, p) for p, item in doc["paths"].items() for m in item]
    assert len(operations) == len(OPERATIONS)


async def test_it_is_served_without_a_token(service: Service) -> None:
    assert service.http is not None
    async with service.http.get(service.base_url + PATH) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.json() == document()


def test_every_json_route_is_in_the_document_and_only_those(service: Service) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in service.app.router.routes()
        if route.resource is not None
        and documented(route.method, route.resource.canonical, route.handler.__module__)
    }
    in_document = {
        (method.upper(), path) for path, item in document()["paths"].items() for method in item
    }
    assert served - in_document == set(), "routes the document does not name"
    assert in_document - served == set(), "operations the service does not serve"
    # what is left out is what the module says it leaves out: pages, sockets, connectors
    left_out = {
        (route.method, route.resource.canonical, route.handler.__module__.partition(".")[0])
        for route in service.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    } - {(m, p, "controller") for m, p in served}
    assert left_out == {
        ("GET", "/desk", "controller"),
        ("GET", "/api/v1/agents/ws", "controller"),
        ("GET", "/webchat", "connectors"),
        ("POST", "/webchat/session", "connectors"),
        ("GET", "/webchat/ws", "connectors"),
    }


def test_each_operation_names_the_callers_of_the_security_table() -> None:
    for path, item in document()["paths"].items():
        for method, op in item.items():
            expected = ACCESS[(method.upper(), path)]
            roles = set(op["x-convctl-roles"]) or {PUBLIC}
            assert roles == expected, (method, path)
            assert bool(op["security"]) == (PUBLIC not in expected), (method, path)


def test_every_example_fits_its_schema() -> None:
    doc = document()
    checked = 0
    for item in doc["paths"].values():
        for op in item.values():
            media = op.get("requestBody", {}).get("content", {}).values()
            found = [(m["schema"], m["example"]) for m in media if "example" in m]
            found += [(p["schema"], p["example"]) for p in op["parameters"] if "example" in p]
            for schema, example in found:
                root = {**schema, "components": doc["components"]}
                jsonschema.Draft202012Validator(root).validate(example)
                checked += 1
    assert checked >= 20
    with_body = {(op.method, op.path) for op in OPERATIONS if op.body is not None}
    assert BODY_EXAMPLES.keys() - with_body == set(), "examples of operations without a body"


def test_bad_text_is_found_anywhere_in_a_body() -> None:
    assert not has_bad_text({"name": "Zoë", "list": ["ok", 1, None], "n": {"k": "v"}})
    assert has_bad_text({"deep": [{"k": "a\x00"}]})
    assert has_bad_text({"key\x00": 1})
    assert has_bad_text(json.loads('{"alone": "\\udb0c"}'))  # an unpaired surrogate
    assert not has_bad_text(json.loads('{"pair": "\\ud83d\\ude00"}'))  # one emoji


def test_every_refusal_has_the_one_error_body() -> None:
    doc = document()
    shared = doc["components"]["responses"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if int(status) < 400 or path == "/readyz":  # /readyz: 503 says why, as 200
                    continue
                ref = answer["$ref"].rpartition("/")[2]
                schema = shared[ref]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


async def test_the_error_body_is_what_the_service_writes(service: Service) -> None:
    assert service.http is not None
    validator = _error_validator(document())
    refusals = [
        ("GET", "/api/v1/rules", None, None),  # 401
        ("GET", "/api/v1/rules/nothing-here", service.admin_headers(), None),  # 404
        ("POST", "/api/v1/agents", service.admin_headers(), {"id": ""}),  # 422
        ("PUT", "/api/v1/rules", service.admin_headers(), None),  # 405 from the router
    ]
    for method, path, headers, body in refusals:
        async with service.http.request(
            method, service.base_url + path, headers=headers, json=body
        ) as r:
            assert r.status >= 400
            validator.validate(await r.json())


# requests that once answered 500 -----------------------------------------------------------------
LONG = "x" * 101
ONCE_500 = [
    # an offer or conversation id longer than the command models allow (pydantic raised)
    ("POST", f"/api/v1/offers/{LONG}/accept", "agent", None, 404),
    ("POST", f"/api/v1/offers/{LONG}/decline", "agent", None, 404),
    ("POST", f"/api/v1/conversations/{LONG}/messages", "agent", {"text": "hi"}, 404),
    ("POST", f"/api/v1/conversations/{LONG}/close", "agent", None, 404),
    ("POST", f"/api/v1/conversations/{LONG}/leave", "agent", None, 404),
    ("POST", f"/api/v1/conversations/{LONG}/wrap-up", "agent", {"disposition": "x"}, 404),
    ("POST", f"/api/v1/conversations/{LONG}/invite", "agent", {"agent": "bob"}, 404),
    ("POST", f"/api/v1/conversations/{LONG}/transfer", "agent", {"queue": "q"}, 404),
    # a page cursor past the store's 64-bit integers (SQLite raised OverflowError)
    ("GET", "/api/v1/apps/me/deliveries?cursor=4445629875480964678620962097390", "app", None, 422),
    # a delivery number past 64 bits, or of digits int() does not read
    ("GET", "/api/v1/apps/me/deliveries/ev_1:99999999999999999999999", "app", None, 404),
    ("GET", "/api/v1/apps/me/deliveries/ev_1:%C2%B2", "app", None, 404),
    ("GET", "/api/v1/apps/me/deliveries/ev_1:9999999999", "app", None, 404),  # 32-bit on PG
    # a NUL character, which PostgreSQL cannot store, in a body, a path or a query
    ("POST", "/api/v1/campaigns/opt-outs", "admin", {"customer_id": "a\x00b"}, 422),
    ("POST", "/api/v1/tokens", "admin", {"role": "crm", "subject": "a\x00b"}, 422),
    ("POST", "/api/v1/customers", "admin", {"name": "Ada", "custom": {"a": "\x00"}}, 422),
    ("GET", "/api/v1/customers/a%00b", "admin", None, 400),
    ("GET", "/api/v1/customers?name=a%00b", "admin", None, 400),
    ("GET", "/api/v1/apps/a%00b", "admin", None, 400),
]


@pytest.mark.parametrize(
    ("method", "path", "role", "body", "status"),
    ONCE_500,
    ids=[f"{m} {p[:60]}" for m, p, *_ in ONCE_500],
)
async def test_requests_that_once_failed_are_refused(
    service: Service, method: str, path: str, role: str, body: Any, status: int
) -> None:
    assert service.http is not None
    tokens = {"admin": str(service.settings.admin_token)}
    if role == "agent":
        tokens["agent"] = (await service.agent("alice")).token
    if role == "app":
        async with service.http.post(
            service.base_url + "/api/v1/apps",
            json={"name": "fuzzed", "scopes": ["events:subscribe"]},
            headers=service.admin_headers(),
        ) as r:
            tokens["app"] = (await r.json())["token"]
    async with service.http.request(
        method,
        service.base_url + path,
        headers={"Authorization": f"Bearer {tokens[role]}"},
        json=body,
    ) as r:
        answer = await r.json()
        assert r.status == status, answer
        _error_validator(document()).validate(answer)


async def test_a_second_customer_with_a_taken_external_id_is_a_conflict(service: Service) -> None:
    """The customers table's unique index refused the insert before the identity check ran
    (found by fuzzing with every role: the CRM repeated the admin's create)."""
    assert service.http is not None
    url, headers = service.base_url + "/api/v1/customers", service.admin_headers()
    answers = []
    for external_id in ("crm-1", " crm-1 "):  # the second one names the same id, untrimmed
        async with service.http.post(url, json={"external_id": external_id}, headers=headers) as r:
            answers.append((r.status, await r.json()))
    assert answers[0][0] == 201, answers
    assert answers[1][0] == 409 and answers[1][1]["error"]["code"] == "identity_taken", answers


async def test_a_recipients_cursor_past_the_positions_is_refused(
    make_service: Callable[..., Any],
) -> None:
    """Recipient positions are 32-bit integers in PostgreSQL (asyncpg raised a DataError)."""
    graph = await FakeGraph(tokens={"1065": "t"}).start()
    try:
        whatsapp = {
            "graph_base_url": graph.base_url,
            "graph_api_version": graph.version,
            "app_secret": "s",
            "verify_token": "v",
            "endpoints": [{"phone_number_id": "1065", "access_token": "t"}],
        }
        service: Service = await make_service(
            connectors=[ConnectorInstance(name="whatsapp", type="whatsapp", settings=whatsapp)]
        )
        assert service.http is not None
        headers, base = service.admin_headers(), service.base_url + "/api/v1"
        async with service.http.post(f"{base}/customers", json={}, headers=headers) as r:
            customer = await r.json()
        campaign = {
            "name": "later",
            "channel": "whatsapp",
            "endpoint": "1065",
            "template": {"name": "hello"},
            "audience": {"customer_ids": [customer["id"]]},
            "rate": 1,
            "window": {"starts_at": "2999-01-01T00:00:00+00:00"},
        }
        async with service.http.post(f"{base}/campaigns", json=campaign, headers=headers) as r:
            assert r.status == 201, await r.text()
            campaign_id = (await r.json())["id"]
        for cursor, status in (("18018759532", 422), ("%C2%B2", 422), ("0", 200)):
            url = f"{base}/campaigns/{campaign_id}/recipients?cursor={cursor}"
            async with service.http.get(url, headers=headers) as r:
                assert r.status == status, (cursor, await r.text())
    finally:
        await graph.stop()
