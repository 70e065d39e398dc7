"""OpenTelemetry tracing: a span for every RPC on both sides, one trace from the client
through the server, exported over OTLP/gRPC.

The spans follow the OpenTelemetry RPC conventions (`rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code`). They are made here rather than by
opentelemetry-instrumentation-grpc's aio interceptors, which record OK for a handler
exception, a deadline or a cancel, add every abort twice as an exception event, and, on
the client, export a cancelled call's span as OK or not at all (see the README).

Configuration is OpenTelemetry's own: OTEL_EXPORTER_OTLP_ENDPOINT (no endpoint: no export),
OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, read by the SDK.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from interceptors import Behaviour, OncePerMethod, for_every_rpc_kind, status_of, wrap_handler
from propagation import current_request_id

log = logging.getLogger("tracing")  # in the Greeter, the Logger and the client alike

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXPORT_TIMEOUT_SECONDS = 2.0  # per batch, retries included (OTEL_EXPORTER_OTLP_TIMEOUT wins)

# The exporter logs every failed batch, twice, with the whole gRPC error: ReportingExporter
# says it once per outage instead.
logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)

# The codes that make a span an error: on the server, those that mean the server failed
# (OpenTelemetry's RPC conventions); on the client, every code but OK.
SERVER_ERROR_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


@contextlib.asynccontextmanager
async def tracer_provider(default_service_name: str) -> AsyncIterator[TracerProvider]:
    """A tracer provider for the block, exporting in batches over OTLP/gRPC when an endpoint
    is configured; on the way out, what is still buffered is exported. The exporter blocks,
    so flushing runs off the event loop."""
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or default_service_name}
    )
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER*
    if endpoint := next((os.environ[n] for n in ENDPOINT_VARIABLES if os.environ.get(n)), None):
        # The collector is a dependency that may be down: an export gives up after a few
        # seconds (not the exporter's default 10 s, which a CLI would wait at every exit),
        # and an outage is reported once, not at every batch.
        timeout = None if os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT") else EXPORT_TIMEOUT_SECONDS
        # Imported only here, where it is used: the exporter's own gRPC and protobuf code
        # would cost every start of the CLI and the servers a fifth of a second.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = ReportingExporter(OTLPSpanExporter(timeout=timeout), endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        log.info("traces are not exported: set OTEL_EXPORTER_OTLP_ENDPOINT to export them")
    try:
        yield provider
    finally:
        await asyncio.to_thread(provider.shutdown)


class ReportingExporter(SpanExporter):
    """The OTLP exporter, saying once when the collector stops taking spans and once when it
    takes them again. Spans of batches that could not be sent are dropped (and counted in
    the warning): tracing never holds up or fails a call."""

    def __init__(self, exporter: SpanExporter, endpoint: str):
        self._exporter, self._endpoint = exporter, endpoint
        self._dropped = 0  # since the collector went away; 0 while it takes spans

    def export(self, spans) -> SpanExportResult:
        result = self._exporter.export(spans)
        if result is SpanExportResult.SUCCESS:
            if self._dropped:
                log.info(
                    "traces are exported to %s again (%d spans were dropped)",
                    self._endpoint,
                    self._dropped,
                )
                self._dropped = 0
        else:
            if not self._dropped:
                log.warning(
                    "traces cannot be exported to %s: dropping spans until it is back",
                    self._endpoint,
                )
            self._dropped += len(spans)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._exporter.shutdown()


def code_attribute(code: grpc.StatusCode) -> int:
    return code.value[0]


class ServerTracer(grpc.aio.ServerInterceptor):
    """A SERVER span for every RPC except those of `untraced` services (health probes and
    reflection: noise in every trace view), a child of the caller's span when the call
    carries one (W3C traceparent metadata). Outermost in the chain, so the span covers the
    other interceptors, and the log line and the metrics can read its trace id."""

    def __init__(
        self,
        provider: TracerProvider,
        untraced: frozenset[str] = frozenset(),
        shutting_down: asyncio.Event | None = None,
    ):
        self._tracer = provider.get_tracer(__name__)
        self._untraced = untraced
        self._shutting_down = shutting_down
        self._traced = OncePerMethod(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._traced(handler_call_details.method, handler)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        _, service, method = full_method.split("/")
        if service in self._untraced:
            return handler
        name = f"{service}/{method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def traced(behaviour: Behaviour, response_streaming: bool) -> Behaviour:
            async def unary(request_or_iterator, context):
                with SpanOfTheCall(self._tracer, name, attributes, context, self._shutting_down):
                    return await behaviour(request_or_iterator, context)

            async def stream(request_or_iterator, context):
                with SpanOfTheCall(self._tracer, name, attributes, context, self._shutting_down):
                    async with contextlib.aclosing(
                        behaviour(request_or_iterator, context)
                    ) as replies:
                        async for reply in replies:
                            yield reply

            return stream if response_streaming else unary

        return wrap_handler(handler, traced)


class SpanOfTheCall:
    """The SERVER span of one call, current while the `with` block runs and ended when it
    ends, however it ends; a child of the caller's span when the call's metadata carries
    one (W3C traceparent). Its status code is recorded at the end, and an exception only
    for a handler bug. A class rather than @contextlib.contextmanager around
    start_as_current_span: it runs on every call, sampled or not, and costs less so."""

    __slots__ = ("context", "shutting_down", "span", "token")

    def __init__(self, tracer, name: str, attributes: dict, context, shutting_down):
        self.context, self.shutting_down = context, shutting_down
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        if request_id := current_request_id():  # joins a trace, a log line, an entry
            attributes = {**attributes, "request_id": request_id}
        self.span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,  # recorded below, once, and only for real exceptions
            set_status_on_exception=False,
        )

    def __enter__(self) -> None:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        try:
            code = status_of(self.context, error, self.shutting_down)
            self.span.set_attribute("rpc.grpc.status_code", code_attribute(code))
            if code == grpc.StatusCode.UNKNOWN and isinstance(error, Exception):
                self.span.record_exception(error)  # a handler bug: one event, not two
            if code in SERVER_ERROR_CODES:
                self.span.set_status(Status(StatusCode.ERROR, code.name))
        finally:
            self.span.end()
            otel_context.detach(self.token)


class ClientTracer:
    """A CLIENT span for every outbound call, its context sent as W3C traceparent metadata,
    ended when the call ends, however it ends (a cancel included). `interceptors()` gives
    one per RPC kind; `flush()` waits for the spans of finished calls to be ended."""

    def __init__(self, provider: TracerProvider, target: str):
        self._tracer = provider.get_tracer(__name__)
        self._pending: set[asyncio.Task] = set()
        host, _, port = target.rpartition(":")  # "127.0.0.1:50051", "[::1]:50051"
        self._server: dict[str, str | int] = {"server.address": host.strip("[]") or target}
        if port.isdigit():
            self._server["server.port"] = int(port)
        if "," in target or target.startswith(("ipv4:", "ipv6:", "dns:")):
            # Several replicas behind one target (balancing.py): name the target itself.
            self._server = {"server.address": target}

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return for_every_rpc_kind(self.intercept)

    async def intercept(self, continuation, call_details, request):
        full_method = call_details.method
        full_method = full_method.decode() if isinstance(full_method, bytes) else full_method
        service, _, method = full_method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            f"{service}/{method}",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                **self._server,
            },
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(call_details.metadata or ()), *carrier.items())
        try:
            call = await continuation(call_details._replace(metadata=metadata), request)
        except BaseException:
            span.set_status(Status(StatusCode.ERROR, "the call could not start"))
            span.end()
            raise
        task = asyncio.create_task(self._end_when_done(call, span))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return call

    async def _end_when_done(self, call, span) -> None:
        code = await call.code()
        span.set_attribute("rpc.grpc.status_code", code_attribute(code))
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    async def flush(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)
