"""Chat, the bidirectional stream: ping-pong replies, half-close, limits and disconnects."""

import asyncio
import logging
import subprocess
import sys

import grpc

from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, messages, open_channel, rpc_error, say
from service import MAX_CHAT_MESSAGES
from tests.support.helpers import eventually


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
    address = (await start_server()).address
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
        # The chat's own: this process also serves long-lived health Watch streams (the
        # Greeter's channel to its Logger watches the Logger's health).
        chat = "HandleExceptions[/greeter.v1.Greeter/Chat]"
        return sum(1 for task in asyncio.all_tasks() if task.get_name() == chat)

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
