"""Keepalive (keepalive.py): a client that pings more often than the server permits is sent
away with GOAWAY `too_many_pings`, and its open calls fail; one within the permitted rate
keeps its calls, a health Watch held open included. Against a server process whose minimum
is short, so the test takes seconds rather than minutes."""

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import STEP_DIR, raw_channel, rpc_error
from keepalive import MAX_PING_STRIKES
from tools.processes import ServerProcess

PERMIT_SECONDS = 1.5  # the server's minimum between two of a client's pings, here
TOO_OFTEN_MS = 1000  # gRPC core does not ping more often than once a second
WITHIN_MS = 2200


def pinging(address: str, every_ms: int) -> grpc.aio.Channel:
    """A channel that pings every `every_ms` while a call is open, as many clients do."""
    return raw_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", every_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


async def open_watch(channel: grpc.aio.Channel):
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    reply = await call.read()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return call


async def test_a_client_pinging_too_often_is_sent_away_and_one_within_the_minimum_is_not():
    with ServerProcess(STEP_DIR, "--permit-keepalive-time", str(PERMIT_SECONDS)) as server:
        async with (
            pinging(server.address, WITHIN_MS) as within,
            pinging(server.address, TOO_OFTEN_MS) as too_often,
        ):
            kept = await open_watch(within)
            opened = time.monotonic()
            error = await rpc_error((await open_watch(too_often)).read())
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == "Too many pings"
            # The other client's Watch stays open while it pings more times than the server
            # forgives pings that come too soon: a window in which nothing may happen.
            window = (MAX_PING_STRIKES + 1) * WITHIN_MS / 1000 + 1
            left = opened + window - time.monotonic()
            ended, _ = await asyncio.wait({asyncio.ensure_future(kept.code())}, timeout=left)
            assert not ended, "the Watch of the client within the minimum ended"
            kept.cancel()
