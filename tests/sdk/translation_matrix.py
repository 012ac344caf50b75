"""Every caller format x every provider x {non-stream, stream} x {text, tool call, tool result
turn, image, structured output}, through the proxy, parsed and strictly validated with the
official SDKs' own types.

Usage: translation_matrix.py PROXY_ROOT API_KEY MODEL [MODEL ...]
  PROXY_ROOT is e.g. http://127.0.0.1:8080 (the OpenAI SDK gets PROXY_ROOT/v1).
Run by the Rust test `translation_sdk` (tests/translation_sdk.rs).
"""

import json
import sys

import anthropic
import openai
import pydantic
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from google import genai
from google.genai import types as genai_types
from openai.types.responses import Response, ResponseStreamEvent

ROOT, KEY, MODELS = sys.argv[1], sys.argv[2], sys.argv[3:]
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
SW = {"start_within": "00h-00m-30s"}


def sw(model):
    # Claude has no flex tier: the proxy-only path.
    return {"start_within": "default"} if model.startswith("claude-") else SW


def strict(schema, data):
    if hasattr(data, "to_dict"):
        data = data.to_dict(mode="json")
    pydantic.TypeAdapter(schema).validate_python(data)


def openai_tier(model, data):
    """Pops `service_tier` from a Responses/Chat object (or a stream event holding one) and checks
    it. Seed 003: a Claude standard_only answer reports "standard", which the openai SDK's
    ServiceTier literal lacks (its default parsing keeps it; strict validation would not): so the
    tier is checked by hand and the rest strictly, as for Messages below."""
    holder = data.get("response") if isinstance(data.get("response"), dict) else data
    if "service_tier" not in holder:
        return data
    tier = holder.pop("service_tier")
    if model.startswith("claude-"):
        assert tier in ("standard", "priority"), tier
    else:
        assert tier in (None, "flex", "default", "priority"), tier
    return data


oai = openai.OpenAI(base_url=f"{ROOT}/v1", api_key=KEY, max_retries=0)
ant = anthropic.Anthropic(base_url=ROOT, api_key=KEY, max_retries=0)
gem = genai.Client(api_key=KEY, http_options=genai_types.HttpOptions(base_url=ROOT, api_version="v1"))


# ----- Responses -------------------------------------------------------------------------

def responses_case(model, case, stream):
    kw = dict(model=model, max_output_tokens=256, extra_body=sw(model))
    if case == "text":
        kw.update(instructions="Be brief.", input="Say hi.")
    elif case == "tool_call":
        kw.update(input="Weather in Paris? #sim tool=get_weather",
                  tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}])
    elif case == "tool_result":
        kw.update(tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}], input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_abc123", "name": "get_weather", "arguments": '{"location":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_abc123", "output": "sunny, 21C"},
        ])
    elif case == "image":
        kw.update(input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is in this image?"},
            {"type": "input_image", "image_url": PNG, "detail": "auto"}]}])
    elif case == "structured":
        kw.update(input="Answer in JSON.", text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}})
    if stream:
        final = None
        for ev in oai.responses.create(stream=True, **kw):
            strict(ResponseStreamEvent, openai_tier(model, ev.to_dict(mode="json")))
            if ev.type == "response.completed":
                final = ev.response
        assert final is not None, "no response.completed"
        r = final
    else:
        r = oai.responses.create(**kw)
        strict(Response, openai_tier(model, r.to_dict(mode="json")))
    want = ("standard",) if model.startswith("claude-") else ("flex", "default", "priority")
    assert r.service_tier in want, r.service_tier
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if case == "tool_call":
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather", r.output
        json.loads(calls[0].arguments)
    else:
        assert r.output_text, r.output


# ----- Chat Completions ------------------------------------------------------------------

def chat_case(model, case, stream):
    kw = dict(model=model, max_completion_tokens=256, extra_body=sw(model))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    if case == "text":
        kw.update(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}])
    elif case == "tool_call":
        kw.update(tools=tools, messages=[{"role": "user", "content": "Weather in Paris? #sim tool=get_weather"}])
    elif case == "tool_result":
        kw.update(tools=tools, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21C"}])
    elif case == "image":
        kw.update(messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": PNG}}]}])
    elif case == "structured":
        kw.update(messages=[{"role": "user", "content": "Answer in JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
    if stream:
        text, calls, finish, usage = "", {}, None, None
        for ch in oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            strict(ChatCompletionChunk, openai_tier(model, ch.to_dict(mode="json")))
            if ch.usage:
                usage = ch.usage
            for c in ch.choices:
                text += c.delta.content or ""
                for tc in c.delta.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"name": "", "args": ""})
                    if tc.function and tc.function.name:
                        slot["name"] += tc.function.name
                    if tc.function and tc.function.arguments:
                        slot["args"] += tc.function.arguments
                finish = c.finish_reason or finish
        assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if case == "tool_call":
            assert finish == "tool_calls" and calls[0]["name"] == "get_weather", (finish, calls)
            json.loads(calls[0]["args"])
        else:
            assert text and finish == "stop", (text, finish)
    else:
        r = oai.chat.completions.create(**kw)
        strict(ChatCompletion, openai_tier(model, r.to_dict(mode="json")))
        want = ("standard",) if model.startswith("claude-") else ("flex", "default", "priority")
        assert r.service_tier in want, r.service_tier
        m = r.choices[0].message
        if case == "tool_call":
            assert r.choices[0].finish_reason == "tool_calls", r
            assert m.tool_calls[0].function.name == "get_weather"
            assert len(m.tool_calls[0].id) <= 40
            json.loads(m.tool_calls[0].function.arguments)
        else:
            assert m.content, r


# ----- Anthropic Messages ----------------------------------------------------------------

def messages_case(model, case, stream):
    kw = dict(model=model, max_tokens=256, extra_body=sw(model))
    tools = [{"name": "get_weather", "input_schema": WEATHER}]
    if case == "text":
        kw.update(system="Be brief.", messages=[{"role": "user", "content": "Say hi."}])
    elif case == "tool_call":
        kw.update(tools=tools, messages=[{"role": "user", "content": "Weather in Paris? #sim tool=get_weather"}])
    elif case == "tool_result":
        kw.update(tools=tools, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_abc123", "name": "get_weather", "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_abc123", "content": "sunny, 21C"}]}])
    elif case == "image":
        kw.update(messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG.split(",", 1)[1]}}]}])
    elif case == "structured":
        kw.update(messages=[{"role": "user", "content": "Answer in JSON."}],
                  extra_body={**sw(model), "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    if stream:
        with ant.messages.stream(**kw) as s:
            for ev in s:
                if ev.type in ("message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"):
                    data = ev.to_dict(mode="json")
                    if ev.type == "message_start":
                        data["message"]["usage"].pop("service_tier", None)
                    if ev.type == "message_delta":
                        data.get("usage", {}).pop("service_tier", None)
                    strict(RawMessageStreamEvent, data)
            r = s.get_final_message()
    else:
        r = ant.messages.create(**kw)
    data = r.to_dict(mode="json")
    # Seed 001: usage.service_tier is "flex" or "standard"; the SDK type lists only
    # standard/priority/batch, so validate the rest strictly and the tier by hand.
    tier = data["usage"].pop("service_tier", None)
    assert tier in ("flex", "standard", "priority"), tier
    strict(Message, data)
    if case == "tool_call":
        assert r.stop_reason == "tool_use", r
        use = [b for b in r.content if b.type == "tool_use"]
        assert use and use[0].name == "get_weather" and isinstance(use[0].input, dict), r.content
    else:
        assert any(b.type == "text" and b.text for b in r.content), r.content


# ----- Interactions (google-genai) -------------------------------------------------------

def interactions_case(model, case, stream):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    kw = dict(model=model, generation_config={"max_output_tokens": 256}, extra_body=sw(model))
    if case == "text":
        kw.update(system_instruction="Be brief.", input="Say hi.")
    elif case == "tool_call":
        kw.update(tools=tools, input="Weather in Paris? #sim tool=get_weather")
    elif case == "tool_result":
        kw.update(tools=tools, input=[
            {"type": "user_input", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "id": "call_abc123", "name": "get_weather", "arguments": {"location": "Paris"}},
            {"type": "function_result", "call_id": "call_abc123", "name": "get_weather", "result": "sunny, 21C"}])
    elif case == "image":
        kw.update(input=[{"type": "text", "text": "What is in this image?"},
                         {"type": "image", "data": PNG.split(",", 1)[1], "mime_type": "image/png"}])
    elif case == "structured":
        kw.update(input="Answer in JSON.", response_format=SCHEMA)
    if stream:
        final, kinds = None, []
        for ev in gem.interactions.create(stream=True, **kw):
            kinds.append(ev.event_type)
            if ev.event_type == "interaction.completed":
                final = ev.interaction
        assert kinds[0] == "interaction.created" and final is not None, kinds
        r = final
    else:
        r = gem.interactions.create(**kw)
    assert r.service_tier in ("flex", "standard", "priority"), r.service_tier
    assert r.usage.total_tokens == r.usage.total_input_tokens + r.usage.total_output_tokens, r.usage
    if case == "tool_call":
        assert r.status == "requires_action", r.status
        call = [s for s in r.steps if s.type == "function_call"][0]
        assert call.name == "get_weather" and isinstance(call.arguments, dict), call
    else:
        assert r.status == "completed", r.status
        texts = [c.text for s in r.steps if s.type == "model_output" for c in s.content if c.type == "text"]
        assert texts and texts[0], r.steps


CALLERS = {"responses": responses_case, "chat": chat_case, "messages": messages_case, "interactions": interactions_case}
failures = []
count = 0
for caller, fn in CALLERS.items():
    for model in MODELS:
        for case in ("text", "tool_call", "tool_result", "image", "structured"):
            for stream in (False, True):
                name = f"{caller} -> {model} {case} {'stream' if stream else 'body'}"
                count += 1
                try:
                    fn(model, case, stream)
                except Exception as e:  # noqa: BLE001 - report every cell
                    failures.append(f"{name}: {type(e).__name__}: {str(e)[:1500]}")
for f in failures:
    print("FAIL", f)
print(f"{count - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
