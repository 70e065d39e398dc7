"""Generic helpers for interceptors, for any RPC kind: wrap a server handler (once per
method), give a client interceptor for every kind, tell the status a finished call ended
with.

grpc.aio hands a server interceptor a handler of one of four kinds (unary or streaming
request, unary or streaming reply), and picks client interceptors by kind. Feature modules
(rpc_log.py, auth.py, ...) use these helpers, so none of them repeats the four cases.
"""

import asyncio
from collections.abc import Callable

import grpc

Behaviour = Callable  # a handler function: (request or request iterator, context) -> reply(s)


def wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour replaced by `wrap(behaviour, response_streaming)`,
    whatever kind of RPC it serves. Server interceptors use this to run code around a call."""
    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make_handler, behaviour = kinds[handler.request_streaming, handler.response_streaming]
    return make_handler(
        wrap(behaviour, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
