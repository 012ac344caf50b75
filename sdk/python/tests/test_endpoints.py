"""Every endpoint, streaming and not, against a real `flex up --demo`.

The demo's simulated flex tier starts after 1.5 s and its standard tier after 0.2 s; every
answer's text is "Simulated answer word1 word2 ..." (`#sim output_tokens=N` words).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from flexinference import (
    FlexInference,
    FlexInferenceError,
    Stream,
    interaction_output_text,
    message_output_text,
    output_text,
)

pytestmark = pytest.mark.server

SIMULATED = "Simulated answer"


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- non-streaming ---------------------------------------------------------------------------


def test_responses_flex_starts_in_time(client: FlexInference) -> None:
    raw = client.with_raw_response.responses.create(
        {"model": "gpt-5.5", "input": "Hello!", "start_within": "00h-00m-10s"}
    )
    res = raw.parse()
    assert res["object"] == "response"
    assert res["status"] == "completed"
    assert res["service_tier"] == "flex"
    assert output_text(res).startswith(SIMULATED), res
    assert raw.status_code == 200
    assert raw.outcome.served_tier == "flex"
    assert raw.outcome.reason == "flex_started"
    assert raw.outcome.wait_ms is not None
    assert 1000 <= raw.outcome.wait_ms < 10_000  # the simulated flex tier starts after 1.5 s
    assert raw.outcome.request_id is not None
    assert raw.outcome.request_id.startswith("req_")
    # The dict is the body as sent: nothing added, nothing reshaped.
    assert res == raw.http_response.json()


def test_responses_flex_too_slow_falls_back_to_standard(client: FlexInference) -> None:
    t0 = time.monotonic()
    raw = client.with_raw_response.responses.create(
        {
            "model": "gpt-5.5",
            "input": "Hello! #sim flex_delay_ms=60000",
            "start_within": "00h-00m-05s",
        }
    )
    took = time.monotonic() - t0
    assert took < 5.5, f"standard should start inside the 5 s budget, took {took:.2f} s"
    assert raw.parse()["service_tier"] == "default"
    assert raw.outcome.served_tier == "standard"
    assert raw.outcome.reason == "flex_timeout"
    assert output_text(raw.parse()).startswith(SIMULATED)


def test_responses_on_each_provider(client: FlexInference) -> None:
    gemini = client.responses.create(
        {"model": "gemini-3.5-flash", "input": "Hi", "start_within": "priority"}
    )
    assert output_text(gemini).startswith(SIMULATED)
    claude = client.responses.create(
        {
            "model": "claude-opus-4-8",
            "input": "Hi",
            "max_output_tokens": 64,
            "start_within": "default",
        }
    )
    assert claude["object"] == "response"
    assert claude["service_tier"] == "standard"  # Anthropic's word, in every format
    assert output_text(claude).startswith(SIMULATED)


def test_chat_completions(client: FlexInference) -> None:
    raw = client.with_raw_response.chat.completions.create(
        {"model": "gpt-5.5", "messages": user("Hello!"), "start_within": "default"}
    )
    res = raw.parse()
    assert res["object"] == "chat.completion"
    assert res["service_tier"] == "default"
    content = res["choices"][0]["message"]["content"]
    assert content.startswith(SIMULATED)
    assert output_text(res) == content
    assert raw.outcome.reason == "direct"
    assert raw.outcome.wait_ms == 0


def test_interactions(client: FlexInference) -> None:
    raw = client.with_raw_response.interactions.create(
        {"model": "gemini-3.5-flash", "input": "Summarize.", "start_within": "00h-01m-00s"}
    )
    res = raw.parse()
    assert res["object"] == "interaction"
    assert res["status"] == "completed"
    assert res["service_tier"] == "flex"
    assert interaction_output_text(res).startswith(SIMULATED)
    assert interaction_output_text(res) == res["steps"][0]["content"][0]["text"]
    assert raw.outcome.served_tier == "flex"
    assert raw.outcome.reason == "flex_started"


def test_messages(client: FlexInference) -> None:
    raw = client.with_raw_response.messages.create(
        {
            "model": "claude-opus-4-8",
            "max_tokens": 1024,
            "messages": user("Summarize."),
            "start_within": "default",
        }
    )
    res = raw.parse()
    assert res["type"] == "message"
    assert res["role"] == "assistant"
    assert res["usage"]["service_tier"] == "standard"
    assert message_output_text(res).startswith(SIMULATED)
    assert raw.outcome.served_tier == "standard"


def test_messages_reach_an_openai_model(client: FlexInference) -> None:
    res = client.messages.create(
        {
            "model": "gpt-5.5",
            "max_tokens": 256,
            "messages": user("Hi #sim output_tokens=4"),
            "start_within": "00h-00m-30s",
        }
    )
    assert res["type"] == "message"
    assert message_output_text(res) == "Simulated answer word1 word2"
    assert res["usage"]["service_tier"] == "flex"


def test_tool_call_passes_through(client: FlexInference) -> None:
    res = client.responses.create(
        {
            "model": "gpt-5.5",
            "input": "Weather in Paris? #sim tool=get_weather",
            "tools": [
                {
                    "type": "function",
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                    },
                }
            ],
            "start_within": "default",
        }
    )
    calls = [item for item in res["output"] if item["type"] == "function_call"]
    assert [c["name"] for c in calls] == ["get_weather"], res["output"]
    assert output_text(res) == ""  # only a tool call: no assistant text


def test_fields_the_sdk_does_not_know_pass_through(client: FlexInference) -> None:
    res = client.chat.completions.create(
        {
            "model": "gpt-5.5",
            "messages": user("Hi"),
            "start_within": "default",
            "temperature": 0.2,
            "metadata": {"sdk": "test"},
            "max_completion_tokens": 64,
        }
    )
    assert output_text(res).startswith(SIMULATED)


# --- streaming -------------------------------------------------------------------------------


def test_responses_stream(client: FlexInference) -> None:
    stream = client.responses.create(
        {"model": "gpt-5-nano", "input": "Count to ten.", "start_within": "00h-00m-20s"},
        stream=True,
    )
    assert isinstance(stream, Stream)
    assert stream.outcome.served_tier == "flex"
    assert stream.outcome.reason == "flex_started"
    events = list(stream)
    assert stream.response.is_closed
    types = [e["type"] for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text.startswith(SIMULATED)
    final = events[-1]["response"]
    assert final["service_tier"] == "flex"
    assert output_text(final) == text
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_chat_stream(client: FlexInference) -> None:
    chunks = list(
        client.chat.completions.create(
            {
                "model": "gpt-5.5",
                "messages": user("Hi #sim output_tokens=5"),
                "start_within": "default",
                "stream_options": {"include_usage": True},
            },
            stream=True,
        )
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
    text = "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"])
    assert text == "Simulated answer word1 word2 word3"
    assert chunks[-1]["usage"]["completion_tokens"] == 5  # the [DONE] sentinel is not yielded


def test_interactions_stream(client: FlexInference) -> None:
    with client.interactions.create(
        {
            "model": "gemini-3.5-flash",
            "input": "Hi #sim output_tokens=3",
            "start_within": "00h-00m-30s",
        },
        stream=True,
    ) as stream:
        events = list(stream)
    kinds = [e["event_type"] for e in events]
    assert kinds[0] == "interaction.created"
    assert kinds[-1] == "interaction.completed"
    text = "".join(e["delta"]["text"] for e in events if e["event_type"] == "step.delta")
    assert text == "Simulated answer word1"
    assert interaction_output_text(events[-1]["interaction"]) == text


def test_messages_stream(client: FlexInference) -> None:
    events = list(
        client.messages.create(
            {
                "model": "claude-opus-4-8",
                "max_tokens": 100,
                "messages": user("Hi #sim output_tokens=3"),
                "start_within": "default",
            },
            stream=True,
        )
    )
    types = [e["type"] for e in events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    text = "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )
    assert text == "Simulated answer word1"


def test_raw_stream_has_the_outcome_before_the_first_event(client: FlexInference) -> None:
    raw = client.with_raw_response.chat.completions.create(
        {"model": "gpt-5.5", "messages": user("Hi"), "start_within": "00h-00m-30s"},
        stream=True,
    )
    assert raw.outcome.served_tier == "flex"
    assert raw.headers["content-type"].startswith("text/event-stream")
    stream = raw.parse()
    assert stream.outcome == raw.outcome
    first = next(stream)
    assert first["service_tier"] == "flex"
    stream.close()
    assert stream.response.is_closed


def test_a_stream_left_early_releases_its_connection(client: FlexInference) -> None:
    with client.responses.create(
        {"model": "gpt-5.5", "input": "Hi #sim output_tokens=50", "start_within": "default"},
        stream=True,
    ) as stream:
        first = next(stream)
        assert first["type"] == "response.created"
    assert stream.response.is_closed
    with pytest.raises(StopIteration):
        next(stream)
    # The pool still serves the next request.
    res = client.responses.create({"model": "gpt-5.5", "input": "Hi", "start_within": "auto"})
    assert output_text(res).startswith(SIMULATED)


# --- a stream the provider breaks after it started ---------------------------------------------

CUT = "Hi #sim cut_after=4"  # the simulator resets the connection after 4 events
CUT_BODIES: dict[str, dict[str, Any]] = {
    "responses": {"model": "gpt-5.5", "input": CUT, "start_within": "default"},
    "responses-to-claude": {
        "model": "claude-opus-4-8",
        "max_output_tokens": 64,
        "input": CUT,
        "start_within": "default",
    },
    "chat": {"model": "gpt-5.5", "messages": user(CUT), "start_within": "default"},
    "messages": {
        "model": "claude-opus-4-8",
        "max_tokens": 64,
        "messages": user(CUT),
        "start_within": "default",
    },
    "messages-to-openai": {
        "model": "gpt-5.5",
        "max_tokens": 64,
        "messages": user(CUT),
        "start_within": "default",
    },
    "interactions": {"model": "gemini-3.5-flash", "input": CUT, "start_within": "default"},
}


@pytest.mark.parametrize("case", list(CUT_BODIES))
def test_a_stream_cut_off_raises_instead_of_ending(client: FlexInference, case: str) -> None:
    resource: Any = {
        "responses": client.responses,
        "chat": client.chat.completions,
        "messages": client.messages,
        "interactions": client.interactions,
    }[case.split("-")[0]]
    stream = resource.create(CUT_BODIES[case], stream=True)
    events: list[dict[str, Any]] = []

    def read_all() -> None:
        events.extend(stream)  # the events before the error arrive; then it raises

    with pytest.raises(FlexInferenceError) as info:
        read_all()
    err = info.value
    assert events, "the answer had started: its first events came through"
    assert err.status == 200, "the error came inside the stream, after the 200 head"
    assert "cut off" in err.message, err.message
    assert err.request_id is not None
    assert stream.response.is_closed
