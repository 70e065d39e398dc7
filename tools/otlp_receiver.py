"""A real OTLP/gRPC trace receiver for the tour and the tests: opentelemetry-proto's
TraceService on a gRPC server of its own (own threads, so an exporter that blocks can never
deadlock it), keeping every span it is sent.

    with OtlpReceiver() as receiver:        # receiver.endpoint: http://127.0.0.1:PORT
        ... run servers with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint ...
        receiver.spans                      # [ReceivedSpan, ...], in arrival order
        print(receiver.tree(trace_id))
"""

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUSES = {0: "UNSET", 1: "OK", 2: "ERROR"}


def attribute_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    kind: str  # SERVER, CLIENT, ...
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict = field(hash=False)
    status: str  # UNSET, OK, ERROR
    status_message: str
    events: tuple[str, ...]  # event names, e.g. ("exception",)
    duration_ms: float


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{port}"
        self._server.start()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: attribute_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: attribute_value(a.value) for a in span.attributes},
                            status=STATUSES.get(span.status.code, str(span.status.code)),
                            status_message=span.status.message,
                            events=tuple(event.name for event in span.events),
                            duration_ms=(span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                        )
                    )
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def tree(self, trace_id: str) -> str:
        """The spans of one trace as an indented tree: service, span, duration, status."""
        spans = [s for s in self.spans if s.trace_id == trace_id]
        ids = {s.span_id for s in spans}
        lines: list[str] = []

        def add(span: ReceivedSpan, depth: int) -> None:
            code = span.attributes.get("rpc.grpc.status_code")
            lines.append(
                f"{'  ' * depth}{span.service}: {span.kind} {span.name} "
                f"{span.duration_ms:.1f}ms status={span.status}"
                + ("" if code is None else f" rpc.grpc.status_code={code}")
            )
            for child in spans:
                if child.parent_span_id == span.span_id:
                    add(child, depth + 1)

        for root in (s for s in spans if s.parent_span_id not in ids):
            add(root, 0)
        return "\n".join(lines)

    def stop(self) -> None:
        self._server.stop(None)

    def __enter__(self) -> "OtlpReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
