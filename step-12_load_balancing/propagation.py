"""What a call carries on to the calls it makes: the caller's identity (x-user-id) and the
request id (x-request-id).

On the way in, `ServerRequestIds` (first in every server's chain) takes the caller's
x-request-id when it is well-formed and makes a new one otherwise, keeps it in a context
variable for the handler, the log line and the span, and sends it back to the caller in the
response's initial metadata. The user id is the one the auth interceptor checked
(caller.py).

On the way out, `propagating_interceptors()` adds both to every outbound call, for every RPC
kind: no call site adds them by hand, so none can forget or forge them. grpc.aio runs each
call in a context of its own, so concurrent calls never see each other's values.
"""

import contextlib
import re
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


def current_request_id() -> str | None:
    """The request id of the RPC being served; None outside one."""
    return _request_id.get()


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
    in the initial metadata, before any reply and before a rejection, with the server's fixed
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

        def wrap(behaviour, response_streaming: bool):
            async def unary(request_or_iterator, context):
                await context.send_initial_metadata(answer)
                return await behaviour(request_or_iterator, context)

            async def stream(request_or_iterator, context):
                await context.send_initial_metadata(answer)
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                    async for reply in replies:
                        yield reply

            return stream if response_streaming else unary

        return wrap_handler(handler, wrap)


async def _propagate(continuation, client_call_details, request_or_iterator):
    carried = [
        (key, value)
        for key, value in ((USER_ID_KEY, current_user_id()), (REQUEST_ID_KEY, current_request_id()))
        if value is not None
    ]
    metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carried)
    return await continuation(client_call_details._replace(metadata=metadata), request_or_iterator)


def propagating_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that pass the current RPC's user id and request id on to every
    call made while serving it."""
    return for_every_rpc_kind(_propagate)
