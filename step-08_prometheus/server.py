"""Greeter server: the wiring of its services, its lifetime (`running_server`) and the
entry point (settings.py holds the configuration).

    python server.py [--host 127.0.0.1] [--port 50051] [--metrics-port 9464] [--grace 10]

Prints `metrics on HOST:PORT`, then `listening on HOST:PORT` once it serves (tools and tests
read the ports from them), and shuts down gracefully on SIGINT/SIGTERM.
"""

import os

import venv_check  # noqa: F401  first: outside the virtual env, one line instead of a traceback

# gRPC's C core logs ordinary events (a port in use, a failed handshake, a GOAWAY) as E…/I…
# lines of its own; this server reports what matters itself. GRPC_VERBOSITY=INFO (or DEBUG)
# turns them back on. It is read when grpc is imported: keep this above the imports.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

import keepalive
from auth import TOKEN_VARIABLE, ServerAuthenticator, token_problem
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from health import HEALTH_SERVICE, HealthService
from interceptors import StreamsEndInTheirTask
from metrics import ServerMetrics, serving_metrics
from rpc_log import ServerRpcLogger
from service import Greeter
from settings import Settings, configure_logging, parse_settings
from tls import TlsConfigError, server_credentials

# Requests are small (a name of at most 100 characters); anything much bigger is a mistake
# or an attack, so refuse it before it is read into memory. gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 4 * 1024
# Beyond this many calls at once, new calls get RESOURCE_EXHAUSTED instead of queueing.
# Callers without credentials can hold only a few of them: auth.MAX_DRAINING_REJECTIONS and
# auth.MAX_PUBLIC_STREAMS.
MAX_CONCURRENT_RPCS = 256

GREETER_SERVICE = greeter_pb2.DESCRIPTOR.services_by_name["Greeter"].full_name  # greeter.v1.Greeter
# Probes and discovery tools carry no token: these services answer without one (over TLS
# still). Everything else requires it.
PUBLIC_SERVICES = frozenset({HEALTH_SERVICE, reflection.SERVICE_NAME})

log = logging.getLogger("greeter.server")


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 host, as gRPC targets spell it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def why_not_listening(host: str, port: int, error: RuntimeError) -> str:
    """gRPC says only "Failed to bind to address": try the port ourselves, to say whether
    something else already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as taken:
        if taken.errno == errno.EADDRINUSE:
            return (
                f"port {port} is in use (another server?): stop it, or choose another with --port"
            )
    return str(error)


def build_server(
    settings: Settings, servicer: Greeter, health: HealthService, metrics: ServerMetrics
) -> tuple[grpc.aio.Server, int]:
    """A server with every service registered and its port bound (not started yet)."""
    server = grpc.aio.server(
        # Run around every RPC, first one outermost (README, "The chain").
        # StreamsEndInTheirTask first: around every other interceptor.
        interceptors=[
            StreamsEndInTheirTask(),
            metrics,
            ServerRpcLogger(servicer.shutting_down),
            ServerAuthenticator(settings.token or "", exempt=PUBLIC_SERVICES),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC enables SO_REUSEPORT by default: a second server on the same port would
            # start "fine" and silently share the traffic. Fail loudly instead.
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(settings.keepalive_time, settings.permit_keepalive_time),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    greeter_pb2_grpc.add_GreeterServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection describes the services listed here to grpcurl and other tools.
    reflection.enable_server_reflection(
        [GREETER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    # TLS only: there is no plaintext port to fall back to.
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = server.add_secure_port(host_port(settings.host, settings.port), credentials)
    return server, port


@dataclass(frozen=True)
class RunningServer:
    server: grpc.aio.Server
    address: str  # host:port it listens on (the real port when 0 was asked for)
    health: HealthService
    metrics_address: str  # host:port of /metrics


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, servicer: Greeter | None = None
) -> AsyncIterator[RunningServer]:
    """The server's lifetime: everything it holds is started here, in order, and released in
    reverse order when the block ends. serve() and the tests use this one sequence; a later
    step that holds more (a metrics server, a channel) enters it in the same exit stack."""
    greeter = servicer or Greeter(settings.stream_interval)
    # NOT_SERVING until everything has started: a probe never sees a half-started server.
    health = await HealthService.starting([GREETER_SERVICE])
    registry = CollectorRegistry()  # this server's own: tests run several servers at once
    metrics = ServerMetrics(registry, greeter.shutting_down)
    metrics.initialize(
        [
            greeter_pb2.DESCRIPTOR.services_by_name["Greeter"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        ]
    )
    async with contextlib.AsyncExitStack() as resources:
        # First in, last out: /metrics stays up while the server drains, for a last scrape.
        metrics_address = await resources.enter_async_context(
            serving_metrics(settings.metrics_host, settings.metrics_port, registry)
        )
        server, port = build_server(settings, greeter, health, metrics)
        await server.start()
        resources.push_async_callback(stop_gracefully, server, settings.grace, greeter)
        # Released first: health says NOT_SERVING while calls are still being served.
        resources.push_async_callback(drain, health, settings.drain_delay)
        await health.set_serving()
        yield RunningServer(server, host_port(settings.host, port), health, metrics_address)


async def drain(health: HealthService, drain_delay: float) -> None:
    """Report NOT_SERVING and keep serving `drain_delay` seconds, so that load balancers and
    Kubernetes stop sending new calls before the server refuses them."""
    await health.enter_graceful_shutdown()
    log.info("health: NOT_SERVING; still serving for %.1fs", drain_delay)
    try:
        # Not synchronisation: a deliberate pause, the time load balancers need to notice.
        await asyncio.sleep(drain_delay)
    finally:
        await health.end_watches()  # the stop that follows would wait for them


async def stop_gracefully(server: grpc.aio.Server, grace: float, greeter: Greeter) -> None:
    """Refuse new calls, let in-flight ones finish for up to `grace` seconds, cancel the rest."""
    greeter.shutting_down.set()  # a stream cut from now on was cut by us, not by its client
    log.info("shutting down: refusing new calls, in-flight calls get %.1fs to finish", grace)
    await server.stop(grace)
    await calls_cut_by_the_stop()
    log.info("stopped")


async def calls_cut_by_the_stop(timeout: float = 1.0) -> None:
    """Wait for the handlers that server.stop() cancelled when the grace ran out: grpc.aio
    returns before they have run their cleanup. Without this wait, asyncio.run cancels them a
    second time on exit and gRPC logs a CancelledError traceback after "stopped". (grpc.aio
    names those tasks; other tasks are left alone.)"""
    rpc_tasks = [
        task
        for task in asyncio.all_tasks()
        if task.get_name() == "rpc_task" or task.get_name().startswith("HandleExceptions[")
    ]
    if rpc_tasks:
        await asyncio.wait(rpc_tasks, timeout=timeout)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve(settings: Settings) -> None:
    # Signal handlers first: whoever reads "listening on" may send SIGTERM right away.
    stop = stop_on_signals()
    async with running_server(settings) as running:
        print(f"metrics on {running.metrics_address}", flush=True)
        print(f"listening on {running.address}", flush=True)
        await stop.wait()


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
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except TlsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the metrics port cannot be bound
        print(
            f"error: cannot serve metrics on {host_port(settings.metrics_host, settings.metrics_port)}: "
            f"{os.strerror(err.errno) if err.errno else err}",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as err:  # grpc raises RuntimeError when the port cannot be bound
        print(
            f"error: cannot listen on {host_port(settings.host, settings.port)}: "
            f"{why_not_listening(settings.host, settings.port, err)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
