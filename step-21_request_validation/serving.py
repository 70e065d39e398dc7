"""How a server runs, the Greeter (server.py) and the Logger (logger_server.py) alike: the
interceptor chain, TLS, health, reflection and /metrics around one service (`build_server`),
its lifetime (`running_server`), and the entry point's start-up and shutdown (`main`).
"""

import os

import venv_check  # noqa: F401  first: outside the virtual env, one line instead of a traceback

# gRPC's C core logs ordinary events (a port in use, a failed handshake, a GOAWAY) as E…/I…
# lines of its own; these servers report what matters themselves. GRPC_VERBOSITY=INFO (or
# DEBUG) turns them back on. It is read when grpc is imported: keep this above the imports.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import keepalive
import rebalancing
from auth import ServerAuthenticator, token_problem
from balancing import SERVED_BY_KEY
from health import HEALTH_SERVICE, HealthService
from interceptors import StreamsEndInTheirTask, wrap_handler
from metrics import ServerMetrics, serving_metrics
from propagation import ServerRequestIds
from ratelimit import LimiterMetrics, Quota, ServerRateLimiter
from rpc_log import ServerRpcLogger
from settings import ServerSettings, configure_logging
from tls import TlsConfigError, server_credentials
from tracing import ServerTracer, tracer_provider
from validation import ServerValidator

# Beyond this many calls at once, new calls get RESOURCE_EXHAUSTED instead of queueing.
# Callers without credentials can hold only a few of them: auth.MAX_DRAINING_REJECTIONS and
# auth.MAX_PUBLIC_STREAMS.
MAX_CONCURRENT_RPCS = 256

# The probe port (serving_probes) is asked by the kubelet, a call at a time; more at once is
# not a probe.
MAX_CONCURRENT_PROBES = 8

# Probes and discovery tools carry no token: these services answer without one (over TLS
# still). Everything else requires it.
PUBLIC_SERVICES = frozenset({HEALTH_SERVICE, reflection.SERVICE_NAME})


@dataclass(frozen=True)
class Service:
    """One of this step's services, as a server serves it."""

    name: str  # "greeter": the name of its logs (greeter.rpc) and of its traces
    # The gRPC services it serves, from the generated code: one per API version it serves
    # (the Greeter's new release: greeter.v1.Greeter and greeter.v2.GreeterService).
    descriptors: tuple[ServiceDescriptor, ...]
    # Adds the servicer of each of them to a server (add_<Service>Servicer_to_server).
    register: Callable[[Any, grpc.aio.Server], None]
    # A request much bigger than the service's largest real one is a mistake or an attack,
    # so it is refused before it is read into memory. gRPC's default is 4 MiB.
    max_request_bytes: int
    max_reply_bytes: int
    # Who a call's rate limit is for ("user ada", "service greeter"): ratelimit.py.
    rate_limit_subject: Callable[[grpc.aio.ServicerContext], str | None]
    rate_limit_name: str  # the `limit` label of its refusals: per_user, per_service
    # Methods no rate limit applies to, as "package.Service/Method".
    rate_limit_exempt: frozenset[str] = frozenset()

    @property
    def names(self) -> list[str]:
        """The full names of its gRPC services: greeter.v1.Greeter, ..."""
        return [descriptor.full_name for descriptor in self.descriptors]

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"{self.name}.server")


@dataclass(frozen=True)
class Telemetry:
    """Where a servicer's own outbound calls report to: the server's metrics and traces."""

    registry: CollectorRegistry
    provider: TracerProvider


# Makes the servicer, entering into the lifetime what it holds (the Greeter: its channel to
# the Logger), so that it is released only after the server has stopped.
StartServicer = Callable[[contextlib.AsyncExitStack, Telemetry], Awaitable[Any]]


class CallsInFlight(grpc.aio.ServerInterceptor):
    """The tasks of the calls this server is running. After server.stop(), the ones it cut
    are still running their cleanup: stop_gracefully waits for those, and only those (a
    process may run several servers: the tests run a Greeter and its Logger in one)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, self._tracked)

    def _tracked(self, behaviour, response_streaming: bool):
        @contextlib.contextmanager
        def tracking() -> Iterator[None]:
            task = asyncio.current_task()
            assert task is not None  # a handler always runs in a task
            self.tasks.add(task)
            try:
                yield
            finally:
                self.tasks.discard(task)

        async def unary(request_or_iterator, context):
            with tracking():
                return await behaviour(request_or_iterator, context)

        async def stream(request_or_iterator, context):
            with tracking():
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                    async for reply in replies:
                        yield reply

        return stream if response_streaming else unary

    async def finished(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, for the calls still running to end."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


def host_port(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 host, as gRPC targets spell it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def why_not_listening(host: str, port: int, error: RuntimeError, flag: str = "--port") -> str:
    """gRPC says only "Failed to bind to address": try the port ourselves, to say whether
    something else already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as taken:
        if taken.errno == errno.EADDRINUSE:
            return (
                f"port {port} is in use (another server?): stop it, or choose another with {flag}"
            )
    return str(error)


def build_server(
    settings: ServerSettings,
    service: Service,
    servicer: Any,
    health: HealthService,
    metrics: ServerMetrics,
    provider: TracerProvider,
    in_flight: CallsInFlight,
    rate_limiter: ServerRateLimiter,
) -> tuple[grpc.aio.Server, int]:
    """A server with every service registered and its port bound (not started yet)."""
    request_ids = ServerRequestIds()
    server = grpc.aio.server(
        # Run around every RPC, first one outermost (README, "The chain").
        # StreamsEndInTheirTask first: around every other interceptor.
        interceptors=[
            StreamsEndInTheirTask(),
            in_flight,
            request_ids,
            ServerTracer(provider, untraced=PUBLIC_SERVICES, shutting_down=servicer.shutting_down),
            metrics,
            ServerRpcLogger(servicer.shutting_down, logging.getLogger(f"{service.name}.rpc")),
            ServerAuthenticator(settings.token or "", exempt=PUBLIC_SERVICES),
            rate_limiter,  # after auth: only a caller with credentials has a bucket
            # Last, right before the handler: only a caller with credentials and a token of
            # its bucket learns what is wrong with its request.
            ServerValidator(service.descriptors, exempt=PUBLIC_SERVICES),
        ],
        options=[
            ("grpc.max_receive_message_length", service.max_request_bytes),
            ("grpc.max_send_message_length", service.max_reply_bytes),
            # gRPC enables SO_REUSEPORT by default: a second server on the same port would
            # start "fine" and silently share the traffic. Fail loudly instead.
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(settings.keepalive_time, settings.permit_keepalive_time),
            *rebalancing.server_options(
                settings.max_connection_age, settings.max_connection_age_grace
            ),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    service.register(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection describes the services listed here to grpcurl and other tools.
    reflection.enable_server_reflection(
        [*service.names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    # TLS only: there is no plaintext port to fall back to.
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = server.add_secure_port(host_port(settings.host, settings.port), credentials)
    # Every reply says which replica served it; by default host name and port, known now.
    replica = settings.replica_name or f"{socket.gethostname()}:{port}"
    request_ids.response_headers = ((SERVED_BY_KEY, replica),)
    return server, port


def health_only_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool with grpc/health/v1/health.proto in it, and nothing else."""
    health_file = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(health_file)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(health_file)
    return pool


class ProbePortError(Exception):
    """The health probes' port cannot be bound."""


@contextlib.asynccontextmanager
async def serving_probes(
    host: str, port: int, health: HealthService, service: Service
) -> AsyncIterator[str]:
    """The health service alone (and reflection for it), in plaintext without a token, on a
    port of its own: what Kubernetes' gRPC probes can ask (step 20's README, "Probes"). It
    says only whether the server is serving; no interceptor runs, so a probe every few
    seconds logs nothing."""
    probes = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1024)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_PROBES,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, probes)
    # Reflection of the health service alone, from a pool that holds nothing else (by
    # default it would describe every message this process knows): grpcurl can ask it.
    reflection.enable_server_reflection(
        [HEALTH_SERVICE, reflection.SERVICE_NAME], probes, pool=health_only_pool()
    )
    try:
        address = host_port(host, probes.add_insecure_port(host_port(host, port)))
    except RuntimeError as err:
        raise ProbePortError(
            f"cannot serve health probes on {host_port(host, port)}: "
            f"{why_not_listening(host, port, err, '--health-port')}"
        ) from None
    await probes.start()
    try:
        yield address
    finally:
        await probes.stop(None)


@dataclass(frozen=True)
class RunningServer:
    server: grpc.aio.Server
    address: str  # host:port it listens on (the real port when 0 was asked for)
    health: HealthService
    metrics_address: str  # host:port of /metrics
    servicer: Any
    probes_address: str | None = None  # host:port of the plaintext health port, if any


@contextlib.asynccontextmanager
async def running_server(
    settings: ServerSettings, service: Service, start_servicer: StartServicer
) -> AsyncIterator[RunningServer]:
    """A server's lifetime: everything it holds is started here, in order, and released in
    reverse order when the block ends. serve() and the tests use this one sequence."""
    # NOT_SERVING until everything has started: a probe never sees a half-started server.
    health = await HealthService.starting(service.names)
    registry = CollectorRegistry()  # this server's own: tests run several servers at once
    async with contextlib.AsyncExitStack() as resources:
        # Released after the server has drained: the spans of the last calls get exported.
        provider = await resources.enter_async_context(tracer_provider(service.name))
        # First in, last out: /metrics stays up while the server drains, for a last scrape.
        metrics_address = await resources.enter_async_context(
            serving_metrics(settings.metrics_host, settings.metrics_port, registry)
        )
        servicer = await start_servicer(resources, Telemetry(registry, provider))
        metrics = ServerMetrics(registry, servicer.shutting_down)
        metrics.initialize(
            [
                *service.descriptors,
                health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
            ]
        )
        in_flight = CallsInFlight()
        rate_limiter = ServerRateLimiter(
            Quota(settings.rate_limit, settings.rate_burst),
            service.rate_limit_subject,
            service.rate_limit_name,
            LimiterMetrics(
                registry,
                service.rate_limit_name,
                service.descriptors,
                service.rate_limit_exempt,
                shared=settings.rate_limit_redis is not None,
            ),
            settings.rate_limit_redis,
            exempt=PUBLIC_SERVICES | service.rate_limit_exempt,
        )
        probes_address = None
        if settings.health_port is not None:
            # Stopped last: probes see NOT_SERVING through the drain and the grace.
            probes_address = await resources.enter_async_context(
                serving_probes(settings.host, settings.health_port, health, service)
            )
        server, port = build_server(
            settings, service, servicer, health, metrics, provider, in_flight, rate_limiter
        )
        await server.start()
        resources.push_async_callback(
            stop_gracefully, server, settings.grace, service, servicer, in_flight
        )
        # Released first: health says NOT_SERVING while calls are still being served.
        resources.push_async_callback(drain, health, settings.drain_delay, service)
        await health.set_serving()
        yield RunningServer(
            server,
            host_port(settings.host, port),
            health,
            metrics_address,
            servicer,
            probes_address,
        )


async def drain(health: HealthService, drain_delay: float, service: Service) -> None:
    """Report NOT_SERVING and keep serving `drain_delay` seconds, so that load balancers and
    Kubernetes stop sending new calls before the server refuses them."""
    await health.enter_graceful_shutdown()
    service.log.info("health: NOT_SERVING; still serving for %.1fs", drain_delay)
    try:
        # Not synchronisation: a deliberate pause, the time load balancers need to notice.
        await asyncio.sleep(drain_delay)
    finally:
        await health.end_watches()  # the stop that follows would wait for them


async def stop_gracefully(
    server: grpc.aio.Server, grace: float, service: Service, servicer: Any, in_flight: CallsInFlight
) -> None:
    """Refuse new calls, let in-flight ones finish for up to `grace` seconds, cancel the rest."""
    servicer.shutting_down.set()  # a stream cut from now on was cut by us, not by its client
    service.log.info(
        "shutting down: refusing new calls, in-flight calls get %.1fs to finish", grace
    )
    await server.stop(grace)
    # grpc.aio returns before the handlers it cancelled when the grace ran out have run their
    # cleanup. Without this wait, asyncio.run cancels them a second time on exit and gRPC
    # logs a CancelledError traceback after "stopped".
    await in_flight.finished(timeout=1.0)
    service.log.info("stopped")


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve(running: Callable[[], contextlib.AbstractAsyncContextManager]) -> None:
    # Signal handlers first: whoever reads "listening on" may send SIGTERM right away.
    stop = stop_on_signals()
    async with running() as server:
        print(f"metrics on {server.metrics_address}", flush=True)
        if server.probes_address:
            print(f"probes on {server.probes_address}", flush=True)
        print(f"listening on {server.address}", flush=True)
        await stop.wait()


def token_hint(settings: ServerSettings, variable: str) -> str:
    """How to set the token of `variable`: a new one for the server's own; for a service it
    calls, the one that service runs with (a new one would be refused: UNAUTHENTICATED)."""
    owner = variable.split("_")[0].lower()  # LOGGER_AUTH_TOKEN: the Logger's
    if variable == type(settings).variable("token"):  # in a file, for its callers too
        new = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        return f"For example:\n  {new} > {owner}.token\n  export {variable}=$(cat {owner}.token)"
    return (
        f"It is the {owner.capitalize()}'s own token, the one it runs with; for example:\n"
        f"  export {variable}=$(cat {owner}.token)"
    )


def main(
    settings: ServerSettings,
    running: Callable[[], contextlib.AbstractAsyncContextManager[RunningServer]],
) -> int:
    """Serve until SIGINT or SIGTERM; exit code 0 after a graceful stop, 2 for a setting
    that cannot work (a token, a TLS file), 1 when a port cannot be bound."""
    for variable, token in settings.secrets().items():
        if problem := token_problem(token, variable):
            # Never serve unauthenticated by accident: no token, no server.
            print(
                f"error: {problem}. The server does not start without one. {token_hint(settings, variable)}",
                file=sys.stderr,
            )
            return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(running))
    except TlsConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ProbePortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
