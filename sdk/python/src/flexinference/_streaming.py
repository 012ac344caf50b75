"""Server-sent events: a byte-level decoder and the sync and async event streams.

Each SSE event's ``data`` is decoded as JSON and yielded as a dict, unchanged. ``data: [DONE]``
(Chat Completions) ends the stream. An error event (an ``event: error``, or data whose
``type``/``event_type`` is ``"error"``, or data carrying a top-level ``error`` object) raises
`FlexInferenceError`: the provider failed after the answer had started.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from types import TracebackType
from typing import Any, NamedTuple

import httpx

from ._errors import FlexInferenceError, error_from_body
from ._response import Outcome

__all__ = ["AsyncStream", "ServerSentEvent", "Stream"]


_EOL = re.compile(rb"[\r\n]")


class ServerSentEvent(NamedTuple):
    event: str
    data: str


class SSEDecoder:
    """Incremental SSE parser over bytes.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only (never at other Unicode line breaks, which
    JSON strings may hold), a line is decoded only once complete (so a multi-byte character split
    across chunks survives), comments are skipped and multi-line ``data`` is joined with ``\\n``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        out: list[ServerSentEvent] = []
        buf = self._buf
        buf.extend(chunk)
        pos = 0
        if self._skip_lf and buf[:1] == b"\n":
            pos = 1
        self._skip_lf = False
        while True:
            found = _EOL.search(buf, pos)
            if found is None:
                break
            end = found.start()
            line = bytes(buf[pos:end])
            if buf[end : end + 1] == b"\r":
                if end + 1 < len(buf):
                    pos = end + 2 if buf[end + 1 : end + 2] == b"\n" else end + 1
                else:
                    pos = end + 1
                    self._skip_lf = True
            else:
                pos = end + 1
            self._line(line, out)
        del buf[:pos]
        return out

    def finish(self) -> list[ServerSentEvent]:
        """Ends the stream: a last event without its blank line is still delivered."""
        out: list[ServerSentEvent] = []
        if self._buf:
            self._line(bytes(self._buf), out)
            self._buf.clear()
        self._dispatch(out)
        return out

    def _line(self, raw: bytes, out: list[ServerSentEvent]) -> None:
        if not raw:
            self._dispatch(out)
            return
        if raw[:1] == b":":
            return
        line = raw.decode("utf-8", errors="replace")
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)

    def _dispatch(self, out: list[ServerSentEvent]) -> None:
        if self._data:
            out.append(ServerSentEvent(self._event, "\n".join(self._data)))
        self._event = ""
        self._data = []


class _Done:
    pass


_DONE = _Done()


def _is_error(sse: ServerSentEvent, data: dict[str, Any]) -> bool:
    return (
        sse.event == "error"
        or data.get("type") == "error"
        or data.get("event_type") == "error"
        or isinstance(data.get("error"), dict)
    )


def decode_event(sse: ServerSentEvent, response: httpx.Response) -> dict[str, Any] | _Done:
    """The event's data as a dict, `_DONE` for ``[DONE]``; raises for an error event."""
    if sse.data.strip() == "[DONE]":
        return _DONE
    try:
        data: Any = json.loads(sse.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise FlexInferenceError(
            response.status_code,
            f"The event stream sent an event whose data is not a JSON object: "
            f"{sse.data[:200]!r} (event {sse.event or 'message'!r}).",
            body=sse.data,
            response=response,
        )
    if _is_error(sse, data):
        raise error_from_body(response.status_code, data, sse.data, response)
    return data


def _check_event_stream(response: httpx.Response) -> None:
    ctype = response.headers.get("content-type", "")
    if not ctype.startswith("text/event-stream"):
        raise FlexInferenceError(
            response.status_code,
            f"Expected an event stream (text/event-stream) for stream=True, but the answer is "
            f"{ctype or 'without a content type'}. Is base_url a FlexInference endpoint?",
            response=response,
        )


class Stream(Iterator[dict[str, Any]]):
    """The events of a streamed answer, each as the dict the wire carries.

    Iterate it (``for event in stream``); use it as a context manager or call `close()` to
    release the connection early. `outcome` has the ``x-flex-*`` routing headers, known before
    the first event.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.outcome = Outcome.from_headers(response.headers)
        self._events = self._iterate()

    def _iterate(self) -> Generator[dict[str, Any], None, None]:
        try:
            _check_event_stream(self.response)
            decoder = SSEDecoder()
            for chunk in self.response.iter_bytes():
                for sse in decoder.feed(chunk):
                    event = decode_event(sse, self.response)
                    if isinstance(event, _Done):
                        return
                    yield event
            for sse in decoder.finish():
                event = decode_event(sse, self.response)
                if isinstance(event, _Done):
                    return
                yield event
        finally:
            self.response.close()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._events)

    def close(self) -> None:
        """Stops reading and releases the connection (safe to call more than once)."""
        self._events.close()
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncStream(AsyncIterator[dict[str, Any]]):
    """The async `Stream`: ``async for event in stream``; ``async with`` or ``await close()``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.outcome = Outcome.from_headers(response.headers)
        self._events = self._iterate()

    async def _iterate(self) -> AsyncGenerator[dict[str, Any], None]:
        try:
            _check_event_stream(self.response)
            decoder = SSEDecoder()
            async for chunk in self.response.aiter_bytes():
                for sse in decoder.feed(chunk):
                    event = decode_event(sse, self.response)
                    if isinstance(event, _Done):
                        return
                    yield event
            for sse in decoder.finish():
                event = decode_event(sse, self.response)
                if isinstance(event, _Done):
                    return
                yield event
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._events.__anext__()

    async def close(self) -> None:
        """Stops reading and releases the connection (safe to call more than once)."""
        await self._events.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
