"""Greeter demo client.

    python client.py hello --name Ada [--target 127.0.0.1:50051] [--timeout 5]

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
import sys
from dataclasses import dataclass

import grpc

from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from settings import add_options, option, positive_seconds

# Every call has a deadline: a client that waits forever for a stuck server is a bug.
# Each command has its own default, since a stream takes longer than one reply.
DEFAULT_TIMEOUT_SECONDS = {"hello": 5.0}


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Shared options live on each subcommand, so they can follow it: `hello --target ...`.
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, ClientSettings)

    parser = argparse.ArgumentParser(description="Greeter demo client")
    commands = parser.add_subparsers(dest="command", required=True)
    say_hello = commands.add_parser("hello", parents=[common], help="one SayHello call")
    say_hello.add_argument("--name", required=True, help="who to greet")
    say_hello.set_defaults(run=hello)
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
