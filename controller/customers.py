"""Customers: normalizing identities, and the profile facts the rules read.

Rules see ``customer.known``, ``customer.language`` and ``customer.profile.*``. Deciding is
pure and synchronous, so the worker awaits ``CustomerProfiles.facts(conversation)`` before it
decides; the result enters ``build_facts`` as a derived fact and is stored with the decision.
Profiles are kept in a bounded LRU cache; every Customer API write of this process puts its
committed record there (a newer version always wins over a read that was in flight).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import phonenumbers

from controller.errors import RequestError
from controller.models import Conversation
from controller.store.base import CustomerRecord, Identity, Store

IDENTITY_KINDS: tuple[str, ...] = ("whatsapp", "messenger", "webchat", "email", "phone", "external")


def normalize_phone(value: str, region: str | None) -> str:
    """E.164 (``+4915123456789``); a number without a country code needs ``region``."""
    text = value.strip()
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException as exc:
        raise RequestError(
            f"not a phone number: {value!r} ({exc})", code="invalid_phone", status=422
        ) from exc
    if not phonenumbers.is_valid_number(number):
        raise RequestError(f"not a valid phone number: {value!r}", code="invalid_phone", status=422)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(value: str) -> str:
    """Trimmed and lowercase; one ``@`` with something on both sides, no spaces."""
    text = value.strip().lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in text):
        raise RequestError(f"not an email address: {value!r}", code="invalid_email", status=422)
    return text


def normalize_identity(kind: str, value: str, region: str | None) -> Identity:
    """An identity as stored: E.164 for WhatsApp and phones, lowercase emails, others trimmed."""
    if kind not in IDENTITY_KINDS:
        raise RequestError(
            f"unknown identity kind {kind!r} (one of {', '.join(IDENTITY_KINDS)})",
            code="invalid_identity",
            status=422,
        )
    if kind in ("whatsapp", "phone"):
        # an unencoded "+" in a query string arrives as a space
        text = value.strip()
        if value.startswith(" ") and text[:1].isdigit():
            text = "+" + text
        return Identity(kind, normalize_phone(text, region))
    if kind == "email":
        return Identity(kind, normalize_email(value))
    text = value.strip()
    if not 1 <= len(text) <= 200:
        raise RequestError("an identity value has 1 to 200 characters", code="invalid_identity")
    return Identity(kind, text)


def parse_identity(text: str, region: str | None) -> Identity:
    """``kind:value`` as written in a lookup (``whatsapp:+4915…``, ``webchat:VISITOR``)."""
    kind, sep, value = text.partition(":")
    if not sep or not value.strip():
        raise RequestError(
            "identity must be KIND:VALUE, e.g. whatsapp:+4915123456789",
            code="invalid_identity",
            status=422,
        )
    return normalize_identity(kind.strip().lower(), value, region)


def profile_facts(record: CustomerRecord | None) -> dict[str, Any] | None:
    """``customer.*`` facts of a profile: known, language (if set) and the profile fields."""
    if record is None:
        return None
    profile = {k: v for k, v in record.profile.items() if v is not None}
    profile.update(record.custom)
    facts: dict[str, Any] = {"known": record.known, "profile": profile}
    if record.profile.get("language"):
        facts["language"] = record.profile["language"]
    return facts


class CustomerProfiles:
    """The customer facts of conversations, read through a bounded LRU cache."""

    def __init__(self, store: Store, *, size: int = 10_000) -> None:
        self._store = store
        self._size = size
        # customer id -> (version, facts; None for a deleted customer)
        self._cache: OrderedDict[str, tuple[int, dict[str, Any] | None]] = OrderedDict()

    async def facts(self, conv: Conversation) -> dict[str, Any] | None:
        """The facts for the conversation's customer (awaited before deciding)."""
        cached = self._cache.get(conv.customer_id)
        if cached is not None:
            self._cache.move_to_end(conv.customer_id)
            return cached[1]
        record = await self._store.customer(conv.customer_id)
        if record is not None:
            self._put(record.id, record.version, profile_facts(record))
            return self._cache[record.id][1]
        return None

    def written(self, record: CustomerRecord) -> None:
        """A committed API write: its record is the newest."""
        self._put(record.id, record.version, profile_facts(record))

    def deleted(self, customer_id: str, version: int) -> None:
        self._put(customer_id, version, None)

    def _put(self, customer_id: str, version: int, facts: dict[str, Any] | None) -> None:
        cached = self._cache.get(customer_id)
        if cached is not None and cached[0] > version:
            return  # a read that was in flight lost the race to a newer write
        self._cache[customer_id] = (version, facts)
        self._cache.move_to_end(customer_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
