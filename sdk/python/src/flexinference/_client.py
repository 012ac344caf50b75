"""`FlexInference` and `AsyncFlexInference`: one pooled httpx client, four endpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from ._errors import FlexInferenceError, error_from_response
from ._response import RawResponse
from ._streaming import AsyncStream, Stream
from ._validation import CHAT_COMPLETIONS, INTERACTIONS, MESSAGES, RESPONSES, Endpoint, prepare
from ._version import __version__

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "AsyncFlexInference",
    "FlexInference",
]

DEFAULT_BASE_URL = "https://api.flexinference.com/v1"
#: 600 s to read (a long answer may take minutes to start on a generous `start_within` and more
#: to finish), 10 s to connect.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
API_KEY_ENV = "FLEXINFERENCE_API_KEY"
BASE_URL_ENV = "FLEXINFERENCE_BASE_URL"

Body = Mapping[str, Any]
Json = dict[str, Any]


def _resolve_api_key(api_key: str | None) -> str:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key is None or key == "":
        raise ValueError(
            f'No API key: pass FlexInference(api_key="flex_live_...") or set {API_KEY_ENV}. '
            "It is your FlexInference key (flex_live_...), not a provider key."
        )
    if not isinstance(key, str):
        raise TypeError(f"api_key must be a string, got {type(key).__name__}.")
    return key


def _resolve_base_url(base_url: str | None) -> str:
    url = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if not isinstance(url, str):
        raise TypeError(f"base_url must be a string, got {type(url).__name__}.")
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"base_url must be an http:// or https:// URL ending in /v1, got {url!r} "
            f"(the default is {DEFAULT_BASE_URL})."
        )
    return url.rstrip("/")


def _check_stream(stream: object) -> bool:
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}.")
    return stream


def _json(response: httpx.Response) -> Json:
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FlexInferenceError(
            response.status_code,
            f"The answer is not a JSON object: {response.text[:200]!r}. "
            f"Is base_url a FlexInference endpoint?",
            body=response.text,
            response=response,
        )
    return body


class _BaseClient:
    api_key: str
    base_url: str

    def _url(self, endpoint: Endpoint) -> str:
        return self.base_url + endpoint.path

    def _headers(self, stream: bool) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": f"flexinference-python/{__version__}",
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


class FlexInference(_BaseClient):
    """The FlexInference client.

    Args:
        api_key: your ``flex_live_`` key; default: the ``FLEXINFERENCE_API_KEY`` variable.
        base_url: the router endpoint; default: ``FLEXINFERENCE_BASE_URL``, else
            ``https://api.flexinference.com/v1``.
        client: an ``httpx.Client`` of your own (proxies, TLS, timeouts, event hooks). It stays
            yours: `close()` leaves it open. Default: a pooled ``httpx.Client`` with a 600 s read
            and 10 s connect timeout, closed by `close()`.

    Endpoints: `responses`, `chat.completions`, `interactions`, `messages`; each ``create(body,
    stream=False)`` takes a dict and returns the raw JSON dict (or, with ``stream=True``, a
    `Stream` of event dicts). ``with_raw_response`` returns the same wrapped with its HTTP
    response, for the ``x-flex-*`` routing headers.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.api_key = _resolve_api_key(api_key)
        self.base_url = _resolve_base_url(base_url)
        if client is not None and not isinstance(client, httpx.Client):
            raise TypeError(
                f"client must be an httpx.Client, got {type(client).__name__} "
                "(use AsyncFlexInference for an httpx.AsyncClient)."
            )
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=DEFAULT_TIMEOUT)
        self.responses = Responses(self, RESPONSES)
        self.chat = Chat(self)
        self.interactions = Interactions(self, INTERACTIONS)
        self.messages = Messages(self, MESSAGES)
        self.with_raw_response = WithRawResponse(self)

    @property
    def http_client(self) -> httpx.Client:
        """The ``httpx.Client`` requests go through."""
        return self._client

    def _create(
        self, endpoint: Endpoint, body: Body, stream: bool
    ) -> tuple[httpx.Response, Json | Stream]:
        payload = prepare(endpoint, body, _check_stream(stream))
        request = self._client.build_request(
            "POST", self._url(endpoint), content=payload, headers=self._headers(stream)
        )
        response = self._client.send(request, stream=stream)
        if stream:
            if not response.is_success:
                try:
                    response.read()
                finally:
                    response.close()
                raise error_from_response(response)
            return response, Stream(response)
        if not response.is_success:
            raise error_from_response(response)
        return response, _json(response)

    def close(self) -> None:
        """Releases the pooled connections (a client passed in as ``client`` stays open)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> FlexInference:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Create:
    def __init__(self, client: FlexInference, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint

    @overload
    def create(self, body: Body, stream: Literal[False] = False) -> Json: ...
    @overload
    def create(self, body: Body, stream: Literal[True]) -> Stream: ...
    @overload
    def create(self, body: Body, stream: bool) -> Json | Stream: ...
    def create(self, body: Body, stream: bool = False) -> Json | Stream:
        """Validates `body`, sends it, and returns the raw JSON dict, or a `Stream` of events.

        Raises:
            ValueError: `start_within`, `model`, the content field or `max_tokens` is missing or
                invalid; nothing was sent.
            FlexInferenceError: a non-2xx answer (`PaymentRequiredError` for 402).
        """
        return self._client._create(self._endpoint, body, stream)[1]


class _RawCreate:
    def __init__(self, client: FlexInference, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint

    @overload
    def create(self, body: Body, stream: Literal[False] = False) -> RawResponse[Json]: ...
    @overload
    def create(self, body: Body, stream: Literal[True]) -> RawResponse[Stream]: ...
    @overload
    def create(self, body: Body, stream: bool) -> RawResponse[Json] | RawResponse[Stream]: ...
    def create(self, body: Body, stream: bool = False) -> RawResponse[Json] | RawResponse[Stream]:
        """Like ``create()``, wrapped with the HTTP response (headers, `outcome`)."""
        response, parsed = self._client._create(self._endpoint, body, stream)
        if isinstance(parsed, Stream):
            return RawResponse(response, parsed)
        return RawResponse(response, parsed)


class Responses(_Create):
    """``POST /v1/responses``: the OpenAI Responses shape."""


class Completions(_Create):
    """``POST /v1/chat/completions``: the OpenAI Chat Completions shape."""


class Chat:
    """``client.chat.completions``."""

    def __init__(self, client: FlexInference) -> None:
        self.completions = Completions(client, CHAT_COMPLETIONS)


class Interactions(_Create):
    """``POST /v1/interactions``: Google's Interactions shape (any model)."""


class Messages(_Create):
    """``POST /v1/messages``: Anthropic's Messages shape (any model); `max_tokens` required."""


class RawChat:
    def __init__(self, client: FlexInference) -> None:
        self.completions = _RawCreate(client, CHAT_COMPLETIONS)


class WithRawResponse:
    """``client.with_raw_response.<endpoint>.create(...)`` returns a `RawResponse`."""

    def __init__(self, client: FlexInference) -> None:
        self.responses = _RawCreate(client, RESPONSES)
        self.chat = RawChat(client)
        self.interactions = _RawCreate(client, INTERACTIONS)
        self.messages = _RawCreate(client, MESSAGES)


# --- async -----------------------------------------------------------------------------------


class AsyncFlexInference(_BaseClient):
    """`FlexInference` on ``httpx.AsyncClient``: the same surface, awaited.

    ``await client.responses.create(body)`` returns the dict; with ``stream=True`` it returns an
    `AsyncStream` (``async for event in stream``). Use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_key = _resolve_api_key(api_key)
        self.base_url = _resolve_base_url(base_url)
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise TypeError(
                f"client must be an httpx.AsyncClient, got {type(client).__name__} "
                "(use FlexInference for an httpx.Client)."
            )
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        self.responses = AsyncResponses(self, RESPONSES)
        self.chat = AsyncChat(self)
        self.interactions = AsyncInteractions(self, INTERACTIONS)
        self.messages = AsyncMessages(self, MESSAGES)
        self.with_raw_response = AsyncWithRawResponse(self)

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` requests go through."""
        return self._client

    async def _create(
        self, endpoint: Endpoint, body: Body, stream: bool
    ) -> tuple[httpx.Response, Json | AsyncStream]:
        payload = prepare(endpoint, body, _check_stream(stream))
        request = self._client.build_request(
            "POST", self._url(endpoint), content=payload, headers=self._headers(stream)
        )
        response = await self._client.send(request, stream=stream)
        if stream:
            if not response.is_success:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                raise error_from_response(response)
            return response, AsyncStream(response)
        if not response.is_success:
            raise error_from_response(response)
        return response, _json(response)

    async def close(self) -> None:
        """Releases the pooled connections (a client passed in as ``client`` stays open)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncFlexInference:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _AsyncCreate:
    def __init__(self, client: AsyncFlexInference, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint

    @overload
    async def create(self, body: Body, stream: Literal[False] = False) -> Json: ...
    @overload
    async def create(self, body: Body, stream: Literal[True]) -> AsyncStream: ...
    @overload
    async def create(self, body: Body, stream: bool) -> Json | AsyncStream: ...
    async def create(self, body: Body, stream: bool = False) -> Json | AsyncStream:
        """Validates `body`, sends it, and returns the raw JSON dict, or an `AsyncStream`.

        Raises:
            ValueError: `start_within`, `model`, the content field or `max_tokens` is missing or
                invalid; nothing was sent.
            FlexInferenceError: a non-2xx answer (`PaymentRequiredError` for 402).
        """
        return (await self._client._create(self._endpoint, body, stream))[1]


class _AsyncRawCreate:
    def __init__(self, client: AsyncFlexInference, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint

    @overload
    async def create(self, body: Body, stream: Literal[False] = False) -> RawResponse[Json]: ...
    @overload
    async def create(self, body: Body, stream: Literal[True]) -> RawResponse[AsyncStream]: ...
    @overload
    async def create(
        self, body: Body, stream: bool
    ) -> RawResponse[Json] | RawResponse[AsyncStream]: ...
    async def create(
        self, body: Body, stream: bool = False
    ) -> RawResponse[Json] | RawResponse[AsyncStream]:
        """Like ``create()``, wrapped with the HTTP response (headers, `outcome`)."""
        response, parsed = await self._client._create(self._endpoint, body, stream)
        if isinstance(parsed, AsyncStream):
            return RawResponse(response, parsed)
        return RawResponse(response, parsed)


class AsyncResponses(_AsyncCreate):
    """``POST /v1/responses``: the OpenAI Responses shape."""


class AsyncCompletions(_AsyncCreate):
    """``POST /v1/chat/completions``: the OpenAI Chat Completions shape."""


class AsyncChat:
    """``client.chat.completions``."""

    def __init__(self, client: AsyncFlexInference) -> None:
        self.completions = AsyncCompletions(client, CHAT_COMPLETIONS)


class AsyncInteractions(_AsyncCreate):
    """``POST /v1/interactions``: Google's Interactions shape (any model)."""


class AsyncMessages(_AsyncCreate):
    """``POST /v1/messages``: Anthropic's Messages shape (any model); `max_tokens` required."""


class AsyncRawChat:
    def __init__(self, client: AsyncFlexInference) -> None:
        self.completions = _AsyncRawCreate(client, CHAT_COMPLETIONS)


class AsyncWithRawResponse:
    """``client.with_raw_response.<endpoint>.create(...)`` returns a `RawResponse`."""

    def __init__(self, client: AsyncFlexInference) -> None:
        self.responses = _AsyncRawCreate(client, RESPONSES)
        self.chat = AsyncRawChat(client)
        self.interactions = _AsyncRawCreate(client, INTERACTIONS)
        self.messages = _AsyncRawCreate(client, MESSAGES)
