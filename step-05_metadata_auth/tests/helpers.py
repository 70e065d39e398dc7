"""What this folder's tests call besides the fixtures of conftest.py: the step's folder,
settings for test servers, and small helpers for calls, processes and log lines. Helpers
that every step shares unchanged are in the repository's tests/support."""

import asyncio
import contextlib
import itertools
import logging
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from auth import client_auth_interceptors
from greeter.v1 import greeter_pb2
from server import RunningServer
from service import Greeter
from settings import Settings
from tools.processes import run_script

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


TEST_USER = "ada"


def server_settings(**overrides) -> Settings:
    """Server settings for tests: loopback, a free port, half a second of grace, the test
    token."""
    return Settings(
        **{"host": "127.0.0.1", "port": 0, "grace": 0.5, "token": TEST_TOKEN, **overrides}
    )


def raw_channel(address: str, interceptors=()) -> grpc.aio.Channel:
    """A channel that adds no credentials: calls carry only the metadata they are given."""
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


def open_channel(
    address: str, *, token: str | None = TEST_TOKEN, user_id: str = TEST_USER, interceptors=()
) -> grpc.aio.Channel:
    """A channel whose calls carry `token` and `user_id` (the client's auth interceptors),
    after any other `interceptors`."""
    return raw_channel(address, [*interceptors, *client_auth_interceptors(token, user_id)])


@dataclass
class ServerInTest:
    """A server started through running_server(), the lifetime serve() uses."""

    running: RunningServer
    lifetime: contextlib.AsyncExitStack

    @property
    def address(self) -> str:
        return self.running.address

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


def rpc_records(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def assert_rpc_line(
    record: logging.LogRecord, method: str, code: str, user: str | None = None
) -> None:
    """`user`: the server's user field; None for client lines, which have none."""
    assert record.rpc_method == f"/greeter.v1.Greeter/{method}"
    assert record.rpc_code == code
    assert record.rpc_user == user
    assert record.rpc_duration_ms >= 0
    user_field = "" if user is None else f" user={user}"
    assert record.getMessage() == (
        f"/greeter.v1.Greeter/{method} code={code} peer={record.rpc_peer}{user_field} "
        f"duration={record.rpc_duration_ms:.1f}ms"
    )


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
