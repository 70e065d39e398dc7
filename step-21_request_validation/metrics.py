"""Prometheus metrics for every RPC, named and labelled exactly as go-grpc-prometheus names
them, so dashboards and alert rules written for Go services work unchanged:

    grpc_server_started_total{grpc_type, grpc_service, grpc_method}
    grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_server_handling_seconds{grpc_type, grpc_service, grpc_method}   (histogram)
    grpc_server_msg_received_total{grpc_type, grpc_service, grpc_method}
    grpc_server_msg_sent_total{grpc_type, grpc_service, grpc_method}

and, for the calls a server makes to another service (unary ones: the only kind made here),

    grpc_client_started_total, grpc_client_handled_total, grpc_client_handling_seconds,
    grpc_client_msg_received_total, grpc_client_msg_sent_total   (same labels)

`grpc_code` is spelled as Go spells it (`OK`, `InvalidArgument`, `Canceled`, ...), and
`grpc_type` is `unary`, `client_stream`, `server_stream` or `bidi_stream`. The registry is
served over HTTP by `serving_metrics`, on a port of its own.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import grpc
import prometheus_client
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from interceptors import Behaviour, OncePerMethod, current_trace_id, status_of, wrap_handler

# Go's prometheus.DefBuckets, which go-grpc-prometheus uses for the handling-time histogram
# (Python's client has other defaults): the same buckets make the same quantiles.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# codes.Code.String() in grpc-go: CANCELLED is "Canceled" there.
GO_CODE_NAMES = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
} | {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}

# /metrics: a request head larger than this, or slower than this, is hung up on.
MAX_REQUEST_BYTES = 16 * 1024
SCRAPE_TIMEOUT_SECONDS = 10.0

# Without this, prometheus_client adds a `*_created` series to every counter and histogram,
# which go-grpc-prometheus does not have.
prometheus_client.disable_created_metrics()


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[request_streaming, response_streaming]


class ServerMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every RPC, outermost in the chain so that rejected calls count too.
    `shutting_down` as for `status_of`: a call cut by the shutdown is `Unavailable`."""

    def __init__(
        self, registry: CollectorRegistry, shutting_down: asyncio.Event | None = None
    ) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=GO_DEFAULT_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            labels,
            registry=registry,
        )
        self._shutting_down = shutting_down
        self._measured = OncePerMethod(self._wrap)

    def initialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Create every series of `services` at 0, as go-grpc-prometheus's InitializeMetrics
        does: a rate over a series that appears only with its first call misses that call."""
        for service in services:
            for method in service.methods:
                labels = (
                    rpc_type(method.client_streaming, method.server_streaming),
                    service.full_name,
                    method.name,
                )
                for metric in (self.started, self.received, self.sent, self.handling_seconds):
                    metric.labels(*labels)
                for code_name in GO_CODE_NAMES.values():
                    self.handled.labels(*labels, code_name)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, and nothing to label it with
        return self._measured(handler_call_details.method, handler)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        _, service, method = full_method.split("/")  # "/greeter.v1.Greeter/SayHello"
        labels = (rpc_type(handler.request_streaming, handler.response_streaming), service, method)
        # The method's series, looked up once: a labels() lookup takes a lock and a dict.
        series = MethodSeries(
            started=self.started.labels(*labels),
            handled={
                code: self.handled.labels(*labels, GO_CODE_NAMES[code]) for code in grpc.StatusCode
            },
            handling_seconds=self.handling_seconds.labels(*labels),
            received=self.received.labels(*labels),
            sent=self.sent.labels(*labels),
        )
        return wrap_handler(
            handler,
            lambda behaviour, response_streaming: measured(
                behaviour,
                series,
                handler.request_streaming,
                response_streaming,
                self._shutting_down,
            ),
        )


@dataclass(frozen=True)
class MethodSeries:
    """The series of one method (its labels set): what `measured` counts and times."""

    started: Counter
    handled: dict[grpc.StatusCode, Counter]
    handling_seconds: Histogram
    received: Counter
    sent: Counter


def measured(
    behaviour: Behaviour,
    series: MethodSeries,
    request_streaming: bool,
    response_streaming: bool,
    shutting_down: asyncio.Event | None,
) -> Behaviour:
    """`behaviour`, counted and timed in `series`, whatever kind of RPC it is."""

    def counted_requests(request_or_iterator):
        if not request_streaming:
            series.received.inc()  # a unary request has arrived by the time the handler runs
            return request_or_iterator
        return counting(request_or_iterator)

    async def counting(requests: AsyncIterator) -> AsyncIterator:
        async for request in requests:
            series.received.inc()
            yield request

    async def unary(request_or_iterator, context):
        with Measuring(series, context, shutting_down):
            reply = await behaviour(counted_requests(request_or_iterator), context)
            series.sent.inc()
            return reply

    async def stream(request_or_iterator, context):
        with Measuring(series, context, shutting_down):
            async with contextlib.aclosing(
                behaviour(counted_requests(request_or_iterator), context)
            ) as replies:
                async for reply in replies:
                    series.sent.inc()
                    yield reply

    return stream if response_streaming else unary


class Measuring:
    """Counts an RPC as started, and when the `with` block ends, however it ends
    (CancelledError and GeneratorExit too), as handled with its code, and its duration.
    A class rather than @contextlib.contextmanager: it runs on every call, and a
    generator-based one costs more."""

    __slots__ = ("context", "series", "shutting_down", "started")

    def __init__(self, series: MethodSeries, context, shutting_down: asyncio.Event | None):
        self.series, self.context, self.shutting_down = series, context, shutting_down
        series.started.inc()
        self.started = time.monotonic()

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        code = status_of(self.context, error, self.shutting_down)
        self.series.handled[code].inc()
        # The trace of this call as an exemplar (OpenMetrics): from a slow bucket on a
        # dashboard straight to a trace that landed in it.
        trace_id = current_trace_id()
        self.series.handling_seconds.observe(
            time.monotonic() - self.started, {"trace_id": trace_id} if trace_id else None
        )


class ClientMetrics(grpc.aio.UnaryUnaryClientInterceptor):
    """go-grpc-prometheus's client metrics, for unary calls: the counts and times of the
    calls this process makes, as the server's metrics are of the calls it answers. A call is
    counted as handled before the caller sees its result."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_client_started_total",
            "Total number of RPCs started on the client.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_client_handled_total",
            "Total number of RPCs completed by the client, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_client_handling_seconds",
            "Histogram of response latency (seconds) of the gRPC until it is finished by the "
            "application.",
            labels,
            buckets=GO_DEFAULT_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_client_msg_received_total",
            "Total number of RPC stream messages received by the client.",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "grpc_client_msg_sent_total",
            "Total number of gRPC stream messages sent by the client.",
            labels,
            registry=registry,
        )

    def initialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Every series of the unary methods of `services` at 0 (see ServerMetrics)."""
        for service in services:
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue
                labels = ("unary", service.full_name, method.name)
                for metric in (self.started, self.received, self.sent, self.handling_seconds):
                    metric.labels(*labels)
                for code_name in GO_CODE_NAMES.values():
                    self.handled.labels(*labels, code_name)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        full_method = client_call_details.method
        full_method = full_method.decode() if isinstance(full_method, bytes) else full_method
        service, _, method = full_method.lstrip("/").partition("/")
        labels = ("unary", service, method)
        self.started.labels(*labels).inc()
        self.sent.labels(*labels).inc()
        started = time.monotonic()
        call = await continuation(client_call_details, request)
        try:
            await call  # the reply, or the error; the caller gets both from `call` as well
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            self._handled(labels, grpc.StatusCode.CANCELLED, started)
            raise
        code = await call.code()
        if code == grpc.StatusCode.OK:
            self.received.labels(*labels).inc()
        self._handled(labels, code, started)
        return call

    def _handled(self, labels: tuple[str, str, str], code: grpc.StatusCode, started: float) -> None:
        self.handled.labels(*labels, GO_CODE_NAMES[code]).inc()
        self.handling_seconds.labels(*labels).observe(time.monotonic() - started)


@contextlib.asynccontextmanager
async def serving_metrics(host: str, port: int, registry: CollectorRegistry) -> AsyncIterator[str]:
    """`GET /metrics` over HTTP on host:port (0: a free one), for as long as the block runs;
    yields the address it listens on. The answer is prometheus_client's own WSGI app
    (`make_wsgi_app`: the text or OpenMetrics format the scraper asks for, gzip when it
    accepts it); the connection is the event loop's, so that a scrape is answered between
    RPCs (generating this registry's text takes well under a millisecond), no thread waits
    on a slow scraper, and the endpoint stops the moment the server does (step 08's README
    says why not prometheus_client's HTTP server)."""
    app = prometheus_client.make_wsgi_app(registry)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_SECONDS):  # the whole exchange
                head = await reader.readuntil(b"\r\n\r\n")  # request line and headers
                writer.write(http_response(head, app))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that is too slow, sends too much or goes away: just hang up
        except asyncio.CancelledError:
            # The server stops with this scrape unanswered: hang up. Ending as cancelled
            # would make Python 3.11's streams log an ERROR for it (3.12 no longer does).
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port, limit=MAX_REQUEST_BYTES)
    try:
        bound_port = server.sockets[0].getsockname()[1]
        yield f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
    finally:
        server.close()
        await server.wait_closed()


def http_response(head: bytes, app: Callable) -> bytes:
    """The whole HTTP/1.1 response to a request's head: the WSGI `app`'s answer for
    `/metrics` (it answers any path; other paths get a 404 that says where to look)."""
    request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, _, rest = request_line.partition(" ")
    path, _, query = rest.split(" ")[0].partition("?")
    if path != "/metrics":
        status, headers, body = "404 Not Found", [("Content-Type", "text/plain")], b"see /metrics\n"
    else:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
        for line in header_lines:
            name, _, value = line.partition(":")
            environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        answered = []
        body = b"".join(app(environ, lambda status, headers: answered.append((status, headers))))
        [(status, headers)] = answered
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
