"""Fixtures and helpers shared by this step's test files: servers (in-process and
real processes), channels, and small helpers for calls and log lines."""

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from server import build_server
from settings import Settings
from tools.processes import ServerProcess, run_script

STEP_DIR = Path(__file__).parent
# Streams in tests: replies 20 ms apart instead of 500 ms keep the tests fast.
FAST_STREAM_INTERVAL = 0.02


@pytest.fixture
async def start_server():
    """Start real gRPC servers (this step's wiring) on free loopback ports, in the test's
    loop: `address = await start_server(stream_interval=0.1)`. Stopped after the test."""
    servers = []

    async def start(**settings) -> str:
        server, port = build_server(Settings(host="127.0.0.1", port=0, **settings))
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


@pytest.fixture
async def server_address(start_server):
    return await start_server(stream_interval=FAST_STREAM_INTERVAL)


@pytest.fixture
async def channel(server_address):
    async with grpc.aio.insecure_channel(server_address) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return greeter_pb2_grpc.GreeterStub(channel)


def run_client(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """`python client.py args...` in this step's folder, as a learner runs it."""
    return run_script(STEP_DIR, "client.py", *args, **kwargs)


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


async def say(call, name: str) -> str:
    """Ping-pong: send one message, wait for its reply (a server that waited for more input
    before answering would fail here instead of hanging)."""
    await call.write(Request(name=name))
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply is not grpc.aio.EOF, "the chat ended early"
    return reply.message
