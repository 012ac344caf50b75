"""Every error code of the seed pages raises `FlexInferenceError` with that code, from a real
`flex up --demo`, in both envelopes (OpenAI's, and Anthropic's on /v1/messages); 402 raises
`PaymentRequiredError`; provider errors pass through with their own envelopes.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Demo
from flexinference import FlexInference, FlexInferenceError, PaymentRequiredError, output_text

pytestmark = pytest.mark.server


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def raises(call: Any, *args: Any, **kwargs: Any) -> FlexInferenceError:
    with pytest.raises(FlexInferenceError) as info:
        call(*args, **kwargs)
    err = info.value
    assert err.request_id is not None, "every answer of the router has an x-request-id"
    assert err.request_id.startswith("req_")
    assert err.message
    return err


# (endpoint, body, status, code, param): one request per code the seed pages name, on each of
# the four formats where the code applies.
CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    (
        "responses",
        {"model": "gpt-5.5", "input": "hi", "start_within": "priority", "service_tier": "flex"},
        400,
        "service_tier_not_allowed",
        "service_tier",
    ),
    (
        "chat",
        {
            "model": "gpt-5.5",
            "messages": user("hi"),
            "start_within": "default",
            "service_tier": "priority",
        },
        400,
        "service_tier_not_allowed",
        "service_tier",
    ),
    (
        "interactions",
        {
            "model": "gemini-3.5-flash",
            "input": "hi",
            "start_within": "default",
            "service_tier": "flex",
        },
        400,
        "service_tier_not_allowed",
        "service_tier",
    ),
    (
        "messages",
        {
            "model": "claude-opus-4-8",
            "max_tokens": 10,
            "messages": user("hi"),
            "start_within": "default",
            "service_tier": "auto",
        },
        400,
        "service_tier_not_allowed",
        "service_tier",
    ),
    (
        "responses",
        {
            "model": "claude-opus-4-8",
            "input": "hi",
            "max_output_tokens": 10,
            "start_within": "00h-00m-30s",
        },
        400,
        "flex_unsupported_for_anthropic",
        "start_within",
    ),
    (
        "messages",
        {
            "model": "claude-opus-4-8",
            "max_tokens": 10,
            "messages": user("hi"),
            "start_within": "00h-00m-30s",
        },
        400,
        "flex_unsupported_for_anthropic",
        "start_within",
    ),
    (
        "responses",
        {"model": "claude-opus-4-8", "input": "hi", "start_within": "default"},
        400,
        "missing_max_tokens",
        "max_output_tokens",
    ),
    (
        "chat",
        {"model": "claude-opus-4-8", "messages": user("hi"), "start_within": "default"},
        400,
        "missing_max_tokens",
        "max_completion_tokens",
    ),
    (
        "interactions",
        {"model": "claude-opus-4-8", "input": "hi", "start_within": "auto"},
        400,
        "missing_max_tokens",
        "generation_config.max_output_tokens",
    ),
    (
        "responses",
        {"model": "gemini-3.5-flash", "input": "hi", "start_within": "auto"},
        400,
        "auto_unsupported_for_gemini",
        "start_within",
    ),
    (
        "interactions",
        {"model": "gemini-2.5-pro", "input": "hi", "start_within": "auto"},
        400,
        "auto_unsupported_for_gemini",
        "start_within",
    ),
    (
        "responses",
        {"model": "gpt-4o", "input": "hi", "start_within": "00h-00m-30s"},
        400,
        "model_not_flex_capable",
        "model",
    ),
    (
        "chat",
        {
            "model": "gpt-5.5",
            "messages": user("hi"),
            "start_within": "default",
            "presence_penalty": 1,
        },
        400,
        "unsupported_parameter",
        "presence_penalty",
    ),
    (
        "messages",
        {
            "model": "claude-opus-4-8",
            "max_tokens": 10,
            "messages": user("hi"),
            "start_within": "default",
            "top_k": 3,
        },
        400,
        "unsupported_parameter",
        "top_k",
    ),
    (
        "responses",
        {"model": "nope-1", "input": "hi", "start_within": "default"},
        404,
        "model_not_found",
        "model",
    ),
]


def endpoint(client: FlexInference, name: str) -> Any:
    return client.chat.completions if name == "chat" else getattr(client, name)


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "param"),
    CASES,
    ids=[f"{c[0]}-{c[3]}" for c in CASES],
)
def test_router_error_codes(
    client: FlexInference,
    name: str,
    body: dict[str, Any],
    status: int,
    code: str,
    param: str | None,
) -> None:
    err = raises(endpoint(client, name).create, body)
    assert type(err) is FlexInferenceError
    assert (err.status, err.code, err.param) == (status, code, param), err.body
    assert err.status_code == status
    expected_type = "not_found_error" if status == 404 else "invalid_request_error"
    assert err.type == expected_type
    assert "Fix:" in err.message, "the router says how to fix it"
    assert str(err).startswith(f"{status} {code}: ")
    if name == "messages":
        assert err.body["type"] == "error", "Anthropic's envelope on /v1/messages"
    else:
        assert set(err.body) == {"error"}, "OpenAI's envelope"


@pytest.mark.parametrize("name", ["responses", "chat", "interactions", "messages"])
def test_the_same_error_raises_before_a_stream_starts(client: FlexInference, name: str) -> None:
    body: dict[str, Any] = {"model": "gpt-5.5", "start_within": "default", "service_tier": "x"}
    if name in ("responses", "interactions"):
        body["input"] = "hi"
    else:
        body["messages"] = user("hi")
    if name == "messages":
        body["max_tokens"] = 10
    err = raises(endpoint(client, name).create, body, stream=True)
    assert (err.status, err.code) == (400, "service_tier_not_allowed")


def test_invalid_api_key(demo: Demo) -> None:
    wrong = "flex_live_" + "x" * 49
    with FlexInference(api_key=wrong, base_url=demo.base_url) as client:
        err = raises(
            client.responses.create, {"model": "gpt-5.5", "input": "hi", "start_within": "auto"}
        )
        assert (err.status, err.type, err.code) == (401, "authentication_error", "invalid_api_key")
        err = raises(
            client.messages.create,
            {
                "model": "claude-opus-4-8",
                "max_tokens": 5,
                "messages": user("hi"),
                "start_within": "auto",
            },
        )
        assert (err.status, err.code) == (401, "invalid_api_key")
        assert err.body["type"] == "error"


def test_no_byok_key(demo: Demo) -> None:
    with FlexInference(api_key=demo.extra["nokeys_key"], base_url=demo.base_url) as client:
        err = raises(
            client.responses.create,
            {"model": "gpt-5.5", "input": "hi", "start_within": "priority"},
        )
        assert (err.status, err.code) == (400, "no_byok_key")
        assert "openai" in err.message
        err = raises(
            client.messages.create,
            {
                "model": "claude-opus-4-8",
                "max_tokens": 5,
                "messages": user("hi"),
                "start_within": "default",
            },
        )
        assert (err.status, err.code) == (400, "no_byok_key")
        assert "anthropic" in err.message


def test_past_due_pauses_flex_and_default_keeps_working(demo: Demo) -> None:
    with FlexInference(api_key=demo.extra["pastdue_key"], base_url=demo.base_url) as client:
        duration = {"model": "gpt-5.5", "input": "hi", "start_within": "00h-00m-30s"}
        with pytest.raises(PaymentRequiredError) as info:
            client.responses.create(duration)
        err = info.value
        assert isinstance(err, FlexInferenceError)
        assert (err.status, err.type, err.code, err.param) == (
            402,
            "billing_error",
            "payment_required",
            "start_within",
        )
        # Streams and the Anthropic envelope too.
        with pytest.raises(PaymentRequiredError):
            client.responses.create(duration, stream=True)
        with pytest.raises(PaymentRequiredError) as info:
            client.messages.create(
                {
                    "model": "gpt-5.5",
                    "max_tokens": 10,
                    "messages": user("hi"),
                    "start_within": "00h-00m-30s",
                }
            )
        assert info.value.code == "payment_required"
        # Free routing keeps working for the same org.
        for tier in ("default", "priority", "auto"):
            res = client.responses.create({"model": "gpt-5.5", "input": "hi", "start_within": tier})
            assert output_text(res).startswith("Simulated answer")


def test_provider_errors_pass_through_in_their_own_envelopes(client: FlexInference) -> None:
    # Anthropic's envelope: {"type": "error", "error": {"type", "message"}}, no code.
    err = raises(
        client.messages.create,
        {
            "model": "claude-opus-4-8",
            "max_tokens": 10,
            "messages": user("hi #sim status=400"),
            "start_within": "default",
        },
    )
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", None)
    assert "Simulated error" in err.message
    # Gemini's: {"error": {"code": 400, "message", "status": "INVALID_ARGUMENT"}}.
    err = raises(
        client.interactions.create,
        {"model": "gemini-3.5-flash", "input": "hi #sim status=400", "start_within": "default"},
    )
    assert (err.status, err.type, err.code) == (400, "INVALID_ARGUMENT", None)
    assert "Simulated error" in err.message
    # OpenAI's, with its own code.
    err = raises(
        client.responses.create,
        {"model": "gpt-5.5", "input": "hi #sim status=429", "start_within": "default"},
    )
    assert (err.status, err.code) == (429, "rate_limit_exceeded")
    # A server error before a stream starts raises from create().
    err = raises(
        client.messages.create,
        {
            "model": "claude-opus-4-8",
            "max_tokens": 10,
            "messages": user("hi #sim status=500"),
            "start_within": "default",
        },
        stream=True,
    )
    assert (err.status, err.type) == (500, "api_error")
