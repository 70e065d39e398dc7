"""What this folder's tests call besides the fixtures of conftest.py: the step's folder,
settings for test servers, and small helpers for calls, processes and log lines. Helpers
that every step shares unchanged are in the repository's tests/support."""

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from auth import client_auth_interceptors
from greeter.v1 import greeter_pb2
from logger.v1 import logger_pb2, logger_pb2_grpc
from propagation import WELL_FORMED_REQUEST_ID
from service import Greeter
from serving import RunningServer
from settings import Settings
from tls import channel_credentials
from tools.envoy import RELEASES, EnvoyProcess
from tools.processes import ServerProcess, free_port, run_script

STEP_DIR = Path(__file__).resolve().parent.parent  # the step folder


class WritingGreeter(Greeter):
    """The Greeter with its streams written (`await context.write(reply)`) instead of
    yielded, as grpcio-health-checking's Watch and many a third-party servicer write theirs:
    the interceptors must treat both alike (interceptors.yielded)."""

    async def StreamGreetings(self, request, context):
        async with contextlib.aclosing(super().StreamGreetings(request, context)) as replies:
            async for reply in replies:
                await context.write(reply)

    async def Chat(self, request_iterator, context):
        async with contextlib.aclosing(super().Chat(request_iterator, context)) as replies:
            async for reply in replies:
                await context.write(reply)


# Streams in tests: replies 20 ms apart instead of 500 ms keep the tests fast.
FAST_STREAM_INTERVAL = 0.02


# A fresh secret per test run, as a deployment would have: nothing to leak from the repo.
TEST_TOKEN = secrets.token_urlsafe(32)


LOGGER_TEST_TOKEN = secrets.token_urlsafe(32)  # the Logger's own


TEST_USER = "ada"
# The tests of the earlier steps' features make calls as fast as they can: a rate limit
# (step 18) that no test but its own reaches. As settings, and as the servers' variables.
UNREACHED_RATE_LIMIT = {"rate_limit": 1_000_000, "rate_burst": 1_000_000}
# ... and at the edge: each user's token bucket in Envoy (tools/envoy.py).
UNREACHED_EDGE_BUCKET = {
    "max_tokens": 1_000_000,
    "tokens_per_fill": 1_000_000,
    "fill_interval": "1s",
}
UNREACHED_RATE_LIMIT_ENVIRONMENT = {
    f"{service}_{name.upper()}": str(value)
    for service in ("GREETER", "LOGGER")
    for name, value in UNREACHED_RATE_LIMIT.items()
}


# Fresh keys and certificates per test run, made by ./gen_certs.sh (session fixture below).
CERTS = Path(tempfile.mkdtemp(prefix="greeter-certs-"))


def server_settings(settings_class=Settings, **overrides):
    """Server settings for tests: loopback, a free port, half a second of grace, the test
    tokens, TLS. The Greeter's by default; `settings_class=LoggerSettings` for the Logger."""
    if settings_class is Settings:
        overrides = {
            "logger_token": LOGGER_TEST_TOKEN,
            "logger_ca": str(CERTS / "ca.crt"),
            **overrides,
        }
    else:
        overrides = {"events_assignment": "all", **overrides}
    overrides = {"kafka_bootstrap_servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"], **overrides}
    return settings_class(
        **{
            "host": "127.0.0.1",
            "port": 0,
            "grace": 0.5,
            "metrics_port": 0,
            "token": TEST_TOKEN if settings_class is Settings else LOGGER_TEST_TOKEN,
            "tls_cert": str(CERTS / "server.crt"),
            "tls_key": str(CERTS / "server.key"),
            **UNREACHED_RATE_LIMIT,
            **overrides,
        }
    )


def raw_channel(address: str, interceptors=(), *, options=(), **tls) -> grpc.aio.Channel:
    """A TLS channel that trusts the test CA and adds no credentials: calls carry only the
    metadata they are given. `tls`: other `ca`, `cert` and `key` files (mutual TLS)."""
    credentials = channel_credentials(**{"ca": str(CERTS / "ca.crt"), **tls})
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def open_channel(
    address: str,
    *,
    token: str | None = TEST_TOKEN,
    user_id: str = TEST_USER,
    interceptors=(),
    **tls,
) -> grpc.aio.Channel:
    """A channel whose calls carry `token` and `user_id` (the client's auth interceptors),
    after any other `interceptors`; `tls` as for raw_channel."""
    return raw_channel(address, [*interceptors, *client_auth_interceptors(token, user_id)], **tls)


@dataclass
class ServerInTest:
    """A server started through its running_server(), the lifetime serve() uses."""

    running: RunningServer
    lifetime: contextlib.AsyncExitStack
    logger: "ServerInTest | None" = None  # the Logger a Greeter was started with

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def metrics_address(self) -> str:
        return self.running.metrics_address

    @property
    def servicer(self):
        return self.running.servicer

    def shut_down(self) -> asyncio.Task:
        """Leave the lifetime, as serve() does on SIGTERM, in a task the test can watch."""
        return asyncio.create_task(self.lifetime.aclose())


def run_client(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """`python client.py args...` in this folder, as a learner runs it."""
    return run_script(STEP_DIR, "client.py", *args, **kwargs)


def start_client(*args: str, **kwargs) -> subprocess.Popen[str]:
    """`python client.py args...` started in the background, its stdout and stderr piped:
    for tests that watch its output while it runs."""
    return subprocess.Popen(
        [sys.executable, "client.py", *args],
        cwd=STEP_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


Request = greeter_pb2.HelloRequest


def logger_channel(address: str, **credentials) -> grpc.aio.Channel:
    """A channel to a Logger whose calls carry the Logger's token (`token`, `user_id`: as
    for open_channel)."""
    return open_channel(
        address, **{"token": LOGGER_TEST_TOKEN, "user_id": TEST_USER, **credentials}
    )


async def logged_greetings(logger_address: str, limit: int = 100) -> list[logger_pb2.Entry]:
    """The entries the Logger holds, oldest first, read as any client reads them."""
    async with logger_channel(logger_address) as channel:
        reply = await logger_pb2_grpc.LoggerStub(channel).ListRecent(
            logger_pb2.ListRecentRequest(limit=limit), timeout=5
        )
    return list(reversed(reply.entries))


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def messages(call) -> list[str]:
    return [reply.message async for reply in call]


async def say(call, name: str) -> str:
    """Ping-pong: send one message, wait for its reply (a server that waited for more input
    before answering would fail here instead of hanging)."""
    await call.write(Request(name=name))
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply is not grpc.aio.EOF, "the chat ended early"
    return reply.message


async def scrape(address: str) -> dict[tuple, float]:
    """Every sample of /metrics: {(name, (label, value), ...): value}. Fetched from a thread:
    an in-process server answers /metrics on this very event loop."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            return response.read().decode()

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, *sorted(labels.items())))


def rpc_records(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def assert_rpc_line(
    record: logging.LogRecord, method: str, code: str, user: str | None = None, client: str = "-"
) -> None:
    """`user` and `client`: the server's fields (`client` names the caller's certificate, "-"
    without mutual TLS); `user` None for client lines, which have neither. Server lines
    carry the call's request id; a client line too, once the server has answered."""
    assert record.rpc_method == f"/greeter.v1.Greeter/{method}"
    assert record.rpc_code == code
    assert record.rpc_user == user
    assert record.rpc_client == (None if user is None else client)
    assert record.rpc_duration_ms >= 0
    fields = "" if user is None else f" client={client} user={user}"
    # Server lines carry the trace of the call (tracing is on in every test); client ones not.
    if user is None:
        assert record.rpc_trace_id is None
    else:
        assert re.fullmatch("[0-9a-f]{32}", record.rpc_trace_id), record.rpc_trace_id
    if user is not None or record.rpc_request_id is not None:
        assert WELL_FORMED_REQUEST_ID.fullmatch(record.rpc_request_id), record.rpc_request_id
    request = "" if record.rpc_request_id is None else f" request_id={record.rpc_request_id}"
    trace = "" if record.rpc_trace_id is None else f" trace_id={record.rpc_trace_id}"
    assert record.getMessage() == (
        f"/greeter.v1.Greeter/{method} code={code} peer={record.rpc_peer}{fields}{request} "
        f"duration={record.rpc_duration_ms:.1f}ms{trace}"
    )


class GatedGreeter(Greeter):
    """The real Greeter, but SayHello waits until the test opens the gate: an in-flight call
    the test controls."""

    def __init__(self, *args):
        super().__init__(*args)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def SayHello(self, request, context):
        self.entered.set()
        await self.gate.wait()
        return await super().SayHello(request, context)


class ChatAttack:
    """`size` chats without a token, each writing a message every 50 ms for as long as the
    server keeps it open, and coming back half a second after it ends, until `stop()`."""

    def __init__(self, stub, size: int):
        self.stub = stub
        self.ended: list[str] = []  # the codes of the calls the server ended
        self._engaged: set[int] = set()  # attackers the server has taken on (or rejected)
        self._stop = asyncio.Event()
        self._attackers = [asyncio.create_task(self._attacker(n)) for n in range(size)]

    @property
    def engaged(self) -> int:
        return len(self._engaged)

    async def _attacker(self, number: int) -> None:
        while not self._stop.is_set():
            call = self.stub.Chat(timeout=30)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for written in itertools.count(1):
                    await call.write(Request(name="attacker"))
                    if written == 3:
                        self._engaged.add(number)  # 3 messages in: the server holds the call
                    if self._stop.is_set():
                        break
                    await asyncio.sleep(0.05)  # the attacker's pace, not synchronisation
            if self._stop.is_set():
                call.cancel()
                return
            self._engaged.add(number)
            self.ended.append((await call.code()).name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._attackers)


async def authenticated_calls_succeed(stub, rounds: int = 5) -> None:
    """SayHello, StreamGreetings and a Chat, `rounds` of each at once, all answered."""

    async def chat() -> list[str]:
        call = stub.Chat(timeout=10)
        replies = [await say(call, name) for name in ("Ada", "Grace")]
        await call.done_writing()
        return replies

    results = await asyncio.gather(
        *(stub.SayHello(Request(name="Ada"), timeout=10) for _ in range(rounds)),
        *(
            messages(stub.StreamGreetings(Request(name="Ada", count=3), timeout=10))
            for _ in range(rounds)
        ),
        *(chat() for _ in range(rounds)),
    )
    assert [r.message for r in results[:rounds]] == ["Hello, Ada!"] * rounds
    assert all(len(replies) == 3 for replies in results[rounds : 2 * rounds])
    assert results[2 * rounds :] == [["Hello, Ada!", "Hello, Grace!"]] * rounds


class WatchAttack:
    """`size` health Watch streams without a token, each held open as long as the server
    lets it, until `stop()`."""

    def __init__(self, stub, size: int):
        self.stub, self.size = stub, size
        self.refused: list[str] = []  # the codes of the streams the server refused
        self._open: list[grpc.aio.UnaryStreamCall] = []  # answered, and still open
        self._watchers = [asyncio.create_task(self._watch()) for _ in range(size)]

    @property
    def holding(self) -> int:
        return sum(1 for call in self._open if not call.done())

    @property
    def settled(self) -> bool:
        """The server has answered or refused every stream."""
        return len(self._open) + len(self.refused) == self.size

    async def _watch(self) -> None:
        call = self.stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        try:
            await call.read()  # SERVING: the server holds this stream from now on
        except grpc.aio.AioRpcError as error:
            self.refused.append(error.code().name)
        else:
            self._open.append(call)

    async def stop(self) -> None:
        await asyncio.gather(*self._watchers)
        for call in self._open:
            call.cancel()


# A test run fails by chance, when Envoy splits as configured, at most once in a million.
RISK = 1e-6


def binomial_bounds(calls: int, share: float, risk: float = RISK) -> tuple[int, int]:
    """The range a Binomial(calls, share) count falls outside of with probability at most
    `risk` (at most risk/2 on each side): where the canary's count of `calls` must be when
    each call goes to it with probability `share`, independently (Envoy draws a random
    number per call)."""

    def probability(k: int) -> float:  # P(X = k), in logs: the terms underflow otherwise
        log = (
            math.lgamma(calls + 1)
            - math.lgamma(k + 1)
            - math.lgamma(calls - k + 1)
            + k * math.log(share)
            + (calls - k) * math.log(1 - share)
        )
        return math.exp(log)

    low, below = 0, 0.0
    while below + probability(low) <= risk / 2:
        below += probability(low)
        low += 1
    high, above = calls, 0.0
    while above + probability(high) <= risk / 2:
        above += probability(high)
        high -= 1
    return low, high


@dataclass
class Releases:
    envoy: EnvoyProcess
    stable: list[ServerProcess]
    canary: ServerProcess
    upstreams: dict[str, str]  # what Envoy was given: compose's names, the processes' addresses


@contextlib.contextmanager
def releases_behind_envoy(
    canary_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    user_bucket: dict = UNREACHED_EDGE_BUCKET,
) -> Iterator[Releases]:
    """The Greeter's two releases as docker-compose.yml runs them (tools/envoy.RELEASES:
    greeter-3 is the canary), with `env` for each and `canary_env` for the canary, and
    Envoy in front of them with `user_bucket` as each user's bucket at the edge. Each
    Greeter has a port of its own choosing (free_port), so a test can start one again
    where it was (`ServerProcess.restarted`)."""
    with contextlib.ExitStack() as stack:
        processes = {
            name: stack.enter_context(
                ServerProcess(
                    STEP_DIR,
                    "--port",
                    str(free_port()),
                    env={**settings, **(env or {}), **((name == "greeter-3" and canary_env) or {})},
                )
            )
            for name, settings in RELEASES.items()
        }
        upstreams = {name: process.address for name, process in processes.items()}
        envoy = stack.enter_context(
            EnvoyProcess(STEP_DIR, CERTS, upstreams, user_bucket=user_bucket)
        )
        *stable, canary = processes.values()
        yield Releases(envoy, stable, canary, upstreams)
