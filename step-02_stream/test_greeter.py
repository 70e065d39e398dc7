"""Steps 01–02: a unary RPC and a server stream, their input validation, their limits and a
graceful shutdown."""

import asyncio
import itertools
import logging
import signal
import subprocess
import sys
import time

import grpc
import pytest

from conftest import STEP_DIR, run_client
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from server import MAX_MESSAGE_BYTES, build_server, stop_when
from service import DEFAULT_STREAM_COUNT, MAX_NAME_LENGTH, MAX_STREAM_COUNT, Greeter
from settings import Settings
from tests.support.helpers import closed_port, eventually, silent_port
from tools.processes import ServerProcess, run_script

Request = greeter_pb2.HelloRequest


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- SayHello ---------------------------------------------------------------------------


async def test_say_hello_greets_by_name(stub):
    reply = await stub.SayHello(Request(name="Ada"), timeout=5)
    assert reply.message == "Hello, Ada!"


async def test_say_hello_accepts_unicode_up_to_the_length_limit(stub):
    name = "é" * MAX_NAME_LENGTH  # characters, not bytes: 100 characters are 200 UTF-8 bytes
    reply = await stub.SayHello(Request(name=name), timeout=5)
    assert reply.message == f"Hello, {name}!"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "name must not be empty"),
        ("   ", "name must not be empty"),
        (
            "x" * (MAX_NAME_LENGTH + 1),
            f"name must be at most {MAX_NAME_LENGTH} characters (got 101)",
        ),
        ("Ada\nINFO forged log line", "name must be printable text"),
    ],
    ids=["empty", "blank", "too-long", "control-characters"],
)
async def test_say_hello_rejects_invalid_names(stub, name, expected):
    error = await rpc_error(stub.SayHello(Request(name=name), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


async def test_oversized_message_is_refused_before_it_is_read(stub):
    error = await rpc_error(stub.SayHello(Request(name="x" * MAX_MESSAGE_BYTES), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


async def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/greeter.v1.Greeter/NoSuchMethod")(b"", timeout=5)
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- StreamGreetings --------------------------------------------------------------------


async def messages(call) -> list[str]:
    return [reply.message async for reply in call]


async def test_stream_sends_the_requested_count_in_order(stub):
    call = stub.StreamGreetings(Request(name="Ada", count=3), timeout=5)
    assert await messages(call) == ["Hello, Ada! (1/3)", "Hello, Ada! (2/3)", "Hello, Ada! (3/3)"]
    assert await call.code() == grpc.StatusCode.OK


async def test_stream_count_defaults_when_unset(stub):
    replies = await messages(stub.StreamGreetings(Request(name="Ada"), timeout=5))
    assert len(replies) == DEFAULT_STREAM_COUNT
    assert replies[-1] == f"Hello, Ada! ({DEFAULT_STREAM_COUNT}/{DEFAULT_STREAM_COUNT})"


async def test_stream_accepts_the_maximum_count(stub):
    replies = await messages(
        stub.StreamGreetings(Request(name="Ada", count=MAX_STREAM_COUNT), timeout=5)
    )
    assert len(replies) == MAX_STREAM_COUNT


async def test_stream_replies_are_spread_over_time(start_server):
    interval = 0.1
    address = await start_server(stream_interval=interval)
    async with grpc.aio.insecure_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=3), timeout=5
        )
        arrivals = [time.monotonic() async for _ in call]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(gaps) == 2
    assert all(gap >= interval * 0.9 for gap in gaps), gaps  # sleeps are never shorter


@pytest.mark.parametrize("count", [-1, MAX_STREAM_COUNT + 1])
async def test_stream_rejects_a_count_out_of_range(stub, count):
    error = await rpc_error(
        messages(stub.StreamGreetings(Request(name="Ada", count=count), timeout=5))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"count must be between 1 and {MAX_STREAM_COUNT} (got {count}); "
        f"0 or unset means {DEFAULT_STREAM_COUNT}"
    )


async def test_stream_rejects_an_invalid_name(stub):
    error = await rpc_error(messages(stub.StreamGreetings(Request(name=" "), timeout=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "name must not be empty"


async def test_server_stops_streaming_as_soon_as_the_client_cancels(start_server, caplog):
    """Observed on the server: the handler is cancelled right after the client cancels,
    long before the stream would have ended, and it produced nothing more."""
    caplog.set_level(logging.INFO, logger="greeter.service")
    interval = 0.3  # the 8 replies left after the cancel would take 8 × 0.3 = 2.4 s
    address = await start_server(stream_interval=interval)
    async with grpc.aio.insecure_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=10), timeout=10
        )
        received = [await call.read(), await call.read()]
        assert [r.message for r in received] == ["Hello, Ada! (1/10)", "Hello, Ada! (2/10)"]
        cancelled_at = time.monotonic()
        call.cancel()

        def server_saw_the_cancel() -> bool:
            return any("StreamGreetings cancelled" in r.getMessage() for r in caplog.records)

        await eventually(server_saw_the_cancel, timeout=5, message="the server to stop the stream")
        assert time.monotonic() - cancelled_at < 1.2, "the server kept going after the cancel"
    [record] = [r for r in caplog.records if "StreamGreetings cancelled" in r.getMessage()]
    assert record.getMessage() == "StreamGreetings cancelled by the client after 2 of 10 replies"


# --- Graceful shutdown ------------------------------------------------------------------


class GatedGreeter(Greeter):
    """The real Greeter, but SayHello waits until the test opens the gate: an in-flight call
    the test controls."""

    def __init__(self):
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def SayHello(self, request, context):
        self.entered.set()
        await self.gate.wait()
        return await super().SayHello(request, context)


async def test_shutdown_lets_an_in_flight_call_finish_and_refuses_new_ones():
    greeter = GatedGreeter()
    server, port = build_server(Settings(host="127.0.0.1", port=0), greeter)
    await server.start()
    address = f"127.0.0.1:{port}"
    stop = asyncio.Event()
    shutdown = asyncio.create_task(stop_when(stop, server, grace=10))

    async with grpc.aio.insecure_channel(address) as channel:
        in_flight = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=10)
        await asyncio.wait_for(greeter.entered.wait(), 5)
        stop.set()

        async def new_call_refused() -> bool:
            async with grpc.aio.insecure_channel(address) as fresh:
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
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_rejects_a_bad_port_setting():
    result = run_script(STEP_DIR, "server.py", env={"GREETER_PORT": "http"})
    assert result.returncode == 2
    assert "--port: invalid port_number value: 'http'" in result.stderr


# --- The command-line client ------------------------------------------------------------


def test_client_prints_the_reply(server_process):
    result = run_client("hello", "--name", "Ada", "--target", server_process.address)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello, Ada!\n", "")


def test_client_reports_an_rpc_error_in_one_line(server_process):
    result = run_client("hello", "--name", "", "--target", server_process.address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: INVALID_ARGUMENT: name must not be empty\n"


def test_client_reports_a_server_that_is_down():
    with closed_port() as address:
        result = run_client("hello", "--name", "Ada", "--target", address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert result.stderr.count("\n") == 1, "one line, no traceback"


def test_client_gives_up_on_a_stuck_server_at_its_deadline():
    with silent_port() as address:
        result = run_client(
            "hello", "--name", "Ada", "--target", address, "--timeout", "0.5", timeout=10
        )
    assert result.returncode == 1
    assert result.stderr.startswith("error: DEADLINE_EXCEEDED: ")


def test_client_prints_stream_replies_as_they_arrive():
    """The first reply is on the client's stdout while the stream is still running."""
    with ServerProcess(STEP_DIR, "--stream-interval", "0.3") as server:
        client = subprocess.Popen(
            [
                sys.executable,
                "client.py",
                "stream",
                "--name",
                "Ada",
                "--count",
                "3",
                "--target",
                server.address,
            ],
            cwd=STEP_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = client.stdout.readline()
        still_running = client.poll() is None
        rest, errors = client.communicate(timeout=10)
    assert first == "Hello, Ada! (1/3)\n"
    assert still_running, "the client printed nothing until the stream ended"
    assert rest == "Hello, Ada! (2/3)\nHello, Ada! (3/3)\n"
    assert (client.returncode, errors) == (0, "")


def test_client_reports_a_stream_error_in_one_line(server_process):
    result = run_client(
        "stream", "--name", "Ada", "--count", "11", "--target", server_process.address
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: count must be between 1 and 10")
    assert result.stderr.count("\n") == 1


def test_client_uses_the_target_from_the_environment(server_process):
    result = run_client("hello", "--name", "Ada", env={"GREETER_TARGET": server_process.address})
    assert result.stdout == "Hello, Ada!\n"
