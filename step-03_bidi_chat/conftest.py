"""Fixtures and helpers shared by this folder's test files: servers (in-process and
real processes), channels, and small helpers for calls and log lines."""

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from server import RunningServer, running_server
from settings import Settings
from tools.processes import ServerProcess, run_script

STEP_DIR = Path(__file__).parent
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


@pytest.fixture
async def start_server():
    """Start real servers (this folder's wiring and lifetime) on free loopback ports, in the
    test's loop: `server = await start_server(servicer, grace=10)`. Each one still running
    at the end of the test is shut down."""
    lifetimes = []

    async def start(servicer=None, **overrides) -> ServerInTest:
        lifetime = contextlib.AsyncExitStack()
        lifetimes.append(lifetime)
        running = await lifetime.enter_async_context(
            running_server(server_settings(**overrides), servicer)
        )
        return ServerInTest(running, lifetime)

    yield start
    for lifetime in reversed(lifetimes):
        await lifetime.aclose()  # does nothing for a server the test shut down


@pytest.fixture
async def server_address(start_server):
    return (await start_server(stream_interval=FAST_STREAM_INTERVAL)).address


@pytest.fixture
async def channel(server_address):
    async with grpc.aio.insecure_channel(server_address) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return greeter_pb2_grpc.GreeterStub(channel)


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


@pytest.fixture
def server_process():
    """`python server.py --port 0` as a learner runs it."""
    with ServerProcess(STEP_DIR, "--stream-interval", str(FAST_STREAM_INTERVAL)) as process:
        yield process


Request = greeter_pb2.HelloRequest


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def messages(call) -> list[str]:
    return [reply.message async for reply in call]
