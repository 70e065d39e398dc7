"""What this folder's tests call besides the fixtures of conftest.py: the step's folder,
settings for test servers, and small helpers for calls, processes and log lines. Helpers
that every step shares unchanged are in the repository's tests/support."""

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

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


def server_settings(**overrides) -> Settings:
    """Server settings for tests: loopback, a free port, half a second of grace."""
    return Settings(**{"host": "127.0.0.1", "port": 0, "grace": 0.5, **overrides})


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
