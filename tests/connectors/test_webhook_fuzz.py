"""Generated webhook payloads against the WhatsApp and Messenger webhooks: never a 500, and
nothing stored from a request whose signature is missing or wrong.

The service runs on its own event loop in a background thread, so hypothesis drives plain
synchronous requests at it. Bodies are both arbitrary JSON and provider-shaped envelopes whose
fields hold values of any type.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing import test_settings as settings_for_tests

T = TypeVar("T")
SECRET = "fuzz-app-secret-7f3a9c"
NUMBER, PAGE = "106540352242922", "1122334455"
OK_STATUSES = {200, 400, 401, 403, 413, 415, 422}


class BackgroundService:
    """A Service on an event loop of its own thread (for synchronous tests)."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        connectors = [
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(name="demo", type="demo_bot"),
            ConnectorInstance(
                name="whatsapp",
                type="whatsapp",
                settings={
                    # Nothing answers here: sends fail and are retried later, which is fine.
                    "graph_base_url": "http://127.0.0.1:9",
                    "app_secret": SECRET,
                    "verify_token": "fuzz-verify",
                    "endpoints": [{"phone_number_id": NUMBER, "access_token": "fuzz-token"}],
                    "media_download": False,
                },
            ),
            ConnectorInstance(
                name="messenger",
                type="messenger",
                settings={
                    "graph_base_url": "http://127.0.0.1:9",
                    "app_secret": SECRET,
                    "verify_token": "fuzz-verify",
                    "pages": [{"page_id": PAGE, "access_token": "fuzz-page-token"}],
                },
            ),
        ]
        # Sends fail at once (nothing listens on :9), so the service goes quiet quickly.
        self.svc = Service(settings_for_tests(tmp, connectors=connectors, outbox_max_attempts=1))
        self.run(self.svc.start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stored(self) -> int:
        """Events stored, once the work of earlier requests is done (it stores events too)."""
        self.run(self.svc.settle())
        return self.run(self.svc.store.count("events"))

    def post(self, path: str, body: bytes, signature: str | None) -> int:
        request = urllib.request.Request(self.svc.base_url + path, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if signature is not None:
            request.add_header("X-Hub-Signature-256", signature)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def close(self) -> None:
        self.run(self.svc.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundService]:
    service = BackgroundService(tmp_path_factory.mktemp("fuzz"))
    try:
        yield service
    finally:
        service.close()


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=25,
)


def whatsapp_like() -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries(
        {
            "from": st.one_of(st.just("351910000001"), anything),
            "id": st.one_of(st.text(min_size=1, max_size=30), anything),
            "timestamp": st.one_of(st.just("1718000000"), anything),
            "type": st.sampled_from(
                [
                    "text",
                    "image",
                    "interactive",
                    "button",
                    "location",
                    "contacts",
                    "reaction",
                    "sticker",
                    "unsupported",
                    "order",
                    "nonsense",
                ]
            ),
        },
        optional={"text": anything, "image": anything, "interactive": anything},
    )
    value = st.fixed_dictionaries(
        {
            "messaging_product": st.just("whatsapp"),
            "metadata": st.one_of(
                st.just({"display_phone_number": "15550001111", "phone_number_id": NUMBER}),
                anything,
            ),
        },
        optional={
            "messages": st.one_of(st.lists(message, max_size=3), anything),
            "statuses": anything,
            "contacts": anything,
        },
    )
    change = st.fixed_dictionaries({"field": st.just("messages"), "value": value})
    return st.fixed_dictionaries(
        {
            "object": st.sampled_from(["whatsapp_business_account", "page", "x"]),
            "entry": st.lists(
                st.fixed_dictionaries({"id": anything, "changes": st.lists(change, max_size=2)}),
                max_size=2,
            ),
        }
    )


def messenger_like() -> st.SearchStrategy[Any]:
    item = st.fixed_dictionaries(
        {
            "sender": st.one_of(st.just({"id": "psid-1"}), anything),
            "recipient": st.one_of(st.just({"id": PAGE}), anything),
            "timestamp": st.one_of(st.integers(), anything),
        },
        optional={"message": anything, "postback": anything, "read": anything},
    )
    return st.fixed_dictionaries(
        {
            "object": st.sampled_from(["page", "whatsapp_business_account"]),
            "entry": st.lists(
                st.fixed_dictionaries(
                    {"id": st.one_of(st.just(PAGE), anything), "messaging": st.lists(item)}
                ),
                max_size=2,
            ),
        }
    )


FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(payload=st.one_of(anything, whatsapp_like(), messenger_like()), raw=st.binary(max_size=64))
@pytest.mark.parametrize("path", ["/webhooks/whatsapp", "/webhooks/messenger"])
def test_signed_bodies_of_any_shape_never_make_a_500(
    background: BackgroundService, path: str, payload: Any, raw: bytes
) -> None:
    body = json.dumps(payload).encode()
    assert background.post(path, body, sign(body)) in OK_STATUSES
    assert background.post(path, raw, sign(raw)) in OK_STATUSES  # not even JSON


@FUZZ
@given(
    payload=st.one_of(whatsapp_like(), messenger_like()),
    signature=st.one_of(
        st.none(), st.text(max_size=80), st.just("sha256=" + "0" * 64), st.just("sha1=abc")
    ),
)
@pytest.mark.parametrize("path", ["/webhooks/whatsapp", "/webhooks/messenger"])
def test_unsigned_or_badly_signed_bodies_store_nothing(
    background: BackgroundService, path: str, payload: Any, signature: str | None
) -> None:
    body = json.dumps(payload).encode()
    assume(signature is None or signature != sign(body))
    # What an HTTP client can send at all: latin-1, no line breaks (else: no header).
    sendable = signature is not None and not any(c in signature for c in "\r\n")
    try:
        signature_header = signature.encode("latin-1").decode("latin-1") if sendable else None
    except (UnicodeEncodeError, AttributeError):
        signature_header = None
    before = background.stored()
    status = background.post(path, body, signature_header)
    # 400: a header with control characters is refused by the HTTP parser itself
    assert status in (400, 401, 403)
    assert background.stored() == before
    # the same body re-serialised is not what was signed either
    resigned = json.dumps(payload, indent=1).encode()
    if resigned != body:
        assert background.post(path, resigned, sign(body)) in (401, 403)
        assert background.stored() == before
