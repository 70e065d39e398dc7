"""Greeter demo client.

    python client.py hello --name Ada [--target 127.0.0.1:50051] [--timeout 5]
    python client.py stream --name Ada [--count N]
    python client.py many [--name NAME ...]        (without --name: one name per stdin line)
    python client.py chat [--message TEXT ...]     (without --message: one message per stdin line)
    python client.py spread --name Ada [--calls 30]  (which replica served each call: a count each;
                                                       a rate-limited call is sent again when
                                                       the server's RetryInfo says)
    python client.py hello --api v2 --name Ada [--family-name Lovelace]   (greeter.v2)

--canary sends `x-canary: always`: through Envoy (deploy/envoy.yaml), the call goes to the
canary release.

--target may name several replicas (ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT): calls go
round robin to those whose health service says SERVING.

Every call carries the token of GREETER_AUTH_TOKEN and the user id of --user-id, over TLS:
the server must have a certificate signed by --ca (default certs/ca.crt).

Prints the reply. On an error it prints one line, `error: STATUS: message`, then each field
an INVALID_ARGUMENT names (`  name: must not be empty`), and exits 1.
"""

import os

import venv_check  # noqa: F401  first: outside the virtual env, one line instead of a traceback

# gRPC's C core writes log lines of its own to stderr (a refused connection, a failed
# handshake). This client reports each failure in one line, so the core stays quiet unless
# you ask (GRPC_VERBOSITY=INFO python client.py ...). It is read when grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import collections
import contextlib
import getpass
import logging
import stat
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from auth import TOKEN_VARIABLE, client_auth_interceptors, unsendable_token_problem, user_id_problem
from balancing import channel_options, replica_target, served_by
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from greeter.v2 import greeter_pb2 as greeter_v2_pb2
from greeter.v2 import greeter_pb2_grpc as greeter_v2_pb2_grpc
from propagation import request_id_interceptors
from retries import GREETER_RETRIED, retry_delay
from rpc_log import ClientRpcLogger
from settings import add_options, flag_type, option, positive_number, positive_seconds
from tls import TlsConfigError, channel_credentials
from tracing import ClientTracer, tracer_provider

# Every call has a deadline: a client that waits forever for a stuck server is a bug.
# Each command has its own default, since a stream takes longer than one reply.
DEFAULT_TIMEOUT_SECONDS = {
    "hello": 5.0,
    "stream": 15.0,
    "many": 300.0,
    "chat": 300.0,
    "spread": 5.0,
}
# spread sends a rate-limited call again after the delay its RetryInfo gives, this many
# times at most (each wait lets the server's bucket refill, so one more is normally enough).
MAX_THROTTLED_ATTEMPTS = 10


@dataclass(frozen=True)
class ClientSettings:
    target: str = option(
        "127.0.0.1:50051",
        "GREETER_TARGET",
        "server address, or replicas: ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT",
        parse=replica_target,
    )
    timeout: float | None = option(
        None,
        "GREETER_TIMEOUT",
        "deadline of each call in seconds (default: per command)",
        parse=positive_seconds,
    )
    ca: str = option(
        "certs/ca.crt", "GREETER_TLS_CA", "the CA that signed the server's certificate (PEM)"
    )
    cert: str | None = option(None, "GREETER_TLS_CLIENT_CERT", "client certificate, for mutual TLS")
    key: str | None = option(None, "GREETER_TLS_CLIENT_KEY", "its private key")
    user_id: str | None = option(
        None, "GREETER_USER_ID", "who is calling, sent as x-user-id (default: your login name)"
    )


# Sent with every call when --canary is given: Envoy's route for it (deploy/envoy.yaml).
CANARY_HEADER = ("x-canary", "always")


def call_options(args: argparse.Namespace) -> dict:
    """What every call of the command carries: its deadline, and the canary header if asked."""
    return {"timeout": args.timeout, "metadata": (CANARY_HEADER,) if args.canary else ()}


async def hello(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    reply: greeter_v2_pb2.SayHelloResponse | greeter_pb2.HelloReply
    if args.api == "v2":
        person = greeter_v2_pb2.Person(given_name=args.name, family_name=args.family_name)
        reply = await greeter_v2_pb2_grpc.GreeterServiceStub(channel).SayHello(
            greeter_v2_pb2.SayHelloRequest(person=person), **call_options(args)
        )
    else:
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(
            greeter_pb2.HelloRequest(name=args.name), **call_options(args)
        )
    print(reply.message)


async def stream(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    stub = greeter_pb2_grpc.GreeterStub(channel)
    request = greeter_pb2.HelloRequest(name=args.name, count=args.count)
    # The deadline covers the whole stream; each reply is printed the moment it arrives.
    async for reply in stub.StreamGreetings(request, **call_options(args)):
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


async def many(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    names = listed(args.name) if args.name else stdin_lines()
    # grpc.aio sends each name as the iterator yields it (as you type it, from stdin); the
    # one reply comes after the last, once the iterator ends and the client half-closes.
    requests = (greeter_pb2.HelloRequest(name=name) async for name in names)
    stub = greeter_pb2_grpc.GreeterStub(channel)
    reply = await stub.GreetMany(requests, **call_options(args))
    print(reply.message)


async def chat(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    call = greeter_pb2_grpc.GreeterStub(channel).Chat(**call_options(args))
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


async def spread(channel: grpc.aio.Channel, args: argparse.Namespace) -> None:
    """`--calls` SayHello calls, one after the other, then how many each replica served."""
    stub = greeter_pb2_grpc.GreeterStub(channel)
    counts: collections.Counter[str] = collections.Counter()
    throttled, waited = 0, 0.0
    for _ in range(args.calls):
        for attempt in range(1, MAX_THROTTLED_ATTEMPTS + 1):
            call = stub.SayHello(greeter_pb2.HelloRequest(name=args.name), **call_options(args))
            try:
                await call
                break
            except grpc.aio.AioRpcError as error:
                # Over a rate limit (step 18): come back when RetryInfo says, not at once.
                if (delay := retry_delay(error)) is None or attempt == MAX_THROTTLED_ATTEMPTS:
                    raise
                throttled, waited = throttled + 1, waited + delay
                await asyncio.sleep(delay)
        counts[served_by(await call.trailing_metadata()) or "?"] += 1
    for replica, count in sorted(counts.items()):
        print(f"{replica}: {count}")
    print(f"{args.calls} calls over {len(counts)} replicas")
    if throttled:
        print(f"rate-limited {throttled} times: waited {waited:.1f} s in all, as RetryInfo said")


def login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # e.g. a container user with no passwd entry and no $USER
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Shared options live on each subcommand, so they can follow it: `hello --target ...`.
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, ClientSettings)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log each call (method, status, duration) to stderr",
    )
    common.add_argument(
        "--canary",
        action="store_true",
        help="send x-canary: always (through Envoy: the call goes to the canary release)",
    )

    parser = argparse.ArgumentParser(description="Greeter demo client")
    commands = parser.add_subparsers(dest="command", required=True)
    say_hello = commands.add_parser("hello", parents=[common], help="one SayHello call")
    say_hello.add_argument("--name", required=True, help="who to greet (v2: the given name)")
    say_hello.add_argument(
        "--api", choices=("v1", "v2"), default="v1", help="greeter.v1 (default) or greeter.v2"
    )
    say_hello.add_argument("--family-name", default="", help="v2 only: the family name")
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
    spreading = commands.add_parser(
        "spread", parents=[common], help="SayHello calls, counted by the replica that served each"
    )
    spreading.add_argument("--name", required=True, help="who to greet")
    spreading.add_argument(
        "--calls", type=flag_type(positive_number), default=30, help="how many calls (default 30)"
    )
    spreading.set_defaults(run=spread)
    args = parser.parse_args(argv)
    if getattr(args, "family_name", "") and args.api != "v2":
        parser.error("--family-name needs --api v2: greeter.v1 has one name field")
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT_SECONDS[args.command]
    args.user_id = args.user_id or login_name()
    return args


async def run(args: argparse.Namespace) -> None:
    # One channel for the whole program, with the interceptors every call goes through.
    # The token comes from the environment only, never a flag (flags show in `ps`).
    rpc_logger = ClientRpcLogger(args.target)
    credentials = client_auth_interceptors(os.environ.get(TOKEN_VARIABLE), args.user_id)
    # The client starts the trace: its span is the parent of the server's.
    async with tracer_provider("greeter-client") as provider:
        tracer = ClientTracer(provider, args.target)
        channel = grpc.aio.secure_channel(
            args.target,
            channel_credentials(args.ca, args.cert, args.key),
            # Round robin over the target's replicas, skipping those not serving.
            # ... and retries of the calls safe to repeat (retries.py), each call with a
            # request id of its own, which its retries carry too.
            options=channel_options(args.target, retried=GREETER_RETRIED),
            interceptors=[
                *tracer.interceptors(),
                *rpc_logger.interceptors(),
                *request_id_interceptors(),
                *credentials,
            ],
        )
        try:
            async with channel:
                await args.run(channel, args)
        finally:
            await rpc_logger.flush()  # closing the channel ended every call: write their lines
            await tracer.flush()  # ...and their spans, which the provider exports on its way out


def metrics_port_hint(target: str) -> str:
    """A gRPC call to a /metrics port gets no answer it understands and ends by its
    deadline: when `target` answers HTTP GET /metrics, say that it is a metrics port."""
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=1) as reply:
            if reply.status == 200:
                return f"; {target} serves /metrics: is this the metrics port? Use the server's `listening on` address"
    except (OSError, ValueError):  # nothing answers HTTP there, or not a host:port
        pass
    return ""


def field_violations(error: grpc.aio.AioRpcError) -> list:
    """The fields an INVALID_ARGUMENT names in its google.rpc.BadRequest detail, if any
    (the server's validation.py)."""
    status = (
        rpc_status.from_call(error) if error.code() == grpc.StatusCode.INVALID_ARGUMENT else None
    )
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details if status else ():
        if detail.Unpack(bad_request):
            return list(bad_request.field_violations)
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.get(TOKEN_VARIABLE)
    if problem := (token and unsendable_token_problem(token)) or user_id_problem(args.user_id):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(run(args))
    except grpc.aio.AioRpcError as err:
        details = " ".join((err.details() or "").split())  # always one line
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:  # the server cannot say where from
            details += f"; {TOKEN_VARIABLE} must be the server's token"
        if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            details += metrics_port_hint(args.target)
        print(f"error: {err.code().name}: {details}", file=sys.stderr)
        for violation in field_violations(err):  # step 21: the request's rules, field by field
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    except TlsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
