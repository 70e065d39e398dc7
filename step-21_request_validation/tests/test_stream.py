"""StreamGreetings, the server stream: count, order, pacing, validation and cancellation."""

import logging
import time

import grpc
import pytest

from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, messages, open_channel, rpc_error, run_client
from service import DEFAULT_STREAM_COUNT, MAX_STREAM_COUNT
from tests.support.helpers import eventually
from tools.processes import ServerProcess


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
    """The server waits an interval before each reply after the first, so reply k cannot
    arrive before k intervals have passed since the call began, however busy the machine.
    (The gaps between arrivals are no measure: a reply that is delivered late makes the
    gap after it short.)"""
    interval = 0.1
    address = (await start_server(stream_interval=interval)).address
    async with open_channel(address) as channel:
        started = time.monotonic()
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=3), timeout=5
        )
        arrivals = [time.monotonic() - started async for _ in call]
    assert len(arrivals) == 3
    for k, arrived in enumerate(arrivals):
        assert arrived >= k * interval - 0.005, arrivals


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_server_process_uses_its_stream_interval_setting(how):
    """10 replies 0.01 s apart take a tenth of a second; at the default interval (0.5 s)
    they would take 4.5 s."""
    args, env = (
        (["--stream-interval", "0.01"], {})
        if how == "flag"
        else ([], {"GREETER_STREAM_INTERVAL": "0.01"})
    )
    with ServerProcess(STEP_DIR, *args, env=env) as server:
        started = time.monotonic()
        result = run_client("stream", "--name", "Ada", "--count", "10", "--target", server.address)
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 10
    assert elapsed < 3.0, f"took {elapsed:.1f}s: the setting was ignored"


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
    address = (await start_server(stream_interval=interval)).address
    async with open_channel(address) as channel:
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


CANCELLED_STREAMS = 50


def unexpected_lines(output: str) -> str:
    """The server's lines but those of a cancelled stream: what a failure has to show."""
    expected = ("cancelled by the client", "code=CANCELLED")
    return "\n".join(line for line in output.splitlines() if not any(e in line for e in expected))


async def test_streams_cancelled_right_after_their_first_reply_are_each_logged_once(server_process):
    """A client that cancels as soon as the first reply is in, over a real connection to a
    server process: the cancel reaches the server either while the handler waits or while
    the reply is being sent, and either way each stream is logged once as cancelled by the
    client, with no error and no traceback."""
    async with open_channel(server_process.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for _ in range(CANCELLED_STREAMS):
            call = stub.StreamGreetings(Request(name="Ada", count=MAX_STREAM_COUNT), timeout=10)
            await call.read()
            call.cancel()
    # Each cancel travels to the server on its own: a SIGTERM sent before the last one
    # arrived would cut that stream instead (and rightly say so). A stream's RPC line is its
    # last: it comes once the greeting's report to the Logger has ended.
    await eventually(
        lambda: (
            server_process.output.count("/greeter.v1.Greeter/StreamGreetings code=")
            >= CANCELLED_STREAMS
        ),
        message=f"the RPC lines of {CANCELLED_STREAMS} streams",
    )
    assert server_process.stop() == 0
    output = server_process.output
    found = {
        "errors": output.count(" ERROR "),
        "tracebacks": output.count("Traceback"),
        "cancelled": output.count("StreamGreetings cancelled by the client after "),
        "rpc lines": output.count("/greeter.v1.Greeter/StreamGreetings code=CANCELLED"),
    }
    print(f"FIGURES cancelled_streams {found}")
    expected = {"cancelled": CANCELLED_STREAMS, "rpc lines": CANCELLED_STREAMS}
    assert found == {"errors": 0, "tracebacks": 0, **expected}, unexpected_lines(output)


async def test_a_stream_ended_by_its_deadline_is_logged_as_such():
    """A deadline of 1 s on a stream of 10 replies 0.5 s apart: the server ends the call when
    the deadline passes, and says so."""
    with ServerProcess(STEP_DIR, "--stream-interval", "0.5") as server:
        async with open_channel(server.address) as channel:
            await channel.channel_ready()  # the deadline is the stream's, not the connection's
            call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
                Request(name="Ada", count=MAX_STREAM_COUNT), timeout=1
            )
            error = await rpc_error(messages(call))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The client gives up at its deadline on its own; the server's line follows.
        await eventually(
            lambda: "StreamGreetings ended by its deadline after" in server.output,
            message="the server's line of the stream",
        )
        assert server.stop() == 0
    assert "cancelled by the client" not in server.output
    assert "/greeter.v1.Greeter/StreamGreetings code=DEADLINE_EXCEEDED" in server.output
