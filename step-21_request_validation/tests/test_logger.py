"""The Logger service on its own: what it stores and lists, the greetings it refuses, its
bounded memory, its own token, and its process started and stopped as a learner does."""

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import (
    CERTS,
    STEP_DIR,
    TEST_TOKEN,
    TEST_USER,
    logged_greetings,
    logger_channel,
    raw_channel,
    rpc_error,
    scrape,
    value,
)
from logger.v1 import logger_pb2, logger_pb2_grpc
from propagation import WELL_FORMED_REQUEST_ID
from tests.support.helpers import eventually
from tools.processes import ServerProcess, run_script

LOGGER = "logger.v1.Logger"


def greeting(**fields) -> logger_pb2.Greeting:
    """A well-formed greeting, with `fields` changed."""
    greeted_at = Timestamp(seconds=1_700_000_000)
    return logger_pb2.Greeting(
        **{"names": ["Ada"], "method": "SayHello", "greeted_at": greeted_at} | fields
    )


async def record(address: str, *greetings: logger_pb2.Greeting, user_id: str = TEST_USER):
    """Record calls as the Greeter makes them: the Logger's token, the user in x-user-id."""
    async with logger_channel(address, user_id=user_id) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        return [
            await stub.Record(logger_pb2.RecordRequest(greeting=g), timeout=5) for g in greetings
        ]


async def test_an_entry_is_stored_with_who_recorded_it_and_when(start_logger):
    logger = await start_logger()
    sent = greeting(names=["Ada", "Grace"], method="Chat")
    [reply] = await record(logger.address, sent, user_id="grace")
    [entry] = await logged_greetings(logger.address)
    assert reply.sequence == entry.sequence == 1
    assert entry.greeting == sent
    assert entry.user_id == "grace"  # the x-user-id the call authenticated with
    assert WELL_FORMED_REQUEST_ID.fullmatch(entry.request_id)  # none was sent: a new one
    assert entry.recorded_by == ""  # no mutual TLS: no certificate names the caller
    assert entry.recorded_at.seconds > sent.greeted_at.seconds
    assert len(entry.trace_id) == 32  # tracing is on in every test


async def test_recent_entries_come_newest_first_and_the_oldest_go_first(start_logger):
    logger = await start_logger(max_entries=3)
    await record(logger.address, *(greeting(names=[f"user{n}"]) for n in range(1, 6)))
    async with logger_channel(logger.address) as channel:
        reply = await logger_pb2_grpc.LoggerStub(channel).ListRecent(
            logger_pb2.ListRecentRequest(limit=2), timeout=5
        )
    assert [e.greeting.names[0] for e in reply.entries] == ["user5", "user4"]
    kept = await logged_greetings(logger.address)
    assert [(e.sequence, e.greeting.names[0]) for e in kept] == [
        (3, "user3"),
        (4, "user4"),
        (5, "user5"),
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"names": []}, "greeting.names must hold 1 to 100 names (got 0)"),
        ({"names": ["Ada"] * 101}, "greeting.names must hold 1 to 100 names (got 101)"),
        (
            {"names": ["Ada", "A" * 101]},
            "greeting.names[1] must be at most 100 characters (got 101)",
        ),
        ({"names": ["Ada", " "]}, "greeting.names[1] must not be empty"),
        ({"names": ["Ada\nuser=admin"]}, "greeting.names[0] must be printable text"),
        ({"method": "Say Hello"}, "greeting.method must be an RPC name such as SayHello"),
        ({"method": "M" * 65}, "greeting.method must be an RPC name such as SayHello"),
        ({"greeted_at": None}, "greeting.greeted_at is required"),
    ],
    ids=[
        "no-names",
        "too-many",
        "long-name",
        "blank-name",
        "newline",
        "method",
        "long-method",
        "no-time",
    ],
)
async def test_a_malformed_greeting_is_refused_and_not_stored(start_logger, fields, message):
    logger = await start_logger()
    async with logger_channel(logger.address) as channel:
        call = logger_pb2_grpc.LoggerStub(channel).Record(
            logger_pb2.RecordRequest(greeting=greeting(**fields)), timeout=5
        )
        error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(message)
    assert await logged_greetings(logger.address) == []


@pytest.mark.parametrize(
    "fields",
    [{"names": ["Ada"] * 100}, {"names": ["A" * 100]}, {"method": "M" * 64}],
    ids=["100-names", "long-name", "long-method"],
)
async def test_a_greeting_at_each_limit_is_stored(start_logger, fields):
    """The other side of each limit above: exactly the maximum is a valid greeting."""
    logger = await start_logger()
    await record(logger.address, greeting(**fields))
    [entry] = await logged_greetings(logger.address)
    assert entry.greeting == greeting(**fields)


async def test_a_listing_has_20_entries_by_default_and_at_most_100(start_logger):
    logger = await start_logger()
    await record(logger.address, *(greeting(names=[f"user{n}"]) for n in range(1, 102)))
    async with logger_channel(logger.address) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        default = await stub.ListRecent(logger_pb2.ListRecentRequest(), timeout=5)
        most = await stub.ListRecent(logger_pb2.ListRecentRequest(limit=100), timeout=5)
    assert [e.sequence for e in default.entries] == list(range(101, 81, -1))
    assert [e.sequence for e in most.entries] == list(range(101, 1, -1))


async def test_the_logger_keeps_the_newest_1000_entries_by_default(start_logger):
    logger = await start_logger()
    await record(logger.address, *(greeting() for _ in range(1001)))
    assert len(logger.servicer.entries) == 1000
    assert logger.servicer.entries[0].sequence == 2


def record_request_of(size: int) -> logger_pb2.RecordRequest:
    """A RecordRequest of exactly `size` bytes on the wire: one name that long (refused as a
    name, once read)."""
    request = logger_pb2.RecordRequest(greeting=greeting(names=[""]))
    request.greeting.names[0] = "a" * (size - request.ByteSize())
    while request.ByteSize() > size:  # the name's length prefix grew with it
        request.greeting.names[0] = request.greeting.names[0][:-1]
    assert request.ByteSize() == size
    return request


@pytest.mark.parametrize(
    ("size", "code"),
    [(65536, grpc.StatusCode.INVALID_ARGUMENT), (65537, grpc.StatusCode.RESOURCE_EXHAUSTED)],
    ids=["64KiB-read", "over-refused-unread"],
)
async def test_a_record_over_64_kib_is_refused_before_it_is_read(start_logger, size, code):
    """64 KiB is read (and refused by the checks, this name is too long); one byte more is
    refused by gRPC before any of it is read."""
    logger = await start_logger()
    async with logger_channel(logger.address) as channel:
        call = logger_pb2_grpc.LoggerStub(channel).Record(record_request_of(size), timeout=5)
        error = await rpc_error(call)
    assert error.code() == code, error.details()


async def test_the_largest_real_greetings_are_stored_and_100_of_them_listed(start_logger):
    """The biggest Record a real caller sends: a chat of 100 names of 100 characters, each
    of 4 bytes in UTF-8 (about 40 KB). 100 of them in one ListRecent reply is about 4 MB."""
    logger = await start_logger()
    largest = greeting(names=["𝔸" * 100] * 100)
    await record(logger.address, *[largest] * 100)
    entries = await logged_greetings(logger.address, limit=100)
    assert len(entries) == 100 and all(e.greeting.names == largest.names for e in entries)


async def test_listing_more_than_the_maximum_is_refused(start_logger):
    logger = await start_logger()
    async with logger_channel(logger.address) as channel:
        call = logger_pb2_grpc.LoggerStub(channel).ListRecent(
            logger_pb2.ListRecentRequest(limit=101), timeout=5
        )
        error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "limit must be at most 100 (got 101); 0 means 20"


@pytest.mark.parametrize("token", [None, TEST_TOKEN], ids=["no-token", "the-greeters-token"])
async def test_the_logger_takes_only_its_own_token(start_logger, token):
    logger = await start_logger()
    async with logger_channel(logger.address, token=token) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        error = await rpc_error(stub.ListRecent(logger_pb2.ListRecentRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await rpc_error(
            stub.Record(logger_pb2.RecordRequest(greeting=greeting()), timeout=5)
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await logged_greetings(logger.address) == []


async def test_health_answers_probes_without_a_token_and_metrics_count_the_calls(start_logger):
    logger = await start_logger()
    async with raw_channel(logger.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=LOGGER), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await record(logger.address, greeting())
    with pytest.raises(grpc.aio.AioRpcError):
        await record(logger.address, greeting(names=[]))
    labels = {"grpc_type": "unary", "grpc_service": LOGGER, "grpc_method": "Record"}

    async def refusal_counted() -> bool:
        # The refusal can reach the client before the server has counted it (step 08's
        # test_unary_outcomes_are_counted_with_go_code_names says why).
        samples = await scrape(logger.metrics_address)
        return (
            value(samples, "grpc_server_handled_total", grpc_code="InvalidArgument", **labels) == 1
        )

    await eventually(refusal_counted, message="the refused Record to be counted")
    samples = await scrape(logger.metrics_address)
    assert value(samples, "grpc_server_handled_total", grpc_code="OK", **labels) == 1
    assert value(samples, "grpc_server_handled_total", grpc_code="InvalidArgument", **labels) == 1
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_code="OK",
            **labels | {"grpc_method": "ListRecent"},
        )
        == 0
    )


def test_the_logger_process_serves_and_stops_gracefully():
    with ServerProcess(STEP_DIR, script="logger_server.py") as logger:
        assert set(logger.addresses) == {"metrics", "listening"}
        assert logger.stop() == 0
    # The server stops first; then its consumer of the Greeter's events says what it counted,
    # last (aiokafka's own lines may come between the two).
    lines = logger.output.rstrip().splitlines()
    [stopped] = [n for n, line in enumerate(lines) if line.endswith("INFO logger.server: stopped")]
    assert lines[-1].endswith("INFO logger.events: events: 0 counted since start"), lines
    assert stopped < len(lines) - 1
    assert "Traceback" not in logger.output


def test_the_logger_refuses_to_start_without_its_token():
    result = run_script(STEP_DIR, "logger_server.py", "--port", "0", env={"LOGGER_AUTH_TOKEN": ""})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (  # a new token, in the file the Greeter's hint reads it from
        "error: no auth token configured: set LOGGER_AUTH_TOKEN. The server does not start "
        "without one. For example:\n"
        "  python -c 'import secrets; print(secrets.token_urlsafe(32))' > logger.token\n"
        "  export LOGGER_AUTH_TOKEN=$(cat logger.token)\n"
    )


def test_the_logger_has_its_own_settings():
    result = run_script(STEP_DIR, "logger_server.py", "--help")
    assert result.returncode == 0
    for variable in ("LOGGER_PORT", "LOGGER_METRICS_PORT", "LOGGER_MAX_ENTRIES", "LOGGER_TLS_CERT"):
        assert variable in result.stdout
    assert "GREETER_" not in result.stdout
    assert "default 50052" in result.stdout and "default 9465" in result.stdout


async def test_anyone_with_the_logger_token_can_read_the_entries(start_logger):
    logger = await start_logger()
    await record(logger.address, greeting(), user_id="grace")
    async with logger_channel(logger.address, user_id=TEST_USER) as channel:
        reply = await logger_pb2_grpc.LoggerStub(channel).ListRecent(
            logger_pb2.ListRecentRequest(), timeout=5
        )
    assert [e.user_id for e in reply.entries] == ["grace"]


async def test_the_readme_command_that_reads_the_logger_works_as_written(start_logger, tmp_path):
    """The README's grpcurl line for ListRecent, run by a shell as written (the port aside),
    with the Logger's token in LOGGER_AUTH_TOKEN, as after the README's set-up."""
    readme = (STEP_DIR / "README.md").read_text()
    [line] = [
        line
        for block in re.findall(r"^```sh\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
        for line in block.splitlines()
        if line.startswith("grpcurl ") and "logger.v1.Logger/ListRecent" in line
    ]
    logger = await start_logger()
    await record(logger.address, greeting(names=["Ada", "Grace"], method="Chat"))
    (tmp_path / "certs").symlink_to(CERTS)
    port = logger.address.rsplit(":", 1)[1]
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", line.replace("localhost:50052", f"localhost:{port}")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)["entries"]
    assert entry["greeting"]["names"] == ["Ada", "Grace"]
    assert entry["user_id"] == TEST_USER
