"""Request validation: the parts of the body FlexInference owns, checked before anything is sent.

Only `start_within`, `model`, the content field (`input` or `messages`) and, on the Messages
shape, `max_tokens` are checked. Every other field passes through untouched, so new provider
parameters keep working; responses are never validated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_START_WITHIN_SECONDS", "MIN_START_WITHIN_SECONDS", "TIERS", "Endpoint"]

TIERS = ("default", "priority", "auto")
MIN_START_WITHIN_SECONDS = 5
MAX_START_WITHIN_SECONDS = 600

_DURATION = re.compile(r"([0-9]{2})h-([0-9]{2})m-([0-9]{2})s")
_SET_START_WITHIN = 'Set it to "default", "priority", "auto", or a duration "HHh-MMm-SSs".'


@dataclass(frozen=True)
class Endpoint:
    """One of the four caller formats: where it posts and what its body must carry."""

    path: str
    content_field: str
    content_hint: str
    requires_max_tokens: bool = False


RESPONSES = Endpoint(
    "/responses",
    "input",
    'Set it to the prompt text or a list of input items, e.g. "input": "Hello!".',
)
CHAT_COMPLETIONS = Endpoint(
    "/chat/completions",
    "messages",
    'Set it to a list of messages, e.g. "messages": [{"role": "user", "content": "Hello!"}].',
)
INTERACTIONS = Endpoint(
    "/interactions",
    "input",
    "Set it to the prompt text, a list of content parts, or the list of steps so far, "
    'e.g. "input": "Hello!".',
)
MESSAGES = Endpoint(
    "/messages",
    "messages",
    'Set it to a list of messages, e.g. "messages": [{"role": "user", "content": "Hello!"}].',
    requires_max_tokens=True,
)


def _shown(value: object) -> str:
    """A short rendering of a caller's value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object) -> str:
    return type(value).__name__


def start_within_problem(value: object) -> str | None:
    """What is wrong with a present `start_within` value, or None when it is valid."""
    if not isinstance(value, str):
        return (
            f"Invalid value for `start_within`: expected a string, got {_shown(value)} "
            f"({_kind(value)}). {_SET_START_WITHIN}"
        )
    if value in TIERS:
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        return (
            f'Invalid value for `start_within`: {_shown(value)} is neither "default", '
            f'"priority", "auto" nor a duration "HHh-MMm-SSs" (two digits each, e.g. '
            f'"00h-00m-30s" for 30 seconds).'
        )
    hours, minutes, seconds = (int(g) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if minutes >= 60 or seconds >= 60:
        h, rest = divmod(total, 3600)
        m, s = divmod(rest, 60)
        return (
            f"Invalid value for `start_within`: {_shown(value)} has minutes or seconds of 60 or "
            f'more; write {total} seconds as "{h:02d}h-{m:02d}m-{s:02d}s".'
        )
    if not MIN_START_WITHIN_SECONDS <= total <= MAX_START_WITHIN_SECONDS:
        return (
            f"Invalid value for `start_within`: {_shown(value)} is {total}s, outside the allowed "
            f'range of 5s ("00h-00m-05s") to 10m ("00h-10m-00s"). Use a duration in that range, '
            f'or "default", "priority" or "auto".'
        )
    return None


def _missing(body: Mapping[str, Any], field: str) -> bool:
    return body.get(field) is None


def problems(endpoint: Endpoint, body: Mapping[str, Any], stream: bool) -> list[str]:
    """Every problem of `body` for `endpoint`, in the order of the fields; empty when valid."""
    found: list[str] = []
    if _missing(body, "start_within"):
        found.append(f"Missing required parameter: `start_within`. {_SET_START_WITHIN}")
    else:
        problem = start_within_problem(body["start_within"])
        if problem is not None:
            found.append(problem)

    if _missing(body, "model"):
        found.append(
            'Missing required parameter: `model`. Set it to a model id, e.g. "gpt-5.5", '
            '"gemini-3.5-flash" or "claude-opus-4-8".'
        )
    elif not isinstance(body["model"], str) or not body["model"].strip():
        found.append(
            f"Invalid value for `model`: expected a model id (a non-empty string), got "
            f"{_shown(body['model'])} ({_kind(body['model'])})."
        )

    field = endpoint.content_field
    if _missing(body, field):
        found.append(f"Missing required parameter: `{field}`. {endpoint.content_hint}")
    elif field == "messages":
        messages = body["messages"]
        if not isinstance(messages, (list, tuple)):
            found.append(
                f"Invalid value for `messages`: expected a list of messages, got "
                f"{_shown(messages)} ({_kind(messages)}). {endpoint.content_hint}"
            )
        elif not messages:
            found.append(
                f"Invalid value for `messages`: the list is empty. {endpoint.content_hint}"
            )

    if endpoint.requires_max_tokens:
        if _missing(body, "max_tokens"):
            found.append(
                "Missing required parameter: `max_tokens`. The Messages shape requires a cap on "
                'output tokens (Anthropic requires it), e.g. "max_tokens": 1024.'
            )
        else:
            cap = body["max_tokens"]
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                found.append(
                    f"Invalid value for `max_tokens`: expected a positive integer, got "
                    f'{_shown(cap)} ({_kind(cap)}), e.g. "max_tokens": 1024.'
                )

    if body.get("stream") is not None and body["stream"] is not stream:
        found.append(
            f'Conflicting `stream`: the body sets "stream": {_shown(body["stream"])} but '
            f"create() was called with stream={stream}. Pass stream=True or stream=False to "
            f"create() (it decides whether you get a dict or an event stream) and leave "
            f"`stream` out of the body."
        )
    return found


def prepare(endpoint: Endpoint, body: object, stream: bool) -> bytes:
    """Validates `body` and returns the JSON to send; raises before any request is made.

    Raises:
        TypeError: `body` is not a mapping, or holds a value JSON cannot encode.
        ValueError: a field FlexInference owns is missing or invalid (every problem is listed).
    """
    if not isinstance(body, Mapping):
        raise TypeError(
            f"Invalid request body: expected a dict (a JSON object), got {_kind(body)}."
        )
    found = problems(endpoint, body, stream)
    if found:
        raise ValueError("Invalid request body:\n  " + "\n  ".join(found))
    payload = dict(body)
    if stream:
        payload["stream"] = True
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"Invalid request body: it cannot be sent as JSON ({e}).") from e
