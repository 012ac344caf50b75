"""Drives a running `flex up --demo` with the official OpenAI Python SDK.

Usage: python openai_demo.py DATA_DIR
Reads base_url and api_key from DATA_DIR/demo.json (as a user would) and checks that the flex tier
serves when the simulated flex tier starts in time, and the standard tier when it does not.
"""
import json
import sys
import time

from openai import OpenAI

demo = json.load(open(f"{sys.argv[1]}/demo.json"))
client = OpenAI(base_url=demo["base_url"], api_key=demo["api_key"], max_retries=0)

# Flex starts in time (the demo simulator's flex tier starts after 1.5 s).
resp = client.responses.create(model="gpt-5.5", input="Hello!", extra_body={"start_within": "00h-00m-10s"})
assert resp.service_tier == "flex", resp.service_tier
assert resp.output_text.startswith("Simulated"), resp.output_text

# Flex would start after 60 s: standard takes over inside the 5 s budget.
t0 = time.monotonic()
resp = client.responses.create(
    model="gpt-5.5", input="Hello! #sim flex_delay_ms=60000", extra_body={"start_within": "00h-00m-05s"}
)
took = time.monotonic() - t0
assert resp.service_tier == "default", resp.service_tier
assert took < 5.5, took

# Chat Completions, and streaming through the SDK's own event types.
chat = client.chat.completions.create(
    model="gpt-5.5", messages=[{"role": "user", "content": "Hello!"}], extra_body={"start_within": "default"}
)
assert chat.service_tier == "default", chat.service_tier
assert chat.choices[0].message.content

text = ""
with client.responses.create(
    model="gpt-5-nano", input="Count to ten.", stream=True, extra_body={"start_within": "00h-00m-20s"}
) as stream:
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            assert event.response.service_tier == "flex"
assert text.startswith("Simulated"), text

# Our errors come back as the SDK's typed errors with our code.
try:
    client.responses.create(model="gpt-5.5", input="hi")
    raise AssertionError("missing start_within was accepted")
except Exception as e:  # openai.BadRequestError
    assert getattr(e, "status_code", None) == 400, e
    assert e.body["code"] == "missing_start_within", e.body

print("openai SDK against flex up --demo: ok")
