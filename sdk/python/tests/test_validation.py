"""Every validation rule raises before a request leaves the machine.

`offline_client` goes through an httpx transport that fails the test when it is called, and each
test also checks that transport saw no request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from conftest import NoNetwork
from flexinference import AsyncFlexInference, FlexInference

SET_IT = 'Set it to "default", "priority", "auto", or a duration "HHh-MMm-SSs".'

VALID: dict[str, dict[str, Any]] = {
    "responses": {"model": "gpt-5.5", "input": "hi", "start_within": "default"},
    "chat": {
        "model": "gpt-5.5",
        "messages": [{"role": "user", "content": "hi"}],
        "start_within": "default",
    },
    "interactions": {"model": "gemini-3.5-flash", "input": "hi", "start_within": "default"},
    "messages": {
        "model": "claude-opus-4-8",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        "start_within": "default",
    },
}
ENDPOINTS = list(VALID)


def create(client: FlexInference, name: str, body: Any, stream: bool = False) -> Any:
    resource: Any = client.chat.completions if name == "chat" else getattr(client, name)
    return resource.create(body, stream=stream)


def rejected(client: FlexInference, no_network: NoNetwork, name: str, body: Any) -> str:
    """The ValueError's text for `body` on `name`, after checking nothing was sent."""
    with pytest.raises(ValueError, match=r"^Invalid request body:\n  ") as info:
        create(client, name, body)
    assert no_network.requests == []
    return str(info.value)


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


def test_the_seed_example_text_exactly(
    offline_client: FlexInference, no_network: NoNetwork
) -> None:
    text = rejected(offline_client, no_network, "responses", {"model": "gpt-5.5", "input": "hi"})
    assert text == (
        "Invalid request body:\n"
        '  Missing required parameter: `start_within`. Set it to "default", "priority", "auto", '
        'or a duration "HHh-MMm-SSs".'
    )


@pytest.mark.parametrize("name", ENDPOINTS)
@pytest.mark.parametrize("value", [None, "missing"])
def test_start_within_is_required(
    offline_client: FlexInference, no_network: NoNetwork, name: str, value: str | None
) -> None:
    body = without(VALID[name], "start_within")
    if value is None:
        body["start_within"] = None  # null counts as missing, as on the router
    text = rejected(offline_client, no_network, name, body)
    assert text == f"Invalid request body:\n  Missing required parameter: `start_within`. {SET_IT}"


BAD_START_WITHIN = [
    ("flex", 'Invalid value for `start_within`: "flex" is neither "default"'),
    ("Default", '"Default" is neither'),
    ("", '"" is neither'),
    ("30s", '"30s" is neither'),
    ("00h-00m-30", '"00h-00m-30" is neither'),
    ("0h-0m-30s", '"0h-0m-30s" is neither'),
    ("00h-00m-030s", '"00h-00m-030s" is neither'),
    ("00h:00m:30s", '"00h:00m:30s" is neither'),
    (" 00h-00m-30s", '" 00h-00m-30s" is neither'),
    ("00h-00m-30s\n", '"00h-00m-30s\\n" is neither'),
    ("\u0660\u0660h-\u0660\u0661m-\u0660\u0660s", "is neither"),  # Arabic-Indic digits
    ("00h-00m-04s", '"00h-00m-04s" is 4s, outside the allowed range of 5s ("00h-00m-05s") to 10m'),
    ("00h-00m-00s", '"00h-00m-00s" is 0s, outside the allowed range'),
    ("00h-10m-01s", '"00h-10m-01s" is 601s, outside the allowed range'),
    ("01h-00m-00s", '"01h-00m-00s" is 3600s, outside the allowed range'),
    ("99h-59m-59s", "is 359999s, outside the allowed range"),
    ("00h-00m-75s", 'has minutes or seconds of 60 or more; write 75 seconds as "00h-01m-15s"'),
    ("00h-60m-00s", 'write 3600 seconds as "01h-00m-00s"'),
    (30, "expected a string, got 30 (int). " + SET_IT),
    (30.0, "expected a string, got 30.0 (float)"),
    (True, "expected a string, got true (bool)"),
    (["default"], 'expected a string, got ["default"] (list)'),
    ({"seconds": 30}, "(dict)"),
]


@pytest.mark.parametrize(
    ("value", "expected"), BAD_START_WITHIN, ids=[repr(v) for v, _ in BAD_START_WITHIN]
)
def test_start_within_values_are_checked(
    offline_client: FlexInference, no_network: NoNetwork, value: object, expected: str
) -> None:
    for name in ENDPOINTS:
        body = {**VALID[name], "start_within": value}
        text = rejected(offline_client, no_network, name, body)
        assert expected in text, text
        assert text.count("\n") == 1, "one problem, one line"


@pytest.mark.parametrize("name", ENDPOINTS)
def test_model_is_required(offline_client: FlexInference, no_network: NoNetwork, name: str) -> None:
    text = rejected(offline_client, no_network, name, without(VALID[name], "model"))
    assert "Missing required parameter: `model`. Set it to a model id" in text
    for bad, shown in [("", '""'), ("   ", '"   "'), (5, "5 (int)"), (None, None)]:
        text = rejected(offline_client, no_network, name, {**VALID[name], "model": bad})
        if shown is None:
            assert "Missing required parameter: `model`" in text
        else:
            assert (
                f"Invalid value for `model`: expected a model id (a non-empty string), got {shown}"
                in text
            )


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("responses", "input"),
        ("interactions", "input"),
        ("chat", "messages"),
        ("messages", "messages"),
    ],
)
def test_the_content_field_is_required(
    offline_client: FlexInference, no_network: NoNetwork, name: str, field: str
) -> None:
    text = rejected(offline_client, no_network, name, without(VALID[name], field))
    assert f"Missing required parameter: `{field}`. Set it to" in text
    text = rejected(offline_client, no_network, name, {**VALID[name], field: None})
    assert f"Missing required parameter: `{field}`" in text


@pytest.mark.parametrize("name", ["chat", "messages"])
def test_messages_must_be_a_non_empty_list(
    offline_client: FlexInference, no_network: NoNetwork, name: str
) -> None:
    text = rejected(offline_client, no_network, name, {**VALID[name], "messages": "hi"})
    assert 'Invalid value for `messages`: expected a list of messages, got "hi" (str).' in text
    text = rejected(offline_client, no_network, name, {**VALID[name], "messages": []})
    assert "Invalid value for `messages`: the list is empty." in text


def test_max_tokens_is_required_on_messages(
    offline_client: FlexInference, no_network: NoNetwork
) -> None:
    text = rejected(
        offline_client, no_network, "messages", without(VALID["messages"], "max_tokens")
    )
    assert "Missing required parameter: `max_tokens`." in text
    assert '"max_tokens": 1024' in text
    for bad, shown in [
        (0, "0 (int)"),
        (-1, "-1 (int)"),
        ("1024", '"1024" (str)'),
        (10.5, "10.5 (float)"),
        (True, "true (bool)"),
    ]:
        text = rejected(
            offline_client, no_network, "messages", {**VALID["messages"], "max_tokens": bad}
        )
        assert f"Invalid value for `max_tokens`: expected a positive integer, got {shown}" in text


@pytest.mark.parametrize("name", ["responses", "chat", "interactions"])
def test_max_tokens_is_not_required_elsewhere(name: str) -> None:
    sent = Recorder()
    client = sent.client()
    create(client, name, VALID[name])
    assert len(sent.bodies) == 1


def test_every_problem_is_listed_at_once(
    offline_client: FlexInference, no_network: NoNetwork
) -> None:
    text = rejected(
        offline_client,
        no_network,
        "messages",
        {"messages": [], "max_tokens": 0, "start_within": "5s"},
    )
    lines = text.split("\n")
    assert lines[0] == "Invalid request body:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "Invalid value for `start_within`",
        "Missing required parameter",
        "Invalid value for `messages`",
        "Invalid value for `max_tokens`",
    ]


@pytest.mark.parametrize("name", ENDPOINTS)
def test_stream_in_the_body_must_agree(
    offline_client: FlexInference, no_network: NoNetwork, name: str
) -> None:
    text = rejected(offline_client, no_network, name, {**VALID[name], "stream": True})
    assert (
        'Conflicting `stream`: the body sets "stream": true but create() was called with '
        "stream=False." in text
    )
    with pytest.raises(
        ValueError,
        match='the body sets "stream": false but create\\(\\) was called with stream=True',
    ):
        create(offline_client, name, {**VALID[name], "stream": False}, stream=True)
    assert no_network.requests == []


def test_bodies_that_are_not_json_objects(
    offline_client: FlexInference, no_network: NoNetwork
) -> None:
    for body in (None, "hi", ["model", "gpt-5.5"], 42):
        with pytest.raises(TypeError, match="Invalid request body: expected a dict"):
            create(offline_client, "responses", body)
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        create(offline_client, "responses", {**VALID["responses"], "metadata": {"when": object()}})
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        create(offline_client, "responses", {**VALID["responses"], "temperature": float("nan")})
    with pytest.raises(TypeError, match="stream must be True or False"):
        create(offline_client, "responses", VALID["responses"], stream="yes")  # type: ignore[arg-type]
    assert no_network.requests == []


async def _async_rejects(no_network: NoNetwork) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(no_network))
    async with AsyncFlexInference(
        api_key="flex_live_test", base_url="http://flex.invalid/v1", client=http
    ) as client:
        with pytest.raises(ValueError, match="Missing required parameter: `start_within`"):
            await client.responses.create({"model": "gpt-5.5", "input": "hi"})
        with pytest.raises(ValueError, match="Missing required parameter: `max_tokens`"):
            await client.messages.create(
                {
                    "model": "claude-opus-4-8",
                    "messages": [{"role": "user", "content": "hi"}],
                    "start_within": "default",
                },
                stream=True,
            )
        with pytest.raises(ValueError, match="outside the allowed range"):
            await client.with_raw_response.chat.completions.create(
                {**VALID["chat"], "start_within": "00h-11m-00s"}
            )
    await http.aclose()


@pytest.mark.anyio
async def test_the_async_client_validates_before_sending(no_network: NoNetwork) -> None:
    await _async_rejects(no_network)
    assert no_network.requests == []


# --- what passes, and what is sent ----------------------------------------------------------


class Recorder:
    """A transport that records each request body and answers a canned 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        if json.loads(request.content).get("stream"):
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=b"data: [DONE]\n\n"
            )
        return httpx.Response(200, json={"object": "response", "output": []})

    def client(self) -> FlexInference:
        return FlexInference(
            api_key="flex_live_test",
            base_url="http://flex.invalid/v1/",
            client=httpx.Client(transport=httpx.MockTransport(self)),
        )


@pytest.mark.parametrize(
    "value",
    [
        "default",
        "priority",
        "auto",
        "00h-00m-05s",
        "00h-00m-30s",
        "00h-01m-30s",
        "00h-09m-59s",
        "00h-10m-00s",
    ],
)
def test_valid_start_within_values_are_sent(value: str) -> None:
    sent = Recorder()
    client = sent.client()
    for name in ENDPOINTS:
        create(client, name, {**VALID[name], "start_within": value})
    assert [json.loads(b)["start_within"] for b in sent.bodies] == [value] * 4
    assert [r.url.path for r in sent.requests] == [
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/interactions",
        "/v1/messages",
    ]


def test_unknown_fields_pass_through_untouched_and_the_body_is_not_mutated() -> None:
    sent = Recorder()
    client = sent.client()
    body: dict[str, Any] = {
        **VALID["responses"],
        "brand_new_openai_param": {"nested": [1, 2.5, None, True, "ü"]},
        "temperature": 0.3,
        "service_tier": "flex",  # the router's rule, not the SDK's: it answers 400
        "stream": False,
    }
    original = json.loads(json.dumps(body))
    client.responses.create(body)
    assert json.loads(sent.bodies[0]) == original
    client.responses.create(without(body, "stream"), stream=True)
    assert json.loads(sent.bodies[1]) == {**without(original, "stream"), "stream": True}
    assert body == original, "the caller's dict is left as it was"


def test_the_request_headers() -> None:
    sent = Recorder()
    client = sent.client()
    client.responses.create(VALID["responses"])
    list(client.responses.create(VALID["responses"], stream=True))
    first, second = sent.requests
    assert first.method == "POST"
    assert first.headers["authorization"] == "Bearer flex_live_test"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["accept"] == "application/json"
    assert first.headers["user-agent"].startswith("flexinference-python/1.3.0")
    assert second.headers["accept"] == "text/event-stream"
