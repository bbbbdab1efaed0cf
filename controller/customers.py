"""Customers: normalizing identities, and the profile facts the rules read.

Rules see ``customer.known``, ``customer.language`` and ``customer.profile.*``. Deciding is
pure and synchronous, so the worker awaits ``CustomerProfiles.facts(conversation)`` before it
decides; the result enters ``build_facts`` as a derived fact and is stored with the decision.
Profiles are kept in a bounded LRU cache; every Customer API write of this process puts its
committed record there (a newer version always wins over a read that was in flight).
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import StringConstraints as Str

from controller.errors import RequestError
from controller.models import Conversation
from controller.store.base import (
    CHANGE_KINDS,
    CustomerChange,
    CustomerRecord,
    Identity,
    NewOutbox,
    Store,
)

IDENTITY_KINDS: tuple[str, ...] = ("whatsapp", "messenger", "webchat", "email", "phone", "external")
# The profile notifications apps can subscribe to (besides the conversation events).
PROFILE_EVENTS: tuple[str, ...] = tuple(f"profile.{kind}" for kind in CHANGE_KINDS)
# What an app needs, besides ``events:subscribe``, to hear them: they carry personal data.
PROFILE_SCOPE = "customers:read"


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


@dataclass(frozen=True)
class ProfileNotices:
    """Who hears which profile notification, fixed when a write starts (read from the app
    registry on the event loop), and the outbox rows that tell them. Pure: the store calls
    it inside the write's transaction (``Notify``), where nothing may await."""

    audience: Mapping[str, tuple[str, ...]]  # profile event type -> app ids

    @property
    def anyone(self) -> bool:
        """Whether any app hears any profile notification (else writes add no rows)."""
        return any(self.audience.values())

    def __call__(self, change: CustomerChange) -> list[NewOutbox]:
        kind = f"profile.{change.kind}"
        apps = self.audience.get(kind, ())
        if not apps:
            return []
        body: dict[str, Any] = {
            "type": kind,
            "conversation_id": None,
            "customer_id": change.customer_id,
            "version": change.version,
            "changed_at": change.at.isoformat(),
        }
        if change.record is not None:
            body["customer"] = change.record.as_dict()
        if change.merged_from is not None:
            body["merged_from"] = change.merged_from
        return [
            NewOutbox(f"app:{app_id}", {**body, "app_id": app_id, "as": "subscriber"})
            for app_id in apps
        ]


# the custom profile field schema --------------------------------------------------------------
FieldName = Annotated[str, Str(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
FIELD_TYPES = ("string", "number", "integer", "boolean", "date", "enum")


class CustomField(BaseModel):
    """One custom profile field an admin declared."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: FieldName
    type: Literal["string", "number", "integer", "boolean", "date", "enum"]
    values: list[Annotated[str, Str(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=200
    )
    required: bool = False
    max_length: int | None = Field(None, ge=1, le=1000)
    description: str | None = Field(None, max_length=500)

    @model_validator(mode="after")
    def _fits_type(self) -> CustomField:
        if (self.type == "enum") != (self.values is not None):
            raise ValueError(f"{self.name}: values are given for an enum field, and only then")
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"{self.name}: enum values must be unique")
        if self.max_length is not None and self.type != "string":
            raise ValueError(f"{self.name}: max_length applies to string fields only")
        return self


class CustomSchema(BaseModel):
    """The custom profile fields (``PUT /api/v1/customers/schema``): values of declared
    fields must have their type; ``allow_unknown`` lets undeclared keys through as before."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fields: list[CustomField] = Field(max_length=100)
    allow_unknown: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> CustomSchema:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique")
        return self

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required)

    def check(self, custom: Mapping[str, Any], *, creating: bool) -> None:
        """InvalidCustom naming the first field that does not fit. ``custom`` is what a write
        gives (None removes a key); ``creating``: required fields must be there."""
        declared = {f.name: f for f in self.fields}
        for name, value in custom.items():
            spec = declared.get(name)
            if spec is None:
                if not self.allow_unknown:
                    raise InvalidCustom(name, "is not a declared custom field")
                continue
            if value is None:
                if spec.required:
                    raise InvalidCustom(name, "is required and cannot be removed")
                continue
            problem = _type_problem(spec, value)
            if problem:
                raise InvalidCustom(name, problem)
        if creating:
            for name in self.required:
                if custom.get(name) is None:
                    raise InvalidCustom(name, "is required")


def _type_problem(spec: CustomField, value: Any) -> str | None:
    """Why ``value`` is not of the field's type (None when it is)."""
    kind = spec.type
    if kind == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "integer":
        return None if type(value) is int else "must be an integer"
    if kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if not isinstance(value, str):
        return "must be a string"
    if kind == "string":
        if spec.max_length is not None and len(value) > spec.max_length:
            return f"is longer than {spec.max_length} characters"
        return None
    if kind == "date":
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            return "must be a date (YYYY-MM-DD)"
        return None if len(value) == 10 else "must be a date (YYYY-MM-DD)"
    assert spec.values is not None
    return None if value in spec.values else f"must be one of {', '.join(spec.values)}"


class InvalidCustom(RequestError):
    """A custom profile value does not fit the schema (422 ``invalid_custom`` naming it)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"custom field {name!r} {problem}", code="invalid_custom", status=422)
        self.details = {"field": name}


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
