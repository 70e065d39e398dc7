"""Metadata propagation: the caller's user id and the request id cross the hop to the Logger,
attached by the client interceptor for every RPC kind; a request id is taken when
well-formed, replaced otherwise, generated once when missing, returned to the caller, and
the same in both services' log lines, the Logger's entry and the spans; concurrent calls
never mix; and only a holder of the Logger's token can set the user the Logger believes."""

import asyncio
import logging

import grpc
import pytest

from greeter.v1 import greeter_pb2_grpc
from helpers import (
    FAST_STREAM_INTERVAL,
    LOGGER_TEST_TOKEN,
    TEST_TOKEN,
    Request,
    logged_greetings,
    logger_channel,
    messages,
    raw_channel,
    rpc_error,
    rpc_records,
    run_client,
    say,
)
from logger.v1 import logger_pb2, logger_pb2_grpc
from propagation import WELL_FORMED_REQUEST_ID
from tests.support.helpers import eventually


def credentials(user_id: str, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """The Greeter's token and `user_id`, and `request_id` when given, as call metadata."""
    sent = (("authorization", f"Bearer {TEST_TOKEN}"), ("x-user-id", user_id))
    return sent if request_id is None else (*sent, ("x-request-id", request_id))


async def greet(stub, method: str, metadata) -> grpc.aio.Call:
    """One call of `method`, run to its end; returns the call (its metadata, its code)."""
    if method == "SayHello":
        call = stub.SayHello(Request(name="Ada"), metadata=metadata, timeout=5)
        await call
    elif method == "StreamGreetings":
        call = stub.StreamGreetings(Request(name="Ada", count=2), metadata=metadata, timeout=5)
        await messages(call)
    elif method == "GreetMany":
        call = stub.GreetMany(iter([Request(name="Ada")]), metadata=metadata, timeout=5)
        await call
    else:
        call = stub.Chat(metadata=metadata, timeout=5)
        await say(call, "Ada")
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    return call


def request_id_returned(trailing_metadata) -> str:
    return dict(trailing_metadata)["x-request-id"]


@pytest.mark.parametrize(
    "sent", [None, "req-4f1c.2026:a_b", "r" * 64], ids=["generated", "the-callers", "longest"]
)
@pytest.mark.parametrize("method", ["SayHello", "StreamGreetings", "GreetMany", "Chat"])
async def test_the_logger_sees_the_user_and_the_request_the_greeter_saw(
    start_server, caplog, method, sent
):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    caplog.set_level(logging.INFO, logger="logger.rpc")
    server = await start_server(stream_interval=FAST_STREAM_INTERVAL)
    async with raw_channel(server.address) as channel:
        call = await greet(
            greeter_pb2_grpc.GreeterStub(channel), method, credentials("grace", sent)
        )
        returned = request_id_returned(await call.trailing_metadata())
    [greeter_line] = rpc_records(caplog, "greeter.rpc")
    [logger_line] = rpc_records(caplog, "logger.rpc")
    [entry] = await logged_greetings(server.logger.address)
    if sent is None:  # made once, by the Greeter, and passed on
        assert WELL_FORMED_REQUEST_ID.fullmatch(returned)
    else:
        assert returned == sent
    assert greeter_line.rpc_request_id == logger_line.rpc_request_id == returned
    assert entry.request_id == returned
    assert greeter_line.rpc_user == logger_line.rpc_user == entry.user_id == "grace"
    assert f" request_id={returned} " in logger_line.getMessage()


@pytest.mark.parametrize(
    "sent",
    ["has space", "r" * 65, "a,b", "<script>", ""],
    ids=["space", "oversized", "comma", "markup", "empty"],
)
async def test_a_malformed_request_id_is_replaced_not_passed_on(start_server, sent):
    server = await start_server()
    async with raw_channel(server.address) as channel:
        call = await greet(
            greeter_pb2_grpc.GreeterStub(channel), "SayHello", credentials("ada", sent)
        )
        returned = request_id_returned(await call.trailing_metadata())
    assert returned != sent and WELL_FORMED_REQUEST_ID.fullmatch(returned)
    [entry] = await logged_greetings(server.logger.address)
    assert entry.request_id == returned


async def test_two_request_ids_are_replaced_by_one(start_server):
    server = await start_server()
    metadata = (*credentials("ada", "first"), ("x-request-id", "second"))
    async with raw_channel(server.address) as channel:
        call = await greet(greeter_pb2_grpc.GreeterStub(channel), "SayHello", metadata)
        returned = request_id_returned(await call.trailing_metadata())
    assert returned not in ("first", "second")
    [entry] = await logged_greetings(server.logger.address)
    assert entry.request_id == returned


async def test_a_rejected_call_still_gets_its_request_id(start_server):
    """The id comes back before the rejection: a caller can quote it to whoever runs the
    server, who finds the line."""
    server = await start_server()
    async with raw_channel(server.address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).SayHello(
            Request(name="Ada"), metadata=(("x-request-id", "req-1"),), timeout=5
        )
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert request_id_returned(await call.trailing_metadata()) == "req-1"


async def test_concurrent_calls_never_see_each_others_metadata(start_server):
    """100 calls at once, each with its own user and request id, all four kinds mixed: each
    entry at the Logger carries the pair its call sent."""
    # 100 reports at once to a Logger in the same process: on a busy machine some would take
    # more than the default Logger timeout (0.5 s) and be given up. This test is about
    # metadata, not about a slow Logger, so the Logger gets all the time it needs.
    server = await start_server(stream_interval=FAST_STREAM_INTERVAL, logger_timeout=10.0)
    methods = ["SayHello", "StreamGreetings", "GreetMany", "Chat"]
    async with raw_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await asyncio.gather(
            *(
                greet(stub, methods[n % len(methods)], credentials(f"user-{n}", f"request-{n}"))
                for n in range(100)
            )
        )
    entries = await logged_greetings(server.logger.address, limit=100)
    pairs = {(e.user_id, e.request_id) for e in entries}
    assert pairs == {(f"user-{n}", f"request-{n}") for n in range(100)}


async def test_only_a_holder_of_the_loggers_token_sets_the_user_it_believes(start_server):
    """A client that calls the Logger directly with the Greeter's token, claiming to be
    someone, is refused: the Logger takes x-user-id only with its own token."""
    server = await start_server()
    async with raw_channel(server.logger.address) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        forged = logger_pb2.RecordRequest(greeting=logger_pb2.Greeting(names=["Ada"]))
        forged.greeting.method = "SayHello"
        forged.greeting.greeted_at.GetCurrentTime()
        for metadata in [
            (("x-user-id", "admin"),),
            (("authorization", f"Bearer {TEST_TOKEN}"), ("x-user-id", "admin")),
        ]:
            error = await rpc_error(stub.Record(forged, metadata=metadata, timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await logged_greetings(server.logger.address) == []


async def test_the_logger_accepts_an_identity_from_a_holder_of_its_token(start_server):
    """The other side of the trust rule: with the Logger's token, the user id is believed
    as sent. That is why the token is the Logger's own, held by the services that call it."""
    server = await start_server()
    async with logger_channel(server.logger.address, user_id="carol") as channel:
        request = logger_pb2.RecordRequest(greeting=logger_pb2.Greeting(names=["Ada"]))
        request.greeting.method = "SayHello"
        request.greeting.greeted_at.GetCurrentTime()
        await logger_pb2_grpc.LoggerStub(channel).Record(request, timeout=5)
    [entry] = await logged_greetings(server.logger.address)
    assert entry.user_id == "carol"
    assert LOGGER_TEST_TOKEN not in repr(entry)


async def test_the_request_id_joins_the_spans_of_both_services(start_server, receiver):
    server = await start_server()
    async with raw_channel(server.address) as channel:
        call = await greet(greeter_pb2_grpc.GreeterStub(channel), "SayHello", credentials("ada"))
        returned = request_id_returned(await call.trailing_metadata())
    [entry] = await logged_greetings(server.logger.address)

    def server_spans() -> dict:
        return {
            s.service: s
            for s in receiver.spans
            if s.kind == "SERVER" and s.trace_id == entry.trace_id
        }

    await eventually(lambda: len(server_spans()) == 2, message="both services' spans")
    spans = server_spans()
    assert spans["greeter"].attributes["request_id"] == returned
    assert spans["logger"].attributes["request_id"] == returned


def test_the_client_prints_the_request_id_with_verbose(server_process):
    result = run_client("hello", "--name", "Ada", "-v", "--target", server_process.address)
    assert result.returncode == 0
    [line] = [line for line in result.stderr.splitlines() if "greeter.client" in line]
    request_id = line.split(" request_id=")[1].split()[0]
    assert WELL_FORMED_REQUEST_ID.fullmatch(request_id)
    server_process.stop()
    assert f" request_id={request_id} " in server_process.output  # the same call
