"""SayHello, the unary RPC: its reply, its input validation and its message limits."""

import grpc
import pytest

from helpers import Request, rpc_error
from server import MAX_MESSAGE_BYTES
from service import MAX_NAME_LENGTH


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
