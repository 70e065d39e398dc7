"""Metadata auth: a bearer token and a user id, checked for every RPC kind."""

import asyncio
import collections
import logging

import grpc
import pytest

from auth import MAX_USER_ID_LENGTH
from caller import current_user_id
from drain import MAX_DRAIN_SECONDS
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from helpers import (
    STEP_DIR,
    TEST_TOKEN,
    TEST_USER,
    ChatAttack,
    Request,
    assert_rpc_line,
    authenticated_calls_succeed,
    messages,
    open_channel,
    raw_channel,
    rpc_error,
    rpc_records,
    run_client,
    say,
)
from service import Greeter
from tests.support.helpers import eventually, stalling_the_event_loop
from tools.processes import run_script


async def call_with(channel, method: str, metadata) -> str:
    """One call of `method` with exactly `metadata`, the way our client makes it (the chat
    plays ping-pong); returns the first reply."""
    stub = greeter_pb2_grpc.GreeterStub(channel)
    if method == "SayHello":
        return (await stub.SayHello(Request(name="Ada"), metadata=metadata, timeout=5)).message
    if method == "StreamGreetings":
        return (
            await messages(
                stub.StreamGreetings(Request(name="Ada", count=1), metadata=metadata, timeout=5)
            )
        )[0]
    if method == "GreetMany":
        names = iter([Request(name="Ada")])
        return (await stub.GreetMany(names, metadata=metadata, timeout=5)).message
    call = stub.Chat(metadata=metadata, timeout=5)
    reply = await say(call, "Ada")
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return reply


METHODS = ["SayHello", "StreamGreetings", "GreetMany", "Chat"]


USER = ("x-user-id", TEST_USER)


MISSING_TOKEN = "missing authorization metadata: send 'authorization: Bearer <token>'"


MALFORMED = "malformed authorization metadata: expected 'Bearer <token>'"


BAD_CREDENTIALS = {
    "no-metadata": ((), MISSING_TOKEN),
    "only-user-id": ((USER,), MISSING_TOKEN),
    "empty": ((("authorization", ""), USER), MALFORMED),
    "scheme-only": ((("authorization", "Bearer"), USER), MALFORMED),
    "wrong-scheme": ((("authorization", f"Basic {TEST_TOKEN}"), USER), MALFORMED),
    "no-scheme": ((("authorization", TEST_TOKEN), USER), MALFORMED),
    "extra-parts": ((("authorization", f"Bearer {TEST_TOKEN} extra"), USER), MALFORMED),
    "wrong-token": ((("authorization", "Bearer not-the-token-at-all"), USER), "invalid token"),
    "token-prefix": ((("authorization", f"Bearer {TEST_TOKEN[:-1]}"), USER), "invalid token"),
    "token-suffix": ((("authorization", f"Bearer {TEST_TOKEN}x"), USER), "invalid token"),
    "twice": (
        (
            ("authorization", f"Bearer {TEST_TOKEN}"),
            ("authorization", f"Bearer {TEST_TOKEN}"),
            USER,
        ),
        "authorization metadata must be sent once, not 2 times",
    ),
    "no-user-id": ((("authorization", f"Bearer {TEST_TOKEN}"),), "missing x-user-id metadata"),
    "blank-user-id": (
        (("authorization", f"Bearer {TEST_TOKEN}"), ("x-user-id", " ")),
        f"invalid x-user-id: 1 to {MAX_USER_ID_LENGTH} printable ASCII characters",
    ),
    "long-user-id": (
        (("authorization", f"Bearer {TEST_TOKEN}"), ("x-user-id", "u" * (MAX_USER_ID_LENGTH + 1))),
        f"invalid x-user-id: 1 to {MAX_USER_ID_LENGTH} printable ASCII characters",
    ),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BAD_CREDENTIALS, ids=list(BAD_CREDENTIALS))
async def test_every_rpc_kind_rejects_bad_credentials(server_address, caplog, method, case):
    caplog.set_level(logging.INFO)
    metadata, expected = BAD_CREDENTIALS[case]
    async with raw_channel(server_address) as channel:  # no auth interceptor
        error = await rpc_error(call_with(channel, method, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == expected
    assert TEST_TOKEN[:8] not in caplog.text, "a token reached the logs"
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, method, "UNAUTHENTICATED", user="-")


@pytest.mark.parametrize("method", METHODS)
async def test_every_rpc_kind_accepts_the_right_token(server_address, method):
    async with raw_channel(server_address) as channel:
        metadata = (("authorization", f"Bearer {TEST_TOKEN}"), USER)
        assert (await call_with(channel, method, metadata)).startswith("Hello, Ada!")


async def test_the_bearer_scheme_is_case_insensitive(server_address):
    async with raw_channel(server_address) as channel:
        metadata = (("authorization", f"bearer {TEST_TOKEN}"), USER)
        assert await call_with(channel, "SayHello", metadata) == "Hello, Ada!"


async def ping_pong(stub):
    """Our client's way: send a message, then read its reply."""
    call = stub.Chat(timeout=5)
    await call.write(Request(name="Ada"))
    await call.read()


async def eager_stream(stub):
    """Send 50 messages and half-close without waiting for replies."""
    async for _ in stub.Chat(iter([Request(name="Ada")] * 50), timeout=5):
        pass


async def eager_writes(stub):
    """Write 20 messages, then start reading."""
    call = stub.Chat(timeout=5)
    for _ in range(20):
        await call.write(Request(name="Ada"))
    await call.read()


async def rejection_outcomes(server_address: str, client, calls: int) -> collections.Counter:
    """How `calls` chats of `client` with a wrong token end, 25 at a time (within the budget
    of MAX_DRAINING_REJECTIONS drains)."""
    outcomes: list[str] = []
    async with open_channel(server_address, token="a-wrong-token-of-enough-length") as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)

        async def outcome() -> str:
            try:
                await client(stub)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            except Exception as error:  # a failed write is an outcome too
                return type(error).__name__
            return "accepted"

        for _ in range(calls // 25):
            outcomes += await asyncio.gather(*(outcome() for _ in range(25)))
    return collections.Counter(outcomes)


@pytest.mark.parametrize(
    "client", [ping_pong, eager_stream, eager_writes], ids=lambda c: c.__name__
)
async def test_chat_rejection_is_always_unauthenticated(server_address, client):
    """grpc/grpc#36066: when the server ends a bidi call while the client is still writing,
    the grpc.aio client may see INTERNAL (or a failed write) instead of the server's status;
    a rejection sent at once does so for most eager clients. Ours waits until the client
    stops writing. 100 rejections per client style show it."""
    assert await rejection_outcomes(server_address, client, 100) == {"UNAUTHENTICATED": 100}


async def greet_many_eager(stub):
    """Send 50 names and half-close: the client stream's usual way."""
    await stub.GreetMany(iter([Request(name="Ada")] * 50), timeout=5)


async def greet_many_writes(stub):
    """Write 20 names, half-close, then wait for the one reply."""
    call = stub.GreetMany(timeout=5)
    for _ in range(20):
        await call.write(Request(name="Ada"))
    await call.done_writing()
    await call


@pytest.mark.parametrize("client", [greet_many_eager, greet_many_writes], ids=lambda c: c.__name__)
async def test_client_stream_rejection_is_always_unauthenticated(server_address, client):
    """GreetMany streams requests as Chat does, and is rejected the same way: once the
    client has stopped writing (grpc/grpc#36066)."""
    assert await rejection_outcomes(server_address, client, 100) == {"UNAUTHENTICATED": 100}


async def test_an_endless_client_stream_without_a_token_is_rejected_before_its_deadline(
    server_address,
):
    """A caller without credentials that never stops sending is not read to its end: the
    server reads at most MAX_DRAIN_MESSAGES, for at most MAX_DRAIN_SECONDS, then rejects it
    (while it writes, so grpc.aio may report INTERNAL, grpc/grpc#36066)."""

    async def endless():
        while True:
            yield Request(name="Ada")

    async with open_channel(server_address, token=None) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        error = await rpc_error(stub.GreetMany(endless(), timeout=MAX_DRAIN_SECONDS * 3))
    assert error.code() in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL}


async def test_a_client_waiting_for_a_reply_is_rejected_after_the_quiet_not_the_drain_limit(
    server_address,
):
    """Our client's way (ping-pong): it writes, then waits. The server hears nothing for
    0.2 s and rejects it then, well within this call's 1.5 s (the drain's own limit is 2 s)."""
    async with open_channel(server_address, token="a-wrong-token-of-enough-length") as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=1.5)
        await call.write(Request(name="Ada"))
        error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_stalled_server_does_not_take_a_writing_client_for_a_quiet_one(server_address):
    """On a busy machine the server's process may not run for longer than QUIET_SECONDS while
    a client writes; the drain must not count that time as quiet, or it rejects a client
    still writing (INTERNAL, as above). Here the event loop, server and clients alike, stalls
    for 0.3 s after each 0.05 s it runs."""
    with stalling_the_event_loop(every=0.05, for_seconds=0.3):
        outcomes = await rejection_outcomes(server_address, eager_stream, 100)
    assert outcomes == {"UNAUTHENTICATED": 100}


async def test_chat_rejection_of_a_client_that_sends_nothing(server_address):
    async with open_channel(server_address, token=None) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=5)
        await call.done_writing()
        error = await rpc_error(call.read())
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)


class WhoAmIGreeter(Greeter):
    async def SayHello(self, request, context):
        return greeter_pb2.HelloReply(message=f"you are {current_user_id()}")


async def test_handlers_know_the_authenticated_user(start_server):
    address = (await start_server(WhoAmIGreeter)).address
    async with open_channel(address, user_id="grace") as channel:
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
    assert reply.message == "you are grace"


async def test_concurrent_callers_each_see_their_own_user(server_address, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    users = [f"user-{n}" for n in range(20)]

    async def call_as(user: str) -> None:
        async with open_channel(server_address, user_id=user) as channel:
            await messages(
                greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
                    Request(name=user, count=3), timeout=5
                )
            )

    await asyncio.gather(*(call_as(user) for user in users))
    await eventually(
        lambda: len(rpc_records(caplog, "greeter.rpc")) == len(users), message="20 log lines"
    )
    assert sorted(r.rpc_user for r in rpc_records(caplog, "greeter.rpc")) == sorted(users)


# Tokens no client can send in a header (gRPC metadata is ASCII; `Bearer <token>` is one word).
UNSENDABLE_TOKENS = [
    (
        TEST_TOKEN + "\n",
        "GREETER_AUTH_TOKEN starts or ends with whitespace (a secret file often ends with a newline): remove it",
    ),
    (
        TEST_TOKEN[:10] + " " + TEST_TOKEN[10:],
        "GREETER_AUTH_TOKEN contains whitespace: a token is a single word",
    ),
    (TEST_TOKEN + "é", "GREETER_AUTH_TOKEN contains a character that is not printable ASCII"),
    (" " * 20, "GREETER_AUTH_TOKEN is blank"),
]
UNSENDABLE_TOKEN_IDS = ["trailing-newline", "space-inside", "non-ascii", "only-spaces"]


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "no auth token configured: set GREETER_AUTH_TOKEN"),
        ("short", "GREETER_AUTH_TOKEN is too short"),
        *UNSENDABLE_TOKENS,
    ],
    ids=["unset", "too-short", *UNSENDABLE_TOKEN_IDS],
)
def test_server_refuses_to_start_without_a_proper_token(token, problem):
    result = run_script(STEP_DIR, "server.py", "--port", "0", env={"GREETER_AUTH_TOKEN": token})
    assert result.returncode == 2
    assert result.stdout == ""  # never "listening on"
    assert problem in result.stderr
    assert "export GREETER_AUTH_TOKEN=" in result.stderr


@pytest.mark.parametrize(("token", "problem"), UNSENDABLE_TOKENS, ids=UNSENDABLE_TOKEN_IDS)
def test_client_refuses_a_token_it_cannot_send(token, problem):
    result = run_client("hello", "--name", "Ada", env={"GREETER_AUTH_TOKEN": token})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {problem}\n"


def test_client_refuses_a_user_id_it_cannot_send():
    result = run_client("hello", "--name", "Ada", "--user-id", "José")
    assert result.returncode == 2
    assert result.stderr == "error: invalid x-user-id: 1 to 64 printable ASCII characters\n"


def test_client_without_a_token_gets_one_clear_line(shared_server_process):
    result = run_client(
        "hello",
        "--name",
        "Ada",
        "--target",
        shared_server_process.address,
        env={"GREETER_AUTH_TOKEN": ""},
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: UNAUTHENTICATED: {MISSING_TOKEN}; GREETER_AUTH_TOKEN must be the server's token\n"
    )


def test_client_with_a_wrong_token_is_told_which_variable_to_check(shared_server_process):
    result = run_client(
        "hello",
        "--name",
        "Ada",
        "--target",
        shared_server_process.address,
        env={"GREETER_AUTH_TOKEN": "not-the-right-token"},
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: UNAUTHENTICATED: invalid token; GREETER_AUTH_TOKEN must be the server's token\n"
    )


def test_client_sends_its_user_id_and_the_server_logs_it(server_process):
    result = run_client(
        "hello", "--name", "Ada", "--user-id", "grace", "--target", server_process.address
    )
    assert result.stdout == "Hello, Ada!\n"
    server_process.stop()
    assert "/greeter.v1.Greeter/SayHello code=OK peer=ipv4:127.0.0.1:" in server_process.output
    assert " user=grace request_id=" in server_process.output
    assert TEST_TOKEN not in server_process.output


async def test_callers_without_a_token_cannot_starve_authenticated_ones(server_process):
    """256 token-less chats trickle a message every 50 ms (and come back when rejected),
    against the real server process, while authenticated SayHello, StreamGreetings and Chat
    calls all succeed: waiting for a client to stop writing before rejecting it is a budget
    of MAX_DRAINING_REJECTIONS calls, and the others are rejected at once."""
    address = server_process.address
    async with open_channel(address, token=None) as attacker, open_channel(address) as channel:
        attack = ChatAttack(greeter_pb2_grpc.GreeterStub(attacker), size=256)
        try:
            await eventually(lambda: attack.engaged == 256, timeout=30, message="the attack")
            await authenticated_calls_succeed(greeter_pb2_grpc.GreeterStub(channel))
        finally:
            await attack.stop()
    assert attack.ended, "the server rejected none of the attacker's calls"
    assert set(attack.ended) <= {"UNAUTHENTICATED", "INTERNAL"}, collections.Counter(attack.ended)
