"""The SDK's local validation agrees with the router's: what the SDK refuses before sending, the
router refuses too (checked by sending it past the SDK), and every `start_within` the router
accepts, the SDK accepts.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import Demo
from flexinference import FlexInference
from flexinference._validation import RESPONSES, problems

pytestmark = pytest.mark.server

START_WITHIN = [
    "default",
    "priority",
    "auto",
    "00h-00m-05s",
    "00h-00m-04s",
    "00h-00m-00s",
    "00h-10m-00s",
    "00h-10m-01s",
    "00h-09m-59s",
    "00h-01m-30s",
    "01h-00m-00s",
    "00h-00m-75s",
    "00h-60m-00s",
    "0h-0m-30s",
    "00h-00m-030s",
    "00h-00m-30",
    "30s",
    "Default",
    "flex",
    "",
    " 00h-00m-30s",
    "00h-00m-30s ",
    "\u0660\u0660h-\u0660\u0660m-\u0663\u0660s",
    "\uff10\uff10h-\uff10\uff10m-\uff13\uff10s",
    30,
    True,
    None,
    ["default"],
]


def post(demo: Demo, path: str, body: dict[str, Any]) -> httpx.Response:
    """Sends `body` as it is, past the SDK's validation."""
    return demo.raw_post(path, demo.api_key, body)


@pytest.mark.parametrize("value", START_WITHIN, ids=[repr(v) for v in START_WITHIN])
def test_start_within_verdicts_agree(demo: Demo, value: object) -> None:
    # gpt-4o has no flex tier: a valid duration is answered 400 model_not_flex_capable at once,
    # after start_within was accepted, and a tier name is proxied to the simulator.
    body: dict[str, Any] = {"model": "gpt-4o", "input": "hi", "start_within": value}
    sdk_refuses = bool(problems(RESPONSES, body, stream=False))
    answer = post(demo, "/responses", body)
    code = answer.json().get("error", {}).get("code") if answer.status_code >= 400 else None
    router_refuses = code in ("invalid_start_within", "missing_start_within")
    assert sdk_refuses == router_refuses, (value, answer.status_code, answer.text[:300])
    if not router_refuses:
        assert answer.status_code == 200 or code == "model_not_flex_capable", answer.text[:300]


USER = [{"role": "user", "content": "hi"}]
# Three rules of the SDK go further than the router, which passes these bodies on to the
# provider (and the demo's simulator answers them): `input` on /v1/responses (seed 002: "model and
# input/messages must be present"), a non-empty `messages` list and `max_tokens` >= 1 (OpenAI
# and Anthropic refuse an empty list and a zero cap with a 400 of their own).
REFUSED_BY_BOTH: list[tuple[str, dict[str, Any]]] = [
    ("/responses", {"input": "hi", "start_within": "default"}),
    ("/responses", {"model": "", "input": "hi", "start_within": "default"}),
    ("/responses", {"model": 5, "input": "hi", "start_within": "default"}),
    ("/chat/completions", {"model": "gpt-5.5", "start_within": "default"}),
    ("/chat/completions", {"model": "gpt-5.5", "messages": "hi", "start_within": "default"}),
    ("/interactions", {"model": "gemini-3.5-flash", "start_within": "default"}),
    ("/messages", {"model": "claude-opus-4-8", "max_tokens": 8, "start_within": "default"}),
    ("/messages", {"model": "claude-opus-4-8", "messages": USER, "start_within": "default"}),
    ("/messages", {"model": "gpt-5.5", "messages": USER, "start_within": "default"}),
    (
        "/messages",
        {"model": "claude-opus-4-8", "max_tokens": "8", "messages": USER, "start_within": "auto"},
    ),
]


@pytest.mark.parametrize(
    ("path", "body"), REFUSED_BY_BOTH, ids=[f"{p}:{sorted(b)}" for p, b in REFUSED_BY_BOTH]
)
def test_what_the_sdk_refuses_the_router_refuses(
    demo: Demo, client: FlexInference, path: str, body: dict[str, Any]
) -> None:
    resource: Any = {
        "/responses": client.responses,
        "/chat/completions": client.chat.completions,
        "/interactions": client.interactions,
        "/messages": client.messages,
    }[path]
    with pytest.raises(ValueError, match="Invalid request body"):
        resource.create(body)
    answer = post(demo, path, body)
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
