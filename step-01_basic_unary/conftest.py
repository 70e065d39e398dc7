"""Fixtures and helpers shared by this step's test files: servers (in-process and
real processes), channels, and small helpers for calls and log lines."""

import subprocess
from pathlib import Path

import grpc
import pytest

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from server import build_server
from settings import Settings
from tools.processes import ServerProcess, run_script

STEP_DIR = Path(__file__).parent


@pytest.fixture
async def server_address():
    """A real gRPC server (this step's wiring) on a free loopback port, in the test's loop."""
    server, port = build_server(Settings(host="127.0.0.1", port=0))
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


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
    with ServerProcess(STEP_DIR) as process:
        yield process


Request = greeter_pb2.HelloRequest


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value
