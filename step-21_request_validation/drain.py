"""Ending a call whose client streams, without grpc/grpc#36066.

When the server ends a call while the client is still writing, the grpc.aio client may
report INTERNAL (or fail its write) instead of the server's status. So before refusing a
client stream, the server reads and drops what the client still sends, until it
half-closes or goes quiet to wait for the answer, within the bounds below: a client that
never stops is refused all the same. Step 03's README, "How it works".
"""

import asyncio
import contextlib
from typing import NoReturn

import grpc

QUIET_SECONDS = 0.2  # no message for this long: the client is waiting for us
# The quiet is counted in ticks of this length, each a wake-up of this process: one that was
# stalled (busy, or not scheduled) longer than the quiet has still run only one tick, and
# the message its client sent meanwhile is read in the next.
QUIET_TICK_SECONDS = 0.05
MAX_DRAIN_SECONDS = 2.0
MAX_DRAIN_MESSAGES = 100


async def refuse_stream(
    request_iterator, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    """End a call whose client streams with `code`, once the client has stopped sending."""
    await until_the_client_stops_sending(request_iterator)
    await context.abort(code, message)


async def until_the_client_stops_sending(request_iterator) -> None:
    """Read and drop requests until the client half-closes or goes quiet (bounded)."""
    requests = aiter(request_iterator)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(MAX_DRAIN_SECONDS):
            for _ in range(MAX_DRAIN_MESSAGES):
                if not await another_request_arrives(requests):
                    return  # half-closed, or quiet: the client now waits for a reply


async def another_request_arrives(requests) -> bool:
    """True when a request arrives; False when the client half-closes, or sends nothing for
    QUIET_SECONDS counted in ticks of this process."""
    read = asyncio.ensure_future(anext(requests, None))
    try:
        for _ in range(round(QUIET_SECONDS / QUIET_TICK_SECONDS)):
            done, _ = await asyncio.wait({read}, timeout=QUIET_TICK_SECONDS)
            if done:
                return read.result() is not None
        return False
    finally:
        read.cancel()
