"""The SSE decoder and the streams, on exact wire bytes (through an httpx MockTransport).

The error events below are the ones the router's encoders write (data-plane/src/formats) and
that providers send, for the failures the demo simulator cannot produce after a stream started.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import httpx
import pytest

from flexinference import AsyncFlexInference, AsyncStream, FlexInference, FlexInferenceError
from flexinference._streaming import ServerSentEvent, SSEDecoder

BODY = {"model": "gpt-5.5", "input": "hi", "start_within": "default"}


def decode(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    d = SSEDecoder()
    out: list[ServerSentEvent] = []
    for c in chunks:
        out.extend(d.feed(c))
    out.extend(d.finish())
    return out


def test_named_and_unnamed_events() -> None:
    assert decode([b'event: a\ndata: {"x":1}\n\ndata: [DONE]\n\n']) == [
        ServerSentEvent("a", '{"x":1}'),
        ServerSentEvent("", "[DONE]"),
    ]


def test_split_at_every_byte_with_every_line_ending() -> None:
    whole = (
        b"event: a\r\ndata: one\r\ndata: two\r\n\r\n"
        b": a comment\n"
        b"id: 7\nretry: 100\ndata:no-space\n\n"
        b"event: b\rdata: \xe2\x82\xac \xf0\x9f\x98\x80\r\r"
        b"data: last\n\n"
    )
    expected = [
        ServerSentEvent("a", "one\ntwo"),
        ServerSentEvent("", "no-space"),
        ServerSentEvent("b", "\u20ac \U0001f600"),
        ServerSentEvent("", "last"),
    ]
    assert decode([whole]) == expected
    for cut in range(len(whole) + 1):
        assert decode([whole[:cut], whole[cut:]]) == expected, f"cut at {cut}"
    assert decode([bytes([b]) for b in whole]) == expected


def test_unicode_line_separators_inside_json_are_not_line_breaks() -> None:
    # serde_json does not escape U+2028/U+2029 (nor \x0b, \x1c...): str.splitlines() would cut
    # these events in two.
    text = "a\u2028b\u2029c\x0bd\x1ce\x85f"
    wire = ("data: " + json.dumps({"delta": text}, ensure_ascii=False) + "\n\n").encode()
    (event,) = decode([wire])
    assert json.loads(event.data) == {"delta": text}


def test_a_last_event_without_its_blank_line_is_delivered() -> None:
    assert decode([b"data: tail"]) == [ServerSentEvent("", "tail")]
    assert decode([b"event: x\n"]) == []  # no data: no event


def stream_client(wire: bytes, content_type: str = "text/event-stream") -> FlexInference:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={
                "content-type": content_type,
                "x-flex-served-tier": "flex",
                "x-flex-reason": "flex_started",
                "x-flex-wait-ms": "1503",
                "x-request-id": "req_1",
            },
            stream=httpx.ByteStream(wire),
        )

    return FlexInference(
        api_key="flex_live_test",
        base_url="http://flex.invalid/v1",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def test_done_ends_the_stream_and_the_outcome_is_read() -> None:
    wire = b'data: {"n":1}\n\ndata: {"n":2}\n\ndata: [DONE]\n\ndata: {"n":3}\n\n'
    stream = stream_client(wire).chat.completions.create(
        {
            "model": "gpt-5.5",
            "messages": [{"role": "user", "content": "hi"}],
            "start_within": "auto",
        },
        stream=True,
    )
    assert stream.outcome.served_tier == "flex"
    assert stream.outcome.reason == "flex_started"
    assert stream.outcome.wait_ms == 1503
    assert stream.outcome.request_id == "req_1"
    assert [e["n"] for e in stream] == [1, 2]
    assert stream.response.is_closed


ERROR_EVENTS = [
    (  # the router's Responses encoder, and OpenAI's own Responses stream
        "responses",
        b'event: error\ndata: {"code":"upstream_error","message":"boom","param":null,'
        b'"type":"error","sequence_number":3}\n\n',
        "upstream_error",
        None,
    ),
    (  # the router's Chat Completions encoder
        "chat",
        b'data: {"error":{"message":"boom","type":"api_error","param":null,'
        b'"code":"upstream_error"}}\n\n',
        "upstream_error",
        "api_error",
    ),
    (  # the router's Messages encoder, and Anthropic's own stream
        "messages",
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"boom"}}\n\n',
        None,
        "overloaded_error",
    ),
    (  # the router's Interactions encoder
        "interactions",
        b'event: error\ndata: {"event_type":"error","error":{"code":"upstream_error",'
        b'"message":"boom"}}\n\n',
        "upstream_error",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "event", "code", "kind"), ERROR_EVENTS, ids=[e[0] for e in ERROR_EVENTS]
)
def test_an_error_event_raises_after_the_events_before_it(
    name: str, event: bytes, code: str | None, kind: str | None
) -> None:
    wire = b'data: {"type":"first"}\n\n' + event + b'data: {"type":"never"}\n\n'
    stream = stream_client(wire).responses.create(BODY, stream=True)
    assert next(stream) == {"type": "first"}
    with pytest.raises(FlexInferenceError) as info:
        next(stream)
    err = info.value
    assert (err.status, err.code, err.type, err.message) == (200, code, kind, "boom")
    assert err.request_id == "req_1"
    assert stream.response.is_closed


def test_an_event_that_is_not_json_raises() -> None:
    stream = stream_client(b"data: {not json\n\n").responses.create(BODY, stream=True)
    with pytest.raises(FlexInferenceError, match="not a JSON object: '\\{not json'"):
        next(stream)


def test_an_answer_that_is_not_an_event_stream_raises() -> None:
    stream = stream_client(b'{"object":"response"}', "application/json").responses.create(
        BODY, stream=True
    )
    with pytest.raises(FlexInferenceError, match="Expected an event stream"):
        list(stream)


def test_response_failed_is_an_ordinary_event() -> None:
    # A failed response is part of the Responses shape: it is yielded, not raised.
    wire = (
        b"event: response.failed\n"
        b'data: {"type":"response.failed","response":{"status":"failed",'
        b'"error":{"code":"server_error","message":"x"}}}\n\n'
    )
    events = list(stream_client(wire).responses.create(BODY, stream=True))
    assert [e["type"] for e in events] == ["response.failed"]


@pytest.mark.anyio
async def test_the_async_stream_decodes_and_raises_the_same() -> None:
    wire = b'event: a\ndata: {"n":1}\n\n' + ERROR_EVENTS[2][1]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=httpx.ByteStream(wire)
        )

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with AsyncFlexInference(
        api_key="flex_live_test", base_url="http://flex.invalid/v1", client=http
    ) as client:
        stream = await client.responses.create(BODY, stream=True)
        assert isinstance(stream, AsyncStream)
        assert await stream.__anext__() == {"n": 1}
        with pytest.raises(FlexInferenceError) as info:
            await stream.__anext__()
        assert info.value.type == "overloaded_error"
        assert stream.response.is_closed
    await http.aclose()
