"""Who is calling the RPC being served, for handlers and the log line.

The auth interceptor sets it once it has checked the caller's credentials. grpc.aio runs a
call's interceptors and its handler in one contextvars.Context, of that call alone, so the
value is the caller of *this* RPC, never of a concurrent one.
"""

from contextvars import ContextVar

_user_id: ContextVar[str | None] = ContextVar("user_id", default=None)


def current_user_id() -> str | None:
    """The authenticated user id of the current RPC; None before (or without) authentication."""
    return _user_id.get()


def set_user_id(user_id: str) -> None:
    _user_id.set(user_id)
