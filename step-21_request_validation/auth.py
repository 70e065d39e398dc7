"""Metadata authentication: every RPC carries `authorization: Bearer <token>` and `x-user-id`.

The server checks both in an interceptor, before any handler runs, for every RPC kind; the
client adds them in an interceptor, so no call site can forget them. Work the server does for
callers without credentials has a small budget of its own, so they can never use up what
authenticated callers need. See the README for the trust model.
"""

import contextlib
import hmac
from collections.abc import Iterator

import grpc

from caller import set_user_id
from drain import until_the_client_stops_sending
from interceptors import for_every_rpc_kind, wrap_handler

TOKEN_VARIABLE = "GREETER_AUTH_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_USER_ID_LENGTH = 64
# Before rejecting a client-streaming call, the server reads what the client is still
# sending (see `rejecting_handler`), within the bounds of drain.py (step 03):
# an unauthenticated caller gets no more of the server than that.
# At most this many such drains at once: beyond it a call is rejected at once, and a
# misbehaving client may then see INTERNAL instead of UNAUTHENTICATED (grpc/grpc#36066).
MAX_DRAINING_REJECTIONS = 32
# Calls to the exempt services need no token (probes and tools carry none). A health Watch or
# a reflection stream stays open as long as its client likes, so together they get this many
# at once; beyond it RESOURCE_EXHAUSTED at once. A health Check is one reply: not limited.
# Size it to the number of client channels that watch health (client-side health checking).
MAX_PUBLIC_STREAMS = 64


def unsendable_token_problem(token: str, variable: str = TOKEN_VARIABLE) -> str | None:
    """Why no client can send `token` (read from `variable`) in a header; None when it can.
    gRPC metadata is ASCII, and `Bearer <token>` is one word after the scheme."""
    if not token.strip():
        return f"{variable} is blank"
    if token != token.strip():
        return (
            f"{variable} starts or ends with whitespace (a secret file often ends with a "
            "newline): remove it"
        )
    if any(character.isspace() for character in token):
        return f"{variable} contains whitespace: a token is a single word"
    if not all("!" <= character <= "~" for character in token):
        return f"{variable} contains a character that is not printable ASCII"
    return None


def token_problem(token: str | None, variable: str = TOKEN_VARIABLE) -> str | None:
    """Why `token` (read from `variable`) cannot be a server's secret; None when it can."""
    if not token:
        return f"no auth token configured: set {variable}"
    if problem := unsendable_token_problem(token, variable):
        return problem
    if len(token) < MIN_TOKEN_LENGTH:
        return f"{variable} is too short: use at least {MIN_TOKEN_LENGTH} characters"
    return None


def user_id_problem(user_id: str) -> str | None:
    """Why `user_id` cannot be an x-user-id; None when it can."""
    printable_ascii = all(" " <= character <= "~" for character in user_id)
    if not user_id.strip() or len(user_id) > MAX_USER_ID_LENGTH or not printable_ascii:
        return f"invalid x-user-id: 1 to {MAX_USER_ID_LENGTH} printable ASCII characters"
    return None


class Budget:
    """At most `limit` pieces of some work at once; beyond it, the work is refused at once
    (never queued), so whoever fills this budget cannot take anything else."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """Yields True with a slot held for the block, or False when none is free."""
        if self.in_use >= self.limit:
            yield False
            return
        self.in_use += 1
        try:
            yield True
        finally:
            self.in_use -= 1


class Rejected(Exception):
    """Authentication failed; the message is safe to send (it never contains a token)."""


def metadata_value(metadata, key: str, how_to_send: str = "") -> str:
    values = [value for name, value in metadata or () if name == key]
    if not values:
        raise Rejected(f"missing {key} metadata{how_to_send}")
    if len(values) > 1:
        raise Rejected(f"{key} metadata must be sent once, not {len(values)} times")
    return values[0]


def authenticate(metadata, expected_token: bytes) -> str:
    """The user id of a caller whose metadata holds the right token; raises Rejected."""
    authorization = metadata_value(
        metadata, "authorization", ": send 'authorization: Bearer <token>'"
    )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Rejected("malformed authorization metadata: expected 'Bearer <token>'")
    # compare_digest takes as long for a wrong first byte as for a wrong last one, so the
    # response time tells an attacker nothing about how much of a guess was right.
    if not hmac.compare_digest(token.encode(), expected_token):
        raise Rejected("invalid token")
    user_id = metadata_value(metadata, "x-user-id")
    if problem := user_id_problem(user_id):
        raise Rejected(problem)
    return user_id


class ServerAuthenticator(grpc.aio.ServerInterceptor):
    """Rejects every RPC without the right bearer token and a user id: UNAUTHENTICATED,
    except calls to the `exempt` services (full names, such as grpc.health.v1.Health)."""

    def __init__(self, token: str, exempt: frozenset[str] = frozenset()):
        if problem := token_problem(token):
            raise ValueError(problem)
        self._token = token.encode()
        self._exempt = exempt
        self._draining = Budget(MAX_DRAINING_REJECTIONS)
        self._public_streams = Budget(MAX_PUBLIC_STREAMS)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without auth
        service = handler_call_details.method.split("/")[1]  # "/greeter.v1.Greeter/SayHello"
        if service in self._exempt:
            if handler.request_streaming or handler.response_streaming:
                return budgeted(handler, self._public_streams)
            return handler
        try:
            user_id = authenticate(handler_call_details.invocation_metadata, self._token)
        except Rejected as rejection:
            return rejecting_handler(handler, str(rejection), self._draining)
        set_user_id(user_id)  # for the handler and the log line (caller.py)
        return handler


def rejecting_handler(
    handler: grpc.RpcMethodHandler, message: str, draining: Budget
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the RPC with UNAUTHENTICATED."""

    async def reject(request_or_iterator, context):
        if handler.request_streaming:
            # grpc/grpc#36066: when the server ends a call while the client is still writing,
            # the grpc.aio client may report INTERNAL (or fail its write) instead of our
            # status. So a client-streaming call is rejected only once the client has stopped
            # writing (it half-closed, or paused to wait for a reply), if the budget for such
            # waits has room; under a flood of them, at once.
            with draining.slot() as granted:
                if granted:
                    await until_the_client_stops_sending(request_or_iterator)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def reject_stream(request_or_iterator, context):
        await reject(request_or_iterator, context)
        yield  # never reached; makes this an async generator, as streaming handlers are

    return wrap_handler(handler, lambda _, streaming: reject_stream if streaming else reject)


def budgeted(handler: grpc.RpcMethodHandler, budget: Budget) -> grpc.RpcMethodHandler:
    """`handler`, run only while `budget` has room: RESOURCE_EXHAUSTED at once otherwise."""
    refusal = "too many open streams without credentials (health Watch, reflection); try later"

    def wrap(behaviour, response_streaming: bool):
        async def unary(request_or_iterator, context):
            with budget.slot() as granted:
                if not granted:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                return await behaviour(request_or_iterator, context)

        async def stream(request_or_iterator, context):
            with budget.slot() as granted:
                if not granted:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                    async for reply in replies:
                        yield reply

        return stream if response_streaming else unary

    return wrap_handler(handler, wrap)


def client_auth_interceptors(
    token: str | None, user_id: str | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the caller's credentials to every call: the token and,
    when given, a fixed user id (a service passes on its caller's instead: propagation.py)."""
    credentials = [] if user_id is None else [("x-user-id", user_id)]
    if token:
        credentials.insert(0, ("authorization", f"Bearer {token}"))

    async def add_credentials(continuation, client_call_details, request):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *credentials)
        return await continuation(client_call_details._replace(metadata=metadata), request)

    return for_every_rpc_kind(add_credentials)
