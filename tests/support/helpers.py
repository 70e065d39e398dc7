"""Small helpers shared by every step's tests (imported from each step's tests/)."""

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Wait until `condition()` is true, polling; fail the test after `timeout` seconds.

    This is how tests synchronise with another process or task: on a condition, never on a
    fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def wait_until(condition: Callable[[], bool], *, timeout: float = 5.0, message: str = "condition"):
    """`eventually` for tests that are not async: poll `condition()` until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """An address on loopback where nothing listens: the port stays bound (so nobody else
    takes it) but never accepts, so connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def silent_port() -> Iterator[str]:
    """An address on loopback that accepts TCP connections but never answers: a stuck
    server. Only a deadline gets a client out of a call to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def require_binary(name: str, install_hint: str) -> str:
    """Path of system binary `name`. Without it the test skips, saying how to install it;
    with CI=true a missing binary fails the test, since CI must run every test."""
    path = shutil.which(name)
    if path is None:
        message = f"needs `{name}`: {install_hint}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextlib.contextmanager
def stalling_the_event_loop(*, every: float, for_seconds: float) -> Iterator[None]:
    """Block the running event loop for `for_seconds` after each `every` seconds it runs, as
    a busy machine does to a process it does not schedule (a real stall: nothing of the
    process's asyncio code runs, timers fall due meanwhile)."""
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None

    def stall() -> None:
        nonlocal handle
        time.sleep(for_seconds)
        handle = loop.call_later(every, stall)

    handle = loop.call_later(every, stall)
    try:
        yield
    finally:
        handle.cancel()
