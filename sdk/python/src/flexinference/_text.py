"""Text helpers: the assistant's text out of a raw answer of each shape.

Answers come back as the raw provider JSON (never reshaped), so there is no ``output_text``
field on the wire; these compute it. Each returns ``""`` when the answer holds no text (e.g. only
a tool call).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["interaction_output_text", "message_output_text", "output_text"]


def _check(res: object, helper: str) -> Mapping[str, Any]:
    if not isinstance(res, Mapping):
        raise TypeError(
            f"{helper}() takes the dict that create() returned, got {type(res).__name__}."
        )
    return res


def _items(value: object) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def _texts(parts: object, kind: str) -> str:
    return "".join(
        p["text"] for p in _items(parts) if p.get("type") == kind and isinstance(p.get("text"), str)
    )


def output_text(res: Mapping[str, Any]) -> str:
    """The assistant's text of a Responses answer or a Chat Completions answer.

    A response: every ``output_text`` part of its ``message`` output items, in order. A chat
    completion: the first choice's ``message.content`` (a string, or its text parts).
    """
    res = _check(res, "output_text")
    if "output" in res:
        return "".join(
            _texts(item.get("content"), "output_text")
            for item in _items(res.get("output"))
            if item.get("type") == "message"
        )
    choices = list(_items(res.get("choices")))
    if not choices:
        return ""
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return _texts(content, "text")


def interaction_output_text(res: Mapping[str, Any]) -> str:
    """The assistant's text of an Interactions answer: the text of its ``model_output`` steps."""
    res = _check(res, "interaction_output_text")
    return "".join(
        _texts(step.get("content"), "text")
        for step in _items(res.get("steps"))
        if step.get("type") == "model_output"
    )


def message_output_text(res: Mapping[str, Any]) -> str:
    """The assistant's text of a Messages answer: its ``text`` content blocks, in order."""
    res = _check(res, "message_output_text")
    return _texts(res.get("content"), "text")
