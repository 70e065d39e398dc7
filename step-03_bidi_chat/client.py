"""Greeter demo client.

    python client.py hello --name Ada [--target 127.0.0.1:50051] [--timeout 5]
    python client.py stream --name Ada [--count N]
    python client.py many [--name NAME ...]        (without --name: one name per stdin line)
    python client.py chat [--message TEXT ...]     (without --message: one message per stdin line)

Prints the reply. On an error it prints one line, `error: STATUS: message`, and exits 1.
"""

import os

import venv_check  # noqa: F401  first: outside the virtual env, one line instead of a traceback

# gRPC's C core writes log lines of its own to stderr (a refused connection, a failed
# handshake). This client reports each failure in one line, so the core stays quiet unless
# you ask (GRPC_VERBOSITY=INFO python client.py ...). It is read when grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import contextlib
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TextIO

import grpc

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from settings import add_options, option, positive_seconds

# Every call has a deadline: a client that waits forever for a stuck server is a bug.
# Each command has its own default, since a stream takes longer than one reply.
DEFAULT_TIMEOUT_SECONDS = {"hello": 5.0, "stream": 15.0, "many": 300.0, "chat": 300.0}


@dataclass(frozen=True)
class ClientSettings:
    target: str = option("127.0.0.1:50051", "GREETER_TARGET", "server address")
    timeout: float | None = option(
        None,
        "GREETER_TIMEOUT",
        "deadline of each call in seconds (default: per command)",
        parse=positive_seconds,
    )


async def hello(stub: "greeter_pb2_grpc.GreeterAsyncStub", args: argparse.Namespace) -> None:
    reply = await stub.SayHello(greeter_pb2.HelloRequest(name=args.name), timeout=args.timeout)
    print(reply.message)


async def stream(stub: "greeter_pb2_grpc.GreeterAsyncStub", args: argparse.Namespace) -> None:
    request = greeter_pb2.HelloRequest(name=args.name, count=args.count)
    # The deadline covers the whole stream; each reply is printed the moment it arrives.
    async for reply in stub.StreamGreetings(request, timeout=args.timeout):
        print(reply.message, flush=True)


async def stdin_lines() -> AsyncIterator[str]:
    """Lines typed (or piped) on stdin, read without blocking the event loop; blank lines
    are skipped. Ends at end of input (Ctrl-D)."""
    if not waits_for_input(sys.stdin):
        # A file (`< names.txt`) or /dev/null: reading it never waits, and the event loop
        # could not watch it anyway (epoll refuses regular files).
        for line in sys.stdin:
            if text := line.rstrip("\r\n"):
                yield text
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = await reader.readline()
        if not line:
            return
        if text := line.decode().rstrip("\r\n"):
            yield text


def waits_for_input(stream: TextIO) -> bool:
    """A terminal, a pipe or a socket: input that may not be there yet."""
    mode = os.fstat(stream.fileno()).st_mode
    return stream.isatty() or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def listed(messages: list[str]) -> AsyncIterator[str]:
    for message in messages:
        yield message


async def many(stub: "greeter_pb2_grpc.GreeterAsyncStub", args: argparse.Namespace) -> None:
    names = listed(args.name) if args.name else stdin_lines()
    # grpc.aio sends each name as the iterator yields it (as you type it, from stdin); the
    # one reply comes after the last, once the iterator ends and the client half-closes.
    requests = (greeter_pb2.HelloRequest(name=name) async for name in names)
    reply = await stub.GreetMany(requests, timeout=args.timeout)
    print(reply.message)


async def chat(stub: "greeter_pb2_grpc.GreeterAsyncStub", args: argparse.Namespace) -> None:
    call = stub.Chat(timeout=args.timeout)
    messages = listed(args.message) if args.message else stdin_lines()
    # Ping-pong: send one message, print its reply, then send the next. The client never
    # writes while the server may be ending the call, which sidesteps a grpc.aio race
    # (grpc/grpc#36066) that can turn the server's status into INTERNAL.
    async for text in messages:
        if call.done():
            break  # the server ended the chat while the user was typing: its status follows
        try:
            await call.write(greeter_pb2.HelloRequest(name=text))
        except asyncio.InvalidStateError:
            break  # ended just now: the same
        reply = await call.read()  # raises AioRpcError when the server ends the chat with an error
        if not isinstance(reply, greeter_pb2.HelloReply):  # grpc.aio.EOF: it has ended
            break
        print(reply.message, flush=True)
    if not call.done():
        with contextlib.suppress(asyncio.InvalidStateError):  # it may end at any moment
            await call.done_writing()
    # Read to the end of the call: raises AioRpcError if the server ended it with an error.
    while isinstance(reply := await call.read(), greeter_pb2.HelloReply):  # until grpc.aio.EOF
        print(reply.message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Shared options live on each subcommand, so they can follow it: `hello --target ...`.
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, ClientSettings)

    parser = argparse.ArgumentParser(description="Greeter demo client")
    commands = parser.add_subparsers(dest="command", required=True)
    say_hello = commands.add_parser("hello", parents=[common], help="one SayHello call")
    say_hello.add_argument("--name", required=True, help="who to greet")
    say_hello.set_defaults(run=hello)
    greetings = commands.add_parser("stream", parents=[common], help="one StreamGreetings call")
    greetings.add_argument("--name", required=True, help="who to greet")
    greetings.add_argument(
        "--count", type=int, default=0, help="how many replies (server default: 5)"
    )
    greetings.set_defaults(run=stream)
    names = commands.add_parser("many", parents=[common], help="one GreetMany call")
    names.add_argument(
        "--name", action="append", help="a name to send (repeat it); default: read stdin"
    )
    names.set_defaults(run=many)
    conversation = commands.add_parser("chat", parents=[common], help="one Chat conversation")
    conversation.add_argument(
        "--message", action="append", help="a message to send (repeat it); default: read stdin"
    )
    conversation.set_defaults(run=chat)
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT_SECONDS[args.command]
    return args


async def run(args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(args.target) as channel:
        await args.run(greeter_pb2_grpc.GreeterStub(channel), args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except grpc.aio.AioRpcError as err:
        details = " ".join((err.details() or "").split())  # always one line
        print(f"error: {err.code().name}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
