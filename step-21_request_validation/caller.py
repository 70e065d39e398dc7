"""Who is calling the RPC being served, for handlers and the log line.

Two answers: the *user*, from the x-user-id metadata, which the auth interceptor stores once
it has checked the token; and the calling *service*, from its client certificate when the
server requires mutual TLS.

grpc.aio runs a call's interceptors and its handler in one contextvars.Context, of that
call alone, so the user id is the caller of *this* RPC, never of a concurrent one.
"""

from contextvars import ContextVar

import grpc

_user_id: ContextVar[str | None] = ContextVar("user_id", default=None)


def current_user_id() -> str | None:
    """The authenticated user id of the current RPC; None before (or without) authentication."""
    return _user_id.get()


def set_user_id(user_id: str) -> None:
    _user_id.set(user_id)


def calling_service(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the client's certificate (mutual TLS), or None without one. The
    TLS handshake already verified it against the client CA."""
    names = list(context.auth_context().get("x509_common_name", ()))
    return names[0].decode() if names else None


def user_subject(context: grpc.aio.ServicerContext) -> str | None:
    """Whose quota a Greeter call takes (ratelimit.py): its user's."""
    user_id = current_user_id()
    return None if user_id is None else f"user {user_id}"


def service_subject(context: grpc.aio.ServicerContext) -> str:
    """Whose quota a Logger call takes: its calling service's. Callers without a client
    certificate (no mutual TLS) cannot be told apart: they share one quota."""
    return f"service {calling_service(context) or 'without a client certificate'}"
