"""greeter.v2 beside greeter.v1: v2 greets a Person, validates, logs and publishes as v1
does; the previous release (GREETER_SERVE_V2=false) serves v1 only; and a v1 request sent
to a v2 method is refused, not misread."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from greeter.v1 import greeter_pb2_grpc
from greeter.v2 import greeter_pb2 as v2
from greeter.v2 import greeter_pb2_grpc as v2_grpc
from helpers import (
    FAST_STREAM_INTERVAL,
    STEP_DIR,
    Request,
    logged_greetings,
    messages,
    open_channel,
    rpc_error,
)
from server import GREETER_SERVICE, GREETER_V2_SERVICE
from service import MAX_NAME_LENGTH
from settings import parse_settings
from tests.support.helpers import eventually
from tools.processes import run_script

ADA = v2.Person(given_name="Ada", family_name="Lovelace")
GRACE = v2.Person(given_name="Grace", family_name="Hopper")


@pytest.fixture
async def greeter(start_server):
    return await start_server(stream_interval=FAST_STREAM_INTERVAL)


@pytest.fixture
async def v2_stub(greeter):
    async with open_channel(greeter.address) as channel:
        yield v2_grpc.GreeterServiceStub(channel)


@pytest.mark.parametrize(
    ("person", "greeting"),
    [(ADA, "Hello, Ada Lovelace!"), (v2.Person(given_name="Plato"), "Hello, Plato!")],
    ids=["given-and-family", "given-only"],
)
async def test_v2_say_hello_greets_a_person(v2_stub, person, greeting):
    reply = await v2_stub.SayHello(v2.SayHelloRequest(person=person), timeout=5)
    assert reply.message == greeting


@pytest.mark.parametrize(
    ("person", "expected"),
    [
        (v2.Person(family_name="Lovelace"), "person.given_name must not be empty"),
        (v2.Person(given_name="  ", family_name="Lovelace"), "person.given_name must not be empty"),
        (
            v2.Person(given_name="Ada", family_name="x" * MAX_NAME_LENGTH),
            f"person must be at most {MAX_NAME_LENGTH} characters, given and family name together "
            f"(got {MAX_NAME_LENGTH + 4})",
        ),
        (v2.Person(given_name="Ada", family_name="L\novelace"), "name must be printable text"),
    ],
    ids=["no-given-name", "blank-given-name", "too-long", "control-characters"],
)
async def test_v2_refuses_a_bad_person_with_invalid_argument(v2_stub, person, expected):
    error = await rpc_error(v2_stub.SayHello(v2.SayHelloRequest(person=person), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


async def test_v2_streams_and_chats_as_v1_does(v2_stub):
    stream = v2_stub.StreamGreetings(v2.StreamGreetingsRequest(person=ADA, count=2), timeout=5)
    assert await messages(stream) == ["Hello, Ada Lovelace! (1/2)", "Hello, Ada Lovelace! (2/2)"]
    too_many = v2_stub.StreamGreetings(v2.StreamGreetingsRequest(person=ADA, count=11), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messages(too_many)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    chat = v2_stub.Chat(
        iter([v2.ChatRequest(person=ADA), v2.ChatRequest(person=v2.Person(given_name="Grace"))]),
        timeout=5,
    )
    assert await messages(chat) == ["Hello, Ada Lovelace!", "Hello, Grace!"]
    bad_chat = v2_stub.Chat(iter([v2.ChatRequest(person=ADA), v2.ChatRequest()]), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await messages(bad_chat)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "person is required"  # its rule, since step 21


async def test_v2_greets_many_people_as_v1_does(v2_stub):
    people = [v2.GreetManyRequest(person=ADA), v2.GreetManyRequest(person=GRACE)]
    reply = await v2_stub.GreetMany(iter(people), timeout=5)
    assert reply.message == "Hello, Ada Lovelace and Grace Hopper!"
    # A person without a given name ends the call, once the client has stopped sending
    # (drain.py), though 50 more people follow it.
    refused = [v2.GreetManyRequest(person=ADA), v2.GreetManyRequest(), *people * 25]
    error = await rpc_error(v2_stub.GreetMany(iter(refused), timeout=5))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "person is required",  # its rule, since step 21
    )
    too_long = v2.Person(given_name="x" * 101)
    error = await rpc_error(
        v2_stub.GreetMany(iter([v2.GreetManyRequest(person=too_long)]), timeout=5)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # v1's own checks apply too


async def test_v2_greetings_reach_the_audit_log_as_v1_ones_do(greeter, v2_stub):
    await v2_stub.SayHello(v2.SayHelloRequest(person=ADA), timeout=5)
    async with open_channel(greeter.address) as channel:
        await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Grace"), timeout=5)

    async def both_logged() -> bool:
        return len(await logged_greetings(greeter.logger.address)) == 2

    await eventually(both_logged, message="two audit entries")
    entries = await logged_greetings(greeter.logger.address)
    assert [(list(e.greeting.names), e.greeting.method) for e in entries] == [
        (["Ada Lovelace"], "SayHello"),
        (["Grace"], "SayHello"),
    ]


async def test_the_previous_release_serves_v1_only(start_server):
    """GREETER_SERVE_V2=false: the same code as the release before v2. v1 works; v2 is
    UNIMPLEMENTED, and health does not know it (Envoy's v2 health check fails there)."""
    previous = await start_server(serve_v2=False)
    async with open_channel(previous.address) as channel:
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
        assert reply.message == "Hello, Ada!"
        error = await rpc_error(
            v2_grpc.GreeterServiceStub(channel).SayHello(v2.SayHelloRequest(person=ADA), timeout=5)
        )
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=GREETER_SERVICE))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        unknown = await rpc_error(
            health.Check(health_pb2.HealthCheckRequest(service=GREETER_V2_SERVICE))
        )
        assert unknown.code() == grpc.StatusCode.NOT_FOUND


async def test_a_v1_request_sent_to_v2_is_refused_not_misread(greeter):
    """Why v2 is a new package: v1's field 1 is text, v2's a Person. The bytes of a v1
    request do not parse as a v2 one, and the server says so instead of greeting garbage."""
    v1_bytes = Request(name="Ada").SerializeToString()
    async with open_channel(greeter.address) as channel:
        call = channel.unary_unary(f"/{GREETER_V2_SERVICE}/SayHello")(v1_bytes, timeout=5)
        error = await rpc_error(call)
    # grpc.aio answers UNKNOWN (the gRPC spec would say INTERNAL), as the README quotes it.
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == (
        "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message with "
        "type 'greeter.v2.SayHelloRequest': Wire format was corrupt"
    )


@pytest.mark.parametrize(
    ("argv", "environ", "serve_v2"),
    [
        ([], {}, True),
        ([], {"GREETER_SERVE_V2": "false"}, False),
        ([], {"GREETER_SERVE_V2": "FALSE"}, False),
        (["--serve-v2", "true"], {"GREETER_SERVE_V2": "false"}, True),
    ],
    ids=["default", "environment", "any-case", "flag-wins"],
)
def test_serve_v2_is_a_setting(argv, environ, serve_v2):
    assert parse_settings(argv, environ=environ).serve_v2 is serve_v2


def test_a_server_refuses_a_serve_v2_that_is_not_true_or_false():
    result = run_script(STEP_DIR, "server.py", env={"GREETER_SERVE_V2": "yes"})
    assert (result.returncode, result.stdout) == (2, "")
    assert "error: GREETER_SERVE_V2='yes': true or false" in result.stderr
