"""Rate limits per user (ratelimit.py), with real servers: a user over the quota is refused
with RESOURCE_EXHAUSTED and when to come back, while other users, health, reflection and
the refusal of callers without credentials go on as before; each RPC kind pays as the
README says; the refusals are counted."""

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from greeter.v1 import greeter_pb2_grpc
from helpers import Request, messages, open_channel, raw_channel, rpc_error, say, scrape, value
from ratelimit import retry_delay

RATE, BURST = 2, 5  # a token every half second, five at once


def details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The google.rpc details of a refusal, by type name."""
    found: dict[str, object] = {}
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def hammer(stub, calls: int) -> tuple[int, list[grpc.aio.AioRpcError], float]:
    """`calls` SayHellos one after the other: how many passed, the refusals, the seconds."""
    passed, refused = 0, []
    started = time.monotonic()
    for _ in range(calls):
        try:
            await stub.SayHello(Request(name="Ada"), timeout=5)
            passed += 1
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            refused.append(error)
    return passed, refused, time.monotonic() - started


@pytest.fixture
async def limited(start_server):
    return await start_server(rate_limit=RATE, rate_burst=BURST)


async def test_a_user_gets_the_burst_then_is_told_when_to_come_back(limited):
    async with open_channel(limited.address) as channel:
        passed, refused, seconds = await hammer(greeter_pb2_grpc.GreeterStub(channel), 20)
    # The bucket's arithmetic: the burst, and a token for each half second the calls took.
    assert BURST <= passed <= BURST + int(seconds * RATE), (passed, seconds)
    assert len(refused) == 20 - passed
    error = refused[-1]
    assert error.details().startswith(
        "rate limit of user ada (2 calls a second, 5 at once): retry in 0."
    ), error.details()
    found = details(error)
    delay = found["RetryInfo"].retry_delay.ToNanoseconds() / 1e9
    assert 0 < delay <= 1 / RATE, delay
    assert retry_delay(error) == delay
    [violation] = found["QuotaFailure"].violations
    assert violation.subject == "user ada"
    assert violation.description == "2 calls a second, 5 at once"


async def test_a_refused_user_who_waits_as_told_is_served(limited):
    async with open_channel(limited.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        _, refused, _ = await hammer(stub, BURST + 1)
        delay = retry_delay(refused[-1])
        assert delay is not None
        await asyncio.sleep(delay)  # what a client is told to do: the behaviour under test
        reply = await stub.SayHello(Request(name="Ada"), timeout=5)
    assert reply.message == "Hello, Ada!"


async def test_one_throttled_user_leaves_everyone_else_their_calls(limited):
    async with (
        open_channel(limited.address) as ada,
        open_channel(limited.address, user_id="grace") as grace,
        open_channel(limited.address, token="wrong-token-0123456789") as stranger,
        raw_channel(limited.address) as public,
    ):
        _, refused, _ = await hammer(greeter_pb2_grpc.GreeterStub(ada), BURST + 5)
        assert refused, "ada must be over her quota for this test"
        # Another user has a bucket of her own, full.
        passed, _, _ = await hammer(greeter_pb2_grpc.GreeterStub(grace), BURST)
        assert passed == BURST
        # Without credentials: refused by auth, as before, and never with ada's refusal.
        error = await rpc_error(
            greeter_pb2_grpc.GreeterStub(stranger).SayHello(Request(name="X"), timeout=5)
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health and reflection take no tokens and need none.
        for _ in range(BURST + 5):
            health = await health_pb2_grpc.HealthStub(public).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(public).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        [listed] = [reply async for reply in listing]
        assert "greeter.v1.Greeter" in {s.name for s in listed.list_services_response.service}


async def test_a_stream_costs_a_token_when_it_starts(start_server):
    server = await start_server(rate_limit=1, rate_burst=2, stream_interval=0.0)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for _ in range(2):  # 5 replies each, one token each
            replies = await messages(stub.StreamGreetings(Request(name="Ada", count=5), timeout=5))
            assert len(replies) == 5
        error = await rpc_error(messages(stub.StreamGreetings(Request(name="Ada"), timeout=5)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_greet_many_costs_a_token_and_a_refused_one_is_refused_cleanly(start_server):
    """GreetMany (at most 100 names, one reply) costs one token; a refused one is refused
    with its status even while its client still writes (drain.py)."""
    server = await start_server(rate_limit=1, rate_burst=1)

    async def names(count: int):
        for index in range(count):
            yield Request(name=f"Ada{index}")

    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        reply = await stub.GreetMany(names(100), timeout=5)
        assert reply.message.startswith("Hello, Ada0, Ada1")
        for _ in range(20):
            error = await rpc_error(stub.GreetMany(names(100), timeout=5))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error


async def test_a_chat_pays_for_each_message_after_its_first(start_server):
    """A chat may go on for ever: its opening takes a token, and so does each message after
    the first. With 3 tokens: three messages answered, the fourth ends the chat."""
    server = await start_server(rate_limit=1, rate_burst=3)
    async with open_channel(server.address) as channel:
        chat = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=5)
        for name in ("Ada", "Grace", "Alan"):
            assert await say(chat, name) == f"Hello, {name}!"
        await chat.write(Request(name="Edsger"))
        error = await rpc_error(chat.read())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith("rate limit of user ada (1 call a second, 3 at once)")


async def test_refusals_are_counted_by_method_and_limit(limited):
    async with open_channel(limited.address) as channel:
        _, refused, _ = await hammer(greeter_pb2_grpc.GreeterStub(channel), BURST + 3)
    samples = await scrape(limited.metrics_address)
    labels = {"grpc_service": "greeter.v1.Greeter", "limit": "per_user"}
    assert value(samples, "greeter_rate_limited_total", grpc_method="SayHello", **labels) == len(
        refused
    )
    assert value(samples, "greeter_rate_limited_total", grpc_method="Chat", **labels) == 0
    assert value(samples, "greeter_rate_limit_decisions_total", store="memory") == BURST + 3
    assert value(samples, "greeter_rate_limit_decisions_total", store="redis") == 0
    # The RPC metrics see the refusal as any other code (step 08).
    handled = {"grpc_type": "unary", "grpc_service": "greeter.v1.Greeter"}
    assert value(
        samples,
        "grpc_server_handled_total",
        grpc_method="SayHello",
        grpc_code="ResourceExhausted",
        **handled,
    ) == len(refused)
