"""GreetMany, the client stream: many names in, one reply out after the half-close; each
name checked as it arrives, a bounded number of them, and the ways such a call can end."""

import asyncio
import collections
import logging

import grpc
import pytest

from drain import MAX_DRAIN_SECONDS
from greeter.v1 import greeter_pb2_grpc
from helpers import Request, open_channel, rpc_error
from service import MAX_GREET_MANY_NAMES, MAX_NAME_LENGTH, Greeter
from tests.support.helpers import eventually, stalling_the_event_loop


def names_of(*names: str) -> list:
    return [Request(name=name) for name in names]


async def until_cancelled() -> None:
    await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["Ada"], "Hello, Ada!"),
        (["Ada", "Grace"], "Hello, Ada and Grace!"),
        (["Ada", "Grace", "Alan"], "Hello, Ada, Grace and Alan!"),
    ],
    ids=["one", "two", "three"],
)
async def test_greet_many_answers_once_with_every_name(stub, names, message):
    reply = await stub.GreetMany(iter(names_of(*names)), timeout=5)
    assert reply.message == message


async def test_the_reply_waits_for_the_half_close(stub):
    """Names written one by one; the call is still open until the client says it is done."""
    call = stub.GreetMany(timeout=5)
    await call.write(Request(name="Ada"))
    await call.write(Request(name="Grace"))
    assert not call.done()
    await call.done_writing()
    assert (await call).message == "Hello, Ada and Grace!"


async def test_a_stream_without_names_is_refused(stub):
    error = await rpc_error(stub.GreetMany(iter([]), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "GreetMany needs at least one name; send one or more before closing the stream"
    )


async def test_the_most_names_are_greeted_and_one_more_is_refused(stub):
    most = [f"guest {number}" for number in range(MAX_GREET_MANY_NAMES)]
    reply = await stub.GreetMany(iter(names_of(*most)), timeout=10)
    assert reply.message == f"Hello, {', '.join(most[:-1])} and {most[-1]}!"
    error = await rpc_error(stub.GreetMany(iter(names_of(*most, "one too many")), timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        f"GreetMany takes at most {MAX_GREET_MANY_NAMES} names; greet the others in another call"
    )


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("", "name must not be empty"),
        (
            "x" * (MAX_NAME_LENGTH + 1),
            f"name must be at most {MAX_NAME_LENGTH} characters (got 101)",
        ),
        ("Ada\nLovelace", "name must be printable text (no control characters such as newlines)"),
    ],
    ids=["empty", "too long", "control character"],
)
async def test_a_bad_name_ends_the_call_though_the_client_never_closes(stub, bad, problem):
    """The bad name comes second, then the client sends nothing and never closes its
    stream: the call ends with the name's problem once the client has gone quiet."""

    async def names():
        yield Request(name="Ada")
        yield Request(name=bad)
        await until_cancelled()

    error = await rpc_error(stub.GreetMany(names(), timeout=5))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, problem)


async def refusals(stub, calls: int) -> collections.Counter:
    """How `calls` GreetMany calls end, 25 at a time, each with a bad second name and 50
    good ones after it, sent without waiting (grpc.aio sends them as fast as it can)."""

    async def one() -> str:
        names = names_of("Ada", "", *[f"guest {n}" for n in range(50)])
        try:
            await stub.GreetMany(iter(names), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "accepted"

    outcomes: list[str] = []
    for _ in range(calls // 25):
        outcomes += await asyncio.gather(*(one() for _ in range(25)))
    return collections.Counter(outcomes)


async def test_a_client_still_sending_after_a_bad_name_is_told_the_problem(stub):
    """grpc/grpc#36066: a call the server ends while the client still writes may end in
    INTERNAL for the client. The server reads the rest first (drain.refuse_stream)."""
    assert await refusals(stub, 100) == {"INVALID_ARGUMENT": 100}


async def test_a_stalled_server_does_not_take_a_sending_client_for_a_quiet_one(stub):
    """On a busy machine the server may not run for longer than QUIET_SECONDS while its
    client sends; the quiet is counted in the server's own ticks, so that time is not quiet.
    Here the event loop, server and clients alike, stalls for 0.3 s after each 0.05 s."""
    with stalling_the_event_loop(every=0.05, for_seconds=0.3):
        assert await refusals(stub, 50) == {"INVALID_ARGUMENT": 50}


async def test_a_client_that_never_stops_sending_is_refused_all_the_same(stub):
    """The server reads at most MAX_DRAIN_MESSAGES more, for at most MAX_DRAIN_SECONDS: a
    client that keeps sending is refused while it sends (and may see INTERNAL, as above)."""

    async def endless():
        yield Request(name="")
        while True:
            yield Request(name="Ada")

    error = await rpc_error(stub.GreetMany(endless(), timeout=MAX_DRAIN_SECONDS * 3))
    assert error.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL}


async def test_a_client_that_cancels_mid_stream_leaves_the_server_as_it_was(stub, caplog):
    """grpc.aio ends the handler's stream as on a half-close (it cannot tell them apart), so
    the handler answers and gRPC drops the reply: no log line, no error, and the server
    goes on serving."""
    caplog.set_level(logging.INFO, logger="greeter.service")
    call = stub.GreetMany(timeout=5)
    await call.write(Request(name="Ada"))
    await call.write(Request(name="Grace"))
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    reply = await stub.GreetMany(iter(names_of("Alan")), timeout=5)
    assert reply.message == "Hello, Alan!"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_deadline_mid_stream_ends_the_call_and_says_so(stub, caplog):
    caplog.set_level(logging.INFO, logger="greeter.service")
    call = stub.GreetMany(timeout=0.5)
    await call.write(Request(name="Ada"))
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client stops writing
    await wait_for_line(caplog, "GreetMany ended by its deadline; names read: 1")


class ReadingGreeter(Greeter):
    """The real Greeter, whose `read_two` is set once its GreetMany has read two names (a
    client's names may all be sent before the server has started its call)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read_two = asyncio.Event()

    async def GreetMany(self, request_iterator, context):
        async def counted():
            read = 0
            async for request in request_iterator:
                read += 1
                if read == 2:
                    self.read_two.set()
                yield request

        return await super().GreetMany(counted(), context)


async def test_a_stream_the_shutdown_cuts_gets_no_reply_and_says_so(start_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.service")
    server = await start_server(ReadingGreeter, grace=0.5)
    greeter = server.servicer

    async def names():
        yield Request(name="Ada")
        yield Request(name="Grace")
        await until_cancelled()

    async with open_channel(server.address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).GreetMany(names(), timeout=5)
        await asyncio.wait_for(greeter.read_two.wait(), 5)
        await server.shut_down()
        # When the grace runs out gRPC's core cancels the calls left and closes the
        # connection: the client sees whichever reaches it first (both seen in CI).
        assert await call.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    await wait_for_line(caplog, "GreetMany cut by the server's shutdown; names read: 2")


async def wait_for_line(caplog, line: str) -> None:
    await eventually(
        lambda: line in [r.getMessage() for r in caplog.records], message=f"the line {line!r}"
    )
