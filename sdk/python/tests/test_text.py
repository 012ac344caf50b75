"""The text helpers on each answer shape, including the ones the demo does not produce."""

from __future__ import annotations

from typing import Any

import pytest

from flexinference import interaction_output_text, message_output_text, output_text


def test_output_text_of_a_response_joins_every_output_text_part() -> None:
    res: dict[str, Any] = {
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hello"},
                    {"type": "refusal", "refusal": "no"},
                    {"type": "output_text", "text": ", world"},
                ],
            },
            {"type": "function_call", "name": "f", "arguments": "{}"},
            {"type": "message", "content": [{"type": "output_text", "text": "!"}]},
        ],
    }
    assert output_text(res) == "Hello, world!"
    assert output_text({"object": "response", "output": []}) == ""


def test_output_text_of_a_chat_completion() -> None:
    assert output_text({"choices": [{"message": {"content": "Hi"}}]}) == "Hi"
    content = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    parts = {"choices": [{"message": {"content": content}}]}
    assert output_text(parts) == "ab"
    tool_only = {"choices": [{"message": {"content": None, "tool_calls": [{"id": "c"}]}}]}
    assert output_text(tool_only) == ""
    assert output_text({"choices": []}) == ""
    two = {"choices": [{"message": {"content": "first"}}, {"message": {"content": "second"}}]}
    assert output_text(two) == "first"


def test_interaction_output_text_reads_the_model_output_steps() -> None:
    res = {
        "object": "interaction",
        "steps": [
            {"type": "thought", "summary": [{"type": "text", "text": "hmm"}]},
            {"type": "model_output", "content": [{"type": "text", "text": "One"}]},
            {"type": "function_call", "name": "f", "arguments": {}},
            {
                "type": "model_output",
                "content": [{"type": "image"}, {"type": "text", "text": " two"}],
            },
        ],
    }
    assert interaction_output_text(res) == "One two"
    assert interaction_output_text({"object": "interaction", "steps": []}) == ""


def test_message_output_text_reads_the_text_blocks() -> None:
    res = {
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Sum"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {}},
            {"type": "text", "text": "mary"},
        ],
    }
    assert message_output_text(res) == "Summary"
    assert message_output_text({"type": "message", "content": []}) == ""


def test_odd_shapes_give_empty_text_and_non_dicts_a_type_error() -> None:
    assert output_text({"output": "nope"}) == ""
    assert output_text({"choices": [{"message": "nope"}]}) == ""
    not_text = {"steps": [{"type": "model_output", "content": [{"type": "text", "text": 5}]}]}
    assert interaction_output_text(not_text) == ""
    assert message_output_text({}) == ""
    with pytest.raises(
        TypeError, match=r"output_text\(\) takes the dict that create\(\) returned, got str"
    ):
        output_text("Hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got list"):
        message_output_text([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got NoneType"):
        interaction_output_text(None)  # type: ignore[arg-type]
