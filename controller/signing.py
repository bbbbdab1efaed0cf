"""The one signing format for everything convctl sends to third parties and receives back
from them (custom bots, app webhooks, change notifications).

Headers: ``Convctl-Timestamp`` (Unix seconds), ``Convctl-Signature: v1=<hex>`` where hex is
HMAC-SHA256(secret, timestamp + "." + raw body), and ``Convctl-Delivery-Id`` (stable across
retries, so the receiver can drop a redelivery). A receiver rejects a timestamp older or
newer than its tolerance, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

TIMESTAMP = "Convctl-Timestamp"
SIGNATURE = "Convctl-Signature"
DELIVERY_ID = "Convctl-Delivery-Id"
DEFAULT_TOLERANCE = 300.0


class SignatureError(ValueError):
    """The request is not signed as it should be; ``code`` says how."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def sign(secret: str, body: bytes, *, now: float, delivery_id: str) -> dict[str, str]:
    """The headers that sign ``body`` (the exact bytes sent)."""
    ts = int(now)
    return {
        TIMESTAMP: str(ts),
        SIGNATURE: signature(secret, ts, body),
        DELIVERY_ID: delivery_id,
    }


def verify(
    secrets: str | list[str],
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """Raise SignatureError unless ``body`` carries a valid, fresh signature.

    Several secrets may be given (the current one and the one being rotated out); the
    comparison is constant-time for each.
    """
    raw_ts = headers.get(TIMESTAMP)
    given = headers.get(SIGNATURE)
    if not raw_ts or not given:
        raise SignatureError("missing_signature", f"{TIMESTAMP} and {SIGNATURE} are required")
    try:
        ts = int(raw_ts)
    except ValueError:
        raise SignatureError("bad_signature", f"{TIMESTAMP} is not a Unix time") from None
    if abs(now - ts) > tolerance:
        raise SignatureError("stale_signature", f"{TIMESTAMP} is outside {tolerance:.0f} s")
    candidates = [secrets] if isinstance(secrets, str) else secrets
    # Several v1= values may be sent (comma separated) while a secret rotates.
    offered = [part.strip() for part in given.split(",")]
    ok = False
    for secret in candidates:
        expected = signature(secret, ts, body).encode()
        for value in offered:
            ok |= hmac.compare_digest(value.encode(), expected)
    if not ok:
        raise SignatureError("bad_signature", "the signature does not match the body")
