"""Generic helpers for interceptors, for any RPC kind: wrap a server handler (once per
method), give a client interceptor for every kind, tell the status a finished call ended
with, and the trace the call belongs to.

grpc.aio hands a server interceptor a handler of one of four kinds (unary or streaming
request, unary or streaming reply), and picks client interceptors by kind. Feature modules
(rpc_log.py, auth.py, ...) use these helpers, so none of them repeats the four cases.
"""

import asyncio
import contextlib
import inspect
from collections.abc import Callable

import grpc
from opentelemetry import trace

Behaviour = Callable  # a handler function: (request or request iterator, context) -> reply(s)


def wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour replaced by `wrap(behaviour, response_streaming)`,
    whatever kind of RPC it serves. Server interceptors use this to run code around a call.
    A streaming behaviour is always an async generator here, however its handler writes."""
    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make_handler, behaviour = kinds[handler.request_streaming, handler.response_streaming]
    assert behaviour is not None  # grpc sets the behaviour of the handler's own kind
    if handler.response_streaming:
        behaviour = yielded(behaviour)
    return make_handler(
        wrap(behaviour, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def yielded(behaviour: Behaviour) -> Behaviour:
    """A streaming behaviour as an async generator of its replies.

    grpc.aio lets a streaming handler yield its replies or write them with
    `await context.write(reply)` and return. Ours yield; grpcio-health-checking's Watch (step
    07) and many a third-party servicer write. A writer runs in a task of its own here, with a
    context whose `write` hands the reply to this generator and returns once it has been
    sent on, as grpc.aio's does. Its exception, or its abort, ends the generator; closing the
    generator (the call cancelled, its deadline, the server's stop) cancels the writer."""
    if inspect.isasyncgenfunction(behaviour):
        return behaviour

    async def replies(request_or_iterator, context):
        writes = WritesYielded(context)
        writer = asyncio.ensure_future(behaviour(request_or_iterator, writes))
        writer.add_done_callback(writes.end)
        try:
            while (reply := await writes.next_reply()) is not WritesYielded.END:
                yield reply
                writes.sent()
            await writer  # its exception, if any, is the call's
        finally:
            if not writer.done():
                writer.cancel()
                await asyncio.wait({writer})  # its cleanup (finally blocks) runs now
            if not writer.cancelled():
                writer.exception()  # retrieved: asyncio would log it as never retrieved

    return replies


class WritesYielded:
    """The context a writing handler is given by `yielded`: the call's own, but `write`
    hands each reply over instead of sending it."""

    END = object()  # after the last reply: the handler has returned or raised

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._replies: asyncio.Queue = asyncio.Queue()

    def __getattr__(self, name: str):
        return getattr(self._context, name)  # abort, invocation_metadata, read, ...

    async def write(self, reply) -> None:
        self._replies.put_nowait(reply)
        await self._replies.join()  # until the reply has been sent on (sent)

    async def next_reply(self):
        return await self._replies.get()

    def sent(self) -> None:
        self._replies.task_done()

    def end(self, writer: asyncio.Future) -> None:
        self._replies.put_nowait(self.END)


class OncePerMethod:
    """Server interceptors' wrapped handlers, made once per method rather than on every call.

    grpc.aio asks the interceptors for a handler on every call, and the handler an
    interceptor is given for a method is the same object every time. Wrapping it anew (a new
    handler, new closures) would be the same work, repeated on every call, so the wrapped
    handler is kept for as long as the handler it wraps is the one given.
    `wrap(method, handler)` makes it: for example, a `wrap_handler` with the method's name.
    """

    def __init__(self, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def __call__(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(method, handler))
        return known[1]


class StreamsEndInTheirTask(grpc.aio.ServerInterceptor):
    """Ends every streaming call in its own task, at once, however it ends (the client's
    cancel, a deadline, the server's shutdown). The first interceptor.

    grpc.aio iterates a generator handler itself. A cancel that reaches the call while
    grpc.aio is sending a reply leaves the generator (and every interceptor's generator
    around it) paused at its `yield`, and Python closes it later, from another task: the
    log line comes late, or not before the server exits, and code that must end where it
    began (a tracing context) fails. Here a coroutine writes the replies (`context.write`);
    the cancel always reaches it, and it closes the generators there and then, each
    interceptor's closing the one it wraps (`contextlib.aclosing`)."""

    def __init__(self) -> None:
        self._wrapped = OncePerMethod(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        return self._wrapped(handler_call_details.method, handler)

    @staticmethod
    def _wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_handler(handler, lambda behaviour, streaming: written(behaviour))


def written(behaviour: Behaviour) -> Behaviour:
    """A generator behaviour as a coroutine that writes each reply (StreamsEndInTheirTask)."""

    async def write_replies(request_or_iterator, context) -> None:
        # However the call ends, the generators are closed here, in its task; each
        # interceptor's closes the one it wraps (contextlib.aclosing).
        async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
            async for reply in replies:
                await context.write(reply)

    return write_replies


# A client cancels its call when the call's deadline passes, and that cancel may reach the
# server a moment before the server's own timer for the same deadline fires: a call
# cancelled this close to its deadline ended by its deadline.
DEADLINE_CANCEL_SECONDS = 0.1


def status_of(
    context: grpc.aio.ServicerContext,
    error: BaseException | None,
    shutting_down: asyncio.Event | None = None,
) -> grpc.StatusCode:
    """The status an RPC ended with, as far as the server can know it. `shutting_down`, set
    once the server has begun to stop: a call cancelled after that was cut by the server,
    and its client was told UNAVAILABLE."""
    code = context.code()  # set by context.abort() or context.set_code()
    if code is not None:
        return code
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # grpc.aio cancels the handler when the client goes away, or when the grace ends.
        if remaining is not None and remaining < DEADLINE_CANCEL_SECONDS:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        if shutting_down is not None and shutting_down.is_set():
            return grpc.StatusCode.UNAVAILABLE
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def for_every_rpc_kind(intercept: Callable) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors, one per RPC kind, that all run
    `await intercept(continuation, client_call_details, request_or_iterator)`."""
    return [
        _UnaryUnary(intercept),
        _UnaryStream(intercept),
        _StreamUnary(intercept),
        _StreamStream(intercept),
    ]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, intercept: Callable):
        self.intercept = intercept

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self.intercept(continuation, client_call_details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, intercept: Callable):
        self.intercept = intercept

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self.intercept(continuation, client_call_details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, intercept: Callable):
        self.intercept = intercept

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self.intercept(continuation, client_call_details, request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, intercept: Callable):
        self.intercept = intercept

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self.intercept(continuation, client_call_details, request_iterator)


def current_trace_id() -> str | None:
    """The id of the trace of the span being run (tracing.py's, around the call), as hex;
    None outside a sampled span."""
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    return trace.format_trace_id(context.trace_id)
