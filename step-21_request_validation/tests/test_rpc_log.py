"""One log line per RPC, on the server and on the client, for every RPC kind and outcome."""

import asyncio
import logging

import grpc
import pytest

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from helpers import (
    FAST_STREAM_INTERVAL,
    TEST_USER,
    Request,
    WritingGreeter,
    assert_rpc_line,
    messages,
    open_channel,
    rpc_error,
    rpc_records,
    run_client,
    say,
)
from rpc_log import BatchedStreamHandler, ClientRpcLogger
from service import Greeter
from tests.support.helpers import eventually, wait_until


async def say_hello_ok(stub):
    await stub.SayHello(Request(name="Ada"), timeout=5)


async def say_hello_invalid(stub):
    await rpc_error(stub.SayHello(Request(name=""), timeout=5))


async def stream_ok(stub):
    await messages(stub.StreamGreetings(Request(name="Ada", count=2), timeout=5))


async def stream_invalid(stub):
    await rpc_error(messages(stub.StreamGreetings(Request(name="Ada", count=11), timeout=5)))


async def stream_cancelled_by_client(stub):
    call = stub.StreamGreetings(Request(name="Ada", count=10), timeout=5)
    await call.read()
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def greet_many_ok(stub):
    await stub.GreetMany(iter([Request(name="Ada"), Request(name="Grace")]), timeout=5)


async def greet_many_invalid(stub):
    await rpc_error(stub.GreetMany(iter([Request(name="Ada"), Request(name="")]), timeout=5))


async def greet_many_past_its_deadline(stub):
    call = stub.GreetMany(timeout=0.5)
    await call.write(Request(name="Ada"))
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client stops writing


async def chat_ok(stub):
    call = stub.Chat(timeout=5)
    await say(call, "Ada")
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def chat_invalid(stub):
    call = stub.Chat(timeout=5)
    await call.write(Request(name=""))
    await rpc_error(call.read())


async def chat_past_its_deadline(stub):
    call = stub.Chat(timeout=0.5)
    await call.write(Request(name="Ada"))
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client just stops talking


RPC_OUTCOMES = [
    (say_hello_ok, "SayHello", "OK"),
    (say_hello_invalid, "SayHello", "INVALID_ARGUMENT"),
    (stream_ok, "StreamGreetings", "OK"),
    (stream_invalid, "StreamGreetings", "INVALID_ARGUMENT"),
    (stream_cancelled_by_client, "StreamGreetings", "CANCELLED"),
    (greet_many_ok, "GreetMany", "OK"),
    (greet_many_invalid, "GreetMany", "INVALID_ARGUMENT"),
    (greet_many_past_its_deadline, "GreetMany", "DEADLINE_EXCEEDED"),
    (chat_ok, "Chat", "OK"),
    (chat_invalid, "Chat", "INVALID_ARGUMENT"),
    (chat_past_its_deadline, "Chat", "DEADLINE_EXCEEDED"),
]


OUTCOME_IDS = [scenario.__name__ for scenario, _, _ in RPC_OUTCOMES]


@pytest.mark.parametrize(("scenario", "method", "code"), RPC_OUTCOMES, ids=OUTCOME_IDS)
async def test_server_logs_one_line_per_rpc(stub, caplog, scenario, method, code):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    await scenario(stub)
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, method, code, user=TEST_USER)
    assert record.rpc_peer.startswith("ipv4:127.0.0.1:")
    assert record.levelno == logging.INFO


@pytest.mark.parametrize(("scenario", "method", "code"), RPC_OUTCOMES, ids=OUTCOME_IDS)
async def test_client_logs_one_line_per_call(server_address, caplog, scenario, method, code):
    caplog.set_level(logging.INFO, logger="greeter.client")
    rpc_logger = ClientRpcLogger(server_address)
    async with open_channel(server_address, interceptors=rpc_logger.interceptors()) as channel:
        await scenario(greeter_pb2_grpc.GreeterStub(channel))
        await rpc_logger.flush()
    [record] = rpc_records(caplog, "greeter.client")
    assert_rpc_line(record, method, code)
    assert record.rpc_peer == server_address


async def test_stream_log_line_is_written_when_the_stream_ends(start_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    address = (await start_server(stream_interval=0.1)).address
    async with open_channel(address) as channel:
        await messages(
            greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
                Request(name="Ada", count=3), timeout=5
            )
        )
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert record.rpc_duration_ms >= 2 * 0.1 * 1000 * 0.9  # it covers the whole stream


STREAM_OUTCOMES = [outcome for outcome in RPC_OUTCOMES if outcome[1] != "SayHello"]


@pytest.mark.parametrize(
    ("scenario", "method", "code"),
    STREAM_OUTCOMES,
    ids=[scenario.__name__ for scenario, _, _ in STREAM_OUTCOMES],
)
async def test_a_stream_written_with_context_write_is_logged_as_a_yielded_one(
    start_server, caplog, scenario, method, code
):
    """grpc.aio lets a streaming handler write its replies instead of yielding them, as the
    health service does (step 07): every interceptor sees both alike."""
    caplog.set_level(logging.INFO, logger="greeter")
    address = (await start_server(WritingGreeter, stream_interval=FAST_STREAM_INTERVAL)).address
    async with open_channel(address) as channel:
        await scenario(greeter_pb2_grpc.GreeterStub(channel))
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, method, code, user=TEST_USER)
    # The handler has ended, its own cleanup included, when the call is logged.
    handler_lines = [r for r in caplog.records if r.name == "greeter.service"]
    assert all(caplog.records.index(line) < caplog.records.index(record) for line in handler_lines)
    # ...and nothing of it is left running: not the handler's task, nor one waiting on it.
    left = [t for t in asyncio.all_tasks() if "Writ" in t.get_coro().__qualname__]
    assert not left, left


async def test_written_replies_arrive_as_yielded_ones_do(start_server):
    received = []
    for greeter in (Greeter, WritingGreeter):
        address = (await start_server(greeter, stream_interval=FAST_STREAM_INTERVAL)).address
        async with open_channel(address) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            stream = await messages(stub.StreamGreetings(Request(name="Ada", count=3), timeout=5))
            chat = stub.Chat(timeout=5)
            replies = [await say(chat, "Ada"), await say(chat, "Grace")]
            await chat.done_writing()
            assert await chat.read() is grpc.aio.EOF
            received.append((stream, replies))
    yielded, written = received
    assert written == yielded
    assert yielded[0] == ["Hello, Ada! (1/3)", "Hello, Ada! (2/3)", "Hello, Ada! (3/3)"]


class BrokenWriter(Greeter):
    async def StreamGreetings(self, request, context):
        await context.write(greeter_pb2.HelloReply(message="one"))
        raise RuntimeError("a bug in the handler")


async def test_a_failing_writer_is_logged_with_its_traceback(start_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    address = (await start_server(BrokenWriter)).address
    async with open_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=2), timeout=5
        )
        assert (await call.read()).message == "one"
        error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.UNKNOWN
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, "StreamGreetings", "UNKNOWN", user=TEST_USER)
    assert isinstance(record.exc_info[1], RuntimeError)


class BrokenGreeter(Greeter):
    async def SayHello(self, request, context):
        raise RuntimeError("a bug in the handler")


async def test_a_failing_handler_is_logged_with_its_traceback(start_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    address = (await start_server(BrokenGreeter)).address
    async with open_channel(address) as channel:
        error = await rpc_error(
            greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        )
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "Traceback" not in error.details()
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, "SayHello", "UNKNOWN", user=TEST_USER)
    assert record.levelno == logging.WARNING
    assert isinstance(record.exc_info[1], RuntimeError)


def test_server_process_logs_each_rpc_and_the_client_logs_with_verbose(server_process):
    result = run_client("hello", "--name", "Ada", "--target", server_process.address, "-v")
    assert result.stdout == "Hello, Ada!\n"
    assert (
        f"INFO greeter.client: /greeter.v1.Greeter/SayHello code=OK peer={server_process.address}"
        in result.stderr
    )
    # Lines are written in batches, but a running server's line is out within moments.
    wait_until(
        lambda: (
            "INFO greeter.rpc: /greeter.v1.Greeter/SayHello code=OK peer=ipv4:127.0.0.1:"
            in server_process.output
        ),
        message="the server's line for the call, while it runs",
    )


def test_lines_are_written_in_batches_a_warning_at_once_and_the_rest_on_close(tmp_path):
    path = tmp_path / "server.log"
    log = logging.getLogger("test.batched")
    log.propagate, log.level = False, logging.INFO
    with path.open("w") as stream:
        handler = BatchedStreamHandler(stream, flush_seconds=3600)  # no timed flush here
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            log.info("first")
            assert path.read_text() == ""  # still in the buffer: no write per line
            log.warning("second")
            assert path.read_text() == "INFO first\nWARNING second\n"  # and all before it
            log.info("third")
            handler.close()  # as logging.shutdown() does when the program exits
            assert path.read_text() == "INFO first\nWARNING second\nINFO third\n"
        finally:
            log.removeHandler(handler)
