"""Graceful shutdown: in-flight calls finish, new ones are refused, signals stop the process cleanly."""

import asyncio
import signal
import time

import grpc
import pytest

from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, GatedGreeter, Request, open_channel, run_client, start_client
from tests.support.helpers import eventually
from tools.processes import ServerProcess, run_script


async def test_shutdown_lets_an_in_flight_call_finish_and_refuses_new_ones(start_server):
    server = await start_server(GatedGreeter, grace=10)
    greeter = server.servicer
    address = server.address

    async with open_channel(address) as channel:
        in_flight = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=10)
        await asyncio.wait_for(greeter.entered.wait(), 5)
        shutdown = server.shut_down()

        async def new_call_refused() -> bool:
            async with open_channel(address) as fresh:
                try:
                    await greeter_pb2_grpc.GreeterStub(fresh).SayHello(
                        Request(name="Bob"), timeout=1
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code() == grpc.StatusCode.UNAVAILABLE
            return False

        await eventually(new_call_refused, message="new calls to be refused")
        assert not in_flight.done(), "the in-flight call must not be cut off"

        greeter.gate.set()
        assert (await in_flight).message == "Hello, Ada!"
    await asyncio.wait_for(shutdown, 5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_process_stops_cleanly_on_signal(server_process, sig):
    hello = run_client("hello", "--name", "Ada", "--target", server_process.address)
    assert hello.returncode == 0
    assert server_process.stop(sig) == 0
    assert "stopped" in server_process.output
    assert "Traceback" not in server_process.output


def test_server_process_handles_a_signal_right_after_it_says_listening(server_process):
    """The signal handlers are in place before the `listening on` line: a supervisor may
    stop the server the moment it reads that line."""
    assert server_process.stop() == 0
    assert "stopped" in server_process.output


def test_server_refuses_a_port_in_use(server_process):
    port = server_process.address.rsplit(":", 1)[1]
    result = run_script(STEP_DIR, "server.py", "--port", port, timeout=20)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: port {port} is in use (another server?): "
        "stop it, or choose another with --port\n"
    ), "one line that says why: no traceback, no E… line of gRPC's core"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_server_process_cuts_a_stream_when_its_grace_period_ends(how):
    """A stream that outlives the grace period is cut by the server, logged as such (not as a
    client's cancel), and nothing follows "stopped"."""
    args, env = (
        (["--grace", "0.5"], {}) if how == "flag" else ([], {"GREETER_SHUTDOWN_GRACE": "0.5"})
    )
    with ServerProcess(STEP_DIR, "--stream-interval", "0.5", *args, env=env) as server:
        client = start_client(
            "stream", "--name", "Ada", "--count", "10", "--target", server.address
        )
        assert client.stdout.readline() == "Hello, Ada! (1/10)\n"  # the stream is in flight
        started = time.monotonic()
        assert server.stop() == 0
        stopped_after = time.monotonic() - started
        _, errors = client.communicate(timeout=10)
    # With the default grace (10 s) the server would let the stream finish: 4.5 s more.
    assert stopped_after < 3.0, f"stopped after {stopped_after:.1f}s: the grace was ignored"
    assert client.returncode == 1 and errors.startswith("error: UNAVAILABLE: "), errors
    assert "StreamGreetings cut by the server's shutdown after " in server.output
    assert "cancelled by the client" not in server.output
    assert "/greeter.v1.Greeter/StreamGreetings code=UNAVAILABLE peer=" in server.output
    assert server.output.rstrip().endswith("greeter.server: stopped"), server.output
