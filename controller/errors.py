"""One exception tree for the whole service; the HTTP middleware maps it to JSON errors."""

from __future__ import annotations


class ConvctlError(Exception):
    """Base of every error convctl raises on purpose. ``code`` is machine-readable."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ConvctlError):
    code = "config_error"


class RuleError(ConvctlError):
    """A rules file is invalid; ``errors`` lists every problem as ``file:line:col: ...``."""

    code = "rule_error"
    status = 422

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors) if errors else "invalid rules")
        self.errors = errors


class TransitionRefused(ConvctlError):
    """An action asked for a transition the conversation's state does not allow."""

    code = "transition_refused"
    status = 409


class RequestError(ConvctlError):
    """The client sent something we cannot accept (maps to a 4xx)."""

    code = "bad_request"
    status = 400

    def __init__(self, message: str, *, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status


class NotFound(RequestError):
    def __init__(self, message: str, *, code: str = "not_found") -> None:
        super().__init__(message, code=code, status=404)


class Unauthorized(RequestError):
    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(message, code="unauthorized", status=401)


class Forbidden(RequestError):
    def __init__(self, message: str, *, code: str = "forbidden") -> None:
        super().__init__(message, code=code, status=403)


class Conflict(RequestError):
    def __init__(self, message: str, *, code: str = "conflict") -> None:
        super().__init__(message, code=code, status=409)


class PreconditionFailed(RequestError):
    """An ``If-Match`` version is not the stored one any more (412)."""

    def __init__(self, message: str, *, code: str = "precondition_failed") -> None:
        super().__init__(message, code=code, status=412)


class ConnectorError(ConvctlError):
    code = "connector_error"
    status = 502


class WebhookAuthError(ConnectorError):
    code = "bad_signature"
    status = 401


class ChannelSendError(ConnectorError):
    """A send failed. ``retryable`` says whether the outbox may try again; ``ambiguous`` that
    the provider may have taken the message all the same (the request went out and no
    answer came back)."""

    code = "channel_send_failed"

    def __init__(self, message: str, *, retryable: bool, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous


class BotError(ConnectorError):
    code = "bot_failed"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StoreUnavailable(RequestError):
    """The database cannot be reached now (stopped, restarting, connection cut): the request
    is refused with a 503 and may be sent again; work in progress is retried."""

    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message, code="database_unavailable", status=503)
