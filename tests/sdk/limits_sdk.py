"""The rate-limit headers and 429s of a running `flex up --demo`, through the official SDKs.

Usage: python limits_sdk.py DATA_DIR
The org has `--rpm 6 --tpm 200000 --concurrency 1` (set by tests/limits_sdk.rs). Checks:
OpenAI's x-ratelimit-* headers on Chat Completions, Anthropic's anthropic-ratelimit-* on
Messages, a concurrency refusal as the SDK's RateLimitError with our code and Retry-After, the
openai SDK's own retry waiting what our Retry-After says, and the rpm refusal.
"""
import json
import sys
import threading
import time

import anthropic
import openai
from openai import OpenAI

demo = json.load(open(f"{sys.argv[1]}/demo.json"))
root = demo["base_url"].removesuffix("/v1")
client = OpenAI(base_url=demo["base_url"], api_key=demo["api_key"], max_retries=0)
EXTRA = {"start_within": "default"}


def chat(c, text="Hello!"):
    return c.chat.completions.with_raw_response.create(
        model="gpt-5.5",
        messages=[{"role": "user", "content": text}],
        max_completion_tokens=20,
        extra_body=EXTRA,
    )


# 1. OpenAI's names on Chat Completions (request 1 of 6 in the window).
raw = chat(client)
h = raw.headers
assert h["x-ratelimit-limit-requests"] == "6", dict(h)
assert h["x-ratelimit-remaining-requests"] == "5", dict(h)
assert h["x-ratelimit-reset-requests"] == "1m0s", dict(h)
assert h["x-ratelimit-limit-tokens"] == "200000", dict(h)
assert 0 < int(h["x-ratelimit-remaining-tokens"]) < 200000, dict(h)
assert h["x-ratelimit-reset-tokens"] == "1m0s", dict(h)
assert raw.parse().choices[0].message.content

# 2. Anthropic's names on /v1/messages (request 2).
claude = anthropic.Anthropic(base_url=root, api_key=demo["api_key"], max_retries=0)
raw = claude.messages.with_raw_response.create(
    model="gpt-5.5",
    max_tokens=20,
    messages=[{"role": "user", "content": "Hi"}],
    extra_body=EXTRA,
)
h = raw.headers
assert h["anthropic-ratelimit-requests-limit"] == "6", dict(h)
assert h["anthropic-ratelimit-requests-remaining"] == "4", dict(h)
assert h["anthropic-ratelimit-requests-reset"].endswith("Z"), dict(h)
assert h["anthropic-ratelimit-tokens-limit"] == "200000", dict(h)
assert "x-ratelimit-limit-requests" not in h, dict(h)
assert raw.parse().content[0].text

# 3. One slow request holds the only concurrency slot (request 3).
slow_done = threading.Event()


def slow():
    chat(client, "Slow #sim standard_delay_ms=1500")
    slow_done.set()


threading.Thread(target=slow, daemon=True).start()
time.sleep(0.3)
try:
    chat(client)
    raise AssertionError("a second request in flight was admitted")
except openai.RateLimitError as e:
    assert e.status_code == 429
    assert e.code == "concurrency_limit_exceeded", e.body
    assert e.response.headers["retry-after"] == "1", dict(e.response.headers)
    assert e.response.headers["retry-after-ms"] == "1000", dict(e.response.headers)
    assert "Concurrency limit reached" in e.message, e.message
    assert "flex admin limits set" in e.message, e.message

# 4. The SDK's own retry waits what Retry-After says (1 s; its default backoff starts near 0.5 s):
# refused while the slow one runs, admitted after it ends (requests 4).
attempts = []
retrying = OpenAI(
    base_url=demo["base_url"],
    api_key=demo["api_key"],
    max_retries=4,
    # The SDK's own HTTP client class (httpx or its successor), with a hook on every attempt.
    http_client=openai.DefaultHttpxClient(
        event_hooks={"request": [lambda r: attempts.append(time.monotonic())]}
    ),
)
raw = chat(retrying)
assert raw.parse().choices[0].message.content
assert slow_done.wait(5)
assert len(attempts) >= 2, attempts
gaps = [b - a for a, b in zip(attempts, attempts[1:])]
assert all(0.95 <= g <= 1.6 for g in gaps), gaps

# 5. Requests 5 and 6 pass; the 7th is over the rpm limit.
chat(client)
chat(client)
try:
    chat(client)
    raise AssertionError("the 7th request in a minute was admitted")
except openai.RateLimitError as e:
    assert e.code == "rate_limit_exceeded", e.body
    assert e.body["limit"]["name"] == "rpm" and e.body["limit"]["value"] == 6, e.body
    h = e.response.headers
    assert 1 <= int(h["retry-after"]) <= 60, dict(h)
    assert h["x-ratelimit-remaining-requests"] == "0", dict(h)
print("ok", gaps)
