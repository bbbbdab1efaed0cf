"""Who may call what: every route of the service against every kind of caller, and no secret
in the logs.

The table below names, for each route, the roles whose token the route accepts (``public``:
no token at all). A route missing from the table fails the test, so a new route must say who
may call it. For each route and caller: no token or an unknown token is a 401; a token of a
role the route does not accept is a 403 that says so (``wrong_role``, ``not_an_app``,
``missing_scope``); a token it accepts passes the authentication (whatever the route then
answers: 404 for an unknown id, 422 for a bad body, 403 ``not_a_participant``…).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from controller.apps import SCOPES
from controller.testing import Service

ADMIN, AGENT, CRM, APP = "admin", "agent", "crm", "app"
PUBLIC = "public"
# apps act on customers as a crm token would, with customers:read / customers:write
READERS = {ADMIN, CRM, AGENT, APP}
WRITERS = {ADMIN, CRM, APP}
CONV = "/api/v1/conversations/{conversation_id}"
APPS_ME = "/api/v1/apps/me"
APP_ADMIN = "/api/v1/apps/{app_id}"
CAMPAIGNS = "/api/v1/campaigns"

ACCESS: dict[tuple[str, str], set[str]] = {
    ("GET", "/"): {PUBLIC},
    ("GET", "/healthz"): {PUBLIC},
    ("GET", "/readyz"): {PUBLIC},
    ("GET", "/metrics"): {PUBLIC},
    ("GET", "/api/v1/openapi.json"): {PUBLIC},  # the OpenAPI document of the JSON APIs
    ("GET", "/desk"): {PUBLIC},  # the page; it signs in with an agent token itself
    ("GET", "/webchat"): {PUBLIC},
    ("POST", "/webchat/session"): {PUBLIC},  # gives a visitor its signed session token
    ("GET", "/webchat/ws"): {"visitor"},  # the signed session token, tested elsewhere
    # agents
    ("GET", "/api/v1/agents/me"): {AGENT},
    ("PUT", "/api/v1/agents/me/presence"): {AGENT},
    ("GET", "/api/v1/agents/ws"): {AGENT},
    ("POST", "/api/v1/offers/{offer_id}/accept"): {AGENT},
    ("POST", "/api/v1/offers/{offer_id}/decline"): {AGENT},
    ("POST", "/api/v1/conversations"): {AGENT},
    ("POST", CONV + "/messages"): {AGENT},
    ("POST", CONV + "/leave"): {AGENT},
    ("POST", CONV + "/wrap-up"): {AGENT},
    ("POST", CONV + "/transfer"): {AGENT},
    ("POST", CONV + "/invite"): {AGENT},
    ("POST", CONV + "/close"): {AGENT},
    # conversations
    ("GET", CONV): {ADMIN, AGENT, APP},
    ("GET", CONV + "/messages"): {ADMIN, AGENT, APP},
    ("GET", CONV + "/events"): {ADMIN},
    ("GET", CONV + "/events/{event_id}/explain"): {ADMIN},
    # administration and rules
    ("POST", "/api/v1/agents"): {ADMIN},
    ("POST", "/api/v1/tokens"): {ADMIN},
    ("GET", "/api/v1/rules"): {ADMIN},
    ("POST", "/api/v1/rules/reload"): {ADMIN},
    ("GET", "/api/v1/rules/versions"): {ADMIN},
    ("POST", "/api/v1/rules/rollback"): {ADMIN},
    # customers
    ("POST", "/api/v1/customers"): WRITERS,
    ("GET", "/api/v1/customers"): READERS,
    ("GET", "/api/v1/customers/lookup"): READERS,
    ("GET", "/api/v1/customers/export"): {ADMIN, CRM, APP},
    ("GET", "/api/v1/customers/schema"): READERS,
    ("PUT", "/api/v1/customers/schema"): {ADMIN},
    ("POST", "/api/v1/customers/bulk"): WRITERS,
    ("GET", "/api/v1/customers/{customer_id}"): READERS,
    ("PATCH", "/api/v1/customers/{customer_id}"): WRITERS,
    ("DELETE", "/api/v1/customers/{customer_id}"): WRITERS,
    ("POST", "/api/v1/customers/{customer_id}/identities"): WRITERS,
    ("POST", "/api/v1/customers/{customer_id}/merge"): WRITERS,
    ("GET", "/api/v1/customers/{customer_id}/export"): {ADMIN},
    # the app registry (admin) and the apps' own routes
    ("POST", "/api/v1/apps"): {ADMIN},
    ("GET", "/api/v1/apps"): {ADMIN},
    ("GET", APP_ADMIN): {ADMIN},
    ("PATCH", APP_ADMIN): {ADMIN},
    ("DELETE", APP_ADMIN): {ADMIN},
    ("POST", APP_ADMIN + "/token"): {ADMIN},
    ("POST", APP_ADMIN + "/secret"): {ADMIN},
    ("GET", APP_ADMIN + "/subscriptions"): {ADMIN},
    ("POST", APP_ADMIN + "/subscriptions"): {ADMIN},
    ("DELETE", APP_ADMIN + "/subscriptions/{subscription_id}"): {ADMIN},
    ("GET", APP_ADMIN + "/deliveries"): {ADMIN},
    ("GET", APP_ADMIN + "/deliveries/{delivery_id}"): {ADMIN},
    ("POST", APP_ADMIN + "/deliveries/{delivery_id}/replay"): {ADMIN},
    ("GET", APPS_ME): {APP},
    ("GET", APPS_ME + "/subscriptions"): {APP},
    ("POST", APPS_ME + "/subscriptions"): {APP},
    ("DELETE", APPS_ME + "/subscriptions/{subscription_id}"): {APP},
    ("GET", APPS_ME + "/deliveries"): {APP},
    ("GET", APPS_ME + "/deliveries/{delivery_id}"): {APP},
    ("POST", APPS_ME + "/deliveries/{delivery_id}/replay"): {APP},
    ("POST", APPS_ME + "/conversations/{conversation_id}/join"): {APP},
    ("POST", APPS_ME + "/conversations/{conversation_id}/leave"): {APP},
    ("POST", APPS_ME + "/conversations/{conversation_id}/messages"): {APP},
    ("PUT", APPS_ME + "/conversations/{conversation_id}/attributes"): {APP},
    ("POST", APPS_ME + "/conversations/{conversation_id}/events"): {APP},
    # outbound campaigns: an admin, or an app with campaigns:run
    ("POST", CAMPAIGNS): {ADMIN, APP},
    ("GET", CAMPAIGNS): {ADMIN, APP},
    ("GET", CAMPAIGNS + "/{campaign_id}"): {ADMIN, APP},
    ("GET", CAMPAIGNS + "/{campaign_id}/recipients"): {ADMIN, APP},
    ("POST", CAMPAIGNS + "/{campaign_id}/pause"): {ADMIN, APP},
    ("POST", CAMPAIGNS + "/{campaign_id}/resume"): {ADMIN, APP},
    ("POST", CAMPAIGNS + "/{campaign_id}/cancel"): {ADMIN, APP},
    ("GET", CAMPAIGNS + "/opt-outs"): {ADMIN, APP},
    ("POST", CAMPAIGNS + "/opt-outs"): {ADMIN, APP},
    ("DELETE", CAMPAIGNS + "/opt-outs/{customer_id}"): {ADMIN, APP},
}
# Refusals by the authentication itself (anything else means it let the caller through).
ROLE_REFUSALS = {"wrong_role", "not_an_app", "missing_scope"}


def _served(service: Service) -> set[tuple[str, str]]:
    found = set()
    for route in service.app.router.routes():
        if route.method != "HEAD" and route.resource is not None:
            found.add((route.method, route.resource.canonical))
    return found


def _fill(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: f"x_{m.group(1)}", path)


async def _tokens(service: Service) -> dict[str, str]:
    assert service.http is not None
    admin = {"Authorization": f"Bearer {service.settings.admin_token}"}
    tokens = {ADMIN: str(service.settings.admin_token)}
    agent = await service.agent("alice")
    tokens[AGENT] = agent.token
    async with service.http.post(
        service.base_url + "/api/v1/tokens",
        json={"role": "crm", "subject": "the-crm"},
        headers=admin,
    ) as r:
        assert r.status == 201, await r.text()
        tokens[CRM] = (await r.json())["token"]
    async with service.http.post(
        service.base_url + "/api/v1/apps",
        json={"name": "every-scope", "scopes": list(SCOPES), "webhook_url": "http://127.0.0.1:9/"},
        headers=admin,
    ) as r:
        assert r.status == 201, await r.text()
        tokens[APP] = (await r.json())["token"]
    return tokens


async def _call(service: Service, method: str, path: str, token: str | None) -> tuple[int, Any]:
    assert service.http is not None
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    params = {}
    if path.endswith("/ws") and token is not None:
        params, headers = {"token": token}, {}  # sockets take the token in the query
    async with service.http.request(
        method, service.base_url + path, headers=headers, params=params, json=None
    ) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body


def test_every_route_says_who_may_call_it(service: Service) -> None:
    served = _served(service)
    assert served - ACCESS.keys() == set(), "routes missing from the ACCESS table"
    assert ACCESS.keys() - served == set(), "the ACCESS table names routes that are gone"


@pytest.mark.parametrize("route", sorted(ACCESS), ids=lambda r: f"{r[0]} {r[1]}")
async def test_each_route_takes_only_the_tokens_it_should(
    service: Service, route: tuple[str, str]
) -> None:
    method, path = route
    allowed = ACCESS[route]
    if PUBLIC in allowed or "visitor" in allowed:
        status, _ = await _call(service, method, _fill(path), None)
        assert status != 500
        if "visitor" in allowed:
            assert status in (400, 401, 403), status
        return
    url = _fill(path)
    for token in (None, "not-a-token"):
        status, body = await _call(service, method, url, token)
        assert status == 401, (token, status, body)
        assert body["error"]["code"] == "unauthorized"
    for role, token in (await _tokens(service)).items():
        status, body = await _call(service, method, url, token)
        code = (body or {}).get("error", {}).get("code")
        assert status < 500, (role, status, body)
        if role in allowed:
            assert status != 401 and code not in ROLE_REFUSALS, (role, status, body)
        else:
            assert status == 403 and code in ROLE_REFUSALS, (role, status, body)


async def test_no_secret_reaches_the_logs(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens, app secrets and the session secret never appear in log lines, also when a
    request is refused or a signed delivery fails."""
    tokens = await _tokens(service)
    assert service.http is not None
    admin = {"Authorization": f"Bearer {tokens[ADMIN]}"}
    async with service.http.post(
        service.base_url + "/api/v1/apps",
        json={"name": "hook", "scopes": ["events:subscribe"], "webhook_url": "http://127.0.0.1:9/"},
        headers=admin,
    ) as r:
        app = await r.json()
    secrets = [*tokens.values(), app["token"], app["webhook_secret"]]
    secrets.append(str(service.settings.session_secret))
    async with service.http.post(
        service.base_url + "/api/v1/apps/me/subscriptions",
        json={"event_types": ["customer.message"]},
        headers={"Authorization": f"Bearer {app['token']}"},
    ) as r:
        assert r.status == 201, await r.text()
    customer = await service.customer()
    assert customer.token is not None
    secrets.append(customer.token)
    await customer.start_with_bot("hi")  # a delivery to the app fails: nobody listens on :9
    for token in secrets:  # every kind of refusal, with real tokens in the wrong places
        await _call(service, "GET", "/api/v1/rules", token)
        await _call(service, "GET", "/api/v1/agents/me", token)
        await _call(service, "POST", "/api/v1/apps/me/subscriptions", token)
    await service.settle()
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "outbox" in text  # the failing delivery was logged...
    for secret in secrets:
        assert secret not in text  # ...and no secret was
