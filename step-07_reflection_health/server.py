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
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from auth import TOKEN_VARIABLE, ServerAuthenticator, token_problem
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from health import HEALTH_SERVICE, HealthService
from interceptors import ServerRpcLogger
from service import Greeter
from settings import Settings, parse_settings
from tls import TlsConfigError, server_credentials

# Requests are small (a name of at most 100 characters); anything much bigger is a mistake
# or an attack, so refuse it before it is read into memory. gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 4 * 1024
# Beyond this many calls at once, new calls get RESOURCE_EXHAUSTED instead of queueing.
MAX_CONCURRENT_RPCS = 256

GREETER_SERVICE = greeter_pb2.DESCRIPTOR.services_by_name["Greeter"].full_name  # greeter.v1.Greeter
# Probes and discovery tools carry no token: these services answer without one (over TLS
# still). Everything else requires it.
PUBLIC_SERVICES = frozenset({HEALTH_SERVICE, reflection.SERVICE_NAME})

log = logging.getLogger("greeter.server")


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 host, as gRPC targets spell it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_server(
    settings: Settings, servicer: Greeter | None = None, health: HealthService | None = None
) -> tuple[grpc.aio.Server, int]:
    """A server with every service registered and its port bound (not started yet). Its
    health reports NOT_SERVING until `health.set_serving()`."""
    server = grpc.aio.server(
        # Run around every RPC, first one outermost (README, "The chain").
        interceptors=[
            ServerRpcLogger(),
            ServerAuthenticator(settings.token, exempt=PUBLIC_SERVICES),
        ],
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
    health_pb2_grpc.add_HealthServicer_to_server(health or HealthService([GREETER_SERVICE]), server)
    # Reflection describes the services listed here to grpcurl and other tools.
    reflection.enable_server_reflection(
        [GREETER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    # TLS only: there is no plaintext port to fall back to.
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = server.add_secure_port(host_port(settings.host, settings.port), credentials)
    return server, port


async def stop_when(
    stop: asyncio.Event,
    server: grpc.aio.Server,
    grace: float,
    health: HealthService | None = None,
    drain_delay: float = 0.0,
) -> None:
    """Wait for `stop`, then shut down: report NOT_SERVING (and keep serving `drain_delay`
    seconds, for load balancers to notice), refuse new calls, let in-flight ones finish for
    up to `grace` seconds, cancel what is left."""
    await stop.wait()
    if health is not None:
        await health.enter_graceful_shutdown()
        log.info("health: NOT_SERVING; still serving for %.1fs", drain_delay)
        # Not synchronisation: a deliberate pause, the time load balancers need to notice.
        await asyncio.sleep(drain_delay)
    log.info("shutting down: refusing new calls, in-flight calls get %.1fs to finish", grace)
    await server.stop(grace)
    log.info("stopped")


async def serve(settings: Settings) -> None:
    # Signal handlers first: whoever reads "listening on" may send SIGTERM right away.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    health = HealthService([GREETER_SERVICE])
    server, port = build_server(settings, health=health)
    await server.start()
    await health.set_serving()
    print(f"listening on {host_port(settings.host, port)}", flush=True)
    await stop_when(stop, server, settings.grace, health, settings.drain_delay)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    if problem := token_problem(settings.token):
        # Never serve unauthenticated by accident: no token, no server.
        print(
            f"error: {problem}. The server does not start without one. For example:\n"
            f"  export {TOKEN_VARIABLE}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings))
    except TlsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # grpc raises RuntimeError when the port cannot be bound
        print(
            f"error: cannot listen on {host_port(settings.host, settings.port)}: {err}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
