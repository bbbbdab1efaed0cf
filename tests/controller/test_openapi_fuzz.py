"""Schemathesis against the live service: every operation of the OpenAPI document, with
generated valid and invalid requests (examples, coverage and fuzzing phases). No answer may
be a 5xx, and every answer must be one the document names for the operation, with the body
and media type it names.

The service runs on 127.0.0.1 in a thread of its own (schemathesis calls it synchronously
from the test's thread), with a WhatsApp channel on the fake Graph API, seeded with a
conversation an agent serves, one with the bot that an app joined, a customer, two apps, a
subscription, a campaign waiting for its window and an opt-out. Path parameters are drawn
from those ids half of the time, so requests reach real resources as well as unknown ones.

Each generated request is sent with every kind of token its operation accepts, one after
the other (admin, the CRM's, the agent's, an app's with every scope), so that each role's
own paths run too (an agent sees only its conversations, an app only its campaigns).

The run is derandomized with a fixed seed (the same requests every run) and short by
default; ``CONVCTL_FUZZ_EXAMPLES`` (examples per operation and phase) and
``CONVCTL_FUZZ_SEED`` make longer or other runs (docs/api.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from controller.api.openapi import document
from controller.apps import SCOPES, destination
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing import test_settings as service_settings
from controller.testing_graph import FakeGraph

T = TypeVar("T")

NUMBER = "106540352242922"  # the WhatsApp business number of the fake Graph API

EXAMPLES = int(os.environ.get("CONVCTL_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("CONVCTL_FUZZ_SEED", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# the roles whose tokens the run holds, in the order an operation is called with them
ROLE_ORDER = ("admin", "crm", "agent", "app")

SCHEMA = schemathesis.openapi.from_dict(
    document(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # generation checks (slow data, filtered data) say nothing about the API
            "suppress-health-check": ["all"],
            "generation": {
                "max-examples": EXAMPLES,
                "deterministic": True,
                "database": "none",
                "with-security-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
        }
    ),
)


@schemathesis.serializer("application/x-ndjson")
def _ndjson(context: Any, value: Any) -> bytes:
    """The bulk customer upsert takes one JSON object per line."""
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


class LiveService:
    """The service in a thread with its own event loop, and the ids and tokens it was
    seeded with."""

    def __init__(self, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.folder = folder
        self.graph = FakeGraph(tokens={NUMBER: "graph-token"})
        self.service: Service | None = None
        self.tokens: dict[str, str] = {}
        self.known: dict[str, list[str]] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base_url(self) -> str:
        assert self.service is not None
        return self.service.base_url

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()

    async def _stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
        await self.graph.stop()

    async def seed(self) -> None:
        await self.graph.start()
        whatsapp = {
            "graph_base_url": self.graph.base_url,
            "graph_api_version": self.graph.version,
            "app_secret": "fuzz-app-secret",
            "verify_token": "fuzz-verify",
            "endpoints": [{"phone_number_id": NUMBER, "access_token": "graph-token"}],
            "mark_read": False,
        }
        connectors = [
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(name="demo", type="demo_bot"),
            ConnectorInstance(name="whatsapp", type="whatsapp", settings=whatsapp),
        ]
        svc = self.service = Service(service_settings(self.folder, connectors=connectors))
        await svc.start()
        assert svc.http is not None
        admin = svc.admin_headers()
        self.tokens["admin"] = str(svc.settings.admin_token)

        async def post(path: str, body: dict[str, Any], token: str | None = None) -> Any:
            assert svc.http is not None
            headers = {"Authorization": f"Bearer {token}"} if token else admin
            async with svc.http.post(svc.base_url + path, json=body, headers=headers) as r:
                assert r.status in (200, 201, 202), (path, r.status, await r.text())
                return await r.json()

        self.tokens["crm"] = (await post("/api/v1/tokens", {"role": "crm", "subject": "crm"}))[
            "token"
        ]
        # The app whose token calls the app routes, and another one that the admin routes
        # may disable, rotate and delete without locking the first one out.
        caller = await post(
            "/api/v1/apps",
            {"name": "caller", "scopes": list(SCOPES), "webhook_url": "http://127.0.0.1:9/"},
        )
        self.tokens["app"] = caller["token"]
        target = await post(
            "/api/v1/apps", {"name": "target", "scopes": list(SCOPES)[:2], "description": "x"}
        )
        subscription = await post(
            "/api/v1/apps/me/subscriptions",
            {"event_types": ["customer.message", "agent.message"]},
            caller["token"],
        )
        customer = await post(
            "/api/v1/customers",
            {
                "name": "Ada",
                "email": "ada@example.com",
                "identities": [{"kind": "phone", "value": "+4930123456"}],
            },
            self.tokens["crm"],
        )
        # A campaign that waits for its window (it sends nothing), and an opt-out.
        later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
        campaign = await post(
            "/api/v1/campaigns",
            {
                "name": "spring",
                "channel": "whatsapp",
                "endpoint": NUMBER,
                "template": {"name": "spring_sale", "language": "en"},
                "audience": {"customer_ids": [customer["id"]]},
                "rate": 1,
                "window": {"starts_at": later},
            },
        )
        await post("/api/v1/campaigns/opt-outs", {"customer_id": customer["id"]})
        # A conversation the agent serves, and one with the bot that the app joins.
        alice = await svc.agent("alice")
        self.tokens["agent"] = alice.token
        visitor = await svc.customer()
        served = await visitor.start_with_bot("hi")
        await visitor.say("agent")
        await alice.available()
        offer = await alice.wait_offer(served)
        ack = await alice.accept(offer["offer_id"])
        assert ack["type"] == "ack", ack
        other = await (await svc.customer()).start_with_bot("hi")
        await post(f"/api/v1/apps/me/conversations/{other}/join", {}, caller["token"])
        await svc.settle()
        events = [ev.id for ev, _ in await svc.store.events(served)]
        deliveries = await svc.store.outbox_entries(
            destination(caller["id"]), status=None, limit=3, before_id=None
        )
        self.known = {
            "conversation_id": [served, other],
            "offer_id": [offer["offer_id"]],
            "customer_id": [customer["id"], *(await self._webchat_customers(served, other))],
            "app_id": [target["id"]],
            "subscription_id": [subscription["id"]],
            "event_id": events[:3],
            "delivery_id": [d.row.idempotency_key for d in deliveries],
            "campaign_id": [campaign["id"]],
        }

    async def _webchat_customers(self, *conversation_ids: str) -> list[str]:
        found = []
        assert self.service is not None
        for cid in conversation_ids:
            conv = await self.service.store.load_conversation(cid)
            if conv is not None:
                found.append(conv.customer_id)
        return found

    def callers(self, operation: schemathesis.APIOperation) -> list[dict[str, str]]:
        """The headers of each token the operation accepts (no header: a public route)."""
        roles = operation.definition.raw.get("x-convctl-roles", [])
        if not roles:
            return [{}]
        return [{"Authorization": f"Bearer {self.tokens[r]}"} for r in ROLE_ORDER if r in roles]


LIVE: LiveService | None = None


@SCHEMA.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half of the time, the ids of seeded resources instead of generated ones."""
    known = LIVE.known if LIVE is not None else {}
    if not path_parameters:
        return st.just(path_parameters)
    choices = {name: st.sampled_from(known[name]) for name in path_parameters if known.get(name)}
    if not choices:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.fixed_dictionaries(choices).map(lambda picked: {**path_parameters, **picked}),
    )


# what each operation answered, over the whole run (operation → status → count)
ANSWERS: dict[str, Counter[int]] = defaultdict(Counter)


@SCHEMA.hook
def after_call(context: Any, case: schemathesis.Case, response: schemathesis.Response) -> None:
    ANSWERS[case.operation.label][response.status_code] += 1


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    global LIVE
    service = LiveService(tmp_path_factory.mktemp("fuzz"))
    try:
        service.run(service.seed(), timeout=120)
        LIVE = service
        yield service
    finally:
        LIVE = None
        service.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@SCHEMA.parametrize()
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, live: LiveService, http: requests.Session
) -> None:
    for headers in live.callers(case.operation):  # each role's own paths (an app's campaigns)
        case.call_and_validate(
            base_url=live.base_url, session=http, headers=headers, checks=CHECKS, timeout=30
        )


def test_the_run_reached_past_authentication(live: LiveService) -> None:
    """Each operation was called (all of them, unless a subset was selected) and answered
    something other than a refused token at least once: the fuzzing reached the handlers."""
    if not ANSWERS:
        pytest.skip("no operation was fuzzed in this run")
    for label, statuses in sorted(ANSWERS.items()):
        print(label, dict(sorted(statuses.items())))
    stuck = [label for label, seen in ANSWERS.items() if set(seen) <= {401, 403}]
    assert stuck == []
