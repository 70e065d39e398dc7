"""The Greeter reports every greeting to the Logger (logger_client.py): the entry arrives
with the right fields over one reused channel; a Logger that is down, stuck or restarted, or
credentials that do not fit, never fail a greeting nor hold it longer than the Logger
deadline; each failure is one WARNING and is counted; and bad Logger settings stop the
Greeter at start-up with a clear message."""

import asyncio
import contextlib
import logging
import re
import select
import socket
import time

import grpc
import pytest

from greeter.v1 import greeter_pb2_grpc
from helpers import (
    FAST_STREAM_INTERVAL,
    STEP_DIR,
    TEST_USER,
    Request,
    logged_greetings,
    messages,
    open_channel,
    rpc_records,
    run_client,
    say,
    scrape,
    value,
)
from logger_service import GreetingLogService
from propagation import WELL_FORMED_REQUEST_ID
from retries import REPORT_ATTEMPTS
from tests.support.helpers import eventually, silent_port
from tools.processes import ServerProcess, free_port, run_script

# A short Logger deadline keeps these tests fast; a greeting may take this long, plus the
# margin (generous: the tests also pass with both cores busy).
LOGGER_TIMEOUT = 0.2
MARGIN = 0.5
RECORD = {"grpc_type": "unary", "grpc_service": "logger.v1.Logger", "grpc_method": "Record"}


class StuckLogger(GreetingLogService):
    """A Logger that takes every Record call and never answers: only a deadline ends it."""

    async def Record(self, request, context):
        await asyncio.Event().wait()


class GatedLogger(GreetingLogService):
    """Holds every Record call until the test opens the gate."""

    def __init__(self, *args):
        super().__init__(*args)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def Record(self, request, context):
        self.entered.set()
        await self.gate.wait()
        return await super().Record(request, context)


async def say_hello(address: str, name: str = "Ada") -> float:
    """One SayHello that must succeed; returns how long it took, in seconds."""
    async with open_channel(address) as channel:
        started = time.monotonic()
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name=name), timeout=5)
    assert reply.message == f"Hello, {name}!"
    return time.monotonic() - started


def unlogged_total(samples: dict) -> float:
    """greeter_unlogged_greetings_total, every code added up."""
    return sum(v for (name, *_), v in samples.items() if name == "greeter_unlogged_greetings_total")


def unlogged_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "greeter.logger_client"]


async def test_every_greeting_reaches_the_logger_with_its_fields(start_server):
    server = await start_server(stream_interval=FAST_STREAM_INTERVAL)
    before = time.time()
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await stub.SayHello(Request(name="Ada"), timeout=5)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.SayHello(Request(name=""), timeout=5)  # refused: not a greeting
        await messages(stub.StreamGreetings(Request(name="Grace", count=2), timeout=5))
        names = iter([Request(name="Barbara"), Request(name="Donald")])
        await stub.GreetMany(names, timeout=5)
        with contextlib.suppress(grpc.aio.AioRpcError):  # refused at its second name
            await stub.GreetMany(iter([Request(name="Ada"), Request(name="")]), timeout=5)
        chat = stub.Chat(timeout=5)
        assert [await say(chat, name) for name in ("Alan", "Edsger")]
        await chat.done_writing()
        assert await chat.read() is grpc.aio.EOF  # the chat is reported before it ends
    entries = await logged_greetings(server.logger.address)
    assert [(list(e.greeting.names), e.greeting.method) for e in entries] == [
        (["Ada"], "SayHello"),
        (["Grace"], "StreamGreetings"),
        (["Barbara", "Donald"], "GreetMany"),  # one entry for the call, with every name
        (["Alan", "Edsger"], "Chat"),
    ]
    for entry in entries:
        assert entry.user_id == TEST_USER  # who the Greeter authenticated, passed on
        assert WELL_FORMED_REQUEST_ID.fullmatch(entry.request_id)
        assert entry.recorded_by == ""  # no mutual TLS: the Logger cannot name the service
        assert before <= entry.greeting.greeted_at.ToMicroseconds() / 1e6 <= time.time()


async def test_streams_and_chats_cancelled_after_a_reply_are_still_reported(start_server):
    """The greeting was made once a reply went out, however soon the client cancels."""
    server = await start_server(stream_interval=0.5)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for n in range(5):
            stream = stub.StreamGreetings(Request(name=f"Stream{n}", count=3), timeout=5)
            await stream.read()
            stream.cancel()
            chat = stub.Chat(timeout=5)
            await say(chat, f"Chat{n}")
            chat.cancel()

    async def all_reported() -> bool:
        names = {e.greeting.names[0] for e in await logged_greetings(server.logger.address)}
        return names == {f"{kind}{n}" for kind in ("Stream", "Chat") for n in range(5)}

    await eventually(all_reported, message="an entry for each stream and chat")


async def test_one_channel_carries_every_call_to_the_logger(start_server, caplog):
    caplog.set_level(logging.INFO, logger="logger.rpc")
    # Time enough for every report on a loaded machine: this test is about the channel, not
    # about the Logger's deadline.
    server = await start_server(logger_timeout=30.0)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await asyncio.gather(*(stub.SayHello(Request(name="Ada"), timeout=5) for _ in range(20)))
    records = rpc_records(caplog, "logger.rpc")
    assert [r.rpc_code for r in records] == ["OK"] * 20
    assert len({r.rpc_peer for r in records}) == 1, "a connection per call"


async def test_a_logger_that_is_down_costs_a_warning_not_a_greeting(start_server, caplog):
    server = await start_server(logger_timeout=LOGGER_TIMEOUT)
    await server.logger.shut_down()
    durations = [await say_hello(server.address) for _ in range(5)]
    assert max(durations) < LOGGER_TIMEOUT + MARGIN, durations
    warnings = unlogged_warnings(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING] * 5  # one per greeting
    # gRPC retries UNAVAILABLE (step 13) until an attempt's deadline: a Logger that is down
    # ends as UNAVAILABLE, or DEADLINE_EXCEEDED when the retries outlive the attempt.
    assert re.match(
        r"SayHello greeting not logged \(request_id=[0-9a-f]{32}\): "
        r"the Logger call failed with (UNAVAILABLE|DEADLINE_EXCEEDED): ",
        warnings[0].getMessage(),
    )
    samples = await scrape(server.metrics_address)
    assert unlogged_total(samples) == 5
    assert value(samples, "grpc_client_handled_total", grpc_code="OK", **RECORD) == 0


@pytest.mark.parametrize("stuck", ["handler", "connection"])
async def test_a_stuck_logger_delays_a_greeting_by_its_deadline_at_most(
    start_server, start_logger, caplog, stuck
):
    """A Logger whose handler never answers, or a port that accepts TCP and never speaks TLS:
    the greeting waits for the Logger deadline, not longer, and succeeds."""
    async with contextlib.AsyncExitStack() as stack:
        if stuck == "handler":
            target = (await start_logger(StuckLogger)).address
        else:
            target = stack.enter_context(silent_port())
        server = await start_server(logger_target=target, logger_timeout=LOGGER_TIMEOUT)
        durations = [await say_hello(server.address) for _ in range(3)]
        # At least one attempt's deadline (retries.py), at most the Logger timeout.
        first_attempt = LOGGER_TIMEOUT / REPORT_ATTEMPTS
        assert all(first_attempt <= d < LOGGER_TIMEOUT + MARGIN for d in durations), durations
        samples = await scrape(server.metrics_address)
    assert value(samples, "greeter_unlogged_greetings_total", grpc_code="DeadlineExceeded") == 3
    assert "DEADLINE_EXCEEDED" in unlogged_warnings(caplog)[0].getMessage()


async def test_by_default_a_stuck_logger_delays_a_greeting_by_half_a_second(
    start_server, start_logger
):
    """GREETER_LOGGER_TIMEOUT's default, 0.5 s, as a learner who sets nothing gets it: at
    least two attempts of a third of it each (retries.py), at most all of it."""
    logger = await start_logger(StuckLogger)
    server = await start_server(logger_target=logger.address)
    duration = await say_hello(server.address)
    assert 0.5 * 2 / 3 <= duration < 0.5 + MARGIN, duration


async def test_a_restarted_logger_gets_entries_again_without_restarting_the_greeter(
    start_server, start_logger
):
    # The breaker opens while the channel reconnects; a short reset keeps its trials frequent.
    # A port below the kernel's ephemeral range: while the Logger is away, no outgoing
    # connection of another process can be given it, so the Logger can come back there.
    port = free_port()
    first = await start_logger(port=port)
    server = await start_server(
        logger_target=first.address, logger_timeout=LOGGER_TIMEOUT, logger_breaker_reset=0.5
    )
    await say_hello(server.address, "Before")
    await first.shut_down()
    await say_hello(server.address, "During")  # lost, and counted
    logger = await start_logger(port=port)  # the Logger is back, at the same address

    async def greeting_arrives() -> bool:
        await say_hello(server.address, "After")
        return any(e.greeting.names == ["After"] for e in await logged_greetings(logger.address))

    # The channel reconnects on its own, within its reconnect backoff (at most 5 s).
    await eventually(greeting_arrives, timeout=15, interval=0.1, message="an entry after")
    samples = await scrape(server.metrics_address)
    assert unlogged_total(samples) >= 1  # UNAVAILABLE, or DEADLINE_EXCEEDED after retries


async def test_the_logger_channel_waits_at_most_5_s_between_reconnects(
    start_server, start_logger, monkeypatch
):
    """gRPC's own cap is 120 s: a Logger back after a long outage would get no entry for up
    to two minutes. (The option, read where the channel is opened: waiting out a real
    backoff that grows past 5 s takes half a minute per test.)"""
    logger = await start_logger()
    opened: list[tuple[str, dict]] = []
    open_secure_channel = grpc.aio.secure_channel

    def recording(target, credentials, options=None, *args, **kwargs):
        opened.append((target, dict(options or ())))
        return open_secure_channel(target, credentials, options, *args, **kwargs)

    monkeypatch.setattr(grpc.aio, "secure_channel", recording)
    await start_server(logger_target=logger.address)
    [options] = [options for target, options in opened if target == logger.address]
    assert options["grpc.max_reconnect_backoff_ms"] == 5000


async def test_the_greeter_connects_to_the_logger_as_it_starts(start_server):
    """Not at the first greeting, which then need not wait for the connection."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        await start_server(logger_target=address)
        await eventually(lambda: select.select([listening], [], [], 0)[0], message="a connection")


async def test_every_unlogged_series_is_there_from_the_start_at_zero(start_server):
    """So that rate() and alerts see the first failure, not a series that appears."""
    server = await start_server()
    samples = await scrape(server.metrics_address)
    for code in ("Unavailable", "DeadlineExceeded", "Unauthenticated", "InvalidArgument", "OK"):
        assert value(samples, "greeter_unlogged_greetings_total", grpc_code=code) == 0, code


async def test_a_caller_that_goes_away_does_not_cancel_its_report(start_server, start_logger):
    """The greeting was made: its entry is recorded even if the caller cancels meanwhile."""
    logger = await start_logger(GatedLogger)
    server = await start_server(logger_target=logger.address)
    async with open_channel(server.address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        await asyncio.wait_for(logger.servicer.entered.wait(), 5)
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
    logger.servicer.gate.set()
    await eventually(lambda: len(logger.servicer.entries) == 1, message="the entry")


async def test_the_greeter_stops_only_once_a_report_still_running_is_done(
    start_server, start_logger, caplog
):
    """A caller went away and its report runs on; then the Greeter is stopped. It has stopped
    serving ("stopped") but waits for that report before it closes the Logger channel: the
    entry is not lost."""
    caplog.set_level(logging.INFO)
    logger = await start_logger(GatedLogger)
    server = await start_server(logger_target=logger.address, logger_timeout=5.0)
    async with open_channel(server.address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        await asyncio.wait_for(logger.servicer.entered.wait(), 5)
        call.cancel()
    stopping = server.shut_down()
    await eventually(
        lambda: "stopped" in [r.getMessage() for r in caplog.records if r.name == "greeter.server"],
        message="the Greeter has stopped serving",
    )
    assert not stopping.done()
    logger.servicer.gate.set()
    await stopping
    assert [list(e.greeting.names) for e in logger.servicer.entries] == [["Ada"]]


@pytest.mark.parametrize("wrong", ["token", "ca"])
async def test_wrong_logger_credentials_are_a_counted_failure_never_a_hang(
    start_server, other_certs, caplog, wrong
):
    overrides = (
        {"logger_token": "a-token-that-is-not-the-loggers"}
        if wrong == "token"
        else {"logger_ca": str(other_certs / "ca.crt")}  # the Logger's certificate fails it
    )
    # A wrong token is refused once the connection is up: on a loaded machine its TLS
    # handshake alone can take longer than 0.2 s, and the call would end by its deadline.
    timeout = 2.0 if wrong == "token" else LOGGER_TIMEOUT
    server = await start_server(logger_timeout=timeout, **overrides)
    duration = await say_hello(server.address)
    assert duration < timeout + MARGIN
    samples = await scrape(server.metrics_address)
    if wrong == "token":
        assert value(samples, "greeter_unlogged_greetings_total", grpc_code="Unauthenticated") == 1
        [warning] = unlogged_warnings(caplog)
        assert warning.getMessage().endswith(
            "UNAUTHENTICATED: invalid token; LOGGER_AUTH_TOKEN must be the Logger's own token"
        )
    else:  # a failed handshake is UNAVAILABLE, retried until the attempt's deadline
        assert unlogged_total(samples) == 1
    assert len(unlogged_warnings(caplog)) == 1
    assert await logged_greetings(server.logger.address) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LOGGER_AUTH_TOKEN": ""},
            "error: no auth token configured: set LOGGER_AUTH_TOKEN. The server does not start "
            "without one. It is the Logger's own token, the one it runs with; for example:\n"
            "  export LOGGER_AUTH_TOKEN=$(cat logger.token)\n",
        ),
        (
            {"GREETER_LOGGER_TLS_CA": "/nowhere/ca.crt"},
            "error: the Logger's TLS settings: cannot read the CA certificate /nowhere/ca.crt: "
            "No such file or directory",
        ),
    ],
    ids=["no-token", "no-ca"],
)
def test_the_greeter_refuses_to_start_without_the_loggers_credentials(env, message):
    result = run_script(STEP_DIR, "server.py", "--port", "0", env=env)
    assert (result.returncode, result.stdout) == (2, "")  # never "listening on"
    assert result.stderr.startswith(message), result.stderr


async def test_the_greeter_starts_before_the_logger_and_reports_to_it_once_it_is_up():
    port = free_port()  # where the Logger will be
    env = {"GREETER_LOGGER_TARGET": f"127.0.0.1:{port}", "GREETER_LOGGER_BREAKER_RESET": "0.5"}
    with ServerProcess(STEP_DIR, env=env) as greeter:
        assert run_client("hello", "--name", "Early", "--target", greeter.address).returncode == 0
        with ServerProcess(STEP_DIR, "--port", str(port), script="logger_server.py") as logger:

            async def greeting_arrives() -> bool:
                await say_hello(greeter.address, "Later")
                return any(
                    e.greeting.names == ["Later"] for e in await logged_greetings(logger.address)
                )

            await eventually(greeting_arrives, timeout=15, interval=0.1, message="an entry")
        assert greeter.stop() == 0
    assert (
        greeter.output.count("Early greeting not logged") == 0
    )  # the method is named, not the name
    assert greeter.output.count("SayHello greeting not logged") >= 1
