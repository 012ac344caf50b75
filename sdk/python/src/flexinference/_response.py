"""The routing outcome (`x-flex-*` headers) and the raw-response wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx

__all__ = ["Outcome", "RawResponse"]

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """How FlexInference routed one request, from its ``x-flex-*`` response headers.

    Attributes:
        served_tier: ``x-flex-served-tier``, the tier that served the answer: ``"flex"``,
            ``"standard"`` or ``"priority"`` (the body's ``service_tier`` uses each provider's
            own word, e.g. OpenAI's ``"default"`` for standard).
        reason: ``x-flex-reason``: ``"flex_started"`` (flex started in time), ``"flex_timeout"``
            (flex did not start in time, standard took over), ``"flex_capacity"`` (flex had no
            capacity) or ``"direct"`` (a tier was asked for directly: no race).
        wait_ms: ``x-flex-wait-ms``, how long the request waited for flex, in milliseconds.
        request_id: ``x-request-id``, the router's id of the request.
    """

    served_tier: str | None
    reason: str | None
    wait_ms: int | None
    request_id: str | None

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> Outcome:
        wait = headers.get("x-flex-wait-ms")
        try:
            wait_ms = int(wait) if wait is not None else None
        except ValueError:
            wait_ms = None
        return cls(
            served_tier=headers.get("x-flex-served-tier"),
            reason=headers.get("x-flex-reason"),
            wait_ms=wait_ms,
            request_id=headers.get("x-request-id"),
        )


class RawResponse(Generic[T]):
    """An answer with its HTTP response: `parse()` gives what `create()` would have returned.

    Returned by ``client.with_raw_response.<endpoint>.create(...)``.
    """

    def __init__(self, http_response: httpx.Response, parsed: T) -> None:
        self.http_response = http_response
        self._parsed = parsed

    @property
    def headers(self) -> httpx.Headers:
        return self.http_response.headers

    @property
    def status_code(self) -> int:
        return self.http_response.status_code

    @property
    def outcome(self) -> Outcome:
        """The ``x-flex-*`` routing outcome of this request."""
        return Outcome.from_headers(self.http_response.headers)

    def parse(self) -> T:
        """The raw JSON dict (or, with ``stream=True``, the event stream)."""
        return self._parsed

    def __repr__(self) -> str:
        return f"<RawResponse [{self.status_code}] {self.outcome}>"
