"""`AsyncFlexInference` against a real `flex up --demo`: every endpoint, streams, errors, 402."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import Demo
from flexinference import (
    AsyncFlexInference,
    AsyncStream,
    FlexInferenceError,
    PaymentRequiredError,
    interaction_output_text,
    message_output_text,
    output_text,
)

pytestmark = [pytest.mark.server, pytest.mark.anyio]

SIMULATED = "Simulated answer"


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_every_endpoint_concurrently(aclient: AsyncFlexInference) -> None:
    responses, chat, interaction, message = await asyncio.gather(
        aclient.responses.create(
            {"model": "gpt-5.5", "input": "Hi", "start_within": "00h-00m-10s"}
        ),
        aclient.chat.completions.create(
            {"model": "gpt-5.5", "messages": user("Hi"), "start_within": "default"}
        ),
        aclient.interactions.create(
            {"model": "gemini-3.5-flash", "input": "Hi", "start_within": "00h-00m-30s"}
        ),
        aclient.messages.create(
            {
                "model": "claude-opus-4-8",
                "max_tokens": 64,
                "messages": user("Hi"),
                "start_within": "default",
            }
        ),
    )
    assert responses["service_tier"] == "flex"
    assert output_text(responses).startswith(SIMULATED)
    assert chat["object"] == "chat.completion"
    assert output_text(chat).startswith(SIMULATED)
    assert interaction["service_tier"] == "flex"
    assert interaction_output_text(interaction).startswith(SIMULATED)
    assert message["usage"]["service_tier"] == "standard"
    assert message_output_text(message).startswith(SIMULATED)


async def test_streams(aclient: AsyncFlexInference) -> None:
    stream = await aclient.responses.create(
        {
            "model": "gpt-5-nano",
            "input": "Count. #sim output_tokens=4",
            "start_within": "00h-00m-20s",
        },
        stream=True,
    )
    assert isinstance(stream, AsyncStream)
    assert stream.outcome.served_tier == "flex"
    text = ""
    async for event in stream:
        if event["type"] == "response.output_text.delta":
            text += event["delta"]
    assert text == "Simulated answer word1 word2"
    assert stream.response.is_closed

    chunks = [
        c
        async for c in await aclient.chat.completions.create(
            {
                "model": "gpt-5.5",
                "messages": user("Hi #sim output_tokens=3"),
                "start_within": "auto",
            },
            stream=True,
        )
    ]
    assert "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) == (
        "Simulated answer word1"
    )

    async with await aclient.interactions.create(
        {
            "model": "gemini-3.5-flash",
            "input": "Hi #sim output_tokens=3",
            "start_within": "default",
        },
        stream=True,
    ) as istream:
        kinds = [e["event_type"] async for e in istream]
    assert kinds[0] == "interaction.created"
    assert kinds[-1] == "interaction.completed"

    raw = await aclient.with_raw_response.messages.create(
        {
            "model": "claude-opus-4-8",
            "max_tokens": 64,
            "messages": user("Hi #sim output_tokens=3"),
            "start_within": "default",
        },
        stream=True,
    )
    assert raw.outcome.served_tier == "standard"
    mstream = raw.parse()
    first = await mstream.__anext__()
    assert first["type"] == "message_start"
    await mstream.close()
    assert mstream.response.is_closed


async def test_raw_response_outcome(aclient: AsyncFlexInference) -> None:
    # Flex answers 429 (no capacity): it is retried until standard must launch to start by the
    # deadline, so the 5 s budget is spent.
    raw = await aclient.with_raw_response.chat.completions.create(
        {
            "model": "gpt-5.5",
            "messages": user("Hi #sim flex_status=429"),
            "start_within": "00h-00m-05s",
        }
    )
    assert raw.outcome.served_tier == "standard"
    assert raw.outcome.reason == "flex_capacity"
    assert raw.parse()["service_tier"] == "default"


async def test_errors(aclient: AsyncFlexInference, demo: Demo) -> None:
    with pytest.raises(FlexInferenceError) as info:
        await aclient.messages.create(
            {
                "model": "claude-opus-4-8",
                "max_tokens": 5,
                "messages": user("hi"),
                "start_within": "00h-00m-30s",
            }
        )
    assert (info.value.status, info.value.code) == (400, "flex_unsupported_for_anthropic")
    with pytest.raises(FlexInferenceError) as info:
        await aclient.responses.create(
            {"model": "gemini-3.5-flash", "input": "hi", "start_within": "auto"}, stream=True
        )
    assert info.value.code == "auto_unsupported_for_gemini"

    async with AsyncFlexInference(
        api_key=demo.extra["pastdue_key"], base_url=demo.base_url
    ) as pastdue:
        with pytest.raises(PaymentRequiredError) as paid:
            await pastdue.interactions.create(
                {"model": "gemini-3.5-flash", "input": "hi", "start_within": "00h-00m-30s"}
            )
        assert paid.value.code == "payment_required"
        res = await pastdue.responses.create(
            {"model": "gpt-5.5", "input": "hi", "start_within": "default"}
        )
        assert output_text(res).startswith(SIMULATED)
