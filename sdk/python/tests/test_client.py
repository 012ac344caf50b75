"""Construction, configuration, closing, and reading error envelopes (no server needed)."""

from __future__ import annotations

import importlib.metadata
import pickle
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

import flexinference
from flexinference import (
    DEFAULT_BASE_URL,
    AsyncFlexInference,
    FlexInference,
    FlexInferenceError,
    PaymentRequiredError,
)

BODY = {"model": "gpt-5.5", "input": "hi", "start_within": "default"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXINFERENCE_API_KEY", raising=False)
    monkeypatch.delenv("FLEXINFERENCE_BASE_URL", raising=False)


def test_version_and_public_names() -> None:
    assert flexinference.__version__ == "1.3.0"
    assert importlib.metadata.version("flexinference") == flexinference.__version__
    assert (Path(flexinference.__file__).parent / "py.typed").is_file(), "PEP 561 marker"
    for name in flexinference.__all__:
        assert hasattr(flexinference, name), name


def test_defaults() -> None:
    with FlexInference(api_key="flex_live_abc") as client:
        assert client.base_url == DEFAULT_BASE_URL == "https://api.flexinference.com/v1"
        http = client.http_client
        assert isinstance(http, httpx.Client)
        assert http.timeout == httpx.Timeout(600.0, connect=10.0)
        assert http.timeout.read == 600.0
        assert http.timeout.connect == 10.0
        assert "flex_live_abc" not in repr(client)
    assert http.is_closed


def test_the_environment_fills_in_what_is_not_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXINFERENCE_API_KEY", "flex_live_env")
    monkeypatch.setenv("FLEXINFERENCE_BASE_URL", "http://127.0.0.1:9/v1/")
    with FlexInference() as client:
        assert client.api_key == "flex_live_env"
        assert client.base_url == "http://127.0.0.1:9/v1"
    with FlexInference(api_key="flex_live_arg", base_url="https://other.example/v1") as client:
        assert client.api_key == "flex_live_arg"
        assert client.base_url == "https://other.example/v1"


def test_a_missing_api_key_says_how_to_pass_it() -> None:
    with pytest.raises(ValueError, match="FLEXINFERENCE_API_KEY") as info:
        FlexInference()
    assert 'api_key="flex_live_..."' in str(info.value)
    with pytest.raises(ValueError, match="No API key"):
        AsyncFlexInference(api_key="")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        FlexInference(api_key="k", base_url="api.flexinference.com/v1")
    with pytest.raises(TypeError, match="use AsyncFlexInference"):
        FlexInference(api_key="k", client=httpx.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use FlexInference"):
        AsyncFlexInference(api_key="k", client=httpx.Client())  # type: ignore[arg-type]


def test_a_client_passed_in_stays_open() -> None:
    http = httpx.Client()
    with FlexInference(api_key="k", client=http) as client:
        assert client.http_client is http
    client.close()
    assert not http.is_closed
    http.close()


def test_close_is_idempotent() -> None:
    client = FlexInference(api_key="k")
    client.close()
    client.close()
    assert client.http_client.is_closed


@pytest.mark.anyio
async def test_the_async_client_closes_what_it_owns() -> None:
    async with AsyncFlexInference(api_key="k") as client:
        assert client.http_client.timeout == httpx.Timeout(600.0, connect=10.0)
    assert client.http_client.is_closed
    mine = httpx.AsyncClient()
    async with AsyncFlexInference(api_key="k", client=mine):
        pass
    assert not mine.is_closed
    await mine.aclose()


def answering(status: int, content: bytes, content_type: str = "application/json") -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            headers={"content-type": content_type, "x-request-id": "req_42"},
            content=content,
        )

    return FlexInference(
        api_key="k",
        base_url="http://flex.invalid/v1",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def test_an_openai_envelope() -> None:
    client = answering(
        400,
        b'{"error":{"message":"m","type":"invalid_request_error","param":"service_tier",'
        b'"code":"service_tier_not_allowed"}}',
    )
    with pytest.raises(FlexInferenceError) as info:
        client.responses.create(BODY)
    err = info.value
    assert (err.status, err.type, err.code, err.param, err.message) == (
        400,
        "invalid_request_error",
        "service_tier_not_allowed",
        "service_tier",
        "m",
    )
    assert err.request_id == "req_42"
    assert str(err) == "400 service_tier_not_allowed: m"
    assert "code='service_tier_not_allowed'" in repr(err)


def test_an_anthropic_envelope_and_402() -> None:
    client = answering(
        402,
        b'{"type":"error","error":{"type":"billing_error","message":"past due",'
        b'"code":"payment_required","param":"start_within"}}',
    )
    with pytest.raises(PaymentRequiredError) as info:
        client.messages.create({**BODY, "max_tokens": 5, "messages": [{"role": "user"}]})
    err = info.value
    assert (err.status, err.type, err.code, err.param) == (
        402,
        "billing_error",
        "payment_required",
        "start_within",
    )


def test_a_402_without_a_body_is_still_payment_required() -> None:
    with pytest.raises(PaymentRequiredError) as info:
        answering(402, b"", "text/plain").responses.create(BODY)
    assert info.value.message == "HTTP 402 Payment Required"
    assert info.value.code is None


def test_a_gemini_envelope() -> None:
    client = answering(400, b'{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}')
    with pytest.raises(FlexInferenceError) as info:
        client.interactions.create(BODY)
    err = info.value
    assert (err.status, err.type, err.code, err.message) == (400, "INVALID_ARGUMENT", None, "bad")
    assert str(err) == "400 INVALID_ARGUMENT: bad"


def test_a_body_that_is_not_json() -> None:
    with pytest.raises(FlexInferenceError) as info:
        answering(502, b"<html>Bad Gateway</html>", "text/html").responses.create(BODY)
    err = info.value
    assert err.status == 502
    assert err.message == "HTTP 502 Bad Gateway: <html>Bad Gateway</html>"
    assert err.body == "<html>Bad Gateway</html>"
    assert (err.type, err.code, err.param) == (None, None, None)


def test_a_success_that_is_not_a_json_object() -> None:
    with pytest.raises(FlexInferenceError, match="The answer is not a JSON object"):
        answering(200, b"[1, 2]").responses.create(BODY)


def test_errors_survive_pickling_without_the_response() -> None:
    with pytest.raises(PaymentRequiredError) as info:
        answering(
            402, b'{"error":{"message":"m","type":"billing_error","code":"payment_required"}}'
        ).responses.create(BODY)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is PaymentRequiredError
    assert (copy.status, copy.type, copy.code, copy.message) == (
        402,
        "billing_error",
        "payment_required",
        "m",
    )
    assert copy.body == info.value.body
    assert copy.response is None


def test_a_router_that_is_not_listening_raises_httpx_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = FlexInference(api_key="k", base_url=f"http://127.0.0.1:{port}/v1")
        with client, pytest.raises(httpx.ConnectError):
            client.responses.create(BODY)


def test_errors_can_be_made_and_caught_by_callers() -> None:
    err = PaymentRequiredError(402, "pay", code="payment_required")
    assert isinstance(err, FlexInferenceError)
    assert err.request_id is None
    assert str(err) == "402 payment_required: pay"
    assert str(FlexInferenceError(500, "x")) == "500: x"
