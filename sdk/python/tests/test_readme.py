"""Every Python example of the package README runs, as written, against `flex up --demo`.

The only change made to an example is the one a reader makes: `api_key="flex_live_..."` becomes
the demo's key plus `base_url=` the demo's URL. Examples that use `client` without making one
get the client the quickstart made; names imported by earlier examples stay imported, as for a
reader going down the page. Each example's output is checked, and the examples of seed 002 (the
product page) must all be in the README, verbatim.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Demo
from flexinference import FlexInference

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = 'api_key="flex_live_..."'


@dataclass(frozen=True)
class Example:
    heading: str
    index: int  # among the heading's examples
    line: int  # 1-based, of the code's first line
    code: str

    @property
    def id(self) -> str:
        return f"{self.heading}#{self.index}"


def examples() -> list[Example]:
    found: list[Example] = []
    heading = ""
    counts: dict[str, int] = {}
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            counts[heading] = counts.get(heading, 0) + 1
            code = "\n".join(lines[start:end]) + "\n"
            found.append(Example(heading, counts[heading], start + 1, code))
            i = end
        i += 1
    return found


EXAMPLES = examples()


@dataclass
class Ran:
    stdout: str
    namespace: dict[str, Any]
    error: BaseException | None


def run(example: Example, demo: Demo, key: str | None = None) -> Ran:
    key = key or demo.api_key
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for earlier in EXAMPLES[: EXAMPLES.index(example)]:
        for line in earlier.code.splitlines():
            if line.startswith(("from ", "import ")):
                exec(line, namespace)
    code = example.code.replace(PLACEHOLDER, f"api_key={key!r}, base_url={demo.base_url!r}")
    quickstart_client = None
    if not re.search(r"^\s*client = |as client:", code, re.M):
        quickstart_client = FlexInference(api_key=key, base_url=demo.base_url)
        namespace["client"] = quickstart_client
    out = io.StringIO()
    error: BaseException | None = None
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{README}:{example.line}", "exec"), namespace)
    except Exception as e:
        error = e
    finally:
        if quickstart_client is not None:
            quickstart_client.close()
    return Ran(out.getvalue(), namespace, error)


def ok(ran: Ran) -> Ran:
    if ran.error is not None:
        raise ran.error
    return ran


SIM_TEXT = "Simulated answer word1 word2 word3 word4 word5 word6 word7 word8 word9 word10"


def check_quickstart(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT + "\n"
    assert ran.namespace["res"]["service_tier"] == "flex"
    ran.namespace["client"].close()


def check_printed_answer(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT + "\n"


def check_streaming(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT  # deltas printed with end=""


def check_closed_after_with(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT + "\n"
    assert ran.namespace["client"].http_client.is_closed


def check_closed_in_finally(ran: Ran, demo: Demo) -> None:
    ok(ran)
    assert ran.namespace["client"].http_client.is_closed


def check_validation(ran: Ran, demo: Demo) -> None:
    assert isinstance(ran.error, ValueError), ran.error
    code = next(e for e in EXAMPLES if e.heading == "Request validation").code
    shown = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    assert shown[0].startswith("ValueError: ")
    assert str(ran.error) == "\n".join([shown[0][len("ValueError: ") :], *shown[1:]])


def check_errors(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == "Add your OpenAI key in the dashboard.\n"


def check_billing(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == (
        "Billing is past due - update payment in the dashboard to resume flex.\n"
    )


def check_outcome(ran: Ran, demo: Demo) -> None:
    first, second = ok(ran).stdout.splitlines()
    tier, reason, wait_ms = first.split()
    assert (tier, reason) == ("standard", "flex_timeout")
    assert 3000 <= int(wait_ms) <= 5500, "flex was waited for until standard had to launch"
    assert second == SIM_TEXT


def check_async(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT + "\n" + SIM_TEXT


def check_env(ran: Ran, demo: Demo) -> None:
    assert ok(ran).stdout == SIM_TEXT + "\n"


# (example id, org whose key it runs with, check)
CHECKS: dict[str, tuple[str, Callable[[Ran, Demo], None]]] = {
    "Quickstart#1": ("demo", check_quickstart),
    "Streaming#1": ("demo", check_streaming),
    "Chat Completions#1": ("demo", check_printed_answer),
    "Interactions (Gemini shape)#1": ("demo", check_printed_answer),
    "Messages (Anthropic shape)#1": ("demo", check_printed_answer),
    "Closing the client#1": ("demo", check_closed_after_with),
    "Closing the client#2": ("demo", check_closed_in_finally),
    "Request validation#1": ("demo", check_validation),
    "Errors#1": ("nokeys", check_errors),  # an org without an OpenAI key
    "Billing / 402#1": ("pastdue", check_billing),  # a past-due org
    "Which tier served it (`x-flex-*` headers)#1": ("demo", check_outcome),
    "Async#1": ("demo", check_async),
    "Configuration#1": ("env", check_env),
}


def test_every_example_has_a_check() -> None:
    assert [e.id for e in EXAMPLES] == list(CHECKS)


@pytest.mark.server
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example(example: Example, demo: Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    org, check = CHECKS[example.id]
    monkeypatch.delenv("FLEXINFERENCE_API_KEY", raising=False)
    monkeypatch.delenv("FLEXINFERENCE_BASE_URL", raising=False)
    if org == "env":
        assert PLACEHOLDER not in example.code
        monkeypatch.setenv("FLEXINFERENCE_API_KEY", demo.api_key)
        monkeypatch.setenv("FLEXINFERENCE_BASE_URL", demo.base_url)
        key = None
    else:
        key = {
            "demo": demo.api_key,
            "nokeys": demo.extra["nokeys_key"],
            "pastdue": demo.extra["pastdue_key"],
        }[org]
    check(run(example, demo, key), demo)


# The Python examples of seed 002, the SDK's product page, as the page shows them.
SEED_EXAMPLES = [
    """from flexinference import FlexInference, output_text

client = FlexInference(api_key="flex_live_...")

res = client.responses.create({
    "model": "gpt-5.5",
    "input": "Write a haiku about cheap GPUs.",
    "start_within": "00h-00m-30s",
})

print(output_text(res))
""",
    """stream = client.responses.create(
    {"model": "gpt-5-nano", "input": "Count to ten.", "start_within": "00h-00m-20s"},
    stream=True,
)
for event in stream:
    if event.get("type") == "response.output_text.delta":
        print(event["delta"], end="")
""",
    """res = client.chat.completions.create({
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "Hello!"}],
    "start_within": "default",
})
print(res["choices"][0]["message"]["content"])
""",
    """from flexinference import interaction_output_text

res = client.interactions.create({
    "model": "gemini-3.5-flash",
    "input": "Summarize this contract.",
    "start_within": "00h-01m-00s",
})
print(interaction_output_text(res))
""",
    """from flexinference import message_output_text

res = client.messages.create({
    "model": "claude-opus-4-8",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Summarize this contract."}],
    "start_within": "default",
})
print(message_output_text(res))
""",
    """with FlexInference(api_key="flex_live_...") as client:
    res = client.responses.create({"model": "gpt-5.5", "input": "Hi.", "start_within": "default"})
    print(output_text(res))
# connections are released on exit
""",
    """client = FlexInference(api_key="flex_live_...")
try:
    ...
finally:
    client.close()
""",
    """client.responses.create({"model": "gpt-5.5", "input": "hi"})
# ValueError: Invalid request body:
#   Missing required parameter: `start_within`. Set it to "default", "priority", "auto", or a duration "HHh-MMm-SSs".
""",  # noqa: E501 - as the page shows it
    """from flexinference import FlexInferenceError

try:
    client.responses.create({"model": "gpt-5.5", "input": "hi", "start_within": "priority"})
except FlexInferenceError as err:
    if err.code == "no_byok_key":
        print("Add your OpenAI key in the dashboard.")
    else:
        raise
""",
    """from flexinference import PaymentRequiredError

try:
    client.responses.create({"model": "gpt-5.5", "input": "hi", "start_within": "00h-00m-30s"})
except PaymentRequiredError:
    print("Billing is past due - update payment in the dashboard to resume flex.")
except FlexInferenceError:
    raise
""",
]


def test_the_readme_has_every_example_of_seed_002_verbatim() -> None:
    codes = [e.code for e in EXAMPLES]
    for seed_example in SEED_EXAMPLES:
        assert seed_example in codes, f"missing from the README:\n{seed_example}"


def test_the_seed_examples_above_are_the_seed_page_s() -> None:
    seeds = sorted((REPO.parent / "shared" / "seeds").glob("002_*.txt"))
    if not seeds:
        pytest.skip(f"seed 002 is not at {REPO.parent / 'shared' / 'seeds'}")
    page = seeds[0].read_text()
    page_lines = [line.rstrip() for line in page.splitlines() if line.strip()]
    for seed_example in SEED_EXAMPLES:
        lines = [line for line in seed_example.splitlines() if line.strip()]
        starts = [i for i, line in enumerate(page_lines) if line == lines[0]]
        assert any(page_lines[i : i + len(lines)] == lines for i in starts), (
            f"not as on the page:\n{seed_example}"
        )
