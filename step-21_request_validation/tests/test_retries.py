"""Retries and deadlines that add up, with real servers: a Logger that fails its first calls
with UNAVAILABLE is retried as the policy says and stores the entry once; INVALID_ARGUMENT
is never retried; a caller's deadline is never exceeded, however many retries are allowed;
the Logger's deadline is never later than the Greeter's; a Logger replica killed under load
loses no greeting and no entry."""

import asyncio
import collections
import contextlib
import signal
import time

import grpc
import pytest
from tenacity import RetryCallState

import retries
from balancing import channel_options
from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, logged_greetings, logger_channel, open_channel, scrape, value
from logger.v1 import logger_pb2, logger_pb2_grpc
from logger_service import GreetingLogService
from service import Greeter
from tests.support.helpers import eventually
from tools.processes import StepServices

RECORD = {"grpc_type": "unary", "grpc_service": "logger.v1.Logger", "grpc_method": "Record"}


class FlakyLogger(GreetingLogService):
    """Fails its first `failures` Record calls with UNAVAILABLE, and notes each attempt's
    grpc-previous-rpc-attempts header (gRFC A6: 0 for a first attempt, n for a retry)."""

    failures = 2

    def __init__(self, *args):
        super().__init__(*args)
        self.attempts: list[int] = []

    async def Record(self, request, context):
        headers = dict(context.invocation_metadata())
        self.attempts.append(int(headers.get("grpc-previous-rpc-attempts", 0)))
        if len(self.attempts) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return await super().Record(request, context)


class AlwaysFlakyLogger(FlakyLogger):
    failures = 10_000


class OutOfTimeLogger(FlakyLogger):
    """Answers every Record with DEADLINE_EXCEEDED at once: an attempt out of its time."""

    async def Record(self, request, context):
        self.attempts.append(0)
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "out of time")


class CountingStuckLogger(FlakyLogger):
    """Takes every Record, notes it, and never answers."""

    async def Record(self, request, context):
        self.attempts.append(0)
        await asyncio.Event().wait()


class RefusingLogger(FlakyLogger):
    """Fails every Record with `code` (set by the test)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    async def Record(self, request, context):
        self.attempts.append(0)
        await context.abort(self.code, "no")


class StuckLogger(GreetingLogService):
    async def Record(self, request, context):
        await asyncio.Event().wait()


# gRPC sends a deadline as a timeout, and each server counts it from when the call reaches
# it: the Logger's deadline is later than the Greeter meant by the call's way there, some
# milliseconds on a loaded machine (13 ms seen with five suites on two cores).
WAY_THERE = 0.03


class DeadlineWatchingLogger(GreetingLogService):
    """Notes when each Record call must be answered by (time.monotonic())."""

    def __init__(self, *args):
        super().__init__(*args)
        self.deadlines: list[float] = []

    def note_deadline(self, context) -> None:
        # The clock first: a pause before time_remaining() can only make this earlier.
        self.deadlines.append(time.monotonic() + context.time_remaining())

    async def Record(self, request, context):
        self.note_deadline(context)
        return await super().Record(request, context)


class StuckDeadlineWatchingLogger(DeadlineWatchingLogger):
    async def Record(self, request, context):
        self.note_deadline(context)
        await asyncio.Event().wait()


class DeadlineWatchingGreeter(Greeter):
    def __init__(self, *args):
        super().__init__(*args)
        self.deadlines: list[float] = []

    async def SayHello(self, request, context):
        # time_remaining() first: a pause before the clock can only make this later. So a
        # busy machine never makes the Logger's deadline look later than the Greeter's.
        remaining = context.time_remaining()
        self.deadlines.append(time.monotonic() + remaining)
        return await super().SayHello(request, context)


async def say_hello(address: str, timeout: float | None = 5) -> float:
    """One SayHello that must succeed; how long it took."""
    async with open_channel(address) as channel:
        started = time.monotonic()
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(
            Request(name="Ada"), timeout=timeout
        )
    assert reply.message == "Hello, Ada!"
    return time.monotonic() - started


async def unlogged(server, code: str) -> float:
    return value(
        await scrape(server.metrics_address), "greeter_unlogged_greetings_total", grpc_code=code
    )


async def test_a_logger_failing_twice_is_retried_and_stores_the_entry_once(
    start_server, start_logger
):
    logger = await start_logger(FlakyLogger)
    # Attempts of 1 s each: gRPC's backoffs (50 ms, then up to 100 ms) fit in one with room,
    # even on a loaded machine, so all three attempts are gRPC's.
    server = await start_server(logger_target=logger.address, logger_timeout=3.0)
    await say_hello(server.address)
    assert logger.servicer.attempts == [0, 1, 2]  # the first attempt and two retries
    [entry] = await logged_greetings(logger.address)
    assert entry.greeting.names == ["Ada"]
    assert await unlogged(server, "Unavailable") == 0


async def test_retries_stop_at_the_policys_attempts(start_server, start_logger):
    logger = await start_logger(AlwaysFlakyLogger)
    server = await start_server(logger_target=logger.address, logger_timeout=3.0)
    await say_hello(server.address)  # the greeting succeeds all the same
    assert logger.servicer.attempts == [0, 1, 2]  # three attempts in all
    assert await unlogged(server, "Unavailable") == 1


async def test_the_greeters_own_attempts_stop_at_3(start_server, start_logger):
    """Attempts that run out of time at once: the Greeter makes three (retries.py), then
    gives up."""
    logger = await start_logger(OutOfTimeLogger)
    server = await start_server(logger_target=logger.address, logger_timeout=3.0)
    await say_hello(server.address)
    assert len(logger.servicer.attempts) == 3
    assert await unlogged(server, "DeadlineExceeded") == 1


async def test_no_attempt_starts_that_the_callers_deadline_leaves_no_room_for(
    start_server, start_logger
):
    """A caller with 0.3 s, a stuck Logger: the first attempt takes what the caller has
    left, and no second one starts (it would not fit, with its backoff)."""
    logger = await start_logger(CountingStuckLogger)
    server = await start_server(logger_target=logger.address, logger_timeout=3.0)
    with contextlib.suppress(grpc.aio.AioRpcError):  # only if the way back was that slow
        await say_hello(server.address, timeout=0.3)
    assert len(logger.servicer.attempts) == 1


async def test_a_logger_that_is_down_drains_the_retry_tokens_within_50_attempts(
    start_server, start_logger
):
    """The channel's retry throttling (100 tokens, 1 per failed attempt, none retried at
    half, 0.1 back per success): 16 reports get their 3 attempts, the 17th 2, every later
    one 1; 5 successes then give back only half a token."""
    logger = await start_logger(AlwaysFlakyLogger)
    server = await start_server(
        # The breaker (step 14) would stop the reports after 5: the channel's throttling alone.
        logger_target=logger.address,
        logger_timeout=3.0,
        logger_breaker_failures=1000,
    )
    for _ in range(20):
        await say_hello(server.address)
    assert len(logger.servicer.attempts) == 16 * 3 + 2 + 3 * 1  # 47 tokens left
    logger.servicer.failures = 0  # the Logger is back
    for _ in range(5):
        await say_hello(server.address)  # 47.5 tokens
    logger.servicer.failures, before = 10_000, len(logger.servicer.attempts)
    await say_hello(server.address)
    assert len(logger.servicer.attempts) - before == 1  # still throttled


@pytest.mark.parametrize(
    ("code", "counted_as"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        (grpc.StatusCode.INTERNAL, "Internal"),
        (grpc.StatusCode.UNKNOWN, "Unknown"),
        (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "ResourceExhausted"),
    ],
    ids=lambda value: value.name if isinstance(value, grpc.StatusCode) else "",
)
async def test_only_unavailable_is_retried(start_server, start_logger, code, counted_as):
    """The caller's mistake, a bug, a lost outcome (the Logger may have stored the entry),
    or being refused: sent again, each would fail again or be stored twice."""
    logger = await start_logger(type("Refusing", (RefusingLogger,), {"code": code}))
    server = await start_server(logger_target=logger.address)
    await say_hello(server.address)
    assert logger.servicer.attempts == [0]
    assert await unlogged(server, counted_as) == 1


@pytest.mark.parametrize("deadline", [0.3, 0.8])
async def test_a_callers_deadline_is_never_exceeded(start_server, start_logger, deadline):
    """The Logger is stuck and the Greeter would wait 5 s for it: the caller's deadline
    wins. The Greeter gives the Logger the caller's deadline less its margin (50 ms for the
    way back), and then greets. (Whether the reply then crosses in 50 ms is the machine's
    speed: with four suites on two cores it now and then took longer, so the caller may see
    DEADLINE_EXCEEDED, and nothing else.)"""
    logger = await start_logger(StuckDeadlineWatchingLogger)
    server = await start_server(
        DeadlineWatchingGreeter, logger_target=logger.address, logger_timeout=5.0
    )
    try:
        await say_hello(server.address, timeout=deadline)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
    [greeter_deadline] = server.servicer.deadlines
    [logger_deadline] = logger.servicer.deadlines
    assert logger_deadline <= greeter_deadline - 0.05 + WAY_THERE  # the 50 ms margin
    assert logger_deadline > greeter_deadline - 0.05 - 0.25  # not given up on much sooner

    async def counted_unlogged() -> bool:
        return await unlogged(server, "DeadlineExceeded") == 1

    await eventually(counted_unlogged, message="the greeting counted as unlogged")


async def test_the_logger_never_has_more_time_than_the_greeter(start_server, start_logger):
    logger = await start_logger(DeadlineWatchingLogger)
    server = await start_server(
        DeadlineWatchingGreeter, logger_target=logger.address, logger_timeout=5.0
    )
    # Shorter than the Logger timeout, or longer. (Not shorter than a second: a loaded
    # machine took 0.45 s to bring a call of 0.5 s to the Greeter, which then had less than
    # its margin left and gave the Logger the least timeout there is.)
    for deadline in (1.0, 2.0, 10.0):
        await say_hello(server.address, timeout=deadline)
    for greeter_deadline, logger_deadline in zip(
        server.servicer.deadlines, logger.servicer.deadlines, strict=True
    ):
        assert logger_deadline <= greeter_deadline - 0.05 + WAY_THERE  # 50 ms for the way back
    # With a generous caller deadline (10 s) the Logger timeout (5 s) is the limit instead:
    # the first attempt's deadline is a third of it after the greeting began.
    greeting_began = server.servicer.deadlines[2] - 10.0
    assert 5.0 / 3 - 0.05 <= logger.servicer.deadlines[2] - greeting_began < 5.0 / 3 + 0.25


async def test_without_a_callers_deadline_the_logger_timeout_bounds_the_wait(
    start_server, start_logger
):
    logger = await start_logger(StuckLogger)
    server = await start_server(logger_target=logger.address, logger_timeout=1.0)
    duration = await say_hello(server.address, timeout=None)
    assert 0.9 <= duration < 1.0 + 0.5, duration
    assert await unlogged(server, "DeadlineExceeded") == 1


async def test_a_stuck_replica_costs_one_short_attempt_and_the_next_goes_elsewhere(
    start_server, start_logger
):
    """Why the Greeter's own attempts (tenacity): of two Logger replicas, one takes every
    Record and never answers. Each report that lands on it gives up after one attempt (a third
    of the Logger timeout) and is sent again, round robin, to the other: every entry arrives,
    and no greeting waits for the whole Logger timeout. Without these attempts, half the
    reports would wait 3 s and be lost."""
    stuck, healthy = await start_logger(StuckLogger), await start_logger()
    server = await start_server(
        logger_target=f"ipv4:{stuck.address},{healthy.address}", logger_timeout=3.0
    )
    # The first report may leave while the channel is still connecting to one replica, and
    # round robin then starts over at either (CI: two attempts on the stuck one, 2 s). Once
    # both are connected, it alternates: every report meets the stuck replica once at most.
    await say_hello(server.address)
    durations = [await say_hello(server.address) for _ in range(4)]
    lost = await unlogged(server, "DeadlineExceeded")
    assert (len(await logged_greetings(healthy.address)), lost) == (1 + 4, 0), durations
    # One short attempt (a third of the Logger timeout: 1 s) at most, never the whole 3 s.
    assert max(durations) < 1.0 + 1.0, durations


async def test_a_record_sent_twice_is_stored_once(start_logger):
    logger = await start_logger()
    request = logger_pb2.RecordRequest(
        greeting=logger_pb2.Greeting(names=["Ada"], method="SayHello")
    )
    request.greeting.greeted_at.GetCurrentTime()
    async with logger_channel(logger.address) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        metadata = (("x-request-id", "req-1"),)
        first = await stub.Record(request, metadata=metadata, timeout=5)
        again = await stub.Record(request, metadata=metadata, timeout=5)
    assert first.sequence == again.sequence == 1
    assert len(await logged_greetings(logger.address)) == 1


async def test_the_logger_remembers_the_request_ids_of_its_newest_1000_entries(start_logger):
    """By default: a retry of any of the newest 1,000 Records is stored once; the oldest
    request id is forgotten first."""
    logger = await start_logger()
    request = logger_pb2.RecordRequest(
        greeting=logger_pb2.Greeting(names=["Ada"], method="SayHello")
    )
    request.greeting.greeted_at.GetCurrentTime()
    async with logger_channel(logger.address) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)

        async def record(request_id: str) -> int:
            metadata = (("x-request-id", request_id),)
            return (await stub.Record(request, metadata=metadata, timeout=5)).sequence

        for n in range(1001):
            assert await record(f"req-{n}") == n + 1
        assert await record("req-1000") == 1001  # the newest: a retry
        assert await record("req-1") == 2  # the oldest remembered: a retry
        assert await record("req-0") == 1002  # forgotten: stored again


async def test_a_logger_replica_killed_under_load_loses_no_greeting_and_no_entry():
    """Two Loggers, round robin; 8 callers greet without pause; one Logger is killed
    (SIGKILL: its connections drop mid-call). Its calls fail with UNAVAILABLE and are retried
    on the other: every greeting succeeds and every report is acknowledged."""
    # Each report and its retry within 2 s: room on a loaded machine, where the default
    # Logger timeout (0.5 s) can run out before the retry lands.
    with StepServices(
        STEP_DIR, replicas={"logger": 2}, env={"GREETER_LOGGER_TIMEOUT": "2"}
    ) as services:
        victim = services["logger-2"]
        results: collections.Counter = collections.Counter()
        stop = asyncio.Event()

        async def caller(stub) -> None:
            while not stop.is_set():
                try:
                    await stub.SayHello(Request(name="Ada"), timeout=5)
                    results["ok"] += 1
                except grpc.aio.AioRpcError as error:
                    results[error.code().name] += 1

        greeter = services["greeter"]
        async with open_channel(greeter.address, options=channel_options(greeter.address)) as ch:
            stub = greeter_pb2_grpc.GreeterStub(ch)
            callers = [asyncio.create_task(caller(stub)) for _ in range(8)]
            await eventually(lambda: results["ok"] >= 200, message="load")
            victim.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.process.wait)
            killed_at = results["ok"]
            await eventually(lambda: results["ok"] >= killed_at + 200, message="more load")
            stop.set()
            await asyncio.gather(*callers)
        samples = await scrape(greeter.addresses["metrics"])
        lost = sum(
            v
            for (name, *labels), v in samples.items()
            if name == "greeter_unlogged_greetings_total"
        )
        print(
            f"FIGURES calls={sum(results.values())} failed={sum(results.values()) - results['ok']} entries_lost={lost}"
        )
        assert set(results) == {"ok"}, results
        assert lost == 0, {k: v for k, v in samples.items() if "unlogged" in k[0] and v}
        retried = value(samples, "grpc_client_handled_total", grpc_code="OK", **RECORD)
        assert retried == results["ok"]


class GreeterUnavailableOnce(Greeter):
    """GreetMany reads every name of its first call, then answers UNAVAILABLE."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    async def GreetMany(self, request_iterator, context):
        self.calls += 1
        if self.calls == 1:
            async for _ in request_iterator:
                pass
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return await super().GreetMany(request_iterator, context)


async def test_a_client_stream_is_retried_with_every_message_it_sent(start_server):
    """gRPC keeps the messages of a client stream to send them again: the retried call
    carries all three names, though the iterator that made them has ended."""
    server = await start_server(GreeterUnavailableOnce)
    options = channel_options(server.address, retried=retries.GREETER_RETRIED)
    async with open_channel(server.address, options=options) as channel:
        names = iter([Request(name=name) for name in ("Ada", "Grace", "Alan")])
        reply = await greeter_pb2_grpc.GreeterStub(channel).GreetMany(names, timeout=5)
    assert reply.message == "Hello, Ada, Grace and Alan!"
    assert server.servicer.calls == 2


def test_the_retry_policy_is_the_one_the_readme_documents():
    """What the channel is told (gRFC A6): read literally, since its backoffs are random and
    only a timing assertion could see a changed multiplier."""
    assert retries.RETRY_POLICY == {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert retries.RETRY_THROTTLING == {"maxTokens": 100, "tokenRatio": 0.1}


def test_the_greeters_own_backoff_is_random_and_at_most_10_ms_then_20_ms():
    """Full jitter (tenacity's wait_random_exponential, 10 ms doubling, at most 100 ms):
    after the first attempt a pause of 0 to 10 ms, after the second 0 to 20 ms."""
    wait = retries.report_attempts(5.0).wait
    for attempt, most in ((1, 0.01), (2, 0.02)):
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        pauses = [wait(state) for _ in range(200)]
        assert all(0 <= pause <= most for pause in pauses), (attempt, max(pauses), min(pauses))
        assert max(pauses) > most / 2  # random over the whole range, not a fixed pause
