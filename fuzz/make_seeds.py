#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (fuzz/seeds/<target>/, committed): a few real
examples in the shapes the tests use. fuzz/run.sh gives libFuzzer the seeds next to the working
corpus (fuzz/corpus/<target>/, not committed), where what it finds goes."""
import hashlib
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def sse(events):
    out = ""
    for name, data in events:
        if name:
            out += f"event: {name}\n"
        text = data if isinstance(data, str) else json.dumps(data)
        for line in text.split("\n"):
            out += f"data: {line}\n"
        out += "\n"
    return out


# --- sse: two leading bytes pick the chunk cuts --------------------------------------------
put("sse", b"\x05\x09" + b"event: a\ndata: {\"x\":1}\n\ndata: [DONE]\n\n")
put("sse", b"\x03\x11" + b"event: a\r\ndata: one\r\ndata: two\r\n\r\n: comment\r\ndata: z\r\n\r\n")
put("sse", b"\x00\x00data: tail")
put("sse", b"\x01\x02data:\rdata: x\r\rid: 7\nretry: 10\n\n")

# --- start_within ------------------------------------------------------------------------
for s in ["default", "priority", "auto", "00h-00m-05s", "00h-10m-00s", "00h-01m-30s",
          "00h-00m-04s", "00h-60m-00s", '"00h-00m-30s"', "30", "null"]:
    put("start_within", s)

# --- caller formats ------------------------------------------------------------------------
responses = [
    {"model": "gpt-5.5", "input": "Hello!", "start_within": "00h-00m-30s"},
    {"model": "claude-opus-4-8", "max_output_tokens": 256, "start_within": "default",
     "instructions": "Be terse.",
     "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is in it?"},
                                           {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
     "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
     "reasoning": {"effort": "high"}, "stream": True},
    {"model": "gemini-3.5-flash", "input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}}, "start_within": "auto"},
]
chat = [
    {"model": "gpt-5.5", "messages": [{"role": "user", "content": "Hello!"}], "start_within": "00h-00m-30s"},
    {"model": "claude-opus-4-8", "max_completion_tokens": 100, "stream": True, "stream_options": {"include_usage": True},
     "messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://e.invalid/a.png"}}]},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
     "tool_choice": "auto", "response_format": {"type": "json_object"}, "start_within": "priority"},
    {"model": "gpt-5.5", "messages": [{"role": "user", "content": "x"}], "n": 2, "seed": 1, "start_within": "default"},
]
interactions = [
    {"model": "gemini-3.5-flash", "input": "Summarize this contract.", "start_within": "00h-01m-00s"},
    {"model": "gpt-5.5", "system_instruction": "Be terse.", "start_within": "default", "stream": True,
     "input": [{"type": "user_input", "content": [{"type": "text", "text": "weather?"}]},
               {"type": "function_call", "id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}},
               {"type": "function_result", "call_id": "c1", "name": "get_weather", "result": "sunny"}],
     "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}, {"type": "google_search"}],
     "generation_config": {"max_output_tokens": 100, "temperature": 0.5, "thinking_level": "low", "tool_choice": "auto"}},
    {"model": "gemini-3.5-flash", "input": [{"type": "image", "data": "iVBORw0KGgo=", "mime_type": "image/png"}, {"type": "text", "text": "what?"}],
     "response_format": {"type": "object"}, "start_within": "auto"},
]
messages = [
    {"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello!"}], "start_within": "default"},
    {"model": "gpt-5.5", "max_tokens": 300, "system": [{"type": "text", "text": "Be terse."}], "stream": True,
     "messages": [{"role": "user", "content": [{"type": "text", "text": "weather?"},
                                              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"},
                                                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}],
     "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search"}],
     "tool_choice": {"type": "auto"}, "thinking": {"type": "enabled", "budget_tokens": 2048}, "start_within": "00h-00m-30s"},
    {"model": "gemini-3.5-flash", "max_tokens": 10, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}, "effort": "max"},
     "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}]}], "start_within": "auto"},
]
for target, bodies in [("format_responses", responses), ("format_chat", chat),
                       ("format_interactions", interactions), ("format_messages", messages)]:
    for b in bodies:
        put(target, json.dumps(b))

# --- provider streams ----------------------------------------------------------------------
openai = [
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5.5", "created_at": 1, "service_tier": "flex"}}),
    ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": {"type": "reasoning"}}),
    ("response.reasoning_summary_text.delta", {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "think"}),
    ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 1, "delta": "Hello"}),
    ("response.output_item.added", {"type": "response.output_item.added", "output_index": 2, "item": {"type": "function_call", "call_id": "call_1", "name": "f"}}),
    ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "output_index": 2, "delta": "{\"a\":1}"}),
    ("response.completed", {"type": "response.completed", "response": {"service_tier": "flex", "usage": {"input_tokens": 5, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 1}, "output_tokens_details": {"reasoning_tokens": 2}}}}),
]
put("provider_openai", sse(openai))
put("provider_openai", sse(openai[:1] + [("response.failed", {"type": "response.failed", "response": {"error": {"message": "no"}}})]))
put("provider_openai", sse([("", {"type": "error", "code": "rate_limit_exceeded", "message": "slow down"})]))

ms = {"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
      "usage": {"input_tokens": 12, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 100, "output_tokens": 1, "service_tier": "standard"}}}
anthropic = [
    ("message_start", ms),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}}),
    ("message_stop", {"type": "message_stop"}),
]
put("provider_anthropic", sse(anthropic))
put("provider_anthropic", sse([("message_start", ms), ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]))

gemini = [
    ("", {"candidates": [{"content": {"role": "model", "parts": [{"text": "think", "thought": True, "thoughtSignature": "c2ln"}]}, "index": 0}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "serviceTier": "flex"}, "modelVersion": "gemini-3.5-flash", "responseId": "r1"}),
    ("", {"candidates": [{"content": {"role": "model", "parts": [{"text": "Simulated"}]}, "index": 0}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "serviceTier": "flex"}}),
    ("", {"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}]}, "index": 0, "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "thoughtsTokenCount": 1, "cachedContentTokenCount": 2, "serviceTier": "flex"}}),
]
put("provider_gemini", sse(gemini))
put("provider_gemini", sse([("", {"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}})]))
put("provider_gemini", sse(gemini[:1] + [("", {"candidates": [{"finishReason": "MAX_TOKENS", "index": 0}], "usageMetadata": {"promptTokenCount": 1}})]))

chunk = lambda choices, **kw: dict({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-5.5", "service_tier": "flex", "choices": choices}, **kw)
put("chat_assembler", sse([
    ("", chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])),
    ("", chunk([{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}])),
    ("", chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}])),
    ("", chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}])),
    ("", chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
    ("", chunk([], usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})),
    ("", "[DONE]"),
]))

# --- snapshots: protobuf written by hand (flex.control.v1) ---------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(tag, wire, payload):
    key = varint((tag << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return key + varint(len(payload)) + payload

def org(oid):
    return field(1, 2, oid) + field(2, 2, oid) + field(3, 0, 1) + field(4, 2, "active")

def key(kid, oid, h, exp=0):
    return field(1, 2, kid) + field(2, 2, oid) + field(3, 2, h * 64) + (field(4, 0, exp) if exp else b"")

def snapshot(version, keys):
    s = field(1, 0, version) + field(2, 2, "0" * 64)
    s += field(3, 2, org("o1")) + field(3, 2, org("o2"))
    for k in keys:
        s += field(4, 2, k)
    s += field(5, 2, field(1, 2, "o1") + field(2, 2, "openai") + field(3, 2, field(1, 2, "m1") + field(4, 2, b"\x01\x02")))
    s += field(6, 2, field(1, 2, "my-model") + field(2, 2, "openai") + field(3, 0, 1) + field(5, 2, field(1, 2, "flex") + field(2, 0, 100)))
    s += field(7, 2, "2026-01-01T00:00:00Z")
    s += field(8, 2, field(1, 2, "o2") + field(3, 0, 60) + field(6, 0, 1000))
    return s

keys = [key("key_0123456789abcdef0123456789abcdef", "o1", "a"), key("k2", "o1", "b", 1893456000), key("k3", "o2", "c")]
full = snapshot(7, keys)
put("snapshot", full)
# SnapshotUpdate {version = 1, full = 2, delta = 3}
put("snapshot", field(1, 0, 8) + field(2, 2, full))
delta = field(1, 0, 7) + field(3, 2, key("k4", "o2", "d")) + field(4, 2, "b" * 64) + field(2, 2, org("o3"))
delta += field(5, 2, field(1, 2, "o2") + field(2, 2, "gemini") + field(3, 2, field(1, 2, "m1")))
delta += field(6, 2, field(1, 2, "o1") + field(2, 2, "openai"))
delta += field(10, 2, field(1, 2, "o1") + field(2, 2, "k2") + field(5, 0, 4)) + field(11, 2, field(1, 2, "o2"))
delta += field(8, 2, "0" * 64) + field(9, 2, "2026-01-02T00:00:00Z")
put("snapshot", field(1, 0, 8) + field(3, 2, delta))

# --- usage log: the arbitrary-derived StateDir of the target --------------------------------
event = {"schema_version": 1, "request_id": "req_1", "org_id": "org_1", "key_id": "key_1", "model": "gpt-5.5",
         "provider": "openai", "caller_format": "responses", "start_within": "default", "served_tier": "standard",
         "reason": "direct", "flex_wait_ms": 0, "start_latency_ms": 1, "duration_ms": 2, "input_tokens": 3,
         "cached_input_tokens": 0, "output_tokens": 4, "reasoning_tokens": 0, "status": 200, "outcome": "ok",
         "tiers_started": ["standard"], "cost_micros": 5, "standard_cost_micros": 5, "received_at": "2026-01-01T00:00:00Z"}
line = json.dumps(event, separators=(",", ":"))
line2 = line.replace("req_1", "req_2")
# arbitrary's encoding is not stable enough to write by hand; the seeds are raw bytes that it
# reads as some StateDir, with JSON lines inside so the mutator finds them.
put("usage_log", ("1 0\n" + line + "\n" + line2 + "\n").encode())
put("usage_log", ("\x01" + line + "\n\n" + line2[:40]).encode())
put("usage_log", ('{"op":"open","event":' + line + '}\n{"op":"done","request_id":"req_1"}\n').encode())
