"""Request validation from the protos' rules (validation.py): every rule at its boundary
(just valid, just invalid), checked by protovalidate as the interceptor checks; then through
real servers on every RPC kind, where a violation is INVALID_ARGUMENT with a
google.rpc.BadRequest listing each field, before any handler runs; the client's and
grpcurl's display of the details."""

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import validation
from greeter.v1 import greeter_pb2_grpc
from greeter.v2 import greeter_pb2 as v2
from greeter.v2 import greeter_pb2_grpc as v2_grpc
from helpers import (
    CERTS,
    STEP_DIR,
    Request,
    logged_greetings,
    logger_channel,
    messages,
    open_channel,
    raw_channel,
    rpc_error,
    run_client,
)
from logger.v1 import logger_pb2, logger_pb2_grpc
from tests.support.helpers import eventually
from tests.support.readme import console_commands

NOW = Timestamp(seconds=1_800_000_000)
EMPTY = "must not be empty"
PRINTABLE = "must be printable text (no control characters such as newlines)"


def violations(message) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in validation.field_violations(message)]


def greeting(**fields) -> logger_pb2.RecordRequest:
    values = {"names": ["Ada"], "method": "SayHello", "greeted_at": NOW, **fields}
    return logger_pb2.RecordRequest(greeting=logger_pb2.Greeting(**values))


def person(given: str, family: str = "") -> v2.SayHelloRequest:
    return v2.SayHelloRequest(person=v2.Person(given_name=given, family_name=family))


# --- Every rule at its boundary ---------------------------------------------------------------

BOUNDARIES = [
    # greeter.v1: a name (names/v1/names.proto) and a count
    (Request(name="A"), []),
    (Request(name=""), [("name", EMPTY)]),
    (Request(name="   "), [("name", EMPTY)]),
    (Request(name="é" * 100), []),  # characters, not bytes
    (Request(name="é" * 101), [("name", "must be at most 100 characters (got 101)")]),
    (Request(name="Ada Lovelace"), []),  # the space is printable
    (Request(name="Ada\nLovelace"), [("name", PRINTABLE)]),
    (Request(name="Ada\u00a0Lovelace"), [("name", PRINTABLE)]),  # a no-break space
    (Request(name="Ada\u200bLovelace"), [("name", PRINTABLE)]),  # a zero-width space
    (Request(name="Ada", count=0), []),
    (Request(name="Ada", count=10), []),
    (
        Request(name="Ada", count=11),
        [("count", "must be between 1 and 10 (got 11); 0 or unset means 5")],
    ),
    (
        Request(name="Ada", count=-1),
        [("count", "must be between 1 and 10 (got -1); 0 or unset means 5")],
    ),
    # greeter.v2: a person, required; given and family name together at most 100
    (v2.SayHelloRequest(), [("person", "value is required")]),
    (person("Ada"), []),
    (person(" ", "Lovelace"), [("person.given_name", EMPTY)]),
    (person("Ada", "Love\tlace"), [("person.family_name", PRINTABLE)]),
    (person("x" * 50, "y" * 49), []),  # "x... y...": 100 characters
    (
        person("x" * 50, "y" * 50),
        [("person", "must be at most 100 characters, given and family name together (got 101)")],
    ),
    (
        person("x" * 101),
        [
            ("person", "must be at most 100 characters, given and family name together (got 101)"),
            ("person.given_name", "must be at most 100 characters (got 101)"),
        ],
    ),
    # logger.v1: a greeting, its names, method and time; a listing's limit
    (logger_pb2.RecordRequest(), [("greeting", "value is required")]),
    (greeting(), []),
    (greeting(names=["Ada"] * 100), []),
    (greeting(names=[]), [("greeting.names", "must hold 1 to 100 names (got 0)")]),
    (greeting(names=["Ada"] * 101), [("greeting.names", "must hold 1 to 100 names (got 101)")]),
    (greeting(names=["Ada", "", "Grace"]), [("greeting.names[1]", EMPTY)]),
    (greeting(method="M" * 64), []),
    (greeting(method="Say_Hello2"), []),
    (
        greeting(method="M" * 65),
        [("greeting.method", "must be an RPC name such as SayHello (1 to 64 characters)")],
    ),
    (
        greeting(method="2Say"),
        [("greeting.method", "must be an RPC name such as SayHello (1 to 64 characters)")],
    ),
    (greeting(greeted_at=None), [("greeting.greeted_at", "value is required")]),
    (logger_pb2.ListRecentRequest(limit=100), []),
    (
        logger_pb2.ListRecentRequest(limit=101),
        [("limit", "must be at most 100 (got 101); 0 means 20")],
    ),
]


@pytest.mark.parametrize(("request_message", "expected"), BOUNDARIES)
def test_every_rule_at_its_boundary(request_message, expected):
    assert violations(request_message) == expected


def test_the_status_says_every_violation_in_words_and_lists_them_as_details():
    status = validation.invalid_argument(
        validation.field_violations(greeting(names=["", "Ada\n"], greeted_at=None))
    )
    assert status.message == (
        "greeting.names[0] must not be empty; greeting.names[1] must be printable text (no "
        "control characters such as newlines); greeting.greeted_at is required"
    )
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    assert [(v.field, v.description, v.reason) for v in bad_request.field_violations] == [
        ("greeting.names[0]", EMPTY, "NAME_NOT_BLANK"),
        ("greeting.names[1]", PRINTABLE, "PRINTABLE"),
        ("greeting.greeted_at", "value is required", "REQUIRED"),
    ]


# --- Through real servers: every RPC kind ----------------------------------------------------


def bad_request(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The BadRequest detail of an error, as (field, description) pairs."""
    status = rpc_status.from_call(error)
    assert status is not None, "no status details"
    (detail,) = status.details
    found = error_details_pb2.BadRequest()
    assert detail.Unpack(found)
    return [(v.field, v.description) for v in found.field_violations]


async def error_of(call) -> grpc.aio.AioRpcError:
    """How a call of any kind ends: its replies read, if it streams them."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            await messages(call)
        else:
            await call
    return caught.value


async def assert_refused(call, expected: list[tuple[str, str]]) -> None:
    error = await error_of(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(error) == expected
    assert error.details() == "; ".join(f"{f} {d.removeprefix('value ')}" for f, d in expected)


async def test_a_unary_request_is_refused_before_the_handler_runs(start_server):
    server = await start_server(logger_timeout=5)  # the entries are checked: load
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await assert_refused(stub.SayHello(Request(name=""), timeout=5), [("name", EMPTY)])
        assert (await stub.SayHello(Request(name="Ada"), timeout=5)).message == "Hello, Ada!"
    # Only the valid greeting reached the Greeter, and so the Logger.
    assert [e.greeting.names for e in await logged_greetings(server.logger.address)] == [["Ada"]]


async def test_a_server_stream_is_refused_before_its_first_reply(start_server):
    server = await start_server()
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        call = stub.StreamGreetings(Request(name="Ada", count=11), timeout=5)
        error = await error_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(error) == [
            ("count", "must be between 1 and 10 (got 11); 0 or unset means 5")
        ]


async def test_each_message_of_a_client_stream_is_checked_as_it_arrives(start_server):
    """The second name is bad: the call ends with its details once the client stops sending
    (drain.py), though 50 more names follow it; nothing of it is greeted."""
    server = await start_server(logger_timeout=5)  # the entries are checked: load
    names = [Request(name="Ada"), Request(name="Ada\nuser=root"), *[Request(name="Grace")] * 50]
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await assert_refused(stub.GreetMany(iter(names), timeout=5), [("name", PRINTABLE)])
    assert await logged_greetings(server.logger.address) == []


async def test_a_chat_with_one_bad_message_ends_with_its_details(start_server):
    server = await start_server(logger_timeout=5)  # the entries are checked: load
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        chat = stub.Chat(timeout=5)
        await chat.write(Request(name="Ada"))
        assert (await chat.read()).message == "Hello, Ada!"
        await chat.write(Request(name=" "))
        error = await error_of(chat)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(error) == [("name", EMPTY)]

    # The greeting made before the bad message is kept, as a chat's always are: reported
    # when the handler ends, which may be just after the client has the status.
    async def kept() -> bool:
        entries = await logged_greetings(server.logger.address)
        return [e.greeting.names for e in entries] == [["Ada"]]

    await eventually(kept, message="the chat's greeting in the Logger")


async def test_v2_requests_follow_their_own_rules(start_server):
    server = await start_server()
    async with open_channel(server.address) as channel:
        stub = v2_grpc.GreeterServiceStub(channel)
        await assert_refused(
            stub.SayHello(v2.SayHelloRequest(), timeout=5), [("person", "value is required")]
        )
        chat = stub.Chat(
            iter([v2.ChatRequest(person=v2.Person(given_name="Ada", family_name="L\nx"))]),
            timeout=5,
        )
        await assert_refused(chat, [("person.family_name", PRINTABLE)])


async def test_the_loggers_requests_are_checked_too(start_logger):
    logger = await start_logger()
    async with logger_channel(logger.address) as channel:
        stub = logger_pb2_grpc.LoggerStub(channel)
        await assert_refused(
            stub.Record(greeting(names=["Ada", ""]), timeout=5), [("greeting.names[1]", EMPTY)]
        )
        await assert_refused(
            stub.ListRecent(logger_pb2.ListRecentRequest(limit=101), timeout=5),
            [("limit", "must be at most 100 (got 101); 0 means 20")],
        )


async def test_a_caller_without_credentials_learns_nothing_of_the_rules(start_server):
    """Validation runs after authentication: no token, UNAUTHENTICATED, whatever the request."""
    server = await start_server()
    async with raw_channel(server.address) as channel:
        error = await rpc_error(greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_status.from_call(error) is None


# --- What callers see ---------------------------------------------------------------------------


def test_the_client_prints_each_violated_field_on_a_line(shared_server_process):
    result = run_client(
        "hello", "--name", "Ada\tLovelace", "--target", shared_server_process.address
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: INVALID_ARGUMENT: name {PRINTABLE}",
        f"  name: {PRINTABLE}",
    ]


def test_the_readmes_grpcurl_command_shows_the_details(shared_server_process, tmp_path):
    """The grpcurl line of "Request validation", run by a shell as written (the port aside),
    prints the BadRequest: grpcurl finds its type by the server's reflection."""
    (tmp_path / "certs").symlink_to(CERTS)
    [command] = [
        c
        for c in console_commands(STEP_DIR / "README.md", "Request validation")
        if c.argv[0] == "grpcurl"
    ]
    port = shared_server_process.address.rsplit(":", 1)[1]
    result = subprocess.run(
        ["bash", "-c", command.line.replace("localhost:50051", f"localhost:{port}")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.stdout + result.stderr == command.expected_output


def test_the_vendored_rules_are_the_ones_protovalidate_was_built_with():
    """third_party/buf/validate/validate.proto (v1.2.0) describes the same messages, fields and
    options as the copy compiled into protovalidate (its protobuf-py module, which the Rust
    engine's violations use). Compared as descriptors, without what generators fill in
    differently (json_name, the file's language options)."""
    from google.protobuf import descriptor_pb2
    from protovalidate._gen.buf.validate import validate_pb as compiled_in

    from buf.validate import validate_pb2

    def normalized(serialized: bytes) -> bytes:
        file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        file.ClearField("options")
        fields = [f for m in file.message_type for f in (*m.field, *m.extension)]
        for field in [*fields, *file.extension]:
            field.ClearField("json_name")
        return file.SerializeToString(deterministic=True)

    ours = normalized(validate_pb2.DESCRIPTOR.serialized_pb)
    assert ours == normalized(compiled_in.desc().proto.to_binary())
    assert (
        "Licensed under the Apache License, Version 2.0"
        in (STEP_DIR / "third_party" / "buf" / "validate" / "validate.proto").read_text()
    )
