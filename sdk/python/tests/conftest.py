"""Fixtures: a real `flex up --demo` on free ports (once per session), its orgs, and clients.

The binary is $FLEX_BIN, else the repository's target/debug/flex (`cargo build --bin flex`).
Besides the demo org (simulated OpenAI, Anthropic and Gemini keys), the session creates an org
with no provider key (for `no_byok_key`) and a past-due org with an OpenAI key (for 402).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flexinference import AsyncFlexInference, FlexInference

REPO = Path(__file__).resolve().parents[3]


def flex_bin() -> Path:
    path = Path(os.environ.get("FLEX_BIN") or REPO / "target" / "debug" / "flex")
    if not path.is_file():
        raise RuntimeError(
            f"the flex binary {path} is missing: run `cargo build --bin flex` in {REPO} "
            "or set FLEX_BIN to a built flex"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Demo:
    """A running `flex up --demo` and what the tests need of it."""

    base_url: str
    api_key: str
    org_id: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def admin(self, *args: str, stdin: str | None = None) -> dict[str, object]:
        """`flex admin --json --data-dir DIR ARGS` (no FLEX_* variable of ours leaks in)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_")}
        out = subprocess.run(
            [str(flex_bin()), "admin", "--json", "--data-dir", str(self.data_dir), *args],
            input=stdin.encode() if stdin is not None else None,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flex admin {' '.join(args)} failed: {out.stderr.decode()}")
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def raw_post(self, path: str, key: str, body: Mapping[str, object]) -> httpx.Response:
        """A request that does not go through the SDK (to wait for snapshot propagation)."""
        return httpx.post(
            self.base_url + path,
            headers={"Authorization": f"Bearer {key}"},
            json=body,
            timeout=30,
        )


def _start(tmp: Path) -> Demo:
    tmp.mkdir(parents=True)
    data_dir = tmp / "flex"
    log = tmp / "flex.log"
    api, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(flex_bin()),
                "up",
                "--demo",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{api}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    demo_json = data_dir / "demo.json"
    deadline = time.monotonic() + 30
    while not demo_json.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"flex up --demo exited with {process.returncode}:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("flex up --demo wrote no demo.json within 30 s")
        time.sleep(0.05)
    time.sleep(0.2)  # demo.json is written whole, but let the proxy finish binding
    info = json.loads(demo_json.read_text())
    return Demo(
        base_url=info["base_url"],
        api_key=info["api_key"],
        org_id=info["org_id"],
        data_dir=data_dir,
        process=process,
        log=log,
    )


def _wait_for(what: str, demo: Demo, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 15
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not take effect within 15 s:\n{demo.log_tail()}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def demo() -> Iterator[Demo]:
    with tempfile.TemporaryDirectory(prefix="flexinference-sdk-") as tmp:
        last: Exception | None = None
        for attempt in range(3):  # a free port can be taken between probe and bind
            try:
                d = _start(Path(tmp) / f"run{attempt}")
                break
            except RuntimeError as e:
                last = e
        else:
            raise RuntimeError(f"flex up --demo did not start: {last}")
        try:
            _setup_orgs(d)
            yield d
        finally:
            d.process.terminate()
            try:
                d.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                d.process.kill()
                d.process.wait()


def _setup_orgs(d: Demo) -> None:
    sim_keys = json.loads((d.data_dir / "sim-keys.json").read_text())

    nokeys_org = str(d.admin("org", "create", "sdk-no-provider-keys")["org_id"])
    d.extra["nokeys_key"] = str(d.admin("key", "create", "--org", nokeys_org)["api_key"])

    pastdue_org = str(d.admin("org", "create", "sdk-past-due")["org_id"])
    d.extra["pastdue_org"] = pastdue_org
    d.extra["pastdue_key"] = str(d.admin("key", "create", "--org", pastdue_org)["api_key"])
    d.admin(
        "provider-key", "set", "--org", pastdue_org, "--provider", "openai",
        stdin=sim_keys["openai"],
    )  # fmt: skip
    d.admin("billing", "set-status", "--org", pastdue_org, "past_due")

    # The proxy applies each change from a snapshot, a moment later: wait until it has.
    probe = {"model": "gpt-5.5", "input": "hi", "start_within": "00h-00m-30s"}
    _wait_for(
        "the key of the org without provider keys",
        d,
        lambda: d.raw_post("/responses", d.extra["nokeys_key"], probe).status_code == 400,
    )
    _wait_for(
        "the past-due status",
        d,
        lambda: d.raw_post("/responses", d.extra["pastdue_key"], probe).status_code == 402,
    )


@pytest.fixture
def client(demo: Demo) -> Iterator[FlexInference]:
    with FlexInference(api_key=demo.api_key, base_url=demo.base_url) as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def aclient(demo: Demo) -> AsyncIterator[AsyncFlexInference]:
    async with AsyncFlexInference(api_key=demo.api_key, base_url=demo.base_url) as c:
        yield c


class NoNetwork:
    """An httpx transport that fails the test if any request reaches it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raise AssertionError(f"a request was sent: {request.method} {request.url}")


@pytest.fixture
def no_network() -> NoNetwork:
    return NoNetwork()


@pytest.fixture
def offline_client(no_network: NoNetwork) -> Iterator[FlexInference]:
    """A client whose transport fails the test if a request is sent."""
    http = httpx.Client(transport=httpx.MockTransport(no_network))
    c = FlexInference(api_key="flex_live_test", base_url="http://flex.invalid/v1", client=http)
    yield c
    http.close()
