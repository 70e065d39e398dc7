"""Steps 01–05: a unary RPC, a server stream and a bidirectional chat; their input
validation, their limits, a graceful shutdown, one log line per RPC on both sides, and a
bearer token with a user id checked for every RPC."""

import asyncio
import itertools
import logging
import signal
import subprocess
import sys
import time

import grpc
import pytest

from auth import MAX_USER_ID_LENGTH
from caller import current_user_id
from conftest import (
    STEP_DIR,
    TEST_TOKEN,
    TEST_USER,
    open_channel,
    raw_channel,
    run_client,
    server_settings,
)
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from interceptors import ClientRpcLogger
from server import MAX_MESSAGE_BYTES, build_server, stop_when
from service import (
    DEFAULT_STREAM_COUNT,
    MAX_CHAT_MESSAGES,
    MAX_NAME_LENGTH,
    MAX_STREAM_COUNT,
    Greeter,
)
from tests.support.helpers import closed_port, eventually, silent_port
from tools.processes import ServerProcess, run_script

Request = greeter_pb2.HelloRequest


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- SayHello ---------------------------------------------------------------------------


async def test_say_hello_greets_by_name(stub):
    reply = await stub.SayHello(Request(name="Ada"), timeout=5)
    assert reply.message == "Hello, Ada!"


async def test_say_hello_accepts_unicode_up_to_the_length_limit(stub):
    name = "é" * MAX_NAME_LENGTH  # characters, not bytes: 100 characters are 200 UTF-8 bytes
    reply = await stub.SayHello(Request(name=name), timeout=5)
    assert reply.message == f"Hello, {name}!"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "name must not be empty"),
        ("   ", "name must not be empty"),
        (
            "x" * (MAX_NAME_LENGTH + 1),
            f"name must be at most {MAX_NAME_LENGTH} characters (got 101)",
        ),
        ("Ada\nINFO forged log line", "name must be printable text"),
    ],
    ids=["empty", "blank", "too-long", "control-characters"],
)
async def test_say_hello_rejects_invalid_names(stub, name, expected):
    error = await rpc_error(stub.SayHello(Request(name=name), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


async def test_oversized_message_is_refused_before_it_is_read(stub):
    error = await rpc_error(stub.SayHello(Request(name="x" * MAX_MESSAGE_BYTES), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


async def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/greeter.v1.Greeter/NoSuchMethod")(b"", timeout=5)
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- StreamGreetings --------------------------------------------------------------------


async def messages(call) -> list[str]:
    return [reply.message async for reply in call]


async def test_stream_sends_the_requested_count_in_order(stub):
    call = stub.StreamGreetings(Request(name="Ada", count=3), timeout=5)
    assert await messages(call) == ["Hello, Ada! (1/3)", "Hello, Ada! (2/3)", "Hello, Ada! (3/3)"]
    assert await call.code() == grpc.StatusCode.OK


async def test_stream_count_defaults_when_unset(stub):
    replies = await messages(stub.StreamGreetings(Request(name="Ada"), timeout=5))
    assert len(replies) == DEFAULT_STREAM_COUNT
    assert replies[-1] == f"Hello, Ada! ({DEFAULT_STREAM_COUNT}/{DEFAULT_STREAM_COUNT})"


async def test_stream_accepts_the_maximum_count(stub):
    replies = await messages(
        stub.StreamGreetings(Request(name="Ada", count=MAX_STREAM_COUNT), timeout=5)
    )
    assert len(replies) == MAX_STREAM_COUNT


async def test_stream_replies_are_spread_over_time(start_server):
    interval = 0.1
    address = await start_server(stream_interval=interval)
    async with open_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=3), timeout=5
        )
        arrivals = [time.monotonic() async for _ in call]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert len(gaps) == 2
    assert all(gap >= interval * 0.9 for gap in gaps), gaps  # sleeps are never shorter


@pytest.mark.parametrize("count", [-1, MAX_STREAM_COUNT + 1])
async def test_stream_rejects_a_count_out_of_range(stub, count):
    error = await rpc_error(
        messages(stub.StreamGreetings(Request(name="Ada", count=count), timeout=5))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"count must be between 1 and {MAX_STREAM_COUNT} (got {count}); "
        f"0 or unset means {DEFAULT_STREAM_COUNT}"
    )


async def test_stream_rejects_an_invalid_name(stub):
    error = await rpc_error(messages(stub.StreamGreetings(Request(name=" "), timeout=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "name must not be empty"


async def test_server_stops_streaming_as_soon_as_the_client_cancels(start_server, caplog):
    """Observed on the server: the handler is cancelled right after the client cancels,
    long before the stream would have ended, and it produced nothing more."""
    caplog.set_level(logging.INFO, logger="greeter.service")
    interval = 0.3  # the 8 replies left after the cancel would take 8 × 0.3 = 2.4 s
    address = await start_server(stream_interval=interval)
    async with open_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
            Request(name="Ada", count=10), timeout=10
        )
        received = [await call.read(), await call.read()]
        assert [r.message for r in received] == ["Hello, Ada! (1/10)", "Hello, Ada! (2/10)"]
        cancelled_at = time.monotonic()
        call.cancel()

        def server_saw_the_cancel() -> bool:
            return any("StreamGreetings cancelled" in r.getMessage() for r in caplog.records)

        await eventually(server_saw_the_cancel, timeout=5, message="the server to stop the stream")
        assert time.monotonic() - cancelled_at < 1.2, "the server kept going after the cancel"
    [record] = [r for r in caplog.records if "StreamGreetings cancelled" in r.getMessage()]
    assert record.getMessage() == "StreamGreetings cancelled by the client after 2 of 10 replies"


# --- Chat -------------------------------------------------------------------------------


async def say(call, name: str) -> str:
    """Ping-pong: send one message, wait for its reply (a server that waited for more input
    before answering would fail here instead of hanging)."""
    await call.write(Request(name=name))
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply is not grpc.aio.EOF, "the chat ended early"
    return reply.message


async def test_chat_answers_each_message_before_the_next_is_sent(stub):
    call = stub.Chat(timeout=5)
    for name in ["Ada", "Grace", "Linus"]:
        assert await say(call, name) == f"Hello, {name}!"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_ends_cleanly_when_the_client_half_closes(stub):
    names = ["Ada", "Grace"]
    call = stub.Chat(
        iter([Request(name=n) for n in names]), timeout=5
    )  # half-closes after the last
    assert await messages(call) == ["Hello, Ada!", "Hello, Grace!"]
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_without_messages_ends_cleanly(stub):
    call = stub.Chat(timeout=5)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_chat_rejects_an_invalid_message(stub):
    call = stub.Chat(timeout=5)
    assert await say(call, "Ada") == "Hello, Ada!"
    await call.write(Request(name=""))
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "name must not be empty"


async def test_chat_holds_a_bounded_number_of_messages(stub):
    call = stub.Chat(timeout=10)
    for number in range(MAX_CHAT_MESSAGES):
        assert await say(call, f"guest {number}") == f"Hello, guest {number}!"
    await call.write(Request(name="one too many"))
    error = await rpc_error(call.read())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == f"a chat holds at most {MAX_CHAT_MESSAGES} messages; start a new chat"


async def test_fifty_chats_run_at_once(stub):
    """50 chats open at the same time (a barrier holds each one open until all have
    started), each getting its own replies and nobody else's."""
    chats = 50
    all_open = asyncio.Barrier(chats)

    async def one_chat(number: int) -> list[str]:
        call = stub.Chat(timeout=10)
        replies = [await say(call, f"chat {number} first")]
        await asyncio.wait_for(all_open.wait(), 5)
        replies.append(await say(call, f"chat {number} second"))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return replies

    results = await asyncio.gather(*(one_chat(n) for n in range(chats)))
    assert results == [
        [f"Hello, chat {n} first!", f"Hello, chat {n} second!"] for n in range(chats)
    ]


async def test_client_that_disconnects_mid_chat_leaves_nothing_behind(start_server, caplog):
    """A real client process is killed mid-chat (its connection just drops): the server
    ends the chat, no task of it keeps running, and the server goes on serving."""
    caplog.set_level(logging.INFO, logger="greeter.service")
    address = await start_server()
    # Count tasks rather than compare sets: grpc.aio replaces its "wait for the next call"
    # task with a new one whenever a call arrives.
    tasks_before = len(asyncio.all_tasks())
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "client.py",
        "chat",
        "--target",
        address,
        cwd=STEP_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    client.stdin.write(b"Ada\n")
    await client.stdin.drain()
    assert await asyncio.wait_for(client.stdout.readline(), 10) == b"Hello, Ada!\n"

    def chat_tasks() -> int:
        return len(asyncio.all_tasks()) - tasks_before

    assert chat_tasks() > 0, "the chat should be running on the server"
    client.kill()
    await client.wait()

    def chat_ended() -> bool:
        return any(r.getMessage().startswith("Chat ended") for r in caplog.records)

    await eventually(chat_ended, message="the server to end the chat")
    await eventually(lambda: chat_tasks() == 0, message="the chat's tasks to end")
    [record] = [r for r in caplog.records if r.getMessage().startswith("Chat ended")]
    assert record.getMessage() == "Chat ended after 1 messages"

    async with open_channel(address) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=5)
        assert await say(call, "Grace") == "Hello, Grace!"
        await call.done_writing()


# --- One log line per RPC (interceptors) -------------------------------------------------


async def say_hello_ok(stub):
    await stub.SayHello(Request(name="Ada"), timeout=5)


async def say_hello_invalid(stub):
    await rpc_error(stub.SayHello(Request(name=""), timeout=5))


async def stream_ok(stub):
    await messages(stub.StreamGreetings(Request(name="Ada", count=2), timeout=5))


async def stream_invalid(stub):
    await rpc_error(messages(stub.StreamGreetings(Request(name="Ada", count=11), timeout=5)))


async def stream_cancelled_by_client(stub):
    call = stub.StreamGreetings(Request(name="Ada", count=10), timeout=5)
    await call.read()
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def chat_ok(stub):
    call = stub.Chat(timeout=5)
    await say(call, "Ada")
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def chat_invalid(stub):
    call = stub.Chat(timeout=5)
    await call.write(Request(name=""))
    await rpc_error(call.read())


async def chat_past_its_deadline(stub):
    call = stub.Chat(timeout=0.5)
    await call.write(Request(name="Ada"))
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client just stops talking


RPC_OUTCOMES = [
    (say_hello_ok, "SayHello", "OK"),
    (say_hello_invalid, "SayHello", "INVALID_ARGUMENT"),
    (stream_ok, "StreamGreetings", "OK"),
    (stream_invalid, "StreamGreetings", "INVALID_ARGUMENT"),
    (stream_cancelled_by_client, "StreamGreetings", "CANCELLED"),
    (chat_ok, "Chat", "OK"),
    (chat_invalid, "Chat", "INVALID_ARGUMENT"),
    (chat_past_its_deadline, "Chat", "DEADLINE_EXCEEDED"),
]
OUTCOME_IDS = [scenario.__name__ for scenario, _, _ in RPC_OUTCOMES]


def rpc_records(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def assert_rpc_line(
    record: logging.LogRecord, method: str, code: str, user: str | None = None
) -> None:
    """`user`: the server's user field; None for client lines, which have none."""
    assert record.rpc_method == f"/greeter.v1.Greeter/{method}"
    assert record.rpc_code == code
    assert record.rpc_user == user
    assert record.rpc_duration_ms >= 0
    user_field = "" if user is None else f" user={user}"
    assert record.getMessage() == (
        f"/greeter.v1.Greeter/{method} code={code} peer={record.rpc_peer}{user_field} "
        f"duration={record.rpc_duration_ms:.1f}ms"
    )


@pytest.mark.parametrize(("scenario", "method", "code"), RPC_OUTCOMES, ids=OUTCOME_IDS)
async def test_server_logs_one_line_per_rpc(stub, caplog, scenario, method, code):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    await scenario(stub)
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert_rpc_line(record, method, code, user=TEST_USER)
    assert record.rpc_peer.startswith("ipv4:127.0.0.1:")
    assert record.levelno == logging.INFO


@pytest.mark.parametrize(("scenario", "method", "code"), RPC_OUTCOMES, ids=OUTCOME_IDS)
async def test_client_logs_one_line_per_call(server_address, caplog, scenario, method, code):
    caplog.set_level(logging.INFO, logger="greeter.client")
    rpc_logger = ClientRpcLogger(server_address)
    async with open_channel(server_address, interceptors=rpc_logger.interceptors()) as channel:
        await scenario(greeter_pb2_grpc.GreeterStub(channel))
        await rpc_logger.flush()
    [record] = rpc_records(caplog, "greeter.client")
    assert_rpc_line(record, method, code)
    assert record.rpc_peer == server_address


async def test_stream_log_line_is_written_when_the_stream_ends(start_server, caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    address = await start_server(stream_interval=0.1)
    async with open_channel(address) as channel:
        await messages(
            greeter_pb2_grpc.GreeterStub(channel).StreamGreetings(
                Request(name="Ada", count=3), timeout=5
            )
        )
    await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
    [record] = rpc_records(caplog, "greeter.rpc")
    assert record.rpc_duration_ms >= 2 * 0.1 * 1000 * 0.9  # it covers the whole stream


class BrokenGreeter(Greeter):
    async def SayHello(self, request, context):
        raise RuntimeError("a bug in the handler")


async def test_a_failing_handler_is_logged_with_its_traceback(caplog):
    caplog.set_level(logging.INFO, logger="greeter.rpc")
    server, port = build_server(server_settings(), BrokenGreeter())
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}") as channel:
            error = await rpc_error(
                greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
            )
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert "Traceback" not in error.details()
        await eventually(lambda: rpc_records(caplog, "greeter.rpc"), message="the RPC's log line")
        [record] = rpc_records(caplog, "greeter.rpc")
        assert_rpc_line(record, "SayHello", "UNKNOWN", user=TEST_USER)
        assert record.levelno == logging.WARNING
        assert isinstance(record.exc_info[1], RuntimeError)
    finally:
        await server.stop(None)


def test_server_process_logs_each_rpc_and_the_client_logs_with_verbose(server_process):
    result = run_client("hello", "--name", "Ada", "--target", server_process.address, "-v")
    assert result.stdout == "Hello, Ada!\n"
    assert (
        f"INFO greeter.client: /greeter.v1.Greeter/SayHello code=OK peer={server_process.address}"
        in result.stderr
    )
    server_process.stop()
    assert (
        "INFO greeter.rpc: /greeter.v1.Greeter/SayHello code=OK peer=ipv4:127.0.0.1:"
        in server_process.output
    )


# --- Metadata auth ----------------------------------------------------------------------


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
    call = stub.Chat(metadata=metadata, timeout=5)
    reply = await say(call, "Ada")
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return reply


METHODS = ["SayHello", "StreamGreetings", "Chat"]
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
        f"invalid x-user-id: 1 to {MAX_USER_ID_LENGTH} printable characters",
    ),
    "long-user-id": (
        (("authorization", f"Bearer {TEST_TOKEN}"), ("x-user-id", "u" * (MAX_USER_ID_LENGTH + 1))),
        f"invalid x-user-id: 1 to {MAX_USER_ID_LENGTH} printable characters",
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


@pytest.mark.parametrize(
    "client", [ping_pong, eager_stream, eager_writes], ids=lambda c: c.__name__
)
async def test_chat_rejection_is_always_unauthenticated(server_address, client):
    """grpc/grpc#36066: when the server ends a bidi call while the client is still writing,
    the grpc.aio client may see INTERNAL (or a failed write) instead of the server's status;
    a rejection sent at once does so for most eager clients. Ours waits until the client
    stops writing. 200 rejections per client style (50 at a time) prove it."""
    outcomes = []
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

        for _ in range(4):
            outcomes += await asyncio.gather(*(outcome() for _ in range(50)))
    assert outcomes == ["UNAUTHENTICATED"] * 200


async def test_chat_rejection_of_a_client_that_sends_nothing(server_address):
    async with open_channel(server_address, token=None) as channel:
        call = greeter_pb2_grpc.GreeterStub(channel).Chat(timeout=5)
        await call.done_writing()
        error = await rpc_error(call.read())
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)


class WhoAmIGreeter(Greeter):
    async def SayHello(self, request, context):
        return greeter_pb2.HelloReply(message=f"you are {current_user_id()}")


async def test_handlers_know_the_authenticated_user():
    server, port = build_server(server_settings(), WhoAmIGreeter())
    await server.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", user_id="grace") as channel:
            reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(
                Request(name="Ada"), timeout=5
            )
        assert reply.message == "you are grace"
    finally:
        await server.stop(None)


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


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "no auth token configured: set GREETER_AUTH_TOKEN"),
        ("short", "GREETER_AUTH_TOKEN is too short"),
    ],
    ids=["unset", "too-short"],
)
def test_server_refuses_to_start_without_a_proper_token(token, problem):
    result = run_script(STEP_DIR, "server.py", "--port", "0", env={"GREETER_AUTH_TOKEN": token})
    assert result.returncode == 2
    assert result.stdout == ""  # never "listening on"
    assert problem in result.stderr
    assert "export GREETER_AUTH_TOKEN=" in result.stderr


def test_client_without_a_token_gets_one_clear_line(server_process):
    result = run_client(
        "hello", "--name", "Ada", "--target", server_process.address, env={"GREETER_AUTH_TOKEN": ""}
    )
    assert result.returncode == 1
    assert result.stderr == f"error: UNAUTHENTICATED: {MISSING_TOKEN}\n"


def test_client_sends_its_user_id_and_the_server_logs_it(server_process):
    result = run_client(
        "hello", "--name", "Ada", "--user-id", "grace", "--target", server_process.address
    )
    assert result.stdout == "Hello, Ada!\n"
    server_process.stop()
    assert "/greeter.v1.Greeter/SayHello code=OK peer=ipv4:127.0.0.1:" in server_process.output
    assert " user=grace duration=" in server_process.output
    assert TEST_TOKEN not in server_process.output


# --- Graceful shutdown ------------------------------------------------------------------


class GatedGreeter(Greeter):
    """The real Greeter, but SayHello waits until the test opens the gate: an in-flight call
    the test controls."""

    def __init__(self):
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def SayHello(self, request, context):
        self.entered.set()
        await self.gate.wait()
        return await super().SayHello(request, context)


async def test_shutdown_lets_an_in_flight_call_finish_and_refuses_new_ones():
    greeter = GatedGreeter()
    server, port = build_server(server_settings(), greeter)
    await server.start()
    address = f"127.0.0.1:{port}"
    stop = asyncio.Event()
    shutdown = asyncio.create_task(stop_when(stop, server, grace=10))

    async with open_channel(address) as channel:
        in_flight = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=10)
        await asyncio.wait_for(greeter.entered.wait(), 5)
        stop.set()

        async def new_call_refused() -> bool:
            async with open_channel(address) as fresh:
                try:
                    await greeter_pb2_grpc.GreeterStub(fresh).SayHello(
                        Request(name="Bob"), timeout=1
                    )
                except grpc.aio.AioRpcError as err:
                    return err.code() == grpc.StatusCode.UNAVAILABLE
            return False

        await eventually(new_call_refused, message="new calls to be refused")
        assert not in_flight.done(), "the in-flight call must not be cut off"

        greeter.gate.set()
        assert (await in_flight).message == "Hello, Ada!"
    await asyncio.wait_for(shutdown, 5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_process_stops_cleanly_on_signal(server_process, sig):
    hello = run_client("hello", "--name", "Ada", "--target", server_process.address)
    assert hello.returncode == 0
    assert server_process.stop(sig) == 0
    assert "stopped" in server_process.output
    assert "Traceback" not in server_process.output


def test_server_process_handles_a_signal_right_after_it_says_listening(server_process):
    """The signal handlers are in place before the `listening on` line: a supervisor may
    stop the server the moment it reads that line."""
    assert server_process.stop() == 0
    assert "stopped" in server_process.output


def test_server_refuses_a_port_in_use(server_process):
    port = server_process.address.rsplit(":", 1)[1]
    result = run_script(STEP_DIR, "server.py", "--port", port, timeout=20)
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_rejects_a_bad_port_setting():
    result = run_script(STEP_DIR, "server.py", env={"GREETER_PORT": "http"})
    assert result.returncode == 2
    assert "--port: invalid port_number value: 'http'" in result.stderr


# --- The command-line client ------------------------------------------------------------


def test_client_prints_the_reply(server_process):
    result = run_client("hello", "--name", "Ada", "--target", server_process.address)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Hello, Ada!\n", "")


def test_client_reports_an_rpc_error_in_one_line(server_process):
    result = run_client("hello", "--name", "", "--target", server_process.address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: INVALID_ARGUMENT: name must not be empty\n"


def test_client_reports_a_server_that_is_down():
    with closed_port() as address:
        result = run_client("hello", "--name", "Ada", "--target", address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert result.stderr.count("\n") == 1, "one line, no traceback"


def test_client_gives_up_on_a_stuck_server_at_its_deadline():
    with silent_port() as address:
        result = run_client(
            "hello", "--name", "Ada", "--target", address, "--timeout", "0.5", timeout=10
        )
    assert result.returncode == 1
    assert result.stderr.startswith("error: DEADLINE_EXCEEDED: ")


def test_client_prints_stream_replies_as_they_arrive():
    """The first reply is on the client's stdout while the stream is still running."""
    with ServerProcess(STEP_DIR, "--stream-interval", "0.3") as server:
        client = subprocess.Popen(
            [
                sys.executable,
                "client.py",
                "stream",
                "--name",
                "Ada",
                "--count",
                "3",
                "--target",
                server.address,
            ],
            cwd=STEP_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = client.stdout.readline()
        still_running = client.poll() is None
        rest, errors = client.communicate(timeout=10)
    assert first == "Hello, Ada! (1/3)\n"
    assert still_running, "the client printed nothing until the stream ended"
    assert rest == "Hello, Ada! (2/3)\nHello, Ada! (3/3)\n"
    assert (client.returncode, errors) == (0, "")


def test_client_reports_a_stream_error_in_one_line(server_process):
    result = run_client(
        "stream", "--name", "Ada", "--count", "11", "--target", server_process.address
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: count must be between 1 and 10")
    assert result.stderr.count("\n") == 1


def test_client_chats_with_each_message_option(server_process):
    result = run_client(
        "chat", "--message", "Ada", "--message", "Grace", "--target", server_process.address
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "Hello, Ada!\nHello, Grace!\n",
        "",
    )


def test_client_chats_line_by_line_from_stdin(server_process):
    result = run_client("chat", "--target", server_process.address, input="Ada\n\nGrace\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "Hello, Ada!\nHello, Grace!\n",
        "",
    )


def test_client_reports_a_chat_error_in_one_line(server_process):
    result = run_client(
        "chat",
        "--message",
        "Ada",
        "--message",
        "Ada\tLovelace",
        "--message",
        "Grace",
        "--target",
        server_process.address,
    )
    assert result.returncode == 1
    assert result.stdout == "Hello, Ada!\n"
    assert result.stderr == (
        "error: INVALID_ARGUMENT: name must be printable text (no control characters such as newlines)\n"
    )


def test_client_uses_the_target_from_the_environment(server_process):
    result = run_client("hello", "--name", "Ada", env={"GREETER_TARGET": server_process.address})
    assert result.stdout == "Hello, Ada!\n"
