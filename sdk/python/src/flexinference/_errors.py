"""Typed errors: every non-2xx answer becomes a `FlexInferenceError` (402: `PaymentRequiredError`).

The router answers its own errors in the caller's envelope: OpenAI's
(``{"error": {"message", "type", "param", "code"}}``) on /v1/responses, /v1/chat/completions and
/v1/interactions, and Anthropic's (``{"type": "error", "error": {"type", "message", ...}}``) on
/v1/messages. A provider's own error passes through with its original status and body, which may
also be Gemini's (``{"error": {"code": 400, "message", "status": "INVALID_ARGUMENT"}}``). All of
them are read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

__all__ = ["FlexInferenceError", "PaymentRequiredError"]


class FlexInferenceError(Exception):
    """A non-2xx answer from FlexInference (or from the provider, passed through).

    Attributes:
        status: the HTTP status (for an error event inside a stream, the stream's own status,
            200, since the error came after the answer had started).
        type: the error type, e.g. ``"invalid_request_error"`` (Gemini's ``status`` such as
            ``"INVALID_ARGUMENT"`` for a Gemini error).
        code: the machine-readable code, e.g. ``"no_byok_key"`` or ``"payment_required"``;
            ``None`` when the body has none (some provider errors).
        param: the request parameter at fault, e.g. ``"start_within"``, or ``None``.
        message: the human text: what went wrong, why, how to fix it, an example.
        body: the decoded JSON body (or the raw text when it is not JSON).
        response: the ``httpx.Response``, with every header (``x-request-id`` among them).
    """

    status: int
    type: str | None
    code: str | None
    param: str | None
    message: str
    body: Any
    response: httpx.Response | None

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # the envelope field's own name
        code: str | None = None,
        param: str | None = None,
        body: Any = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.message = message
        self.body = body
        self.response = response

    @property
    def status_code(self) -> int:
        """The HTTP status (the same as `status`; the name httpx and the OpenAI SDK use)."""
        return self.status

    @property
    def request_id(self) -> str | None:
        """The router's ``x-request-id`` for this request: quote it when asking for help."""
        if self.response is None:
            return None
        value = self.response.headers.get("x-request-id")
        return value if isinstance(value, str) else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (e.g. across multiprocessing), without the httpx response.
        state = {"type": self.type, "code": self.code, "param": self.param, "body": self.body}
        return (_rebuild, (type(self), self.status, self.message, state))

    def __str__(self) -> str:
        label = self.code or self.type
        head = f"{self.status} {label}" if label else str(self.status)
        return f"{head}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, type={self.type!r}, "
            f"code={self.code!r}, param={self.param!r}, message={self.message!r})"
        )


class PaymentRequiredError(FlexInferenceError):
    """HTTP 402: the organization's billing is past due, so billable flex is paused.

    ``"default"``, ``"priority"`` and ``"auto"`` keep working; update payment to resume flex.
    A subclass of `FlexInferenceError`, so existing handlers keep catching it.
    """


def _rebuild(
    cls: type[FlexInferenceError], status: int, message: str, state: dict[str, Any]
) -> FlexInferenceError:
    return cls(status, message, **state)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _fields(body: object) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) from any of the three envelopes, or Nones."""
    if not isinstance(body, Mapping):
        return None, None, None, None
    error = body.get("error")
    if isinstance(error, str):
        return _str_or_none(error), None, None, None
    if not isinstance(error, Mapping):
        # An error event of a Responses stream is flat: {"type": "error", "code", "message"}.
        error = body
    kind = _str_or_none(error.get("type"))
    if kind == "error":  # the event's or the envelope's own type, not the error's
        kind = None
    return (
        _str_or_none(error.get("message")),
        kind or _str_or_none(error.get("status")),  # Gemini: "status": "INVALID_ARGUMENT"
        _str_or_none(error.get("code")),  # Gemini's code is the HTTP status (an int): skipped
        _str_or_none(error.get("param")),
    )


def error_from_body(
    status: int, body: Any, text: str, response: httpx.Response | None
) -> FlexInferenceError:
    """The typed error for a failed answer (or a stream's error event) with this body."""
    message, kind, code, param = _fields(body)
    if message is None:
        reason = response.reason_phrase if response is not None else ""
        message = f"HTTP {status}{' ' + reason if reason else ''}"
        snippet = text.strip()
        if snippet:
            message += f": {snippet[:500]}"
    cls = PaymentRequiredError if status == 402 else FlexInferenceError
    return cls(
        status,
        message,
        type=kind,
        code=code,
        param=param,
        body=body if body is not None else text,
        response=response,
    )


def error_from_response(response: httpx.Response) -> FlexInferenceError:
    """The typed error for a non-2xx ``response`` whose body has been read."""
    text = response.text
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    return error_from_body(response.status_code, body, text, response)
