"""A real OTLP/gRPC trace receiver for the tour and the tests: opentelemetry-proto's
TraceService on a gRPC server of its own (own threads, so an exporter that blocks can never
deadlock it), keeping every span it is sent.

    with OtlpReceiver() as receiver:        # receiver.endpoint: http://127.0.0.1:PORT
        ... run servers with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint ...
        receiver.spans                      # [ReceivedSpan, ...], in arrival order
        print(receiver.tree(trace_id))

    python tools/otlp_receiver.py [--port 4317]   # for a learner: prints each trace, until Ctrl-C

Run by hand, it prints every finished trace as a tree, a trace being finished once its root
span has arrived and nothing of it came for QUIET_SECONDS: each process exports its spans in
batches, at most 5 s apart (the SDK's OTEL_BSP_SCHEDULE_DELAY), so the tree is whole.
"""

import argparse
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.processes import ToolError, require_free_port, run_tool

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
        self._arrived: dict[str, float] = {}  # trace id: when its latest span arrived
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        try:
            port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc's "Failed to bind": the only reason on loopback
            raise ToolError(f"cannot listen on {host}:{port}: the port is in use") from None
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
            for span in received:
                self._arrived[span.trace_id] = time.monotonic()
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

    def finished_traces(self, quiet: float) -> list[str]:
        """The traces whose root span arrived and of which nothing came for `quiet` seconds;
        each is given once."""
        now = time.monotonic()
        with self._lock:
            roots = {s.trace_id for s in self._spans if not s.parent_span_id}
            finished = [
                trace_id
                for trace_id, arrived in self._arrived.items()
                if trace_id in roots and now - arrived >= quiet
            ]
            for trace_id in finished:
                del self._arrived[trace_id]  # a span that comes later makes it new again
        return finished

    def stop(self) -> None:
        self._server.stop(None)

    def __enter__(self) -> "OtlpReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


QUIET_SECONDS = 6.0  # longer than the SDK's 5 s between two exports of one process


def print_traces(receiver: OtlpReceiver, stopped: threading.Event, quiet: float) -> None:
    """Print each trace once it is finished (see the module's docstring), until `stopped`."""
    printed: set[str] = set()
    while not stopped.wait(0.2):  # polling the receiver, not waiting for time to pass
        for trace_id in receiver.finished_traces(quiet):
            spans = sum(1 for s in receiver.spans if s.trace_id == trace_id)
            again = "again, with what came later: " if trace_id in printed else ""
            printed.add(trace_id)
            print(
                f"{again}trace {trace_id} ({spans} spans)\n{receiver.tree(trace_id)}\n", flush=True
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An OTLP/gRPC trace receiver that prints traces.")
    parser.add_argument("--port", type=int, default=4317, help="OTLP/gRPC's usual port")
    parser.add_argument("--quiet", type=float, default=QUIET_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_free_port(args.port, "trace receiver")
    stopped = threading.Event()
    with OtlpReceiver(port=args.port) as receiver:
        print(
            f"traces on {receiver.endpoint}: start the servers with "
            f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.endpoint}; each trace is printed "
            f"{args.quiet:.0f} s after its last span; Ctrl-C stops it",
            flush=True,
        )
        try:
            print_traces(receiver, stopped, args.quiet)
        finally:
            stopped.set()
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
