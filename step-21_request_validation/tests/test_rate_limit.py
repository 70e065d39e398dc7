"""Rate limits per user (ratelimit.py), with real servers: a user over the quota is refused
with RESOURCE_EXHAUSTED and when to come back, while other users, health, reflection and
the refusal of callers without credentials go on as before; each RPC kind pays as the
README says; the refusals are counted."""

import asyncio
import contextlib
import re
import subprocess
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from greeter.v1 import greeter_pb2_grpc
from helpers import (
    CERTS,
    STEP_DIR,
    Request,
    logged_greetings,
    messages,
    open_channel,
    raw_channel,
    rpc_error,
    run_client,
    say,
    scrape,
    value,
)
from retries import retry_delay
from tests.support.helpers import eventually
from tools.envoy import RELEASES, EnvoyProcess
from tools.processes import ServerProcess, StepServices

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
    """Five replies each, one token each: of 6 streams, the burst of 2 (and one for each
    second they took)."""
    server = await start_server(rate_limit=1, rate_burst=2, stream_interval=0.0)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        started, replies = time.monotonic(), []
        for _ in range(6):
            try:
                replies.append(await messages(stub.StreamGreetings(Request(name="Ada", count=5))))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        seconds = time.monotonic() - started
    assert 2 <= len(replies) <= 2 + int(seconds), (len(replies), seconds)
    assert all(len(each) == 5 for each in replies)


async def test_greet_many_costs_a_token_and_a_refused_one_is_refused_cleanly(start_server):
    """GreetMany (at most 100 names, one reply) costs one token; a refused one is refused
    with its status even while its client still writes (drain.py), never INTERNAL."""
    server = await start_server(rate_limit=1, rate_burst=1)

    async def names(count: int):
        for index in range(count):
            yield Request(name=f"Ada{index}")

    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        started, greeted, refused = time.monotonic(), 0, 0
        for _ in range(10):
            try:
                reply = await stub.GreetMany(names(100), timeout=5)
                assert reply.message.startswith("Hello, Ada0, Ada1")
                greeted += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused += 1
        seconds = time.monotonic() - started
    assert 1 <= greeted <= 1 + int(seconds), (greeted, seconds)
    assert refused == 10 - greeted


async def test_a_chat_pays_for_each_message_after_its_first(start_server):
    """A chat may go on for ever: its opening takes a token, and so does each message after
    the first. With 3 tokens: three messages answered (and one more for each second the
    chat took), then the chat ends with the refusal."""
    server = await start_server(rate_limit=1, rate_burst=3)
    async with open_channel(server.address) as channel:
        chat = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=10)
        started, answered = time.monotonic(), 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            for number in range(10):
                assert await say(chat, f"Ada{number}") == f"Hello, Ada{number}!"
                answered += 1
        seconds = time.monotonic() - started
    assert 3 <= answered <= 3 + int(seconds), (answered, seconds)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ended.value.details().startswith("rate limit of user ada (1 call a second, 3 at once)")


async def test_refusals_are_counted_by_method_and_limit(limited):
    async with open_channel(limited.address) as channel:
        _, refused, _ = await hammer(greeter_pb2_grpc.GreeterStub(channel), BURST + 3)
    samples = await scrape(limited.metrics_address)
    labels = {"grpc_service": "greeter.v1.Greeter", "limit": "per_user"}
    assert value(samples, "ratelimit_refused_total", grpc_method="SayHello", **labels) == len(
        refused
    )
    assert value(samples, "ratelimit_refused_total", grpc_method="Chat", **labels) == 0
    assert value(samples, "ratelimit_decisions_total", store="memory") == BURST + 3
    assert value(samples, "ratelimit_decisions_total", store="redis") == 0
    assert value(samples, "ratelimit_store_up") is None  # no Redis: nothing to be up
    # The RPC metrics see the refusal as any other code (step 08).
    handled = {"grpc_type": "unary", "grpc_service": "greeter.v1.Greeter"}
    assert value(
        samples,
        "grpc_server_handled_total",
        grpc_method="SayHello",
        grpc_code="ResourceExhausted",
        **handled,
    ) == len(refused)


async def round_the_replicas(addresses: list[str], calls: int) -> tuple[int, float]:
    """`calls` SayHellos as ada, each to the next replica in turn, every replica on a
    channel of its own: how many passed, in how many seconds."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            greeter_pb2_grpc.GreeterStub(await stack.enter_async_context(open_channel(address)))
            for address in addresses
        ]
        passed, started = 0, time.monotonic()
        for index in range(calls):
            try:
                await stubs[index % len(stubs)].SayHello(Request(name="Ada"), timeout=5)
                passed += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return passed, time.monotonic() - started


async def test_three_replicas_on_their_own_give_a_user_three_times_the_quota(start_server):
    """Why the buckets are shared: each replica has a bucket of its own per user."""
    replicas = [await start_server(rate_limit=1, rate_burst=6) for _ in range(3)]
    passed, seconds = await round_the_replicas([r.address for r in replicas], 30)
    assert 3 * 6 <= passed <= 3 * (6 + int(seconds * 1)), (passed, seconds)


async def test_three_replicas_share_a_users_quota_through_redis(redis):
    """Three Greeter processes, one Redis: ada gets one burst and one rate, whichever
    replica serves her."""
    settings = {
        "GREETER_RATE_LIMIT": "1",
        "GREETER_RATE_BURST": "6",
        "GREETER_RATE_LIMIT_REDIS": redis.url,
    }
    with StepServices(STEP_DIR, replicas={"greeter": 3}, env=settings) as services:
        addresses = [p.address for p in services.replicas("greeter")]
        passed, seconds = await round_the_replicas(addresses, 30)
        metrics = [await scrape(p.addresses["metrics"]) for p in services.replicas("greeter")]
    assert 6 <= passed <= 6 + int(seconds * 1) + 1, (passed, seconds)
    for samples in metrics:  # every replica asked Redis, each its share of the calls
        assert value(samples, "ratelimit_decisions_total", store="redis") == 10
        assert value(samples, "ratelimit_decisions_total", store="memory") == 0
        assert value(samples, "ratelimit_store_up") == 1


async def test_a_redis_that_goes_away_under_load_costs_no_call_and_limits_go_on(
    start_server, redis, caplog
):
    """Redis stops while four callers greet as fast as they can: no call fails or waits
    for it, each replica limits on its own meanwhile (one line says so), and once Redis is
    back the limits are shared again (one line)."""
    server = await start_server(rate_limit=1_000, rate_burst=1_000, rate_limit_redis=redis.url)
    failures: list[BaseException] = []
    longest = 0.0
    stop = asyncio.Event()

    async def caller(user: str) -> None:
        nonlocal longest
        async with open_channel(server.address, user_id=user) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await stub.SayHello(Request(name="Ada"), timeout=5)
                except grpc.aio.AioRpcError as error:
                    failures.append(error)
                longest = max(longest, time.monotonic() - started)

    async def store_up() -> float | None:
        return value(await scrape(server.metrics_address), "ratelimit_store_up")

    async def decided_in(where: str) -> float:
        samples = await scrape(server.metrics_address)
        return value(samples, "ratelimit_decisions_total", store=where) or 0.0

    callers = [asyncio.create_task(caller(f"user{n}")) for n in range(4)]
    try:
        await eventually(lambda: decided_in("redis"), message="calls decided in Redis")
        redis.stop()
        await eventually(lambda: _is(store_up(), 0), message="store_up at 0")
        local = await decided_in("memory")
        await eventually(lambda: _more(decided_in("memory"), local + 50), message="local calls")
        redis.start()
        await eventually(lambda: _is(store_up(), 1), timeout=10, message="store_up at 1")
        shared = await decided_in("redis")
        await eventually(lambda: _more(decided_in("redis"), shared + 50), message="shared calls")
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert failures == []
    assert longest < 2, f"a call took {longest:.2f} s"  # generous: Redis's timeout is 0.25 s
    lines = [r.getMessage() for r in caplog.records if r.name == "ratelimit"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"rate limits: Redis at {redis.url} is unreachable (")
    assert lines[0].endswith("): each replica limits on its own until it is back")
    assert lines[1] == f"rate limits: Redis at {redis.url} is back: limits are shared again"


async def test_while_redis_is_down_a_user_is_still_limited(start_server, redis):
    """Fail open, but not wide open: each replica's own bucket still holds."""
    server = await start_server(rate_limit=1, rate_burst=3, rate_limit_redis=redis.url)
    redis.stop()
    async with open_channel(server.address) as channel:
        passed, refused, seconds = await hammer(greeter_pb2_grpc.GreeterStub(channel), 10)
    assert 3 <= passed <= 3 + int(seconds * 1), (passed, seconds)
    assert refused[-1].details().startswith("rate limit of user ada (1 call a second")


async def _is(value_of, expected: float) -> bool:
    return await value_of == expected


async def _more(value_of, than: float) -> bool:
    return await value_of > than


async def test_the_client_says_in_one_line_when_to_come_back():
    limits = {"GREETER_RATE_LIMIT": "1", "GREETER_RATE_BURST": "2"}
    client = ("hello", "--name", "Ada", "--user-id", "ada")
    result: subprocess.CompletedProcess | None = None
    with ServerProcess(STEP_DIR, env=limits) as server:
        async with open_channel(server.address) as channel:

            async def client_refused() -> bool:
                """ada's bucket emptied, then the client as ada: refused, unless it took
                longer than a second to start (a token came meanwhile: then again)."""
                nonlocal result
                await hammer(greeter_pb2_grpc.GreeterStub(channel), 3)
                result = await asyncio.to_thread(run_client, *client, "--target", server.address)
                return result.returncode != 0

            await eventually(client_refused, timeout=30, message="a refused client")
    assert result is not None
    [line] = result.stderr.splitlines()
    assert re.fullmatch(
        r"error: RESOURCE_EXHAUSTED: rate limit of user ada \(1 call a second, 2 at once\): "
        r"retry in 0\.\d\d s",
        line,
    ), line


def test_spread_comes_back_when_retry_info_says():
    """Twelve calls at 4 a second from a bucket of 1: at least 2.75 s apart, or refused.
    (Calls that slow on their own would take a quarter of a second each.)"""
    limits = {"GREETER_RATE_LIMIT": "4", "GREETER_RATE_BURST": "1"}
    with ServerProcess(STEP_DIR, env=limits) as server:
        spread = run_client("spread", "--name", "Ada", "--calls", "12", "--target", server.address)
    assert spread.returncode == 0, spread.stderr
    *_, total, throttled = spread.stdout.splitlines()
    assert total == "12 calls over 1 replicas"
    assert re.fullmatch(
        r"rate-limited \d+ times: waited \d+\.\d s in all, as RetryInfo said", throttled
    ), throttled


async def test_a_greeter_the_logger_throttles_comes_back_when_told(start_server, start_logger):
    """The Logger's limit is per calling service. A second report right after the first is
    refused with a RetryInfo of up to a second: the Greeter waits that long and tries again
    (retries.py), and both greetings are logged."""
    logger = await start_logger(rate_limit=1, rate_burst=1)
    server = await start_server(logger_target=logger.address, logger_timeout=3.0)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for name in ("Ada", "Grace"):
            await stub.SayHello(Request(name=name), timeout=5)
    assert [list(e.greeting.names) for e in await logged_greetings(logger.address)] == [
        ["Ada"],
        ["Grace"],
    ]
    record = {"grpc_service": "logger.v1.Logger", "grpc_method": "Record", "limit": "per_service"}
    assert value(await scrape(logger.metrics_address), "ratelimit_refused_total", **record) == 1
    samples = await scrape(server.metrics_address)
    assert value(samples, "greeter_logger_report_retries_total") == 1
    assert value(samples, "greeter_unlogged_greetings_total", grpc_code="ResourceExhausted") == 0


async def test_a_throttled_greeter_does_not_open_its_breaker(start_server, start_logger, caplog):
    """The Logger lets the Greeter record one greeting a second, and the Greeter greets ten
    in a row: all but the first are refused (and one more for each second they took), each
    with a RetryInfo longer than the report may wait. They are lost and counted, but the
    Logger works: the breaker (two failures open it) stays closed, and the Logger still
    gets every report it has room for."""
    logger = await start_logger(rate_limit=1, rate_burst=1)
    server = await start_server(
        logger_target=logger.address, logger_timeout=0.5, logger_breaker_failures=2
    )
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        started = time.monotonic()
        for _ in range(10):
            assert (await stub.SayHello(Request(name="Ada"), timeout=5)).message == "Hello, Ada!"
        seconds = time.monotonic() - started
    samples = await scrape(server.metrics_address)
    unlogged = value(samples, "greeter_unlogged_greetings_total", grpc_code="ResourceExhausted")
    assert 9 - int(seconds) <= unlogged <= 9, (unlogged, seconds)
    assert value(samples, "greeter_logger_breaker_state") == 0
    assert value(samples, "greeter_logger_breaker_skipped_total") == 0
    assert not [r for r in caplog.records if r.name == "greeter.breaker"]
    assert len(await logged_greetings(logger.address)) == 10 - unlogged


async def test_envoy_limits_each_user_at_the_edge_before_any_greeter_is_called():
    """deploy/envoy.yaml, with a bucket of 5 per user (1 a second) for the test: ada's
    calls beyond it are refused by Envoy, as RESOURCE_EXHAUSTED (not UNAVAILABLE, which
    clients would retry), and never reach the Greeter; grace has a bucket of her own."""
    with ServerProcess(STEP_DIR) as greeter:  # its own limit unreached (conftest)
        upstreams = dict.fromkeys(RELEASES, greeter.address)  # every release: this one
        bucket = {"max_tokens": 5, "tokens_per_fill": 1, "fill_interval": "1s"}
        with EnvoyProcess(STEP_DIR, CERTS, upstreams, user_bucket=bucket) as envoy:
            async with (
                open_channel(envoy.address) as ada,
                open_channel(envoy.address, user_id="grace") as grace,
            ):
                passed, refused, seconds = await hammer(greeter_pb2_grpc.GreeterStub(ada), 20)
                grace_passed, _, _ = await hammer(greeter_pb2_grpc.GreeterStub(grace), 5)
        samples = await scrape(greeter.addresses["metrics"])
    assert 5 <= passed <= 5 + int(seconds) + 1, (passed, seconds)
    assert grace_passed == 5
    assert {error.details() for error in refused} == {"local_rate_limited"}
    handled = {
        "grpc_type": "unary",
        "grpc_service": "greeter.v1.Greeter",
        "grpc_method": "SayHello",
    }
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **handled) == passed + 5
    assert value(samples, "grpc_server_started_total", **handled) == passed + 5
