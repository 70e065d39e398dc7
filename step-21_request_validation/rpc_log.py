"""One log line per RPC, on the server and on the client: method, peer (or target), status
code, request id and duration. The server's line is written when the RPC ends: for a stream, when the
last reply is sent, the client cancels it, or the handler fails.
"""

import asyncio
import contextlib
import logging
import threading
import time
from typing import TextIO

import grpc

from caller import calling_service, current_user_id
from interceptors import (
    Behaviour,
    OncePerMethod,
    current_trace_id,
    for_every_rpc_kind,
    status_of,
    wrap_handler,
)
from propagation import REQUEST_ID_KEY, current_request_id

server_log = logging.getLogger("greeter.rpc")
client_log = logging.getLogger("greeter.client")

# Codes that mean "the server failed", as opposed to "the caller asked for something wrong":
# those are logged as warnings, so they stand out.
SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}

# Health calls that went as they should: a load balancer, a Kubernetes probe or a client
# watching (step 12) makes them all day long, and a line for each would drown the lines that
# matter. From step 08 on, metrics count them; only their failures are logged here.
ROUTINE = {
    "/grpc.health.v1.Health/Check": {grpc.StatusCode.OK},
    "/grpc.health.v1.Health/Watch": {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED},
}


def log_rpc(
    log: logging.Logger,
    method: str,
    peer: str,
    code: grpc.StatusCode,
    started: float,
    error: BaseException | None = None,
    user: str | None = None,
    client: str | None = None,
    request_id: str | None = None,
) -> None:
    """Write the RPC's line. On the server, `client` is the calling service named by its
    certificate and `user` the authenticated user ("-" when there is none); the client's
    own lines leave both out. `request_id`: the call's x-request-id, the same in the line of
    every service the request went through."""
    duration_ms = (time.monotonic() - started) * 1000
    # A handler bug: keep its traceback in the server's log (the client never sees it).
    traceback_of = error if error is not None and code == grpc.StatusCode.UNKNOWN else None
    trace_id = current_trace_id()  # from a log line to its trace, in one search
    log.log(
        logging.WARNING if code in SERVER_FAULTS else logging.INFO,
        "%s code=%s peer=%s%s%s%s duration=%.1fms%s",
        method,
        code.name,
        peer,
        "" if client is None else f" client={client}",
        "" if user is None else f" user={user}",
        "" if request_id is None else f" request_id={request_id}",
        duration_ms,
        "" if trace_id is None else f" trace_id={trace_id}",
        # Structured fields for log processors (and for the tests).
        extra={
            "rpc_method": method,
            "rpc_peer": peer,
            "rpc_client": client,
            "rpc_user": user,
            "rpc_request_id": request_id,
            "rpc_code": code.name,
            "rpc_duration_ms": duration_ms,
            "rpc_trace_id": trace_id,
        },
        exc_info=traceback_of,
    )


class ServerRpcLogger(grpc.aio.ServerInterceptor):
    """One log line per RPC, written when the RPC ends: for a stream, when the last reply is
    sent, the client cancels it, or the handler fails. `shutting_down` is set when the server
    begins to stop: a call cancelled after that was cut by the server, and its client was
    told UNAVAILABLE, so the line says so."""

    def __init__(
        self, shutting_down: asyncio.Event | None = None, log: logging.Logger = server_log
    ):
        self._shutting_down = shutting_down or asyncio.Event()
        self._log = log  # the service's: greeter.rpc, logger.rpc
        self._logged = OncePerMethod(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        return self._logged(handler_call_details.method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_handler(
            handler,
            lambda behaviour, streaming: logged(
                method, behaviour, streaming, self._shutting_down, self._log
            ),
        )


def logged(
    method: str,
    behaviour: Behaviour,
    response_streaming: bool,
    shutting_down: asyncio.Event,
    log: logging.Logger,
) -> Behaviour:
    """`behaviour`, logging its RPC when it ends, whatever kind it is."""

    async def unary(request, context):
        with LineWhenDone(log, method, context, shutting_down):
            return await behaviour(request, context)

    async def stream(request_or_iterator, context):
        with LineWhenDone(log, method, context, shutting_down):
            async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                async for reply in replies:
                    yield reply

    return stream if response_streaming else unary


class LineWhenDone:
    """Writes the server's line of one RPC when the `with` block ends, however it ends
    (CancelledError and GeneratorExit too: the call ended). The peer and its certificate are
    read up front: once a call has ended, grpc.aio forgets them. A class rather than @contextlib.contextmanager:
    it runs on every call, and a generator-based one costs more."""

    __slots__ = ("context", "log", "method", "peer", "service", "shutting_down", "started")

    def __init__(self, log: logging.Logger, method: str, context, shutting_down: asyncio.Event):
        self.log, self.method, self.context = log, method, context
        self.shutting_down = shutting_down
        self.started, self.peer = time.monotonic(), context.peer()
        self.service = calling_service(context)

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        code = status_of(self.context, error, self.shutting_down)
        if code in ROUTINE.get(self.method, ()):
            return
        log_rpc(
            self.log,
            self.method,
            self.peer,
            code,
            self.started,
            error,
            user=current_user_id() or "-",
            client=self.service or "-",
            request_id=current_request_id(),
        )


class BatchedStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes its lines in batches instead of one write() per line.

    A server writes a line for every RPC, and a write to a pipe (as under Docker or
    systemd) costs more than formatting the line (bench/README.md). Here a line is written
    at most `flush_seconds` after it was logged, a WARNING or worse at once, and what is
    left when the program exits (logging.shutdown flushes every handler). Only a process
    killed outright (SIGKILL) loses its last INFO lines: at most `flush_seconds` of them.
    """

    def __init__(self, stream: TextIO, flush_seconds: float = 0.2):
        # A buffer of our own over the stream's file: Python flushes stderr at every line.
        buffered = open(
            stream.fileno(),
            "w",
            buffering=64 * 1024,
            encoding=stream.encoding,
            errors=stream.errors,
            closefd=False,
        )
        super().__init__(buffered)
        self._closed = threading.Event()
        threading.Thread(
            target=self._flush_every, args=(flush_seconds,), name="log-flush", daemon=True
        ).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()

    def close(self) -> None:
        self.flush()
        self._closed.set()
        super().close()

    def _flush_every(self, seconds: float) -> None:
        # A timer, not synchronisation: no line waits longer than this to be written.
        while not self._closed.wait(seconds):
            self.flush()  # takes the handler's lock, as emit() does


class ClientRpcLogger:
    """One log line per outbound call, written when the call ends.

    grpc.aio picks client interceptors by RPC kind: an object is used only for the kinds whose
    interceptor class it subclasses, and one class subclassing all four is used for unary-unary
    calls only. So `interceptors()` gives one instance per kind (`for_every_rpc_kind`), all
    sharing this logger.
    The line is written by a small task that waits for the call's status; `flush()` waits
    for those, so a short-lived program loses no line at exit.
    """

    def __init__(self, target: str):
        self.target = target
        self._pending: set[asyncio.Task] = set()

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return for_every_rpc_kind(self.intercept)

    async def intercept(self, continuation, call_details, request):
        started = time.monotonic()
        call = await continuation(call_details, request)
        method = call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        task = asyncio.create_task(self._log_when_done(call, method, started))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return call

    async def _log_when_done(self, call, method: str, started: float) -> None:
        code = await call.code()
        # The server's request id for the call (propagation.py), to find its lines.
        request_id = dict(await call.trailing_metadata() or ()).get(REQUEST_ID_KEY)
        log_rpc(client_log, method, self.target, code, started, request_id=request_id)

    async def flush(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)
