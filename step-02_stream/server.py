"""Greeter server: the wiring of its services and interceptors, and the entry point
(settings.py holds the configuration).

    python server.py [--host 127.0.0.1] [--port 50051] [--grace 10]

Prints `listening on HOST:PORT` once it serves (tools and tests read the port from it) and
shuts down gracefully on SIGINT/SIGTERM.
"""

import asyncio
import logging
import signal
import sys

import grpc

from greeter.v1 import greeter_pb2_grpc
from service import Greeter
from settings import Settings, parse_settings

# Requests are small (a name of at most 100 characters); anything much bigger is a mistake
# or an attack, so refuse it before it is read into memory. gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 4 * 1024
# Beyond this many calls at once, new calls get RESOURCE_EXHAUSTED instead of queueing.
MAX_CONCURRENT_RPCS = 256

log = logging.getLogger("greeter.server")


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 host, as gRPC targets spell it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_server(
    settings: Settings, servicer: Greeter | None = None
) -> tuple[grpc.aio.Server, int]:
    """A server with every service registered and its port bound (not started yet)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC enables SO_REUSEPORT by default: a second server on the same port would
            # start "fine" and silently share the traffic. Fail loudly instead.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    greeter_pb2_grpc.add_GreeterServicer_to_server(
        servicer or Greeter(settings.stream_interval), server
    )
    port = server.add_insecure_port(host_port(settings.host, settings.port))
    return server, port


async def stop_when(stop: asyncio.Event, server: grpc.aio.Server, grace: float) -> None:
    """Wait for `stop`, then shut down: refuse new calls, let in-flight ones finish for up to
    `grace` seconds, cancel what is left."""
    await stop.wait()
    log.info("shutting down: refusing new calls, in-flight calls get %.1fs to finish", grace)
    await server.stop(grace)
    log.info("stopped")


async def serve(settings: Settings) -> None:
    # Signal handlers first: whoever reads "listening on" may send SIGTERM right away.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    server, port = build_server(settings)
    await server.start()
    print(f"listening on {host_port(settings.host, port)}", flush=True)
    await stop_when(stop, server, settings.grace)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings))
    except RuntimeError as err:  # grpc raises RuntimeError when the port cannot be bound
        print(
            f"error: cannot listen on {host_port(settings.host, settings.port)}: {err}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
