"""Drive the provider simulator with the official SDKs and assert what they parse.

Usage: sim_sdk_check.py BASE_URL OPENAI_KEY ANTHROPIC_KEY GEMINI_KEY
  BASE_URL is the simulator's root, e.g. http://127.0.0.1:8090 (OpenAI gets BASE_URL/v1).

Every endpoint, streaming and not, text and tool calls, the served tier, usage, and the error
envelopes (wrong key, flex capacity error, directed 400) as each SDK's exception types.
Run by the Rust test `sim::sdk_check` (cargo test -p flex sdk_check).
"""

import json
import sys
import warnings

import anthropic
import openai
import pydantic
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

CLAUDE = "claude-sonnet-5"

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"location": {"type": "string"}},
    "required": ["location"],
    "additionalProperties": False,
}


def words(n):
    """The simulator's deterministic answer of n tokens."""
    return " ".join(["Simulated", "answer"][:n] + [f"word{i}" for i in range(1, n - 1)])


def strict(schema, obj):
    """Validate what the SDK parsed against its type, required fields and all (the openai and
    anthropic SDKs build their models without validation)."""
    data = obj.to_dict(mode="json")
    pydantic.TypeAdapter(schema).validate_python(data)
    return obj


def expect_error(exc_type, call, check=lambda e: True):
    try:
        call()
    except exc_type as e:  # noqa: PERF203
        assert check(e), f"unexpected {exc_type.__name__}: {e}"
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def check_openai_responses(client):
    r = strict(Response, client.responses.create(
        model="gpt-5", input="hello #sim output_tokens=5", service_tier="flex",
        instructions="be brief",
    ))
    assert r.output_text == words(5), r.output_text
    assert r.service_tier == "flex", r.service_tier
    assert r.status == "completed"
    assert r.usage.output_tokens == 5 and r.usage.input_tokens >= 1
    assert r.usage.total_tokens == r.usage.input_tokens + 5
    assert r.usage.output_tokens_details.reasoning_tokens == 0

    r = client.responses.create(model="gpt-5", input="hi", service_tier="auto")
    assert r.service_tier == "default", r.service_tier
    assert r.output_text == words(12)

    # Raw event stream: every event parses to its typed model.
    kinds = []
    deltas = []
    final = None
    for event in client.responses.create(
        model="o3", input=[{"role": "user", "content": "hi #sim output_tokens=4"}],
        service_tier="priority", stream=True,
    ):
        strict(ResponseStreamEvent, event)
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed", kinds
    assert "".join(deltas) == words(4)
    assert final.output_text == words(4) and final.service_tier == "priority"
    assert final.usage.output_tokens == 4

    # The accumulating helper validates the event sequence.
    with client.responses.stream(model="gpt-5", input="hi #sim output_tokens=3") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        done = stream.get_final_response()
    assert text == words(3) and done.output_text == words(3)

    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": WEATHER_SCHEMA, "strict": True}]
    r = strict(Response, client.responses.create(
        model="gpt-5", input="weather? #sim tool=get_weather", tools=tools))
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather", call
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"location": "Paris"}

    with client.responses.stream(model="gpt-5", input="weather? #sim tool=get_weather",
                                 tools=tools) as stream:
        args = "".join(e.delta for e in stream
                       if e.type == "response.function_call_arguments.delta")
        done = stream.get_final_response()
    assert json.loads(args) == {"location": "Paris"}
    assert done.output[0].type == "function_call"

    # After the tool result, the model answers in text.
    r = client.responses.create(model="gpt-5", tools=tools, input=[
        {"role": "user", "content": "weather? #sim tool=get_weather"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])
    assert r.output_text == words(12)


def check_openai_chat(client):
    c = strict(ChatCompletion, client.chat.completions.create(
        model="gpt-4o", service_tier="priority",
        messages=[{"role": "system", "content": "sys"},
                  {"role": "user", "content": "hi #sim output_tokens=3"}],
    ))
    assert c.choices[0].message.content == words(3), c
    assert c.choices[0].finish_reason == "stop"
    assert c.service_tier == "priority"
    assert c.usage.completion_tokens == 3 and c.usage.prompt_tokens >= 1

    text = ""
    chunks = list(client.chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "hi #sim output_tokens=4"}],
        service_tier="flex", stream=True, stream_options={"include_usage": True},
    ))
    for chunk in chunks:
        strict(ChatCompletionChunk, chunk)
        assert chunk.object == "chat.completion.chunk" and chunk.service_tier == "flex"
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == words(4)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4

    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": WEATHER_SCHEMA}}]
    messages = [{"role": "user", "content": "weather? #sim tool=get_weather"}]
    c = strict(ChatCompletion,
               client.chat.completions.create(model="gpt-5", messages=messages, tools=tools))
    call = c.choices[0].message.tool_calls[0]
    assert c.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}

    # The accumulating helper joins tool-call fragments by index.
    with client.chat.completions.stream(model="gpt-5", messages=messages,
                                        tools=tools) as stream:
        for _ in stream:
            pass
        done = stream.get_final_completion()
    streamed = done.choices[0].message.tool_calls[0]
    assert streamed.function.name == "get_weather"
    assert json.loads(streamed.function.arguments) == {"location": "Paris"}
    assert done.choices[0].finish_reason == "tool_calls"


def check_openai_errors(base_url, client):
    bad = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    expect_error(openai.AuthenticationError,
                 lambda: bad.responses.create(model="gpt-5", input="hi"),
                 lambda e: e.code == "invalid_api_key")
    expect_error(openai.RateLimitError,
                 lambda: client.responses.create(model="o3", input="#sim flex_status=429",
                                                 service_tier="flex"),
                 lambda e: e.code == "resource_unavailable")
    expect_error(openai.BadRequestError,
                 lambda: client.chat.completions.create(
                     model="gpt-5", messages=[{"role": "user", "content": "#sim status=400"}]),
                 lambda e: e.type == "invalid_request_error")


def check_anthropic(base_url, key):
    client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi #sim output_tokens=3"}]
    m = strict(Message, client.messages.create(model=CLAUDE, max_tokens=100,
                                               messages=messages, system="be nice"))
    assert m.content[0].text == words(3), m
    assert m.stop_reason == "end_turn"
    assert m.usage.service_tier == "standard" and m.usage.output_tokens == 3

    m = client.messages.create(model=CLAUDE, max_tokens=100, service_tier="auto",
                               messages=[{"role": "user", "content": "#sim served_tier=priority"}])
    assert m.usage.service_tier == "priority"

    events = list(client.messages.create(model=CLAUDE, max_tokens=100, messages=messages,
                                         stream=True))
    for event in events:
        strict(RawMessageStreamEvent, event)
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"

    with client.messages.stream(model=CLAUDE, max_tokens=100,
                                messages=messages, service_tier="standard_only") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == words(3) and final.content[0].text == words(3)
    assert final.usage.service_tier == "standard" and final.usage.output_tokens == 3

    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": WEATHER_SCHEMA}]
    ask = [{"role": "user", "content": "weather? #sim tool=get_weather"}]
    m = strict(Message, client.messages.create(model=CLAUDE, max_tokens=100, tools=tools,
                                               messages=ask))
    block = m.content[0]
    assert m.stop_reason == "tool_use" and block.type == "tool_use"
    assert block.name == "get_weather" and block.input == {"location": "Paris"}

    with client.messages.stream(model=CLAUDE, max_tokens=100, tools=tools,
                                messages=ask) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"location": "Paris"}

    m = client.messages.create(model=CLAUDE, max_tokens=100, tools=tools,
                               messages=ask + [
                                   {"role": "assistant", "content": [block.model_dump()]},
                                   {"role": "user", "content": [
                                       {"type": "tool_result", "tool_use_id": block.id,
                                        "content": "sunny"}]}])
    assert m.content[0].type == "text"

    m = client.messages.create(model=CLAUDE, max_tokens=2, messages=messages)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2

    bad = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-wrong", max_retries=0)
    expect_error(anthropic.AuthenticationError,
                 lambda: bad.messages.create(model=CLAUDE, max_tokens=10,
                                             messages=messages))
    expect_error(anthropic.BadRequestError,
                 lambda: client.messages.create(
                     model=CLAUDE, max_tokens=10,
                     messages=[{"role": "user", "content": "#sim status=400"}]),
                 lambda e: e.body["error"]["type"] == "invalid_request_error")


def check_gemini(base_url, key):
    client = genai.Client(api_key=key, http_options=genai_types.HttpOptions(base_url=base_url))
    model = "gemini-2.5-flash"
    r = client.models.generate_content(
        model=model, contents="hello #sim output_tokens=4",
        config=genai_types.GenerateContentConfig(service_tier="flex",
                                                 system_instruction="be nice"),
    )
    assert r.text == words(4), r
    assert r.candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert r.usage_metadata.candidates_token_count == 4
    assert r.usage_metadata.total_token_count == r.usage_metadata.prompt_token_count + 4
    assert r.model_version == model and r.response_id
    assert r.sdk_http_response.headers["x-gemini-service-tier"] == "flex"

    text = ""
    chunks = list(client.models.generate_content_stream(
        model=model, contents="hi #sim output_tokens=5",
        config=genai_types.GenerateContentConfig(service_tier="priority")))
    for chunk in chunks:
        text += chunk.text or ""
    assert text == words(5), text
    assert chunks[-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count == 5

    weather = genai_types.FunctionDeclaration(
        name="get_weather", description="Weather in a city",
        parameters=genai_types.Schema(type="OBJECT", properties={
            "location": genai_types.Schema(type="STRING")}))
    config = genai_types.GenerateContentConfig(
        tools=[genai_types.Tool(function_declarations=[weather])])
    r = client.models.generate_content(model=model, contents="weather? #sim tool=get_weather",
                                       config=config)
    call = r.function_calls[0]
    assert call.name == "get_weather" and call.args == {"location": "Paris"}, r
    calls = [c for chunk in client.models.generate_content_stream(
        model=model, contents="weather? #sim tool=get_weather", config=config)
        for c in (chunk.function_calls or [])]
    assert calls[0].name == "get_weather" and calls[0].args == {"location": "Paris"}

    bad = genai.Client(api_key="AIza-wrong",
                       http_options=genai_types.HttpOptions(base_url=base_url))
    expect_error(genai_errors.ClientError,
                 lambda: bad.models.generate_content(model=model, contents="hi"),
                 lambda e: e.code == 401 and e.status == "UNAUTHENTICATED")
    expect_error(genai_errors.ClientError,
                 lambda: client.models.generate_content(
                     model=model, contents="#sim flex_status=429",
                     config=genai_types.GenerateContentConfig(service_tier="flex")),
                 lambda e: e.code == 429 and e.status == "RESOURCE_EXHAUSTED")
    expect_error(genai_errors.ServerError,
                 lambda: list(client.models.generate_content_stream(
                     model=model, contents="#sim flex_status=503",
                     config=genai_types.GenerateContentConfig(service_tier="flex"))),
                 lambda e: e.code == 503)


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    base_url, openai_key, anthropic_key, gemini_key = sys.argv[1:]
    base_url = base_url.rstrip("/")
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key=openai_key, max_retries=0)
    checks = [
        ("openai responses", lambda: check_openai_responses(oai)),
        ("openai chat", lambda: check_openai_chat(oai)),
        ("openai errors", lambda: check_openai_errors(f"{base_url}/v1", oai)),
        ("anthropic messages", lambda: check_anthropic(base_url, anthropic_key)),
        ("gemini generateContent", lambda: check_gemini(base_url, gemini_key)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, check in checks:
            check()
            print(f"ok: {name}")
    # An SDK warns, rather than fails, on e.g. an unknown enum value: count that as a failure.
    complaints = [w for w in caught
                  if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    for w in caught:
        print(f"warning: {w.category.__name__}: {w.message}", file=sys.stderr)
    assert not complaints, f"the SDKs complained: {[str(w.message) for w in complaints]}"
    print("all SDK checks passed")


if __name__ == "__main__":
    main()
