"""What a call carries on to the calls it makes: the caller's identity (x-user-id), the
request id (x-request-id), and what is left of its deadline.

On the way in, `ServerRequestIds` (first in every server's chain) takes the caller's
x-request-id when it is well-formed and makes a new one otherwise, keeps it in a context
variable for the handler, the log line and the span, and sends it back to the caller in the
response's trailing metadata. The user id is the one the auth interceptor checked
(caller.py).

On the way out, `propagating_interceptors()` adds both to every outbound call, for every RPC
kind, and gives the call no more time than the caller has left, minus a margin for the
server's own work: no call site adds them by hand, so none can forget or forge them. grpc.aio runs each
call in a context of its own, so concurrent calls never see each other's values.
"""

import contextlib
import re
import time
import uuid
from contextvars import ContextVar

import grpc

from caller import current_user_id
from interceptors import for_every_rpc_kind, wrap_handler

REQUEST_ID_KEY = "x-request-id"
USER_ID_KEY = "x-user-id"
# What a request id from a caller may look like: a UUID, a ULID, a trace-style hex id. Anything
# else (too long, spaces, control characters) is replaced, never passed on into our logs.
MAX_REQUEST_ID_LENGTH = 64
WELL_FORMED_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# When the call being served must be answered (time.monotonic()); None: its caller set no
# deadline.
_deadline: ContextVar[float | None] = ContextVar("deadline", default=None)
# Outbound calls never get less than this, so that one with no time left fails at once with
# DEADLINE_EXCEEDED rather than being sent without a deadline.
MIN_TIMEOUT_SECONDS = 0.001


def current_request_id() -> str | None:
    """The request id of the RPC being served; None outside one."""
    return _request_id.get()


def seconds_left() -> float | None:
    """What is left of the deadline of the call being served; None without one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(metadata) -> str:
    """The caller's x-request-id when it sent exactly one well-formed id; a new one otherwise."""
    sent = [value for key, value in metadata or () if key == REQUEST_ID_KEY]
    if len(sent) == 1 and WELL_FORMED_REQUEST_ID.fullmatch(sent[0]):
        return sent[0]
    return new_request_id()


class ServerRequestIds(grpc.aio.ServerInterceptor):
    """Gives every RPC a request id (the caller's, or a new one) and returns it to the caller
    in the trailing metadata, also with a rejection, with the server's fixed
    `response_headers` (x-served-by: serving.build_server sets it once the port is bound)."""

    def __init__(self) -> None:
        self.response_headers: tuple[tuple[str, str], ...] = ()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        request_id = request_id_of(handler_call_details.invocation_metadata)
        # Seen by the rest of the chain and the handler: they run in this call's context.
        _request_id.set(request_id)
        answer = ((REQUEST_ID_KEY, request_id), *self.response_headers)

        def remember_the_deadline(context) -> None:
            remaining = context.time_remaining()
            if remaining is not None:
                _deadline.set(time.monotonic() + remaining)

        # In the trailing metadata, which goes out with the status, never ahead of it: a call
        # that fails before its first reply is then a "trailers-only" response, which the
        # client may retry. Headers sent early would commit it (gRFC A6). An abort keeps them.
        def wrap(behaviour, response_streaming: bool):
            async def unary(request_or_iterator, context):
                remember_the_deadline(context)
                context.set_trailing_metadata(answer)
                return await behaviour(request_or_iterator, context)

            async def stream(request_or_iterator, context):
                remember_the_deadline(context)
                context.set_trailing_metadata(answer)
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                    async for reply in replies:
                        yield reply

            return stream if response_streaming else unary

        return wrap_handler(handler, wrap)


def propagating_interceptors(margin: float) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that pass the current RPC's user id and request id on to every
    call made while serving it, and cap its timeout at what is left of the current RPC's
    deadline minus `margin` seconds."""

    async def propagate(continuation, client_call_details, request_or_iterator):
        carried = [
            (key, value)
            for key, value in (
                (USER_ID_KEY, current_user_id()),
                (REQUEST_ID_KEY, current_request_id()),
            )
            if value is not None
        ]
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carried)
        timeout = client_call_details.timeout
        if (left := seconds_left()) is not None:
            budget = max(left - margin, MIN_TIMEOUT_SECONDS)
            timeout = budget if timeout is None else min(timeout, budget)
        details = client_call_details._replace(metadata=metadata, timeout=timeout)
        return await continuation(details, request_or_iterator)

    return for_every_rpc_kind(propagate)


def request_id_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For a client that starts requests (client.py): a new x-request-id on every call, so
    that gRPC's retries of a call carry the same one, and the server sees them as one."""

    async def add_request_id(continuation, client_call_details, request_or_iterator):
        metadata = grpc.aio.Metadata(
            *(client_call_details.metadata or ()), (REQUEST_ID_KEY, new_request_id())
        )
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request_or_iterator)

    return for_every_rpc_kind(add_request_id)
