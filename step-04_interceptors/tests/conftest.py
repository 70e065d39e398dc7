"""The fixtures of this folder's tests: servers (in-process and real processes), channels,
and what they need to run. What the tests call besides fixtures is in helpers.py."""

import contextlib

import grpc
import pytest

from greeter.v1 import greeter_pb2_grpc
from helpers import FAST_STREAM_INTERVAL, STEP_DIR, ServerInTest, server_settings
from server import running_server
from tools.processes import ServerProcess


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


@pytest.fixture
def server_process():
    """`python server.py --port 0` as a learner runs it."""
    with ServerProcess(STEP_DIR, "--stream-interval", str(FAST_STREAM_INTERVAL)) as process:
        yield process


@pytest.fixture(scope="module")
def shared_server_process():
    """The same, started once for the tests of a module that only call it, as a learner
    leaves a server running in one terminal and tries commands in another: none of them
    stops it, floods it or reads its output. One start per module instead of one per test."""
    with ServerProcess(STEP_DIR, "--stream-interval", str(FAST_STREAM_INTERVAL)) as process:
        yield process
